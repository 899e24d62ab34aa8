"""The real ``vault-edge`` CLI against a real server process, as an operator types it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli

VALUE = "cli-value-9d81c6-never-logged"


@pytest.fixture
def vault(start_server: Any, sqlite_url: str) -> dict[str, Any]:
    """A real server, initialized (5 shares, threshold 3) and unsealed through the CLI."""
    server = start_server(sqlite_url)
    env = {"VAULT_EDGE_ADDR": server.addr}
    r = cli("init", "--output", "json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) >= {"shares", "root_token"} and len(doc["shares"]) == 5
    for i, share in enumerate(doc["shares"][:3], 1):
        r = cli("unseal", "-", env=env, input=(share + "\n").encode())
        assert r.returncode == 0, r.stderr
        assert ("Unsealed" if i == 3 else f"{i} of 3") in r.stdout.decode()
    env["VAULT_EDGE_TOKEN"] = doc["root_token"]
    return {"server": server, "env": env, "shares": doc["shares"]}


def test_readme_flow_init_unseal_region_put_get(vault: dict[str, Any]) -> None:
    env = vault["env"]
    st = json.loads(cli("status", "--output", "json", env=env).stdout)
    assert {k: st[k] for k in ("initialized", "sealed", "progress", "threshold")} == {
        "initialized": True,
        "sealed": False,
        "progress": 0,
        "threshold": 3,
    }
    assert cli("region", "create", "eu-west", env=env).returncode == 0
    r = cli("put", "openai/api-key", "-", "--regions", "eu-west", env=env, input=(VALUE + "\n").encode())
    assert r.returncode == 0, r.stderr
    r = cli("get", "openai/api-key", env=env)
    assert r.returncode == 0 and r.stdout == VALUE.encode()  # stdin's trailing newline dropped, none added
    doc = json.loads(cli("get", "openai/api-key", "--output", "json", env=env).stdout)
    assert {k: doc[k] for k in ("name", "value", "version", "stage")} == {
        "name": "openai/api-key",
        "value": VALUE,
        "version": 1,
        "stage": "current",
    }
    assert isinstance(doc["revision"], int)
    names = json.loads(cli("list", "--output", "json", env=env).stdout)["secrets"]
    assert [s["name"] for s in names] == ["openai/api-key"]
    # the server never logged the value
    assert VALUE not in vault["server"].log()


def test_binary_values_round_trip_through_from_file(vault: dict[str, Any], tmp_path: Path) -> None:
    env = vault["env"]
    cli("region", "create", "eu", env=env)
    blob = bytes(range(256)) * 4
    (tmp_path / "key.bin").write_bytes(blob)
    assert cli("put", "tls/key", "--from-file", str(tmp_path / "key.bin"), env=env).returncode == 0
    assert cli("get", "tls/key", env=env).stdout == blob


def test_errors_are_one_line_exit_1_and_usage_exit_2(vault: dict[str, Any]) -> None:
    env = vault["env"]
    r = cli("get", "no/such/secret", env=env)
    assert r.returncode == 1 and r.stdout == b""
    assert r.stderr.decode().count("\n") == 1 and r.stderr.startswith(b"error: ")
    assert b"Traceback" not in r.stderr
    r = cli("put", "bad name!", "x", env=env)
    assert r.returncode == 1 and b"invalid secret name" in r.stderr
    r = cli("get", env=env)
    assert r.returncode == 2
    r = cli("get", "x", "--version", "zero", env=env)
    assert r.returncode == 2
    r = cli("list", env={**env, "VAULT_EDGE_TOKEN": "vet_wrong"})
    assert r.returncode == 1 and b"invalid or revoked token" in r.stderr
    r = cli("status", env={"VAULT_EDGE_ADDR": "http://127.0.0.1:1"})
    assert r.returncode == 1 and b"cannot reach the control plane" in r.stderr
    assert r.stderr.decode().count("\n") == 1
    for addr in ("http://[::1", "ftp://127.0.0.1:8420", "127.0.0.1 8420"):
        r = cli("status", env={"VAULT_EDGE_ADDR": addr})
        assert r.returncode == 2 and b"not a control-plane address" in r.stderr, (addr, r.stderr)  # usage
        assert b"--addr / VAULT_EDGE_ADDR" in r.stderr and b"Traceback" not in r.stderr
    # a '.' or '..' segment would be collapsed into another name by the URL layer: refused before sending
    cli("region", "create", "eu", env=env)
    assert cli("put", "x/y", "kept", env=env).returncode == 0
    for name in ("x/./y", "x/z/../y", "./x/y"):
        r = cli("put", name, "overwritten", env=env)
        assert r.returncode == 1 and b"invalid secret name" in r.stderr, name
    assert cli("get", "x/y", env=env).stdout == b"kept"
    r = cli("rotate", "x/y", "rotated", "--wait", "--timeout", "soon", env=env)
    assert r.returncode == 2 and b"invalid duration" in r.stderr  # checked before anything is rotated
    assert cli("get", "x/y", env=env).stdout == b"kept"
    r = cli("token", "create", "--name", "eternal", "--prefix", "x/", "--verb", "read", "--ttl", "0s", env=env)
    assert r.returncode == 1 and b"ttl" in r.stderr


def test_unseal_refusals_through_the_cli(start_server: Any, sqlite_url: str) -> None:
    server = start_server(sqlite_url)
    env = {"VAULT_EDGE_ADDR": server.addr}
    shares = json.loads(cli("init", "--output", "json", env=env).stdout)["shares"]
    assert cli("unseal", "-", env=env, input=shares[0].encode()).returncode == 0
    r = cli("unseal", "-", env=env, input=shares[0].encode())
    assert r.returncode == 1 and b"duplicate share" in r.stderr
    r = cli("unseal", "-", env=env, input=b"not a share at all")
    assert r.returncode == 1 and b"not a valid share" in r.stderr
    st = json.loads(cli("status", "-o", "json", env=env).stdout)
    assert st["sealed"] is True and st["progress"] == 1


def test_unseal_sends_the_passphrase_only_with_the_final_share(start_server: Any, sqlite_url: str) -> None:
    """The control plane takes the passphrase only with the share that completes the unseal: the CLI
    asks for it (the next stdin line, when stdin is no terminal) or takes VAULT_EDGE_PASSPHRASE then
    only, and never sends it before."""
    import httpx

    server = start_server(sqlite_url)
    env = {"VAULT_EDGE_ADDR": server.addr}
    doc = httpx.post(server.addr + "/v1/sys/init", json={"shares": 3, "threshold": 2, "passphrase": "correct horse"})
    shares, token = doc.json()["shares"], doc.json()["root_token"]
    r = cli("unseal", "-", env=env, input=(shares[0] + "\n").encode())  # not the last: no passphrase asked
    assert r.returncode == 0 and b"1 of 2" in r.stdout and b"assphrase" not in r.stderr, r.stderr
    r = cli("unseal", "-", env=env, input=(shares[1] + "\n").encode())  # the last, and no passphrase to give
    assert r.returncode == 1 and b"passphrase" in r.stderr and b"correct horse" not in r.stderr
    assert json.loads(cli("status", "-o", "json", env=env).stdout)["progress"] == 1  # nothing lost
    r = cli("unseal", "-", env=env, input=(shares[1] + "\ncorrect horse\n").encode())
    assert r.returncode == 0 and b"Unsealed" in r.stdout, r.stderr

    env["VAULT_EDGE_TOKEN"] = token
    assert cli("seal", env=env).returncode == 0
    env["VAULT_EDGE_PASSPHRASE"] = "correct horse"  # set for every share: sent with the last one only
    r = cli("unseal", shares[2], env=env)
    assert r.returncode == 0 and b"1 of 2" in r.stdout, r.stderr
    r = cli("unseal", shares[0], env=env)
    assert r.returncode == 0 and b"Unsealed" in r.stdout, r.stderr
    assert "correct horse" not in server.log()


def test_unseal_with_groups_sends_the_passphrase_with_the_share_that_completes_them(
    start_server: Any, sqlite_url: str
) -> None:
    """With groups the share count can say "last" too early: the control plane refuses the passphrase
    then, changing nothing, and the CLI sends the share again without it."""
    import httpx

    server = start_server(sqlite_url)
    env = {"VAULT_EDGE_ADDR": server.addr, "VAULT_EDGE_PASSPHRASE": "correct horse"}
    doc = httpx.post(
        server.addr + "/v1/sys/init",
        json={
            "groups": [{"threshold": 2, "shares": 3}, {"threshold": 2, "shares": 3}],
            "group_threshold": 2,
            "passphrase": "correct horse",
        },
    ).json()
    for share, shown in zip(doc["shares"][:5], [b"1 of 4", b"2 of 4", b"3 of 4", b"4 of 4", b"Unsealed"], strict=True):
        r = cli("unseal", share, env=env)  # group 1 whole (one share more than needed), then group 2
        assert r.returncode == 0 and shown in r.stdout, (shown, r.stdout, r.stderr)


def test_rotate_history_rollback_delete(vault: dict[str, Any]) -> None:
    env = vault["env"]
    cli("region", "create", "eu", env=env)
    cli("put", "svc/token", "one", env=env)
    r = cli("rotate", "svc/token", "two", "--output", "json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == 2
    assert cli("get", "svc/token", "--stage", "previous", env=env).stdout == b"one"
    assert cli("rollback", "svc/token", "--to", "1", env=env).returncode == 0
    assert cli("get", "svc/token", env=env).stdout == b"one"
    hist = json.loads(cli("history", "svc/token", "-o", "json", env=env).stdout)
    assert [v["origin"] for v in hist["versions"]] == ["put", "rotate", "rollback:1"]
    r = cli("rotate", "svc/token", "--generate", "40:hex", "-o", "json", env=env)
    assert r.returncode == 0
    gen = cli("get", "svc/token", env=env).stdout
    assert len(gen) == 40 and all(c in b"0123456789abcdef" for c in gen)
    assert cli("delete", "svc/token", env=env).returncode == 0
    assert cli("get", "svc/token", env=env).returncode == 1
    assert cli("delete", "svc/token", "--destroy", env=env).returncode == 0
    audit = json.loads(cli("audit", "-o", "json", "--limit", "1000", env=env).stdout)["entries"]
    assert "secret.destroy" in [e["action"] for e in audit]
    assert all("one" not in e["detail"] for e in audit)
    assert cli("audit", "verify", env=env).returncode == 0


def test_scoped_tokens_limit_prefixes_and_verbs(vault: dict[str, Any]) -> None:
    env = vault["env"]
    cli("region", "create", "eu", env=env)
    cli("put", "team-a/db", "a-secret", env=env)
    cli("put", "team-b/db", "b-secret", env=env)
    r = cli(
        "token",
        "create",
        "--name",
        "ci-a",
        "--prefix",
        "team-a/",
        "--verb",
        "read",
        "--verb",
        "list",
        "-o",
        "json",
        env=env,
    )
    scoped = {**env, "VAULT_EDGE_TOKEN": json.loads(r.stdout)["token"]}
    assert cli("get", "team-a/db", env=scoped).stdout == b"a-secret"
    r = cli("get", "team-b/db", env=scoped)
    assert r.returncode == 1 and b"may not read" in r.stderr
    r = cli("put", "team-a/db", "x", env=scoped)
    assert r.returncode == 1 and b"may not write" in r.stderr
    listed = json.loads(cli("list", "-o", "json", env=scoped).stdout)["secrets"]
    assert [s["name"] for s in listed] == ["team-a/db"]


def test_server_dev_mode_initializes_and_unseals_itself(start_server: Any, tmp_path: Path) -> None:
    server = start_server(str(tmp_path / "dev.db"), "--dev", "--dev-token", "vet_devtoken")
    env = {"VAULT_EDGE_ADDR": server.addr, "VAULT_EDGE_TOKEN": "vet_devtoken"}
    import time

    for _ in range(100):
        st = json.loads(cli("status", "-o", "json", env=env).stdout)
        if not st["sealed"]:
            break
        time.sleep(0.1)
    assert st["initialized"] and not st["sealed"]
    assert cli("region", "create", "eu", env=env).returncode == 0
    assert "WARNING: dev mode" in server.log() and "Unseal share" in server.log()
