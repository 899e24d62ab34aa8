"""Shared fixtures: databases (SQLite and PostgreSQL), an app client, real server processes.

PostgreSQL: 127.0.0.1:5432, trust auth (override with VAULT_EDGE_TEST_PG, a server URL without a
database). Each test run makes its own template database, each test its own database copied from
it, and drops them afterwards, so runs never see each other's rows. With CI=true a missing
PostgreSQL fails the run; elsewhere its tests are skipped with a reason.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

PG_SERVER = os.environ.get("VAULT_EDGE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
RUN_ID = secrets.token_hex(4)
ROOT = Path(__file__).resolve().parent.parent


def _pg_admin() -> Any:
    import psycopg

    url = PG_SERVER.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    return psycopg.connect(url, autocommit=True, connect_timeout=3)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated template database for this run; dropped at the end."""
    try:
        admin = _pg_admin()
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required under CI=true and is not reachable at {PG_SERVER}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_SERVER}: {exc}")
    name = f"ve_{RUN_ID}_tpl"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        from vault_edge.server.storage.engine import make_engine, migrate

        engine = make_engine(f"{PG_SERVER}/{name}")
        migrate(engine)
        engine.dispose()
        try:
            yield name
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    template = request.getfixturevalue("pg_template")
    name = f"ve_{RUN_ID}_{secrets.token_hex(4)}"
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        try:
            yield f"{PG_SERVER}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fresh_pg(request: pytest.FixtureRequest) -> Any:
    """fresh_pg() → the URL of a new, empty PostgreSQL database (dropped at teardown)."""
    request.getfixturevalue("pg_template")  # skips (or fails under CI) without PostgreSQL
    made: list[str] = []

    def make() -> str:
        name = f"ve_{RUN_ID}_{secrets.token_hex(4)}"
        with _pg_admin() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{PG_SERVER}/{name}"

    yield make
    with _pg_admin() as admin:
        for name in made:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every storage-touching test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "vault.db")
    return request.getfixturevalue("pg_url")  # type: ignore[no-any-return]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return str(tmp_path / "vault.db")


# -- in-process app ----------------------------------------------------------------------------
class Api:
    """A TestClient with the token set, returning (status, json)."""

    def __init__(self, client: Any, token: str | None = None) -> None:
        self.client, self.token = client, token

    def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = kw.pop("headers", {})
        if self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        r = self.client.request(method, path, headers=headers, **kw)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text


@pytest.fixture
def make_app(db_url: str) -> Iterator[Any]:
    """make_app(**settings) → (TestClient, app), against ``db_url``; closed at teardown."""
    from fastapi.testclient import TestClient

    from vault_edge.server.app import create_app
    from vault_edge.server.settings import Settings

    opened: list[Any] = []

    def make(**settings: Any) -> tuple[Any, Any]:
        app = create_app(Settings(db=db_url, **settings))
        client = TestClient(app)
        client.__enter__()
        opened.append(client)
        return client, app

    yield make
    for c in opened:
        c.__exit__(None, None, None)
        c.app.state.ctx.store.dispose()


def signed_headers(
    pair: Any, method: str, target: str, node: str, body: bytes, timestamp: int | str | None = None
) -> dict[str, str]:
    """The headers of a node-signed request (``pair``: a signing.KeyPair), as the agent makes them."""
    from vault_edge import wire
    from vault_edge.crypto import signing

    ts = int(time.time()) if timestamp is None else timestamp
    nonce = wire.b64e(secrets.token_bytes(wire.NONCE_BYTES))
    try:
        ts_int = int(ts)
    except ValueError:
        ts_int = 0
    sig = signing.sign(pair.signer(), wire.request_message(method, target, node, ts_int, nonce, body))
    return {wire.H_NODE: node, wire.H_TIMESTAMP: str(ts), wire.H_NONCE: nonce, wire.H_SIGNATURE: wire.b64e(sig)}


def server_key(api: Api) -> bytes:
    from vault_edge import wire

    return wire.b64d(api.call("GET", "/v1/sys/status")[1]["server_key"])


def enroll_body(key: bytes, pair: Any, token: str) -> bytes:
    """An enrolment request for ``pair`` with ``token``, sealed to the control plane's ``key``."""
    from vault_edge.agent.sync import enrolment_body

    return enrolment_body(key, token, pair.box_public, pair.sign_public, "pop-1")


def enroll_node(api: Api, region: str = "eu") -> tuple[str, Any]:
    """A real node enrolment through the API, as the agent does it: (node id, its signing.KeyPair)."""
    from vault_edge import wire
    from vault_edge.crypto import signing

    st, doc = api.call("POST", "/v1/nodes/tokens", json={"region": region})
    assert st == 200, doc
    pair = signing.KeyPair.generate()
    body = enroll_body(server_key(api), pair, doc["token"])
    resp = api.client.post(
        "/v1/agent/enroll",
        content=body,
        headers=signed_headers(pair, "POST", "/v1/agent/enroll", wire.ENROLL_NODE, body),
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["node"], pair


def run_concurrently(fn: Any, n: int) -> None:
    """``fn(i)`` for i in range(n), each in its own thread, all released at once; waits for all."""
    import threading

    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def init_and_unseal(client: Any, shares: int = 3, threshold: int = 2, **extra: Any) -> tuple[list[str], str]:
    r = client.post("/v1/sys/init", json={"shares": shares, "threshold": threshold, **extra})
    assert r.status_code == 200, r.text
    doc = r.json()
    for i, share in enumerate(doc["shares"][: doc["threshold"]], 1):
        last = i == doc["threshold"]  # a passphrase comes only with the share that completes the unseal
        passphrase = extra.get("passphrase") if last else None
        r = client.post("/v1/sys/unseal", json={"share": share, "passphrase": passphrase})
        assert r.status_code == 200, r.text
    assert r.json()["sealed"] is False
    return doc["shares"], doc["root_token"]


@pytest.fixture
def api(make_app: Any) -> Api:
    """An initialized, unsealed control plane with regions eu and us, and the root token."""
    client, _ = make_app()
    _, token = init_and_unseal(client)
    a = Api(client, token)
    for region in ("eu", "us"):
        assert a.call("POST", "/v1/regions", json={"name": region})[0] == 200
    return a


# -- real processes ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vault_edge_cmd() -> list[str]:
    return [sys.executable, "-m", "vault_edge"]


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = 15) -> None:
    """Signal ``proc`` and reap it; SIGKILL after 15 s."""
    if proc and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServerProcess:
    def __init__(
        self,
        db: str,
        log_path: Path,
        port: int | None = None,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.db, self.log_path, self.port = db, log_path, port or free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.extra, self.env = extra or [], env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> ServerProcess:
        env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*vault_edge_cmd(), "server", "--db", self.db, "--port", str(self.port), *self.extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.log_path.read_text()[-2000:]}"
            try:
                httpx.get(self.addr + "/v1/sys/status", timeout=1)
                return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError(f"server did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self, sig: int = 15) -> None:
        stop_process(self.proc, sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Any]:
    """start_server(db, *extra_args) → a running ServerProcess; all stopped at teardown."""
    started: list[ServerProcess] = []

    def start(db: str, *extra: str, port: int | None = None, env: dict[str, str] | None = None) -> ServerProcess:
        s = ServerProcess(db, tmp_path / f"server-{len(started)}.log", port, list(extra), env).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def cli(
    *args: str, env: dict[str, str] | None = None, input: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run the real ``vault-edge`` CLI."""
    return subprocess.run(
        [*vault_edge_cmd(), *args],
        env={**os.environ, **(env or {})},
        input=input,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def two_replicas(make_app: Any) -> tuple[Api, Any, Any]:
    """Two control planes on one database, the first initialized and unsealed, the second unsealed with
    its shares; region eu; (the first's Api with the root token, app1, app2)."""
    c1, app1 = make_app(min_rotate_every_s=1, scheduler_interval_s=3600)
    shares, token = init_and_unseal(c1)
    c2, app2 = make_app(min_rotate_every_s=1, scheduler_interval_s=3600)
    for share in shares[:2]:
        assert c2.post("/v1/sys/unseal", json={"share": share}).status_code == 200
    api = Api(c1, token)
    api.call("POST", "/v1/regions", json={"name": "eu"})
    return api, app1, app2
