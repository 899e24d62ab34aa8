"""The agent's socket API, end to end: a real agent process, a real unix socket, real clients."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

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

BINARY = b"\x00\xff\xfe raw \x80"
ENTRIES: list[dict[str, Any]] = [
    {"name": "db/main", "version": 3, "stage": "current", "value": "hunter2"},
    {"name": "db/main", "version": 2, "stage": "previous", "value": "hunter1", "expires_in": 3600},
    {"name": "old", "version": 2, "stage": "current", "value": "fresh"},
    {"name": "old", "version": 1, "stage": "previous", "value": "expired", "expires_in": -1},
    {"name": "bin", "version": 1, "stage": "current", "value_b64": base64.b64encode(BINARY).decode()},
    {"name": "openai", "version": 1, "stage": "current", "value": "sk-ökö-✓"},
    {"name": "tenant-a/key", "version": 1, "stage": "current", "value": "a-secret"},
    {"name": "tenant-b/key", "version": 1, "stage": "current", "value": "b-secret"},
]
NOBODY = NOBODY_ID


@pytest.fixture
def agent(start_agent: Any) -> Agent:
    return start_agent(entries=ENTRIES)  # type: ignore[no-any-return]


def error_of(r: httpx.Response) -> tuple[int, str, str]:
    doc = r.json()["error"]
    return r.status_code, doc["code"], doc["message"]


# -- reads ------------------------------------------------------------------------------------------

def test_read_current_as_json(agent: Agent) -> None:
    r = agent.get("/v1/secrets/db/main")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"name": "db/main", "value": "hunter2", "encoding": "utf-8", "version": 3,
                        "stage": "current", "revision": 1}
    assert r.headers["x-vault-edge-revision"] == "1"
    assert r.headers["age"] == "0"
    assert r.headers["cache-control"] == "no-store"


def test_read_percent_encoded_name(agent: Agent) -> None:
    r = agent.get("/v1/secrets/db%2Fmain")
    assert r.status_code == 200 and r.json()["value"] == "hunter2"


def test_utf8_value_is_text_and_binary_value_is_base64url(agent: Agent) -> None:
    assert agent.get("/v1/secrets/openai").json()["value"] == "sk-ökö-✓"
    doc = agent.get("/v1/secrets/bin").json()
    assert doc["encoding"] == "base64"
    assert "=" not in doc["value"]
    assert base64.urlsafe_b64decode(doc["value"] + "=" * (-len(doc["value"]) % 4)) == BINARY


def test_octet_stream_gives_the_raw_bytes(agent: Agent) -> None:
    r = agent.get("/v1/secrets/bin", headers={"Accept": "application/octet-stream"})
    assert r.status_code == 200
    assert r.content == BINARY
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-vault-edge-version"] == "1"
    assert r.headers["x-vault-edge-stage"] == "current"
    assert r.headers["x-vault-edge-revision"] == "1" and "age" in r.headers
    # JSON listed first wins; a plain */* client gets JSON
    r = agent.get("/v1/secrets/bin", headers={"Accept": "application/json, application/octet-stream"})
    assert r.json()["name"] == "bin"
    assert agent.get("/v1/secrets/bin", headers={"Accept": "*/*"}).json()["name"] == "bin"


def test_read_by_version_and_stage(agent: Agent) -> None:
    assert agent.get("/v1/secrets/db/main", params={"version": 2}).json()["value"] == "hunter1"
    doc = agent.get("/v1/secrets/db/main", params={"stage": "previous"}).json()
    assert (doc["value"], doc["version"], doc["stage"]) == ("hunter1", 2, "previous")
    assert agent.get("/v1/secrets/db/main", params={"version": 3}).json()["stage"] == "current"
    assert error_of(agent.get("/v1/secrets/db/main", params={"version": 9}))[:2] == (404, "not_found")
    assert error_of(agent.get("/v1/secrets/db/main", params={"stage": "pending"}))[:2] == (404, "not_found")


def test_expired_previous_is_not_found(agent: Agent) -> None:
    assert agent.get("/v1/secrets/old").json()["value"] == "fresh"
    assert error_of(agent.get("/v1/secrets/old", params={"stage": "previous"}))[:2] == (404, "not_found")
    assert error_of(agent.get("/v1/secrets/old", params={"version": 1}))[:2] == (404, "not_found")


def test_grace_period_ends_while_serving(start_agent: Any) -> None:
    entries = [{"name": "k", "version": 2, "stage": "current", "value": "new"},
               {"name": "k", "version": 1, "stage": "previous", "value": "old", "expires_in": 3}]
    agent = start_agent(entries=entries)
    assert agent.get("/v1/secrets/k", params={"stage": "previous"}).json()["value"] == "old"
    deadline = time.monotonic() + 10
    while agent.get("/v1/secrets/k", params={"stage": "previous"}).status_code != 404:
        assert time.monotonic() < deadline, "a previous version outlived its grace period"
        time.sleep(0.05)


@pytest.mark.parametrize(("target", "fragment"), [
    ("/v1/secrets/db/main?version=2&stage=previous", "not both"),
    ("/v1/secrets/db/main?version=abc", "version"),
    ("/v1/secrets/db/main?version=0", "version"),
    ("/v1/secrets/db/main?version=%C2%B2", "version"),  # a Unicode digit is not a version
    ("/v1/secrets/db/main?stage=future", "stage"),
    ("/v1/secrets/db/main?verison=2", "verison"),
    ("/v1/secrets/db/main?version=1&version=2", "twice"),
    ("/v1/secrets/..%2Fetc", "invalid secret name"),
    ("/v1/secrets/a//b", "invalid secret name"),
    ("/v1/secrets/%ff", "percent-encoding"),
    ("/v1/secrets/" + "a" * 300, "invalid secret name"),
    ("/v1/secrets?stage=previous", "stage"),
    ("/v1/health?x=1", "unknown query parameter"),
    ("/v1/watch?wait=soon", "wait"),
    ("/v1/watch?since=-1", "since"),
])
def test_bad_requests_are_400_and_the_connection_stays_open(agent: Agent, target: str, fragment: str) -> None:
    with RawConn(agent.sock) as c:
        c.send(get(target))
        r = c.response()
        assert r.status == 400, r.body
        assert r.json()["error"]["code"] == "bad_request"
        assert fragment in r.json()["error"]["message"]
        c.send(get("/v1/secrets/db/main"))
        assert c.response().json()["value"] == "hunter2"


def test_unknown_endpoint_is_404(agent: Agent) -> None:
    assert error_of(agent.get("/v1/nope"))[:2] == (404, "not_found")
    assert error_of(agent.get("/"))[:2] == (404, "not_found")


def test_non_get_is_405(agent: Agent) -> None:
    for method in ("POST", "PUT", "DELETE", "HEAD", "PATCH"):
        r = agent.client.request(method, "/v1/secrets/db/main")
        assert r.status_code == 405
        assert r.headers["allow"] == "GET"


# -- listing, batch ---------------------------------------------------------------------------------

def test_list_names(agent: Agent) -> None:
    r = agent.get("/v1/secrets")
    assert r.status_code == 200
    assert r.json() == {"names": ["bin", "db/main", "old", "openai", "tenant-a/key", "tenant-b/key"]}
    assert r.headers["x-vault-edge-revision"] == "1"


def test_batch_read(agent: Agent) -> None:
    r = agent.get("/v1/secrets", params={"names": "db/main,openai,bin"})
    assert r.status_code == 200
    docs = r.json()["secrets"]
    assert [d["name"] for d in docs] == ["db/main", "openai", "bin"]
    assert docs[0]["value"] == "hunter2" and docs[2]["encoding"] == "base64"
    docs = agent.get("/v1/secrets", params={"names": "db/main", "stage": "previous"}).json()["secrets"]
    assert docs[0]["value"] == "hunter1"


def test_batch_is_all_or_nothing_naming_the_first_failure(agent: Agent) -> None:
    status, code, message = error_of(agent.get("/v1/secrets", params={"names": "db/main,nope,gone"}))
    assert (status, code) == (404, "not_found") and "'nope'" in message
    assert error_of(agent.get("/v1/secrets", params={"names": "db/main,bad..name/"}))[:2] == (400, "bad_request")
    r = agent.get("/v1/secrets", params={"names": ",".join(["db/main"] * 257)})
    assert error_of(r)[:2] == (400, "bad_request")
    assert agent.get("/v1/secrets", params={"names": ",".join(["db/main"] * 256)}).status_code == 200


# -- health, staleness, readiness -------------------------------------------------------------------

def test_health(agent: Agent) -> None:
    doc = agent.get("/v1/health").json()
    assert doc["status"] == "ok"
    assert doc["node"] == "n-0123456789abcdef" and doc["region"] == "eu"
    assert doc["revision"] == 1 and doc["secrets"] == 6
    assert 0 <= doc["last_sync_age_s"] < 60


def test_health_stale_when_control_plane_unreachable(agent: Agent) -> None:
    agent.signal(signal.SIGUSR2)
    deadline = time.monotonic() + 5
    while agent.get("/v1/health").json()["status"] != "stale":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert agent.get("/v1/secrets/db/main").status_code == 200  # stale still serves (no --max-stale)


def test_starting_agent_answers_not_ready(start_agent: Any) -> None:
    agent = start_agent("--no-load")
    assert agent.get("/v1/health").json()["status"] == "starting"
    r = agent.get("/v1/secrets/db/main")
    assert error_of(r)[:2] == (503, "not_ready")
    assert r.headers["retry-after"] == "1"
    assert error_of(agent.get("/v1/secrets"))[:2] == (503, "not_ready")


def test_never_contacted_serves_with_age_zero_and_says_stale(start_agent: Any) -> None:
    agent = start_agent("--no-contact", entries=ENTRIES)
    r = agent.get("/v1/secrets/db/main")
    assert r.status_code == 200 and r.headers["age"] == "0"
    doc = agent.get("/v1/health").json()
    assert doc["status"] == "stale" and doc["last_sync_age_s"] is None


def test_age_header_counts_seconds_since_contact(start_agent: Any) -> None:
    agent = start_agent("--contact-age", "5", entries=ENTRIES)
    first = int(agent.get("/v1/secrets/db/main").headers["age"])
    assert 5 <= first <= 7
    time.sleep(1.1)
    later = int(agent.get("/v1/secrets/db/main").headers["age"])  # same request: a cached answer must not stick
    assert later >= first + 1
    agent.signal(signal.SIGHUP)  # a contact resets it
    deadline = time.monotonic() + 5
    while int(agent.get("/v1/secrets/db/main").headers["age"]) > 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_too_stale_refuses_reads(start_agent: Any) -> None:
    agent = start_agent("--max-stale", "1.5", entries=ENTRIES)
    assert agent.get("/v1/secrets/db/main").status_code == 200
    deadline = time.monotonic() + 10
    while (r := agent.get("/v1/secrets/db/main")).status_code == 200:
        assert time.monotonic() < deadline, "reads went on past --max-stale"
        time.sleep(0.05)
    assert error_of(r)[:2] == (503, "too_stale")
    assert agent.get("/v1/health").status_code == 200
    agent.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while agent.get("/v1/secrets/db/main").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)


# -- new views, long-poll ---------------------------------------------------------------------------

def test_new_view_is_served_at_once_on_a_warm_connection(agent: Agent) -> None:
    with RawConn(agent.sock) as reader, RawConn(agent.sock) as watcher:
        for _ in range(3):  # warm: these answers are cached by the connection
            reader.send(get("/v1/secrets/db/main"))
            r = reader.response()
            assert r.json()["value"] == "hunter2" and r.headers["x-vault-edge-revision"] == "1"
        watcher.send(get("/v1/watch?since=1&wait=30"))
        agent.signal(signal.SIGUSR1)
        assert watcher.response().json() == {"revision": 2, "changed": True}  # the new view is installed
        reader.send(get("/v1/secrets/db/main"))
        r = reader.response()
        assert r.headers["x-vault-edge-revision"] == "2"
        assert r.json() == {"name": "db/main", "value": "hunter2-r2", "encoding": "utf-8", "version": 4,
                            "stage": "current", "revision": 2}


def test_watch_returns_when_the_revision_passes(agent: Agent) -> None:
    with RawConn(agent.sock) as c:
        c.send(get("/v1/watch?since=1&wait=30"))
        time.sleep(0.2)
        agent.signal(signal.SIGUSR1)
        r = c.response()
        assert r.status == 200 and r.json() == {"revision": 2, "changed": True}
        assert r.headers["x-vault-edge-revision"] == "2"
    # already past: at once
    assert agent.get("/v1/watch", params={"since": 0, "wait": 30}).json() == {"revision": 2, "changed": True}


def test_watch_times_out_unchanged(agent: Agent) -> None:
    t0 = time.monotonic()
    r = agent.get("/v1/watch", params={"since": 1, "wait": 0.3})
    assert r.json() == {"revision": 1, "changed": False}
    assert time.monotonic() - t0 >= 0.3


def test_pipelined_requests_wait_behind_a_watch_in_order(agent: Agent) -> None:
    with RawConn(agent.sock) as c:
        c.send(get("/v1/watch?wait=0.3") + get("/v1/secrets/openai") + get("/v1/secrets/db/main"))
        assert c.response().json() == {"revision": 1, "changed": False}
        assert c.response().json()["name"] == "openai"
        assert c.response().json()["name"] == "db/main"


def test_a_long_pipeline_behind_a_watch(agent: Agent) -> None:
    names = ["db/main", "openai", "bin"] * 200  # well over a head's worth of bytes waits behind the watch
    with RawConn(agent.sock) as c:
        c.send(get("/v1/watch?wait=0.3") + b"".join(get(f"/v1/secrets/{n}") for n in names))
        assert c.response().json()["changed"] is False
        assert [c.response().json()["name"] for _ in names] == names


def test_a_half_closed_client_still_gets_its_long_poll_answers(agent: Agent) -> None:
    with RawConn(agent.sock) as c:
        c.send(get("/v1/watch?wait=0.3") + get("/v1/secrets/openai"))
        c.sock.shutdown(socket.SHUT_WR)
        assert c.response().json()["changed"] is False
        assert c.response().json()["name"] == "openai"
        assert c.closed()


def test_client_leaving_during_a_watch(agent: Agent) -> None:
    for _ in range(50):
        with RawConn(agent.sock) as c:
            c.send(get("/v1/watch?wait=300"))
    assert agent.get("/v1/secrets/db/main").status_code == 200
    assert agent.alive()


# -- policy: kernel identity and tokens -------------------------------------------------------------

UID_POLICY = f"""
[[rule]]
uid = {os.getuid()}
secrets = ["db/*", "openai"]

[[rule]]
uid = {NOBODY}
secrets = ["tenant-b/*"]
"""


def test_policy_forbids_names_outside_the_rules(start_agent: Any) -> None:
    agent = start_agent(entries=ENTRIES, policy=UID_POLICY)
    assert agent.get("/v1/secrets/db/main").status_code == 200
    status, code, message = error_of(agent.get("/v1/secrets/bin"))
    assert (status, code) == (403, "forbidden") and "'bin'" in message
    # a forbidden name is forbidden whether or not it exists; an allowed absent one is not found
    assert error_of(agent.get("/v1/secrets/no-such"))[:2] == (403, "forbidden")
    assert error_of(agent.get("/v1/secrets/db/absent"))[:2] == (404, "not_found")
    assert agent.get("/v1/secrets").json() == {"names": ["db/main", "openai"]}
    status, _, message = error_of(agent.get("/v1/secrets", params={"names": "db/main,bin,nope"}))
    assert status == 403 and "'bin'" in message


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
    out = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", agent.sock,
                          "http://agent/v1/secrets/db/main"], capture_output=True, text=True, check=False)
    assert out.stdout == "403"


TOKEN_A = "tok-A-0123456789abcdef0123456789abcdef012"
TOKEN_POLICY = f"""
[[rule]]
uid = {os.getuid()}
secrets = ["*"]

[[rule]]
token_sha256 = "{hashlib.sha256(TOKEN_A.encode()).hexdigest()}"
secrets = ["tenant-a/*"]
"""


def test_token_rules(start_agent: Any) -> None:
    agent = start_agent(entries=ENTRIES, policy=TOKEN_POLICY)
    a = {"X-Vault-Edge-Token": TOKEN_A}
    assert agent.get("/v1/secrets/tenant-a/key", headers=a).json()["value"] == "a-secret"
    # a token request is judged by its token's rules only, not by the uid rule of the process
    assert error_of(agent.get("/v1/secrets/tenant-b/key", headers=a))[:2] == (403, "forbidden")
    assert agent.get("/v1/secrets", headers=a).json() == {"names": ["tenant-a/key"]}
    # an unknown token never falls back to kernel identity
    bad = {"X-Vault-Edge-Token": "not-a-known-token"}
    assert error_of(agent.get("/v1/secrets/db/main", headers=bad))[:2] == (403, "forbidden")
    assert error_of(agent.get("/v1/secrets", headers=bad))[:2] == (403, "forbidden")
    # without a token the uid rule applies
    assert agent.get("/v1/secrets/tenant-b/key").status_code == 200


def test_token_answers_are_not_shared_across_requests_on_one_connection(start_agent: Any) -> None:
    agent = start_agent(entries=ENTRIES, policy=TOKEN_POLICY)
    with RawConn(agent.sock) as c:
        for _ in range(3):
            c.send(get("/v1/secrets/db/main", f"X-Vault-Edge-Token: {TOKEN_A}\r\n"))
            assert c.response().status == 403
            c.send(get("/v1/secrets/db/main"))
            assert c.response().status == 200
        c.send(get("/v1/secrets/db/main", "X-Vault-Edge-Token: a\r\nX-Vault-Edge-Token: b\r\n"))
        assert c.response().status == 400


def test_a_bad_policy_file_stops_start_with_one_clear_line(sock_dir: Path) -> None:
    policy = sock_dir / "bad.toml"
    policy.write_text('[[rule]]\nexe = "bin/python"\nsecrets = ["*"]\n')
    out = subprocess.run([sys.executable, str(FIXTURE), "--socket", str(sock_dir / "x.sock"), "--policy",
                          str(policy)], capture_output=True, text=True, timeout=30, check=False)
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


# -- HTTP framing and hostile input -----------------------------------------------------------------

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


def test_a_head_split_into_single_bytes(agent: Agent) -> None:
    with RawConn(agent.sock) as c:
        for b in get("/v1/secrets/db/main", "Accept: application/octet-stream\r\n"):
            c.send(bytes([b]))
        assert c.response().body == b"hunter2"


def test_connection_close_and_http10(agent: Agent) -> None:
    with RawConn(agent.sock) as c:
        c.send(get("/v1/secrets/db/main", "Connection: close\r\n") + get("/v1/secrets/openai"))
        r = c.response()
        assert r.status == 200 and r.headers["connection"] == "close"
        assert c.closed()  # and the pipelined request behind it was not answered
    with RawConn(agent.sock) as c:
        c.send(b"GET /v1/secrets/db/main HTTP/1.0\r\n\r\n")
        assert c.response().json()["value"] == "hunter2"
        assert c.closed()
    with RawConn(agent.sock) as c:
        for _ in range(2):
            c.send(b"GET /v1/secrets/db/main HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert c.response().status == 200


@pytest.mark.parametrize(("raw", "status"), [
    (b"garbage\r\n\r\n", 400),
    (b"GET /v1/secrets/db/main\r\n\r\n", 505),  # HTTP/0.9
    (b"GET /v1/secrets/db/main HTTP/2.0\r\n\r\n", 505),
    (b"GET /v1/secrets/db/main FTP/1.1\r\n\r\n", 400),
    (b"G(T /v1/secrets/db/main HTTP/1.1\r\n\r\n", 400),
    (b"GET http://agent/v1/secrets/db/main HTTP/1.1\r\n\r\n", 400),
    ("GET /v1/secrets/dé HTTP/1.1\r\n\r\n".encode(), 400),
    (b"GET /v1/secrets/db/main HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /v1/secrets/db/main HTTP/1.1\r\nAccept : x\r\n\r\n", 400),
    (b"GET /v1/secrets/db/main HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
    (b"GET /v1/secrets/db/main HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET /v1/secrets/db/main HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),
    (b"GET /v1/secrets/db/main HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET /v1/secrets/db/main HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400),
    (b"GET /v1/secrets/db/main HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 413),
    (b"POST /v1/secrets/db/main HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET /v1/secrets/db/main HTTP/1.1\nHost: a\n\n", 400),
    (b"GET /v1/secrets/db/main HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"GET /v1/secrets/db/main HTTP/1.1\r\nX: " + b"a" * 9000, 431),
])
def test_malformed_heads_get_a_4xx_and_a_clean_close(agent: Agent, raw: bytes, status: int) -> None:
    with RawConn(agent.sock) as c:
        c.send(raw)
        r = c.response()
        assert r.status == status, r.body
        assert r.headers["connection"] == "close"
        assert r.json()["error"]["code"] == "bad_request"
        assert c.closed()
    assert agent.get("/v1/secrets/db/main").status_code == 200


def test_an_unfinished_head_is_timed_out(start_agent: Any) -> None:
    agent = start_agent("--head-timeout", "1", entries=ENTRIES)
    with RawConn(agent.sock) as slow, RawConn(agent.sock) as idle, RawConn(agent.sock) as busy:
        slow.send(b"GET /v1/secrets/db/main HTTP/1.1\r\nHost: a\r\n")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:  # a busy keep-alive client is never cut off
            busy.send(get("/v1/secrets/db/main"))
            assert busy.response().status == 200
            time.sleep(0.05)
        r = slow.response()
        assert r.status == 408
        assert slow.closed()
        idle.send(get("/v1/secrets/db/main"))  # an idle connection with nothing pending stays open
        assert idle.response().status == 200


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


def test_the_endpoint_imports_nothing_of_the_server_side() -> None:
    code = ("import sys, vault_edge.agent.endpoint; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'starlette', 'sqlalchemy', 'httpx', 'pydantic') or m.startswith('vault_edge.server')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
