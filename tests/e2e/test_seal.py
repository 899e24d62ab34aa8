"""The PKCS#11 seal, recovery shares and backup/restore with real processes: SoftHSM2 (tests/softhsm.py),
`vault-edge server`, the CLI and a node agent."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, cli
from tests.e2e.conftest import AgentProcess, wait_until
from tests.softhsm import SoftHsm, softhsm  # noqa: F401 (the fixture)
from vault_edge.operator import ClientError, OperatorClient

pytestmark = pytest.mark.e2e
LABEL = "vault-edge-seal"


def _server(
    workdir: Path,
    db: str,
    hsm: SoftHsm | None,
    slot: int | None = None,
    port: int | None = None,
    name: str = "server",
    **kw: Any,
) -> ServerProcess:
    extra = hsm.args(slot, **kw) if hsm is not None and slot is not None else []
    return ServerProcess(db, workdir / f"{name}.log", port, extra, env=hsm.env if hsm else None).start()


def _init(addr: str) -> tuple[list[str], str]:
    with OperatorClient(addr, "") as c:
        doc = c.init(shares=3, threshold=2)
    return doc["shares"], doc["root_token"]


def _status(addr: str) -> dict[str, Any]:
    with OperatorClient(addr, "") as c:
        return c.status()


def test_pkcs11_server_restarts_unattended_under_a_writer_loop(tmp_path: Path, softhsm: SoftHsm) -> None:  # noqa: F811
    slot = softhsm.init_token("vault")
    db = str(tmp_path / "vault.db")
    server = _server(tmp_path, db, softhsm, slot, generate=True)
    _, token = _init(server.addr)
    assert _status(server.addr)["sealed"] is False  # unsealed by the HSM, no share entered
    port, addr = server.port, server.addr
    op = OperatorClient(addr, token)
    op.create_region("eu")
    op.put("app/key", value="v0", regions=["eu"])
    stop, written = threading.Event(), [0]

    def writer() -> None:
        with OperatorClient(addr, token, timeout=2) as c:
            while not stop.is_set():
                try:
                    c.put("app/key", value=f"w{written[0]}")
                    written[0] += 1
                except ClientError:
                    time.sleep(0.02)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    times = []
    reader = httpx.Client(base_url=addr, headers={"Authorization": f"Bearer {token}"}, timeout=2)

    def read_ok() -> bool:
        try:
            return reader.get("/v1/secrets/app/key").status_code == 200
        except httpx.TransportError:
            return False

    try:
        for _ in range(10):
            time.sleep(0.3)
            server.stop(9)
            t0 = time.monotonic()
            server = _server(tmp_path, db, softhsm, slot, port=port)
            wait_until(read_ok, 30, "a read after the restart")
            times.append(time.monotonic() - t0)
    finally:
        stop.set()
        thread.join(10)
        reader.close()
    try:
        assert written[0] > 10
        unseals, after = [], 0
        while page := op.audit(after=after, limit=1000)["entries"]:
            unseals += [e for e in page if e["action"] == "sys.unseal"]
            after = page[-1]["seq"]
        assert len(unseals) == 11 and {e["actor"] for e in unseals} == {"system"}  # the HSM's each time, no share
        print(
            f"\nPKCS#11 auto-unseal: start → first 200, median {statistics.median(times) * 1000:.0f} ms, "
            f"max {max(times) * 1000:.0f} ms over 10 SIGKILL restarts ({written[0]} writes)"
        )
        assert op.audit_verify()["ok"] is True
    finally:  # the server is stopped whatever failed (a process left running fails the next test)
        op.close()
        server.stop()


@pytest.fixture
def hsm_vault(tmp_path: Path, softhsm: SoftHsm) -> Any:  # noqa: F811
    slot = softhsm.init_token("vault")
    db = str(tmp_path / "vault.db")
    server = _server(tmp_path, db, softhsm, slot, generate=True)
    shares, token = _init(server.addr)
    with OperatorClient(server.addr, token) as op:
        op.create_region("eu")
        op.put("app/key", value="kept", regions=["eu"])
    server.stop()
    return db, slot, shares, token


@pytest.mark.parametrize("fault", ["wrong pin", "missing key label", "different token"])
def test_a_bad_hsm_leaves_it_sealed_with_a_clear_error(
    tmp_path: Path,
    softhsm: SoftHsm,  # noqa: F811
    hsm_vault: Any,
    fault: str,
) -> None:
    db, slot, shares, token = hsm_vault
    label = LABEL
    if fault == "wrong pin":
        softhsm.pin_file.write_text("0000-wrong\n")
    elif fault == "missing key label":
        label = "no-such-key"
    else:
        slot = softhsm.init_token("other")
        server = _server(tmp_path, db, softhsm, slot, name="keygen", generate=True)  # same label, other key
        server.stop()
    server = _server(tmp_path, db, softhsm, slot, name=fault.replace(" ", "-"), label=label)
    status = _status(server.addr)
    assert status["sealed"] is True
    want = {
        "wrong pin": "refused the PIN",
        "missing key label": "no AES key labelled 'no-such-key'",
        "different token": "does not open this vault's wrapped root key",
    }[fault]
    assert want in status["seal_error"], status["seal_error"]
    assert want in server.log() and "4711" not in server.log()
    with OperatorClient(server.addr, "") as c:  # the recovery shares still unseal it
        for s in shares[:2]:
            c.unseal(s)
    with OperatorClient(server.addr, token) as op:
        assert op.get("app/key")["value"] == "kept"
    server.stop()


def test_recovery_shares_generate_root_and_seal_migrates_both_ways(
    tmp_path: Path,
    softhsm: SoftHsm,  # noqa: F811
    hsm_vault: Any,
) -> None:
    db, slot, shares, token = hsm_vault
    server = _server(tmp_path, db, softhsm, slot)
    env = {"VAULT_EDGE_ADDR": server.addr, "VAULT_EDGE_TOKEN": ""}
    r = cli("operator", "generate-root", "-o", "json", env=env, input="\n".join(shares[:2]).encode())
    assert r.returncode == 0, r.stderr
    import json

    new_token = json.loads(r.stdout)["root_token"]
    with OperatorClient(server.addr, new_token) as op:
        assert op.get("app/key")["value"] == "kept"
    r = cli("operator", "generate-root", env=env, input=shares[0].encode())
    assert r.returncode == 1 and b"not enough shares" in r.stderr and len(r.stderr.splitlines()) == 1
    # PKCS#11 → Shamir: the next start needs the shares
    r = cli("operator", "seal-migrate", "--to", "shamir", env=env, input="\n".join(shares[:2]).encode())
    assert r.returncode == 0, r.stderr
    server.stop()
    server = _server(tmp_path, db, None, name="shamir")
    assert _status(server.addr)["sealed"] is True and _status(server.addr)["seal"] == "shamir"
    with OperatorClient(server.addr, "") as c:
        for s in shares[:2]:
            c.unseal(s)
    with OperatorClient(server.addr, token) as op:
        assert op.get("app/key")["value"] == "kept"
        op.put("app/two", value="second", regions=["eu"])
    server.stop()
    # Shamir → PKCS#11: sealed at start, migrated with the shares, then starts unseal themselves
    server = _server(tmp_path, db, softhsm, slot, name="back")
    status = _status(server.addr)
    assert status["sealed"] is True and "seal-migrate" in status["seal_error"]
    env["VAULT_EDGE_ADDR"] = server.addr
    r = cli("operator", "seal-migrate", "--to", "pkcs11", env=env, input="\n".join(shares[1:]).encode())
    assert r.returncode == 0, r.stderr
    server.stop()
    server = _server(tmp_path, db, softhsm, slot, name="auto")
    assert _status(server.addr)["sealed"] is False
    with OperatorClient(server.addr, token) as op:
        assert op.get("app/key")["value"] == "kept" and op.get("app/two")["value"] == "second"
        assert op.audit_verify()["ok"] is True
    server.stop()


@pytest.mark.parametrize("target", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_backup_restore_keeps_an_enrolled_agent_syncing(
    tmp_path: Path, target: str, request: pytest.FixtureRequest
) -> None:
    db = str(tmp_path / "vault.db")
    server = ServerProcess(db, tmp_path / "server.log").start()
    shares, token = _init(server.addr)
    with OperatorClient(server.addr, "") as c:
        for s in shares[:2]:
            c.unseal(s)
    op = OperatorClient(server.addr, token)
    op.create_region("eu")
    op.put("app/a", value="plain-a1-7f3c9e", regions=["eu"])
    op.put("app/b", value="b1", regions=["eu"])
    agent = AgentProcess(tmp_path, "pop", server.addr, str(op.join_token("eu")["token"])).start()
    env = {"VAULT_EDGE_ADDR": server.addr, "VAULT_EDGE_TOKEN": token}
    backup_file = tmp_path / "vault.backup"
    r = cli("backup", str(backup_file), env=env)
    assert r.returncode == 0, r.stderr
    assert backup_file.stat().st_mode & 0o777 == 0o600 and b"plain-a1-7f3c9e" not in backup_file.read_bytes()
    op.put("app/b", value="b2")  # after the backup: the agent has it, the backup does not
    wait_until(lambda: agent.get("app/b") == "b2", 15, "b2 at the agent")
    want = {e["seq"]: e for e in op.audit(0, 1000)["entries"]}
    server.stop()
    new_db = str(tmp_path / "restored.db") if target == "sqlite" else request.getfixturevalue("fresh_pg")()
    r = cli("restore", str(backup_file), "--db", new_db, "--shares-file", "-", input="\n".join(shares[:2]).encode())
    assert r.returncode == 0, r.stderr
    restored = ServerProcess(new_db, tmp_path / "restored.log", port=server.port).start()
    with OperatorClient(restored.addr, "") as c:
        for s in shares[:2]:
            c.unseal(s)
    assert op.get("app/a")["value"] == "plain-a1-7f3c9e" and op.get("app/b")["value"] == "b1"
    assert op.audit_verify()["ok"] is True
    got = {e["seq"]: e for e in op.audit(0, 1000)["entries"]}
    in_backup = min(s for s, e in want.items() if e["action"] == "sys.backup")  # recorded after the snapshot
    assert all(got[s] == want[s] for s in range(1, in_backup))  # every audit entry of the backup, unchanged
    assert [n["id"] for n in op.nodes()["nodes"]] == [agent.node_id]
    op.put("app/c", value="c1", regions=["eu"])  # the agent syncs on against the restored control plane
    wait_until(lambda: agent.get("app/c") == "c1", 20, "c1 at the agent after the restore")
    assert agent.get("app/b") == "b2"  # what it held newer than the backup it keeps (never backwards)
    assert agent.health()["status"] == "ok"
    bad = tmp_path / "cut.backup"
    bad.write_bytes(backup_file.read_bytes()[:-7])
    r = cli(
        "restore",
        str(bad),
        "--db",
        str(tmp_path / "cut.db"),
        "--shares-file",
        "-",
        input="\n".join(shares[:2]).encode(),
    )
    assert r.returncode == 1 and b"truncated" in r.stderr
    agent.stop()
    op.close()
    restored.stop()
