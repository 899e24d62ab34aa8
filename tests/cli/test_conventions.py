"""The CLI's conventions (issue 13, Vault's where they exist), against a real server process:
status exit codes, usage errors, the global --output and VAULT_EDGE_FORMAT, --addr and --ca-cert,
login and token lookup, whole IDs in piped tables, audit --follow, truthful TLS errors, completion."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import queue
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli, free_port, stop_process, vault_edge_cmd


@pytest.fixture
def vault(start_server: Any, sqlite_url: str, tmp_path: Path) -> dict[str, Any]:
    server = start_server(sqlite_url)
    # no token in the environment unless a test puts one: login's file is per test
    env = {
        "VAULT_EDGE_ADDR": server.addr,
        "VAULT_EDGE_TOKEN": "",
        "VAULT_EDGE_TOKEN_FILE": str(tmp_path / "tok"),
        "VAULT_EDGE_FORMAT": "",
    }
    r = cli("status", env=env)
    assert r.returncode == 2, r.stderr  # not initialized: sealed
    doc = json.loads(cli("init", "--shares", "1", "--threshold", "1", "-o", "json", env=env).stdout)
    r = cli("status", "-o", "json", env=env)
    assert r.returncode == 2 and json.loads(r.stdout)["sealed"] is True  # the document, and exit 2
    assert cli("unseal", doc["shares"][0], env=env).returncode == 0
    r = cli("status", env=env)
    assert r.returncode == 0 and b"sealed" in r.stdout
    return {"server": server, "env": env, "token": doc["root_token"], "tmp": tmp_path}


def test_login_stores_the_token_and_later_verbs_use_it(vault: dict[str, Any]) -> None:
    env, token_file = vault["env"], vault["tmp"] / "tok"
    r = cli("region", "list", env=env)
    assert r.returncode == 1 and r.stderr.startswith(b"error: missing token: run `vault-edge login`")  # none yet
    r = cli("login", "vet_not-a-token", env=env)
    assert r.returncode == 1 and not token_file.exists()  # a refused token is never stored
    r = cli("login", "-", env=env, input=(vault["token"] + "\n").encode())
    assert r.returncode == 0 and b"Logged in as" in r.stdout and vault["token"].encode() not in r.stdout, r.stderr
    assert oct(token_file.stat().st_mode & 0o777) == "0o600" and token_file.read_text().strip() == vault["token"]
    assert cli("region", "create", "eu", env=env).returncode == 0
    for group in ("egress", "rotator"):  # every verb group takes the stored token, and --addr
        r = cli(group, "list", "-o", "json", env=env)
        assert r.returncode == 0, (group, r.stderr)
        r = cli("--addr", "http://127.0.0.1:1", group, "list", env=env)
        assert r.returncode == 1 and b"http://127.0.0.1:1" in r.stderr, (group, r.stderr)
    doc = json.loads(cli("token", "lookup", "-o", "json", env=env).stdout)
    assert doc["name"] == "root" and "admin" in doc["verbs"] and doc["expires_at"] is None
    # VAULT_EDGE_TOKEN still wins over the file
    r = cli("token", "lookup", env={**env, "VAULT_EDGE_TOKEN": "vet_wrong"})
    assert r.returncode == 1 and b"invalid or revoked token" in r.stderr


def test_global_output_format_env_and_usage_errors(vault: dict[str, Any]) -> None:
    env = {**vault["env"], "VAULT_EDGE_TOKEN": vault["token"]}
    assert cli("region", "create", "eu", env=env).returncode == 0
    for args, extra in ((["-o", "json", "region", "list"], {}), (["region", "list"], {"VAULT_EDGE_FORMAT": "json"})):
        r = cli(*args, env={**env, **extra})
        assert r.returncode == 0 and json.loads(r.stdout)["regions"][0]["name"] == "eu", (args, r.stderr)
    r = cli("region", "list", "-o", "table", env={**env, "VAULT_EDGE_FORMAT": "json"})  # the verb's flag wins
    assert r.returncode == 0 and not r.stdout.startswith(b"{")
    # usage errors: exit 2, before anything is sent
    assert cli("region", "list", env={**env, "VAULT_EDGE_FORMAT": "yaml"}).returncode == 2
    assert cli("put", "a/b", "v", "--from-file", "/etc/hostname", env=env).returncode == 2
    assert cli("put", "a/b", "--generate", "8:hex", "v", env=env).returncode == 2
    assert cli("put", "a/b", env=env, input=b"").returncode == 2
    assert cli("init", "--group", "two-of-three", env=env).returncode == 2
    assert cli("no-such-verb", env=env).returncode == 2
    assert cli("--ca-cert", "/nonexistent.pem", "status", env=env).returncode == 2
    # durations the control plane takes as text are checked here too: a typo is a usage error
    for args in (
        ["put", "a/b", "--generate", "8:hex", "--rotate-every", "1q"],
        ["put", "a/b", "v", "--grace", "1y"],
        ["rotate", "a/b", "v", "--grace", "soon"],
        ["node", "token", "--region", "eu", "--ttl", "-1"],
        ["token", "create", "--name", "t", "--verb", "read", "--ttl", "1 h"],
    ):
        r = cli(*args, env=env)
        assert r.returncode == 2 and b"invalid duration" in r.stderr, (args, r.stderr)
    assert json.loads(cli("list", "-o", "json", env=env).stdout)["secrets"] == []  # nothing was stored
    # --addr wins over VAULT_EDGE_ADDR
    r = cli("--addr", vault["server"].addr, "status", env={**env, "VAULT_EDGE_ADDR": "http://127.0.0.1:1"})
    assert r.returncode == 0, r.stderr
    r = cli("--addr", "http://127.0.0.1:1", "status", env=env)
    assert r.returncode == 1 and b"127.0.0.1:1" in r.stderr


def test_node_token_prints_only_the_token_and_hints_at_the_join_token_file(vault: dict[str, Any]) -> None:
    env = {**vault["env"], "VAULT_EDGE_TOKEN": vault["token"]}
    assert cli("region", "create", "eu", env=env).returncode == 0
    r = cli("node", "token", "--region", "eu", "--ttl", "10m", env=env)
    assert r.returncode == 0 and r.stdout.decode().count("\n") == 1 and r.stdout.startswith(b"vej1.")
    hint = r.stderr.decode()
    assert hint.count("\n") == 1 and "vault-edge agent run --join-token-file FILE" in hint, (
        hint
    )  # one line: pastes whole
    assert r.stdout.strip().decode() not in hint


def test_piped_tables_keep_whole_ids(vault: dict[str, Any]) -> None:
    env = {**vault["env"], "VAULT_EDGE_TOKEN": vault["token"], "COLUMNS": "40"}
    name = "a-rather-long-token-name-for-a-narrow-terminal-" + "x" * 40
    made = json.loads(cli("token", "create", "--name", name, "--verb", "read", "-o", "json", env=env).stdout)
    r = cli("token", "list", env=env)
    assert r.returncode == 0
    rows = [line for line in r.stdout.decode().splitlines() if made["id"] in line]
    assert len(rows) == 1 and name in rows[0]  # whole, on one line, however narrow COLUMNS says


def test_audit_follow_prints_new_entries_as_json_lines(vault: dict[str, Any]) -> None:
    env = {**os.environ, **vault["env"], "VAULT_EDGE_TOKEN": vault["token"]}
    lines: queue.Queue[bytes] = queue.Queue()
    with subprocess.Popen(
        [*vault_edge_cmd(), "audit", "--follow", "-o", "json", "--limit", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as proc:
        assert proc.stdout is not None
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
        try:
            first = json.loads(lines.get(timeout=15))  # the last entry so far
            assert first["action"] == "sys.unseal"
            op_env = {**vault["env"], "VAULT_EDGE_TOKEN": vault["token"]}
            assert cli("region", "create", "eu", env=op_env).returncode == 0
            new = json.loads(lines.get(timeout=15))
            assert new["action"] == "region.create" and new["target"] == "eu" and new["seq"] == first["seq"] + 1
        finally:
            proc.terminate()


def test_help_documents_the_environment_and_completion() -> None:
    r = cli("--help")
    assert r.returncode == 0
    for var in (
        "VAULT_EDGE_ADDR",
        "VAULT_EDGE_CACERT",
        "VAULT_EDGE_TOKEN",
        "VAULT_EDGE_TOKEN_FILE",
        "VAULT_EDGE_FORMAT",
        "VAULT_EDGE_SOCKET",
        "VAULT_EDGE_PASSPHRASE",
        "_VAULT_EDGE_COMPLETE",
    ):
        assert var in r.stdout.decode(), var
    r = cli(env={"_VAULT_EDGE_COMPLETE": "bash_source"})
    assert r.returncode == 0 and b"complete " in r.stdout and b"_VAULT_EDGE_COMPLETE" in r.stdout


def test_every_environment_variable_is_in_the_help_and_the_readme() -> None:
    """Each VAULT_EDGE_* the code reads (a literal in vault_edge/, or a field of the server's Settings)
    is named in `vault-edge --help`, `server --help` or `agent run --help`, and in the README."""
    from tests.conftest import ROOT
    from vault_edge.server.settings import Settings

    read = {
        m
        for f in (ROOT / "vault_edge").rglob("*.py")
        for m in re.findall(r"_?VAULT_EDGE_[A-Z0-9_]*[A-Z0-9]", f.read_text())
    }
    read |= {f"VAULT_EDGE_{name.upper()}" for name in Settings.model_fields}
    assert len(read) > 40 and "VAULT_EDGE_MIN_ROTATE_EVERY_S" in read and "VAULT_EDGE_SOCKET" in read
    helps = ""
    for args in (["--help"], ["server", "--help"], ["agent", "run", "--help"]):
        r = cli(*args, env={"COLUMNS": "200"})
        assert r.returncode == 0, r.stderr
        helps += r.stdout.decode()
    readme = (ROOT / "README.md").read_text()
    assert sorted(v for v in read if not re.search(rf"\b{v}\b", helps)) == []
    assert sorted(v for v in read if not re.search(rf"\b{v}\b", readme)) == []


def _self_signed(tmp: Path, expired: bool = False) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vault-edge test")])
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30 if expired else 0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    tag = "-expired" if expired else ""
    cert_path, key_path = tmp / f"cert{tag}.pem", tmp / f"key{tag}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _tls_server(db: str, cert: Path, key: Path, log: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    cmd = [*vault_edge_cmd(), "server", "--db", db, "--port", str(port), "--tls-cert", str(cert), "--tls-key", str(key)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    return f"https://127.0.0.1:{port}", proc


def _wait_tls(addr: str, cert: Path | None, proc: subprocess.Popen[bytes]) -> None:
    import ssl
    import time

    import httpx

    ctx = ssl.create_default_context(cafile=str(cert)) if cert else ssl._create_unverified_context()
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the TLS server did not start"
        try:
            httpx.get(addr + "/v1/sys/status", verify=ctx, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)


def test_a_tls_failure_names_the_certificate_problem_and_the_ca_option(sqlite_url: str, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    addr, proc = _tls_server(sqlite_url, cert, key, tmp_path / "server.log")
    try:
        _wait_tls(addr, cert, proc)
        env = {"VAULT_EDGE_ADDR": addr, "VAULT_EDGE_CACERT": "", "SSL_CERT_FILE": ""}
        r = cli("status", env=env)
        assert r.returncode == 1 and r.stderr.decode().count("\n") == 1, r.stderr
        assert b"certificate verify failed: self-signed certificate;" in r.stderr
        assert b"--ca-cert" in r.stderr and b"VAULT_EDGE_CACERT" in r.stderr
        r = cli("--ca-cert", str(cert), "status", env=env)
        assert r.returncode == 2, r.stderr  # reached it: not initialized, so sealed
        r = cli("status", env={**env, "VAULT_EDGE_CACERT": str(cert)})
        assert r.returncode == 2, r.stderr
    finally:
        stop_process(proc)


def test_tls_errors_say_what_would_fix_them(start_server: Any, tmp_path: Path) -> None:
    """A CA only helps when the chain is the problem: a wrong name, an expired certificate, or no TLS
    at either end each say what is wrong instead."""
    cert, key = _self_signed(tmp_path)
    old_cert, old_key = _self_signed(tmp_path, expired=True)
    addr, proc = _tls_server(str(tmp_path / "a.db"), cert, key, tmp_path / "a.log")
    old_addr, old_proc = _tls_server(str(tmp_path / "b.db"), old_cert, old_key, tmp_path / "b.log")
    try:
        plain = start_server(str(tmp_path / "c.db"))
        _wait_tls(addr, cert, proc)
        _wait_tls(old_addr, None, old_proc)
        env = {"VAULT_EDGE_ADDR": "", "VAULT_EDGE_CACERT": "", "SSL_CERT_FILE": ""}

        def one_line(*args: str) -> str:
            r = cli(*args, env=env)
            assert r.returncode == 1 and r.stderr.decode().count("\n") == 1, r.stderr
            return r.stderr.decode()

        port = addr.rsplit(":", 1)[1]
        msg = one_line("--addr", f"https://localhost:{port}", "--ca-cert", str(cert), "status")
        assert "Hostname mismatch" in msg and "'localhost';" in msg and "--addr" in msg and "--ca-cert" not in msg
        msg = one_line("--addr", old_addr, "--ca-cert", str(old_cert), "status")
        assert "certificate has expired" in msg and "renew or replace" in msg and "vouch" not in msg
        msg = one_line("--addr", plain.addr.replace("http://", "https://"), "status")
        assert "WRONG_VERSION_NUMBER" in msg and f"is it {plain.addr}?" in msg and "--ca-cert" not in msg
        msg = one_line("--addr", addr.replace("https://", "http://"), "status")
        assert "hung up without an answer" in msg and f"does it serve https ({addr})?" in msg
    finally:
        stop_process(proc)
        stop_process(old_proc)


def test_a_postgresql_url_without_its_driver_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None; "  # as if vault-edge[postgres] were not installed
        "sys.argv = ['vault-edge', 'server', '--db', 'postgresql://u:pw@127.0.0.1:1/x', '--port', '0']; "
        "from vault_edge.cli.entry import main; main()"
    )
    r = subprocess.run([*vault_edge_cmd()[:1], "-c", code], capture_output=True, timeout=60)
    assert r.returncode == 1 and r.stderr.decode().splitlines()[-1] == (
        "error: the PostgreSQL driver is not installed: pip install 'vault-edge[postgres]'"
    ), r.stderr
    assert b"pw" not in r.stderr


def test_make_dev_installs_the_postgresql_driver() -> None:
    """The README's PostgreSQL line works after `make dev`: its install takes the postgres extra."""
    from tests.conftest import ROOT

    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^\$\(VENV\)/\.installed:.*?\n((?:\t.*\n)+)", makefile, re.M)
    assert rule and "pip install" in rule.group(1) and ".[postgres]" in rule.group(1), makefile


def test_the_start_up_line_hides_the_database_password(start_server: Any, pg_url: str) -> None:
    """On PostgreSQL (trust auth: the passwords are never asked for), in the userinfo and as libpq's
    query parameter alike; the line still names the database, the seal state and the address."""
    url = pg_url.replace("://postgres@", "://postgres:pw-in-userinfo-7f3a@") + "?password=pw-in-query-91c2"
    server = start_server(url, env={"VAULT_EDGE_LOG_FORMAT": "json"})
    lines = [json.loads(x)["msg"] for x in server.log().splitlines() if x.strip()]
    start = [m for m in lines if "control plane on" in m]
    assert len(start) == 1, lines
    db_name = pg_url.rsplit("/", 1)[1]
    assert (
        f"on {server.addr}; database postgresql+psycopg://postgres:***@127.0.0.1:5432/{db_name}?password=***;"
        in (start[0])
    )
    assert "seal shamir, sealed" in start[0]
    assert "pw-in-userinfo" not in server.log() and "pw-in-query" not in server.log()


def test_offline_database_verbs_say_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    """`migrate` and `restore` open databases themselves: an unreachable one is one line, no traceback
    and no password."""
    down = "postgresql://u:pw-never-shown@127.0.0.1:1/x"
    for args in (
        ["migrate", "--from", down, "--to", str(tmp_path / "a.db")],
        ["migrate", "--from", str(tmp_path / "b.db"), "--to", down],
    ):
        r = cli(*args)
        err = r.stderr.decode()
        assert r.returncode == 1 and err.count("\n") == 1 and err.startswith("error: cannot open the database:"), err
        assert "Connection refused" in err and "pw-never-shown" not in err
    r = cli("migrate", "--from", "mysql://u:pw@h/x", "--to", str(tmp_path / "c.db"))
    assert r.returncode == 1 and r.stderr == b"error: unsupported database 'mysql': use sqlite or postgresql+psycopg\n"


def test_agent_run_metrics_and_log_options_are_checked_as_usage() -> None:
    env = {"VAULT_EDGE_SOCKET": "", "VAULT_EDGE_ADDR": ""}
    base = ["agent", "run", "--state-dir", "/nonexistent/s", "--socket", "/nonexistent/a.sock"]
    for bad in (["--metrics-addr", "localhost:http"], ["--metrics-addr", "70000"], ["--log-format", "xml"]):
        r = cli(*base, *bad, env=env)
        assert r.returncode == 2, (bad, r.stderr)
    r = cli(*base, env={**env, "VAULT_EDGE_LOG_FORMAT": "xml"})
    assert r.returncode == 2 and b"--log-format" in r.stderr
    r = cli("agent", "run", "--help")
    for option in ("--metrics-addr", "--metrics-token", "--log-format", "VAULT_EDGE_METRICS_TOKEN", "SIGHUP"):
        assert option.encode() in r.stdout, option


def test_a_supervised_command_takes_fields_of_structured_values() -> None:
    """``agent exec --restart-on-change --env PW=db/main#password``: one round trip, the field's value."""
    from types import SimpleNamespace

    from vault_edge.cli.supervise import read_env

    asked: list[list[str]] = []

    class Client:
        def get_many(self, names: list[str]) -> dict[str, Any]:
            asked.append(names)
            return {
                "db/main": SimpleNamespace(bytes=b'{"user": "app_a", "password": "pw-1"}', version=3, revision=9),
                "api/key": SimpleNamespace(bytes=b"sk-1", version=1, revision=9),
            }

    env, versions, revision = read_env(Client(), {"PW": "db/main#password", "U": "db/main#user", "K": "api/key"})  # type: ignore[arg-type]
    assert env == {"PW": "pw-1", "U": "app_a", "K": "sk-1"} and asked == [["api/key", "db/main"]]
    assert versions == {"db/main": 3, "api/key": 1} and revision == 9
