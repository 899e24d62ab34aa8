"""The agent's socket, in real processes: what needs the kernel or a process of its own.

A real ``tests/agent/fixture_agent.py`` process (the endpoint and the API on uvloop, as the agent
runs them) on a real unix socket: peer credentials of another user, the socket file (modes, a stale
or a live one, restarts), start-up refusals, and framing under hostile input where the measure is
the process itself (its memory, its log, its survival). Everything else about the API and the
transport runs in-process with a fake clock (``test_api``, ``test_endpoint``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.agent.inproc import ENTRIES
from tests.agent.support import (
    FIXTURE,
    NOBODY_ID,
    Agent,
    RawConn,
    connect,
    get,
    run_as,
    start_fixture,
    wait_for_socket,
)
from vault_edge.agent import endpoint
from vault_edge.agent.api import Api
from vault_edge.agent.policy import Policy
from vault_edge.agent.view import AgentState

pytestmark = pytest.mark.e2e

NOBODY = NOBODY_ID


@pytest.fixture
def agent(start_agent: Any) -> Agent:
    return start_agent(entries=ENTRIES)  # type: ignore[no-any-return]


# -- a real process, end to end ---------------------------------------------------------------------


def test_a_real_agent_process_serves_reads_and_new_views(agent: Agent) -> None:
    r = agent.get("/v1/secrets/db/main")  # httpx, as a worker's client would
    assert r.status_code == 200 and r.headers["age"] == "0" and r.headers["x-vault-edge-revision"] == "1"
    assert r.json() == {
        "name": "db/main",
        "value": "hunter2",
        "encoding": "utf-8",
        "version": 3,
        "stage": "current",
        "revision": 1,
    }
    assert agent.get("/v1/health").json()["status"] == "ok"
    with RawConn(agent.sock) as c:
        c.send(get("/v1/watch?since=1&wait=30"))
        agent.signal(signal.SIGUSR1)  # the fixture installs the next revision
        assert c.response().json() == {"revision": 2, "changed": True}
        c.send(get("/v1/secrets/db/main"))
        assert c.response().json()["value"] == "hunter2-r2"


def test_pipelined_requests_are_answered_in_order(agent: Agent) -> None:
    names = ["db/main", "openai", "bin", "old", "db/main", "nope", "tenant-a/key"] * 20
    with RawConn(agent.sock) as c:
        c.send(b"".join(get(f"/v1/secrets/{n}") for n in names))
        for n in names:
            r = c.response()
            if n == "nope":
                assert r.status == 404
            else:
                assert r.json()["name"] == n


# -- peer credentials: another user, the executable -------------------------------------------------

UID_POLICY = f"""
[[rule]]
uid = {os.getuid()}
secrets = ["db/*", "openai"]

[[rule]]
uid = {NOBODY}
secrets = ["tenant-b/*"]
"""


def _as_nobody(sock: str, target: str) -> bytes:
    def client() -> bytes:
        with RawConn(sock) as c:
            c.send(get(target))
            r = c.response()
            return b"%d " % r.status + r.body

    return run_as(NOBODY, NOBODY, client)


def test_another_uid_is_refused_without_a_policy(start_agent: Any) -> None:
    agent = start_agent(entries=ENTRIES)
    os.chown(agent.sock, -1, NOBODY)  # nobody reaches the socket through its group (mode 0660)
    out = _as_nobody(agent.sock, "/v1/secrets/db/main")
    assert out.startswith(b"403 ") and b'"forbidden"' in out
    assert b"hunter2" not in out
    assert agent.get("/v1/secrets/db/main").status_code == 200  # the owner still reads


def test_another_uid_reads_what_its_rule_allows(start_agent: Any) -> None:
    agent = start_agent(entries=ENTRIES, policy=UID_POLICY)
    os.chown(agent.sock, -1, NOBODY)
    out = _as_nobody(agent.sock, "/v1/secrets/tenant-b/key")
    assert out.startswith(b'200 {"name":"tenant-b/key","value":"b-secret"')
    assert _as_nobody(agent.sock, "/v1/secrets/db/main").startswith(b"403 ")
    assert _as_nobody(agent.sock, "/v1/secrets").startswith(b'200 {"names":["tenant-b/key"]}')


def test_others_cannot_connect_at_all(start_agent: Any) -> None:
    agent = start_agent(entries=ENTRIES)
    st = os.stat(agent.sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660

    def client() -> bytes:
        try:
            connect(agent.sock).close()
        except PermissionError:
            return b"refused"
        return b"connected"

    assert run_as(NOBODY, NOBODY, client) == b"refused"


def test_exe_rule_uses_the_kernel_view_of_the_executable(start_agent: Any) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    me = os.path.realpath("/proc/self/exe")
    agent = start_agent(entries=ENTRIES, policy=f'[[rule]]\nexe = "{me}"\nsecrets = ["*"]\n')
    assert agent.get("/v1/secrets/db/main").status_code == 200
    out = subprocess.run(
        [
            curl,
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
            agent.sock,
            "http://agent/v1/secrets/db/main",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.stdout == "403"


def test_a_bad_policy_file_stops_start_with_one_clear_line(sock_dir: Path) -> None:
    policy = sock_dir / "bad.toml"
    policy.write_text('[[rule]]\nexe = "bin/python"\nsecrets = ["*"]\n')
    out = subprocess.run(
        [sys.executable, str(FIXTURE), "--socket", str(sock_dir / "x.sock"), "--policy", str(policy)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 1
    assert str(policy) in out.stderr and "absolute" in out.stderr
    assert "Traceback" not in out.stderr


# -- the socket file --------------------------------------------------------------------------------


def test_stale_socket_is_replaced_and_a_live_one_is_not(sock_dir: Path, start_agent: Any) -> None:
    path = str(sock_dir / "agent.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on: what a killed agent leaves
    agent = start_agent(entries=ENTRIES)
    assert agent.get("/v1/secrets/db/main").status_code == 200
    log = sock_dir / "second.log"
    second = start_fixture(["--socket", path, "--secret", "x=y"], log)
    assert second.wait(timeout=30) == 1
    assert "already serving" in log.read_text()
    assert agent.get("/v1/secrets/db/main").status_code == 200


def test_a_non_socket_file_is_never_replaced(sock_dir: Path) -> None:
    path = sock_dir / "agent.sock"
    path.write_text("precious")
    log = sock_dir / "a.log"
    proc = start_fixture(["--socket", str(path), "--secret", "x=y"], log)
    assert proc.wait(timeout=30) == 1
    assert "not a socket" in log.read_text()
    assert path.read_text() == "precious"


def test_world_accessible_modes_are_refused(tmp_path: Path) -> None:
    async def attempt(mode: int) -> None:
        await endpoint.serve(str(tmp_path / "s.sock"), Api(AgentState(), Policy(None)), mode=mode)

    for mode in (0o666, 0o662, 0o1660):
        with pytest.raises(ValueError, match="nothing to others"):
            asyncio.run(attempt(mode))
    assert not (tmp_path / "s.sock").exists()


def test_socket_restart_cycle(sock_dir: Path) -> None:
    path = str(sock_dir / "cycle.sock")
    for _ in range(2):  # a clean stop removes the socket; a second start finds the path free
        log = sock_dir / "cycle.log"
        proc = start_fixture(["--socket", path, "--secret", "x=y", "--mode", "600"], log)
        wait_for_socket(path, proc, log)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not os.path.exists(path)


# -- hostile input: the process survives, its memory and its log stay clean --------------------------


def test_random_bytes_never_hurt_the_server(agent: Agent) -> None:
    rnd = __import__("random").Random(1234)
    prefixes = [b"", b"GET ", b"GET /v1/secrets/", b"GET /v1/secrets/db/main HTTP/1.1\r\n"]
    for i in range(300):
        junk = rnd.choice(prefixes) + bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 300)))
        if i % 3 == 0:
            junk += b"\r\n\r\n"
        with RawConn(agent.sock, timeout=5) as c:
            c.send(junk)
            c.sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := c.sock.recv(65536):
                data += chunk
            assert data == b"" or data.startswith(b"HTTP/1.1 4") or data.startswith(b"HTTP/1.1 505"), data[:100]
    assert agent.get("/v1/secrets/db/main").status_code == 200
    assert "Traceback" not in agent.log()


def test_bad_requests_do_not_grow_memory(agent: Agent) -> None:
    def burst(n: int) -> None:
        with RawConn(agent.sock) as c:
            for start in range(0, n, 100):
                c.send(b"".join(get(f"/v1/secrets/-{i}?x={i}") for i in range(start, start + 100)))
                for _ in range(100):
                    assert c.response().status == 400
        for i in range(n // 20):
            with RawConn(agent.sock) as c:
                c.send(b"GET /%d HTTP/9\r\n\r\n" % i)
                assert c.response().status == 400

    burst(5000)
    before = agent.rss_kib()
    burst(20000)
    assert agent.rss_kib() - before < 4096, "memory grew with bad requests"


def test_a_client_that_does_not_read_is_paused_not_buffered(agent: Agent) -> None:
    with RawConn(agent.sock, timeout=2) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        req = get("/v1/secrets/db/main")
        sent = 0
        try:
            for _ in range(200_000):  # ~11 MB of requests; answers pile up unread
                c.sock.sendall(req * 50)
                sent += 50
        except (TimeoutError, BlockingIOError):
            pass
        assert sent < 200_000 * 50, "the server kept reading while its answers were not read"
        before = agent.rss_kib()
    assert agent.rss_kib() - before < 65536
    assert agent.get("/v1/secrets/db/main").status_code == 200


def test_secret_values_never_reach_the_log(agent: Agent) -> None:
    agent.get("/v1/secrets/db/main")
    agent.get("/v1/secrets", params={"names": "db/main,nope"})
    with RawConn(agent.sock) as c:
        c.send(b"GET /v1/secrets/db/main HTTP/1.1\r\nX: \x00\r\n\r\n")
        c.response()
    agent.stop()
    log = agent.log()
    for e in ENTRIES:
        if "value" in e:
            assert e["value"] not in log
