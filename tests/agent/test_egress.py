"""The agent's egress proxy (keyless workers), in this process: the real endpoint and Api on a loop in
a thread (``tests.agent.inproc.Served``), a real HTTPS upstream with a CA the test makes
(``tests.agent.egress_upstream``) that records what it receives.

Every byte the agent writes to a test's connections, and every log line, is checked for the key at
the end of each test (``no_leak``): errors included."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.egress_upstream import Upstream, make_ca
from tests.agent.egress_upstream_h2 import H2Upstream
from tests.agent.inproc import ME, NODE, REGION, FakeClock, Served, make_state
from vault_edge.agent.egress import EgressSettings
from vault_edge.agent.policy import Policy, parse_rules
from vault_edge.agent.view import Entry, View
from vault_edge.wire.egress import REPORT_FIELDS, Report, route_from_json

KEY = "sk-live-0123456789abcdef"
KEY2 = "sk-live-rotated-9876543210"
CREDS = {"user": "acct_42", "password": "pw-0123456789-secret"}
TOKEN = "binding-token-for-tenant-a"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_ca(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=["h1", "h2"])
def upstream(request: pytest.FixtureRequest, pki: tuple[Path, Path, Path]) -> Iterator[Upstream]:
    """Every test of the egress path runs against an HTTP/1.1 upstream and one that speaks HTTP/2 only."""
    u: Any = Upstream(pki[1], pki[2]) if request.param == "h1" else H2Upstream(pki[1], pki[2])
    yield u
    u.close()


@pytest.fixture
def other(pki: tuple[Path, Path, Path]) -> Iterator[Upstream]:
    u = Upstream(pki[1], pki[2])
    yield u
    u.close()


class Conn:
    """A raw HTTP/1.1 client on one connection; keeps every byte it received (for the leak check)."""

    def __init__(self, sock: socket.socket, received: list[bytes]) -> None:
        self.sock, self.buf, self.received = sock, b"", received

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.received.append(chunk)
        self.buf += chunk
        return bool(chunk)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError("closed mid-line")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"closed before a response head: {self.buf[:200]!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for k, _, v in (ln.partition(":") for ln in lines[1:]):
            headers[k.strip().lower()] = v.strip()
        return int(lines[0].split(" ")[1]), headers

    def chunks(self) -> Iterator[bytes]:
        while True:
            size = int(self._line(), 16)
            while len(self.buf) < size + 2:
                if not self._fill():
                    raise EOFError("closed inside a chunk")
            data, self.buf = self.buf[:size], self.buf[size + 2 :]
            if not size:
                return
            yield data

    def response(self, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        status, headers = self.head()
        if method == "HEAD" or status in (204, 304):
            return status, headers, b""
        if headers.get("transfer-encoding") == "chunked":
            return status, headers, b"".join(self.chunks())
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                if not self._fill():
                    raise EOFError("closed inside a body")
            body, self.buf = self.buf[:n], self.buf[n:]
            return status, headers, body
        while self._fill():
            pass
        body, self.buf = self.buf, b""
        return status, headers, body

    def request(
        self, method: str, target: str, headers: str = "", body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        length = f"Content-Length: {len(body)}\r\n" if body else ""
        self.send(f"{method} {target} HTTP/1.1\r\nHost: agent\r\n{headers}{length}\r\n".encode() + body)
        return self.response(method)


class Agent:
    def __init__(self, served: Served, received: list[bytes]) -> None:
        self.served, self.received = served, received

    def conn(self) -> Conn:
        return Conn(self.served.pair(timeout=10), self.received)

    def call(self, method: str, target: str, headers: str = "", body: bytes = b"") -> tuple[int, dict[str, str], Any]:
        status, h, raw = self.conn().request(method, target, headers, body)
        try:
            return status, h, json.loads(raw)
        except ValueError:
            return status, h, raw

    def install(self, routes: list[dict[str, Any]], value: str = KEY) -> None:
        entries = [
            Entry("api/key", 1, "current", value.encode()),
            Entry("api/creds", 1, "current", json.dumps(CREDS).encode()),
            Entry("other/key", 1, "current", b"other-secret-value"),
        ]
        parsed = tuple(route_from_json(r).route for r in routes)
        rev = self.served.state.view.revision + 1
        self.served.call(lambda: self.served.state.install(View(NODE, REGION, rev, entries, parsed)))


def route(name: str, url: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "upstream": url, "secret": "api/key", "inject": ["header:Authorization=Bearer {value}"], **kw}


@pytest.fixture
def make_agent(
    request: pytest.FixtureRequest, pki: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> Iterator[Callable[..., Agent]]:
    caplog.set_level(logging.DEBUG)
    served_list: list[Served] = []
    received: list[bytes] = []

    def make(routes: list[dict[str, Any]], policy: Policy | None = None, **settings: Any) -> Agent:
        served = Served(make_state(FakeClock(), []), policy)
        served.api.egress.settings = EgressSettings(ca_file=str(pki[0]), **settings)
        served_list.append(served)
        agent = Agent(served, received)
        agent.install(routes)
        return agent

    yield make
    for s in served_list:
        asyncio.run_coroutine_threadsafe(s.api.egress.aclose(), s.loop).result(timeout=10)  # its upstream pool
        s.close()
    everything = b"".join(received)
    # every phase's records (caplog.text in a fixture's teardown holds only the teardown's)
    logged = "\n".join(
        logging.Formatter().format(r) for when in ("setup", "call", "teardown") for r in caplog.get_records(when)
    )
    # whatever an upstream does is its fault, handled as such: no test but the planted bug's logs a bug
    if request.node.originalname != "test_a_bug_in_the_relay_costs_that_call_only":
        assert "internal error" not in logged and "Traceback" not in logged, logged[-2000:]
    for value in (
        KEY,
        KEY2,
        CREDS["password"],
        base64.b64encode(f"{CREDS['user']}:{CREDS['password']}".encode()).decode(),
    ):
        assert value.encode() not in everything, "a secret reached a worker"
        assert value not in logged, "a secret reached the log"


def test_the_key_is_injected_and_the_workers_own_credential_and_hop_by_hop_headers_dropped(
    make_agent: Callable[..., Agent], upstream: Upstream
) -> None:
    agent = make_agent([route("api", upstream.url, paths=["/v1/"])])
    status, headers, doc = agent.call(
        "POST",
        "/v1/egress/api/v1/echo?x=1",
        "Authorization: Bearer the-workers-own\r\nConnection: X-Drop-Me\r\nX-Drop-Me: 1\r\nKeep-Alive: timeout=5\r\n"
        "Proxy-Authorization: Basic abc\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n"
        "X-Keep: yes\r\nContent-Type: application/json\r\nAccept-Encoding: gzip\r\n",
        b'{"prompt": "hi"}',
    )
    assert status == 200, doc
    seen = upstream.last()
    assert seen.method == "POST" and seen.target == "/v1/echo?x=1" and seen.body == b'{"prompt": "hi"}'
    assert seen.header("Authorization") == [f"Bearer {KEY}"]  # the key, and only the key
    assert seen.header("X-Keep") == ["yes"] and seen.header("Content-Type") == ["application/json"]
    assert seen.header("Host") == [f"127.0.0.1:{upstream.port}"]
    for dropped in (
        "X-Drop-Me",
        "Keep-Alive",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "X-Vault-Edge-Token",
        "Accept-Encoding",
    ):
        assert seen.header(dropped) == [], dropped
    # The upstream echoes what it got, the key with it: scrubbed from the answer, same length.
    echoed = dict((k.lower(), v) for k, v in doc["headers"])
    assert echoed["authorization"] == "Bearer " + "*" * len(KEY)
    # the upstream's hop-by-hop headers (and those its Connection names) do not reach the worker
    assert "x-upstream-private" not in headers and "keep-alive" not in headers
    assert headers["content-type"] == "application/json"


def test_query_basic_and_field_injections(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    agent = make_agent(
        [
            route("q", upstream.url, inject=["query:key={value}"]),
            {
                "name": "basic",
                "upstream": upstream.url,
                "secret": "api/creds",
                "inject": ["basic:{value.user}:{value.password}"],
            },
            {
                "name": "field",
                "upstream": upstream.url,
                "secret": "api/creds",
                "inject": ["header:X-Api-Key={value.password}"],
            },
        ]
    )
    assert agent.call("GET", "/v1/egress/q/ok?key=the-workers-own&x=1&key=again")[0] == 200
    assert upstream.last().query == {"x": ["1"], "key": [KEY]}
    assert agent.call("GET", "/v1/egress/basic/ok", "Authorization: Bearer the-workers-own\r\n")[0] == 200
    expect = base64.b64encode(f"{CREDS['user']}:{CREDS['password']}".encode()).decode()
    assert upstream.last().header("Authorization") == [f"Basic {expect}"]
    assert agent.call("GET", "/v1/egress/field/ok", "X-Api-Key: mine\r\n")[0] == 200
    assert upstream.last().header("X-Api-Key") == [CREDS["password"]]


def test_forward_proxy_mode_with_an_absolute_uri(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    agent = make_agent([route("api", upstream.url)])
    status, _, doc = agent.call("GET", f"{upstream.url}/v1/ok?z=2")
    assert status == 200 and doc == {"ok": True}
    assert upstream.last().header("Authorization") == [f"Bearer {KEY}"] and upstream.last().target == "/v1/ok?z=2"
    # a host no route names: 403, and nothing sent anywhere
    n = len(upstream.seen)
    for target in (
        "https://api.example.com/v1/ok",
        f"https://localhost:{upstream.port}/v1/ok",
        f"http://127.0.0.1:{upstream.port}/v1/ok",
    ):
        status, _, doc = agent.call("GET", target)
        assert status == 403 and doc["error"]["code"] == "forbidden", target
    assert len(upstream.seen) == n
    status, _, _ = agent.call("CONNECT", f"127.0.0.1:{upstream.port}")
    assert status == 400  # no tunnels: the agent must see the request to add the key


def test_policy_says_which_routes_a_caller_may_call(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    policy = Policy(
        parse_rules(
            {
                "rule": [
                    {"uid": ME.uid, "egress": ["other-*"]},
                    {"token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "egress": ["api"]},
                ]
            }
        )
    )
    agent = make_agent([route("api", upstream.url), route("other-one", upstream.url)], policy)
    status, _, doc = agent.call("GET", "/v1/egress/api/ok")
    assert status == 403 and doc["error"]["code"] == "forbidden"
    assert agent.call("GET", "/v1/egress/other-one/ok")[0] == 200
    assert agent.call("GET", "/v1/egress/api/ok", f"X-Vault-Edge-Token: {TOKEN}\r\n")[0] == 200
    assert upstream.last().header("X-Vault-Edge-Token") == []  # the binding's token stays here
    assert agent.call("GET", "/v1/egress/api/ok", "X-Vault-Edge-Token: wrong\r\n")[0] == 403
    assert agent.call("GET", "/v1/egress/nope/ok", f"X-Vault-Edge-Token: {TOKEN}\r\n")[0] == 403  # unknown: same
    # calling a route is not reading its secret
    assert agent.call("GET", "/v1/secrets/api/key", f"X-Vault-Edge-Token: {TOKEN}\r\n")[0] == 403
    # proxy mode: the caller's routes only
    assert agent.call("GET", f"{upstream.url}/ok")[0] == 200  # other-one's upstream is the same
    policy_none = Policy(parse_rules({"rule": [{"uid": ME.uid, "secrets": ["*"]}]}))
    agent2 = make_agent([route("api", upstream.url)], policy_none)
    assert agent2.call("GET", f"{upstream.url}/ok")[0] == 403


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("DELETE", "/v1/egress/api/v1/ok", 405),
        ("TRACE", "/v1/egress/api/v1/ok", 405),
        ("GET", "/v1/egress/api/admin/ok", 403),
        ("GET", "/v1/egress/api/v1/../admin/ok", 400),
        ("GET", "/v1/egress/api/v1/%2e%2e/admin/ok", 400),
        ("GET", "/v1/egress/api/v1%2fok", 400),
        ("GET", "/v1/egress/api/v1/%5cok", 400),
        ("GET", "/v1/egress/Bad!/ok", 400),
        ("GET", "/v1/egress/", 400),
    ],
)
def test_the_route_bounds_methods_and_paths(
    make_agent: Callable[..., Agent], upstream: Upstream, method: str, target: str, status: int
) -> None:
    agent = make_agent([route("api", upstream.url, methods=["GET", "POST"], paths=["/v1/"])])
    got, headers, doc = agent.call(method, target)
    assert got == status, doc
    assert set(doc["error"]) == {"code", "message"}
    if status == 405:
        assert headers["allow"] == "GET, POST"
    assert upstream.seen == []


def test_redirects_go_back_to_the_worker_unfollowed(
    make_agent: Callable[..., Agent], upstream: Upstream, other: Upstream
) -> None:
    agent = make_agent([route("api", upstream.url)])
    status, headers, _ = agent.call("GET", f"/v1/egress/api/redirect?to=https://localhost:{other.port}/ok")
    assert status == 302 and headers["location"] == f"https://localhost:{other.port}/ok"
    assert other.seen == []  # not followed: the other host never saw the key (nor anything)
    # a redirect that would carry the key in its URL has it scrubbed
    status, headers, _ = agent.call("GET", f"/v1/egress/api/redirect?to=https://x.example/?k={KEY}")
    assert status == 302 and KEY not in headers["location"]


def test_errors_say_what_happened_never_the_key(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens there once closed
    agent = make_agent(
        [
            route("api", upstream.url),
            route("down", f"https://127.0.0.1:{dead}"),
            route("q", upstream.url, inject=["query:key={value}"]),
        ],
        timeout=0.5,
        max_answer=1 << 20,
        max_body=1024,
    )
    status, _, doc = agent.call("GET", "/v1/egress/down/ok")
    assert status == 502 and doc["error"]["code"] == "upstream_unreachable"
    status, _, doc = agent.call("GET", "/v1/egress/q/slow?s=2")
    assert status == 504 and doc["error"]["code"] == "upstream_timeout"
    status, _, doc = agent.call("GET", f"/v1/egress/api/big?n={2 << 20}")
    assert status == 502 and doc["error"]["code"] == "answer_too_large"
    status, _, doc = agent.call("POST", "/v1/egress/api/echo", body=b"x" * 2048)
    assert status == 413
    conn = agent.conn()  # a chunked body over the limit: refused too, once the agent counts past it
    conn.send(b"POST /v1/egress/api/echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    conn.send(b"400\r\n" + b"x" * 1024 + b"\r\n1\r\nx\r\n0\r\n\r\n")
    status, _, body = conn.response()
    assert status == 413 and "over 1024 bytes" in json.loads(body)["error"]["message"]
    assert all(len(seen.body) <= 1024 for seen in upstream.seen)
    # streamed past the limit: the answer is cut (the worker sees a broken body, not a whole one)
    conn = agent.conn()
    conn.send(f"GET /v1/egress/api/stream?n={2 << 20} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    status, headers = conn.head()
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    with pytest.raises(EOFError):
        for _ in conn.chunks():
            pass
    # and the agent serves everyone else as before
    assert agent.call("GET", "/v1/egress/api/ok")[0] == 200
    assert agent.call("GET", "/v1/secrets/other/key")[0] == 200  # reads too


def test_a_secret_that_cannot_be_injected_is_refused_without_its_value(
    make_agent: Callable[..., Agent], upstream: Upstream
) -> None:
    agent = make_agent([route("api", upstream.url)])
    agent.install(
        [
            route("api", upstream.url),
            {"name": "f", "upstream": upstream.url, "secret": "api/key", "inject": ["header:X={value.missing}"]},
        ],
        value="sk-live-with\r\nInjected: header",
    )
    status, _, doc = agent.call("GET", "/v1/egress/api/ok")
    assert status == 502 and doc["error"]["code"] == "bad_secret" and "Injected" not in json.dumps(doc)
    status, _, doc = agent.call("GET", "/v1/egress/f/ok")
    assert status == 502 and doc["error"]["code"] == "bad_secret"
    assert upstream.seen == []


def test_the_next_call_after_a_rotation_uses_the_new_key(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    agent = make_agent([route("api", upstream.url)])
    conn = agent.conn()
    assert conn.request("GET", "/v1/egress/api/ok")[0] == 200
    assert upstream.last().header("Authorization") == [f"Bearer {KEY}"]
    agent.install([route("api", upstream.url)], value=KEY2)
    assert conn.request("GET", "/v1/egress/api/ok")[0] == 200  # same connection, kept alive
    assert upstream.last().header("Authorization") == [f"Bearer {KEY2}"]
    agent.install([])  # the route deleted
    assert conn.request("GET", "/v1/egress/api/ok")[0] == 404


def test_server_sent_events_arrive_one_by_one(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    agent = make_agent([route("api", upstream.url)])
    conn = agent.conn()
    conn.send(b"GET /v1/egress/api/sse?n=4&gap=0.3 HTTP/1.1\r\nHost: a\r\nAccept: text/event-stream\r\n\r\n")
    status, headers = conn.head()
    assert status == 200 and headers["content-type"] == "text/event-stream"
    lags = []
    for chunk in conn.chunks():
        for event in chunk.decode().split("\n\n"):
            if event.startswith("id:"):
                sent = json.loads(event.split("data: ", 1)[1])["sent"]
                lags.append(time.time() - sent)
    assert len(lags) == 4
    assert max(lags) < 0.25, lags  # each event as it left the upstream, not at the end (0.9 s later)
    assert conn.request("GET", "/v1/egress/api/ok")[0] == 200  # the connection is still good


def test_a_worker_that_goes_away_ends_the_upstream_call(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    agent = make_agent([route("api", upstream.url)])
    conn = agent.conn()
    conn.send(b"GET /v1/egress/api/sse?n=50&gap=0.1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert conn.head()[0] == 200
    conn.sock.close()
    served = agent.served
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and served.open_conns():
        time.sleep(0.02)
    assert served.open_conns() == 0
    deadline = time.monotonic() + 3  # the stream would run 5 s: the agent hung up on it
    while time.monotonic() < deadline and not upstream.aborted:
        time.sleep(0.02)
    assert upstream.aborted == 1
    assert agent.call("GET", "/v1/egress/api/ok")[0] == 200


def test_pipelined_requests_behind_an_egress_call_are_answered_in_order(
    make_agent: Callable[..., Agent], upstream: Upstream
) -> None:
    agent = make_agent([route("api", upstream.url)])
    conn = agent.conn()
    conn.send(
        b"POST /v1/egress/api/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /v1/health HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    status, _, body = conn.response()
    assert status == 200 and json.loads(body)["body"] == "hello"
    status, _, body = conn.response()
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_a_body_sent_slowly_is_waited_for(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    agent = make_agent([route("api", upstream.url)])
    conn = agent.conn()
    conn.send(b"POST /v1/egress/api/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhel")
    time.sleep(0.1)
    conn.send(b"lo worl")
    status, _, body = conn.response()
    assert status == 200 and json.loads(body)["body"] == "hello worl"


def test_egress_answers_are_never_cached(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    agent = make_agent([route("api", upstream.url)])
    conn = agent.conn()
    for _ in range(3):
        assert conn.request("GET", "/v1/egress/api/ok")[0] == 200
    assert len(upstream.seen) == 3


def test_egress_needs_no_environment(
    monkeypatch: pytest.MonkeyPatch, make_agent: Callable[..., Agent], upstream: Upstream
) -> None:
    # a proxy in the environment is never used for egress (the agent is the proxy), nor a .netrc
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    agent = make_agent([route("api", upstream.url)])
    assert agent.call("GET", "/v1/egress/api/ok")[0] == 200
    assert os.environ["HTTPS_PROXY"]


def test_expect_100_continue_is_answered(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    agent = make_agent([route("api", upstream.url)])
    conn = agent.conn()
    conn.send(b"POST /v1/egress/api/echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    assert conn.head()[0] == 100
    conn.send(b"body")
    status, _, body = conn.response()
    assert status == 200 and json.loads(body)["body"] == "body"
    assert upstream.last().header("Expect") == []


def test_a_refused_call_with_a_body_gets_its_refusal(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    policy = Policy(parse_rules({"rule": [{"uid": ME.uid, "secrets": ["*"]}]}))
    agent = make_agent([route("api", upstream.url)], policy)
    conn = agent.conn()
    status, _, body = conn.request("POST", "/v1/egress/api/echo", body=b'{"a": 1}')
    assert status == 403 and json.loads(body)["error"]["code"] == "forbidden"
    assert conn.request("GET", "/v1/health")[0] == 200  # the body was read: the connection is still in step
    assert upstream.seen == []


def test_upstream_connections_are_kept_alive_and_reused(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    agent = make_agent([route("api", upstream.url)])
    for _ in range(3):
        assert agent.call("GET", "/v1/egress/api/ok")[0] == 200
    assert agent.call("POST", "/v1/egress/api/echo", body=b"x" * 100)[0] == 200
    assert len(upstream.conns) == 1  # one TLS connection for all four calls, from separate worker connections


def test_a_pooled_connection_the_upstream_closed_is_not_used(
    make_agent: Callable[..., Agent], upstream: Upstream
) -> None:
    agent = make_agent([route("api", upstream.url)])
    assert agent.call("GET", "/v1/egress/api/ok")[0] == 200
    for conn in upstream.conns:  # the upstream drops its idle keep-alive connection
        conn.shutdown(socket.SHUT_RDWR)
    assert agent.call("GET", "/v1/egress/api/ok")[0] == 200  # a new one (or a retry), not a 502
    assert agent.call("POST", "/v1/egress/api/echo", body=b"hello")[0] == 200
    assert len(upstream.conns) == 2


def test_a_half_read_answer_does_not_go_back_to_the_pool(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    agent = make_agent([route("api", upstream.url)])
    conn = agent.conn()
    conn.send(f"GET /v1/egress/api/stream?n={48 << 20} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    assert conn.head()[0] == 200
    conn.sock.close()  # the worker leaves mid-answer: that upstream connection is out of step, so closed
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not upstream.aborted:
        time.sleep(0.02)
    assert upstream.aborted == 1
    status, _, doc = agent.call("GET", "/v1/egress/api/ok")
    assert status == 200 and doc == {"ok": True}
    # HTTP/1.1: that connection was closed, a new one made; HTTP/2: that stream was reset, the connection kept
    assert len(upstream.conns) == (1 if upstream.protocol == "h2" else 2)


def test_the_request_body_streams_up_before_it_is_whole(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    agent = make_agent([route("api", upstream.url)])
    conn = agent.conn()
    conn.send(b"POST /v1/egress/api/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n" + b"a" * 1000)
    deadline = time.monotonic() + 5  # the agent has gone upstream with what it has: no waiting for the rest
    while time.monotonic() < deadline and not upstream.conns:
        time.sleep(0.02)
    assert len(upstream.conns) == 1 and upstream.seen == []
    for _ in range(1999):
        conn.send(b"b" * 1000)
    status, _, body = conn.response()
    doc = json.loads(body)
    assert status == 200 and len(doc["body"]) == 2_000_000 and doc["body"].startswith("a" * 1000 + "b")


def test_a_stalled_body_gets_408_and_the_upstream_call_is_dropped(
    monkeypatch: pytest.MonkeyPatch, make_agent: Callable[..., Agent], upstream: Upstream
) -> None:
    from vault_edge.agent import endpoint

    monkeypatch.setattr(endpoint, "BODY_TIMEOUT_S", 0.5)
    agent = make_agent([route("api", upstream.url)])
    conn = agent.conn()
    conn.send(b"POST /v1/egress/api/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhel")
    status, _, body = conn.response()
    assert status == 408 and json.loads(body)["error"]["message"] == "the request body was not finished in time"
    # the call went up as the body came, and was cut: the upstream never got a whole request
    assert all(len(seen.body) < 10 for seen in upstream.seen)
    assert agent.call("POST", "/v1/egress/api/echo", body=b"hello")[0] == 200


def _rotated(agent: Agent, routes: list[dict[str, Any]], grace_s: float = 100.0) -> None:
    """KEY2 current, KEY previous (within its grace on the agent's clock)."""
    clock = agent.served.state.clock
    entries = [
        Entry("api/key", 2, "current", KEY2.encode()),
        Entry("api/key", 1, "previous", KEY.encode(), clock.wall() + grace_s),
    ]
    parsed = tuple(route_from_json(r).route for r in routes)
    rev = agent.served.state.view.revision + 1
    agent.served.call(lambda: agent.served.state.install(View(NODE, REGION, rev, entries, parsed)))


def test_a_401_during_the_grace_is_retried_once_with_the_previous_value(
    make_agent: Callable[..., Agent], upstream: Upstream
) -> None:
    routes = [route("api", upstream.url, retry_previous_on_401=True), route("plain", upstream.url)]
    agent = make_agent(routes)
    _rotated(agent, routes)
    upstream.accept = f"Bearer {KEY}"  # the upstream has not taken the new key yet
    conn = agent.conn()
    status, _, body = conn.request("POST", "/v1/egress/api/auth", body=b'{"q": 1}')
    assert status == 200 and json.loads(body) == {"ok": True, "body": '{"q": 1}'}  # the body sent again, whole
    assert [s.header("Authorization") for s in upstream.seen] == [[f"Bearer {KEY2}"], [f"Bearer {KEY}"]]
    assert len(upstream.conns) == 1  # the 401's connection was read to its end and used again
    # off by default: a route without the flag gives the worker the 401 (scrubbed of the key it echoes)
    status, _, body = conn.request("GET", "/v1/egress/plain/auth")
    assert status == 401 and json.loads(body)["got"] == "Bearer " + "*" * len(KEY2)
    # the upstream takes the new key: one call, no retry
    upstream.accept = f"Bearer {KEY2}"
    n = len(upstream.seen)
    assert conn.request("GET", "/v1/egress/api/auth")[0] == 200 and len(upstream.seen) == n + 1
    # both keys refused: one retry, then the worker gets the 401, neither key in it
    upstream.accept = "Bearer something-else"
    status, _, body = conn.request("GET", "/v1/egress/api/auth")
    assert status == 401 and len(upstream.seen) == n + 3
    assert json.loads(body)["got"] == "Bearer " + "*" * len(KEY)


def test_no_retry_with_previous_past_its_grace_or_for_a_body_too_large_to_replay(
    make_agent: Callable[..., Agent], upstream: Upstream
) -> None:
    routes = [route("api", upstream.url, retry_previous_on_401=True)]
    agent = make_agent(routes)
    _rotated(agent, routes)
    upstream.accept = f"Bearer {KEY}"
    status, _, _ = agent.call("POST", "/v1/egress/api/auth", body=b"x" * (64 * 1024 + 1))
    assert status == 401 and len(upstream.seen) == 1  # over 64 KiB: not kept, so not sent again
    agent.served.state.clock.advance(101)  # the grace is over: previous is no longer served
    status, _, _ = agent.call("GET", "/v1/egress/api/auth")
    assert status == 401 and len(upstream.seen) == 2


def test_metrics_per_route(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    from vault_edge.agent.metrics import render

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    agent = make_agent([route("api", upstream.url), route("down", f"https://127.0.0.1:{dead}")])
    assert agent.call("GET", "/v1/egress/api/ok")[0] == 200
    assert agent.call("GET", "/v1/egress/api/ok")[0] == 200
    assert agent.call("GET", "/v1/egress/api/nothing-here")[0] == 404
    assert agent.call("GET", "/v1/egress/down/ok")[0] == 502
    assert agent.call("GET", "/v1/egress/nope/ok")[0] == 404  # no route: no upstream call, not counted per route

    class Listener:
        conns: set[object] = set()

        def cache_hits(self) -> int:
            return 0

    text = agent.served.call(lambda: render(agent.served.api, None, Listener())).decode()
    lines = set(text.splitlines())
    assert 'vault_edge_agent_egress_requests_total{route="api"} 3' in lines
    assert 'vault_edge_agent_egress_requests_total{route="down"} 1' in lines
    assert 'vault_edge_agent_egress_upstream_answers_total{route="api",class="2xx"} 2' in lines
    assert 'vault_edge_agent_egress_upstream_answers_total{route="api",class="4xx"} 1' in lines
    assert 'vault_edge_agent_egress_upstream_failures_total{route="down",kind="connect"} 1' in lines
    assert 'vault_edge_agent_egress_upstream_seconds_bucket{route="api",le="+Inf"} 3' in lines
    assert 'vault_edge_agent_egress_upstream_seconds_count{route="api"} 3' in lines
    assert 'vault_edge_agent_egress_upstream_seconds_count{route="down"} 0' in lines
    # the same counters, as the sync poll carries them to the control plane
    report = Report.decode(agent.served.call(agent.served.api.egress.report))
    counts = {n: dict(zip(REPORT_FIELDS, c, strict=True)) for n, c in report.routes}
    assert counts["api"] == {**counts["api"], "requests": 3, "2xx": 2, "4xx": 1, "failed": 0}
    assert counts["down"] == {**counts["down"], "requests": 1, "failed": 1, "ms": 0}
    assert abs(report.since - time.time()) < 60


CHUNKED = "POST /v1/egress/api/echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"


def test_a_chunked_upload_streams_up_chunked(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    agent = make_agent([route("api", upstream.url)])
    conn = agent.conn()
    conn.send(f"{CHUNKED}\r\n".encode() + b"5;ext=1\r\nhello\r\n")
    deadline = time.monotonic() + 5  # the first chunk is upstream before the worker sends the rest
    while time.monotonic() < deadline and not upstream.chunk_times:
        time.sleep(0.02)
    assert len(upstream.chunk_times) == 1 and upstream.seen == []
    conn.send(b"6\r\n world\r\n")
    conn.send(b"0\r\nX-Trailer: dropped\r\n\r\n" + b"GET /v1/health HTTP/1.1\r\nHost: a\r\n\r\n")
    status, _, body = conn.response()
    assert status == 200 and json.loads(body)["body"] == "hello world"
    seen = upstream.last()
    # HTTP/1.1 frames it chunked; HTTP/2 in DATA frames, with no Transfer-Encoding (not allowed there)
    assert seen.header("Transfer-Encoding") == ([] if upstream.protocol == "h2" else ["chunked"])
    assert seen.header("Content-Length") == []
    assert seen.header("X-Trailer") == []
    assert conn.response()[0] == 200  # the request pipelined behind the body, in step
    # an empty chunked body, and a large one in many pieces, on the same connection
    conn.send(f"{CHUNKED}\r\n0\r\n\r\n".encode())
    status, _, body = conn.response()
    assert status == 200 and json.loads(body)["body"] == ""
    conn.send(f"{CHUNKED}\r\n".encode())
    for i in range(200):
        conn.send(b"1388\r\n" + bytes([97 + i % 26]) * 5000 + b"\r\n")
    conn.send(b"0\r\n\r\n")
    status, _, body = conn.response()
    got = json.loads(body)["body"]
    assert status == 200 and len(got) == 1_000_000 and got.startswith("a" * 5000 + "b")


@pytest.mark.parametrize(
    ("framing", "status"),
    [
        (b"5\nhello\r\n0\r\n\r\n", 400),  # a bare LF
        (b"0x5\r\nhello\r\n0\r\n\r\n", 400),
        (b" 5\r\nhello\r\n0\r\n\r\n", 400),
        (b"-1\r\n", 400),
        (b"5\r\nhelloXX0\r\n\r\n", 400),  # no CRLF after the data
        (b"ffffffffffffffff\r\n", 400),  # 16 hex digits
        (b"1;" + b"e" * 5000 + b"\r\n", 400),  # extensions past the bound
        (b"7fffffffffffffff"[:15] + b"\r\n", 413),  # a size past the limit
    ],
)
def test_malformed_chunked_uploads_are_refused(
    make_agent: Callable[..., Agent], upstream: Upstream, framing: bytes, status: int
) -> None:
    agent = make_agent([route("api", upstream.url)])
    conn = agent.conn()
    conn.send(f"{CHUNKED}\r\n".encode() + framing)
    got, _, body = conn.response()
    assert got == status and json.loads(body)["error"]["code"] == "bad_request"
    assert conn.sock.recv(1) == b""  # closed: the connection is out of step
    assert upstream.seen == []  # nothing whole reached it


def test_transfer_codings_other_than_chunked_get_501(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    agent = make_agent([route("api", upstream.url)])
    # a coding the agent does not decode (RFC 9112 §6.1: 501); framings llhttp refuses itself are 400s
    for coding, status in (("gzip, chunked", 501), ("chunked, chunked", 400), ("gzip", 400)):
        conn = agent.conn()
        conn.send(f"POST /v1/egress/api/echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {coding}\r\n\r\n".encode())
        assert conn.response()[0] == status, coding
    assert upstream.seen == []


def test_a_chunked_body_that_stalls_gets_408(
    monkeypatch: pytest.MonkeyPatch, make_agent: Callable[..., Agent], upstream: Upstream
) -> None:
    from vault_edge.agent import endpoint

    monkeypatch.setattr(endpoint, "BODY_TIMEOUT_S", 0.5)
    agent = make_agent([route("api", upstream.url)])
    conn = agent.conn()
    conn.send(f"{CHUNKED}\r\n3\r\nhel\r\n".encode())
    status, _, body = conn.response()
    assert status == 408 and "not finished in time" in json.loads(body)["error"]["message"]
    assert all(seen.body != b"hel" for seen in upstream.seen)  # the upstream never got a whole request


def test_a_chunked_body_is_sent_again_on_a_401_during_the_grace(
    make_agent: Callable[..., Agent], upstream: Upstream
) -> None:
    routes = [route("api", upstream.url, retry_previous_on_401=True)]
    agent = make_agent(routes)
    _rotated(agent, routes)
    upstream.accept = f"Bearer {KEY}"
    conn = agent.conn()
    conn.send(b"POST /v1/egress/api/auth HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    conn.send(b'4\r\n{"q"\r\n')
    conn.send(b"3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n")
    status, _, body = conn.response()
    assert status == 200 and json.loads(body) == {"ok": True, "body": '{"q": 1}'}
    assert [s.header("Authorization") for s in upstream.seen] == [[f"Bearer {KEY2}"], [f"Bearer {KEY}"]]
    assert [s.body for s in upstream.seen] == [b'{"q": 1}', b'{"q": 1}']


def test_a_worker_that_reads_slowly_gets_the_whole_answer(make_agent: Callable[..., Agent], upstream: Upstream) -> None:
    """Flow control on the way down: the agent stops relaying while the worker does not read (the upstream
    is paused in turn) and goes on when it reads again."""
    agent = make_agent([route("api", upstream.url)])
    conn = agent.conn()
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    size = 24 << 20
    conn.send(f"GET /v1/egress/api/big?n={size} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    time.sleep(0.5)  # not reading: the agent's writes to this worker block
    status, headers = conn.head()
    assert status == 200 and int(headers["content-length"]) == size
    got = len(conn.buf)
    while got < size:
        chunk = conn.sock.recv(1 << 20)
        assert chunk
        got += len(chunk)
    assert got == size
    assert conn.request("GET", "/v1/egress/api/ok")[0] == 200  # in step, and the upstream connection reused
    assert len(upstream.conns) == 1


def test_an_answer_that_stops_coming_is_cut_after_the_timeout(
    make_agent: Callable[..., Agent], upstream: Upstream
) -> None:
    agent = make_agent([route("api", upstream.url)], timeout=0.5)
    conn = agent.conn()
    conn.send(b"GET /v1/egress/api/sse?n=2&gap=2 HTTP/1.1\r\nHost: a\r\n\r\n")
    status, _ = conn.head()
    assert status == 200
    started = time.monotonic()
    with pytest.raises(EOFError):  # the first event, then nothing for longer than the timeout: cut
        for _ in conn.chunks():
            pass
    assert time.monotonic() - started < 1.9
    assert agent.call("GET", "/v1/egress/api/ok")[0] == 200


def test_a_bug_in_the_relay_costs_that_call_only(
    monkeypatch: pytest.MonkeyPatch, make_agent: Callable[..., Agent], upstream: Upstream
) -> None:
    from vault_edge.agent import egress

    agent = make_agent([route("api", upstream.url)])

    def broken(self: Any, conn: Any) -> bytes:
        raise RuntimeError(KEY)  # even an exception holding the key: its type is all that is logged

    monkeypatch.setattr(egress._Relay, "head", broken)
    status, _, doc = agent.call("GET", "/v1/egress/api/ok")
    assert status == 500 and doc["error"]["code"] == "internal"
    monkeypatch.undo()
    assert agent.call("GET", "/v1/egress/api/ok")[0] == 200


# -- HTTP/2 only ---------------------------------------------------------------------------------------


@pytest.fixture
def h2up(pki: tuple[Path, Path, Path]) -> Iterator[H2Upstream]:
    u = H2Upstream(pki[1], pki[2], max_streams=4)
    yield u
    u.close()


def _at_once(agent: Agent, n: int, target: str) -> list[tuple[int, dict[str, str], bytes]]:
    """``n`` calls at once, each from its own worker connection."""
    conns = [agent.conn() for _ in range(n)]
    for c in conns:
        c.send(f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    return [c.response() for c in conns]


def test_http2_calls_share_one_connection_up_to_the_upstreams_limit(
    make_agent: Callable[..., Agent], h2up: H2Upstream
) -> None:
    agent = make_agent([route("api", h2up.url)])
    assert agent.call("GET", "/v1/egress/api/ok")[0] == 200  # the pool learns the upstream speaks HTTP/2
    got = _at_once(agent, 4, "/v1/egress/api/hold?s=0.5")
    assert [g[0] for g in got] == [200] * 4
    assert len(h2up.conns) == 1 and h2up.most_streams == 4  # four calls at once, as streams of one connection
    # past the upstream's SETTINGS_MAX_CONCURRENT_STREAMS (4) the pool opens another connection
    got = _at_once(agent, 6, "/v1/egress/api/hold?s=0.5")
    assert [g[0] for g in got] == [200] * 6
    assert len(h2up.conns) == 2 and h2up.most_streams == 4
    assert all(s.header("Authorization") == [f"Bearer {KEY}"] for s in h2up.seen)


def test_http2_a_refused_stream_is_retried_once_on_a_new_stream(
    make_agent: Callable[..., Agent], h2up: H2Upstream
) -> None:
    agent = make_agent([route("api", h2up.url)])
    status, _, doc = agent.call("GET", "/v1/egress/api/refuse-once")
    assert status == 200 and doc == {"ok": True}
    assert h2up.refused == 1 and len(h2up.seen) == 2 and len(h2up.conns) == 1


def test_http2_after_the_upstreams_goaway_a_new_connection_is_made(
    make_agent: Callable[..., Agent], h2up: H2Upstream
) -> None:
    agent = make_agent([route("api", h2up.url)])
    assert agent.call("GET", "/v1/egress/api/goaway")[0] == 200  # answered, then GOAWAY
    assert agent.call("GET", "/v1/egress/api/ok")[0] == 200
    assert agent.call("POST", "/v1/egress/api/echo", body=b"hello")[0] == 200
    assert len(h2up.conns) == 2 and h2up.errors == 0


def test_http2_a_worker_leaving_resets_its_stream_only(make_agent: Callable[..., Agent], h2up: H2Upstream) -> None:
    agent = make_agent([route("api", h2up.url)])
    streaming = agent.conn()
    streaming.send(b"GET /v1/egress/api/sse?n=50&gap=0.1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert streaming.head()[0] == 200
    other = agent.conn()  # another call on the same upstream connection, in flight meanwhile
    other.send(b"GET /v1/egress/api/hold?s=0.6 HTTP/1.1\r\nHost: a\r\n\r\n")
    time.sleep(0.2)
    streaming.sock.close()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not h2up.aborted:
        time.sleep(0.02)
    assert h2up.aborted == 1  # the upstream was told (RST_STREAM) and stopped sending
    status, _, body = other.response()
    assert status == 200 and json.loads(body) == {"slow": True}  # the other stream went on
    assert len(h2up.conns) == 1


def test_an_upstream_that_speaks_http2_only_is_not_offered_it_by_the_control_plane_client(
    pki: tuple[Path, Path, Path],
) -> None:
    """The pool offers HTTP/2 only where asked (the egress proxy); the control plane's stays HTTP/1.1."""
    import ssl

    from vault_edge.agent.upstream import Pool, UpstreamError

    up = H2Upstream(pki[1], pki[2])

    async def go() -> None:
        pool = Pool(ssl.create_default_context(cafile=str(pki[0])))
        conn, _ = await pool.get(("https", "127.0.0.1", up.port), 5)
        conn.begin(False)
        conn.start(b"GET /ok HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n", b"", False, True)
        with pytest.raises(UpstreamError):
            await conn.head(5)  # the HTTP/2-only upstream cannot read an HTTP/1.1 request
        conn.close()
        pool.close()

    try:
        asyncio.run(go())
    finally:
        up.close()


def test_http2_the_fields_holding_the_key_are_never_indexed(make_agent: Callable[..., Agent], h2up: H2Upstream) -> None:
    """HPACK keeps fields in a table per connection unless told not to (RFC 7541 §7.1.3): the injected
    fields are sent never-indexed, so no intermediary that re-encodes them keeps the key either."""
    agent = make_agent(
        [
            route("api", h2up.url, inject=["header:X-Api-Key={value}"]),
            route("q", h2up.url, inject=["query:key={value}"]),
        ]
    )
    assert agent.call("GET", "/v1/egress/api/ok", "X-Keep: yes\r\n")[0] == 200
    assert h2up.last().header("X-Api-Key") == [KEY]
    assert "x-api-key" in h2up.never_indexed[-1] and "x-keep" not in h2up.never_indexed[-1]
    assert ":path" not in h2up.never_indexed[-1]
    assert agent.call("GET", "/v1/egress/q/ok?x=1")[0] == 200
    assert h2up.last().query == {"x": ["1"], "key": [KEY]} and ":path" in h2up.never_indexed[-1]


def test_http2_an_upstream_that_breaks_the_protocol_costs_its_calls_only(
    make_agent: Callable[..., Agent], h2up: H2Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    agent = make_agent([route("api", h2up.url)])
    waiting = agent.conn()  # a call in flight on the same connection when it breaks
    waiting.send(b"GET /v1/egress/api/hold?s=2 HTTP/1.1\r\nHost: a\r\n\r\n")
    time.sleep(0.2)
    status, _, doc = agent.call("GET", "/v1/egress/api/garbage")
    assert status == 502 and doc["error"]["code"] == "bad_upstream"
    status, _, body = waiting.response()
    assert status == 502 and json.loads(body)["error"]["code"] in ("bad_upstream", "upstream_unreachable")
    assert agent.call("GET", "/v1/egress/api/ok")[0] == 200  # a new connection; the agent serves on
    assert agent.call("GET", "/v1/secrets/other/key")[0] == 200
    assert len(h2up.conns) == 2
    assert "internal error" not in caplog.text  # handled as the upstream's fault, not a bug of the agent


def test_http2_off_offers_only_http1(make_agent: Callable[..., Agent], h2up: H2Upstream, upstream: Upstream) -> None:
    """``--egress-http2 off``: the handshake offers HTTP/1.1 only; an upstream that speaks nothing else
    gets no call it can read (a clear 502), one that speaks HTTP/1.1 is served as ever."""
    agent = make_agent([route("h2only", h2up.url), route("api", upstream.url)], http2=False)
    status, _, doc = agent.call("GET", "/v1/egress/h2only/ok")
    assert status == 502 and doc["error"]["code"] in ("bad_upstream", "upstream_unreachable")
    assert h2up.seen == []
    assert agent.call("GET", "/v1/egress/api/ok")[0] == (200 if upstream.protocol == "http/1.1" else 502)


@pytest.mark.parametrize("kind", ["crlf", "upper", "colon", "pseudo", "nul"])
def test_http2_an_answer_with_a_forbidden_field_is_refused_never_relayed(
    make_agent: Callable[..., Agent], h2up: H2Upstream, kind: str
) -> None:
    """A field value with CR LF would split the worker's HTTP/1.1 answer; a name that is no lower-case
    token, or a pseudo-field past ``:status``, is a broken answer (RFC 9113 §8.2.1, §8.3)."""
    agent = make_agent([route("api", h2up.url)])
    conn = agent.conn()
    status, headers, body = conn.request("GET", f"/v1/egress/api/evil-header?kind={kind}")
    assert status == 502 and json.loads(body)["error"]["code"] == "bad_upstream"
    assert "set-cookie" not in headers and "x-evil" not in headers
    assert conn.request("GET", "/v1/egress/api/ok")[0] == 200  # the stream was reset; the connection serves on
    assert len(h2up.conns) == 1


def test_http2_a_graceful_goaway_lets_the_streams_in_flight_finish(
    make_agent: Callable[..., Agent], h2up: H2Upstream
) -> None:
    """A GOAWAY naming a stream as processed (as nginx sends after keepalive_requests): that stream's
    answer still comes and is relayed; new calls go on a new connection."""
    agent = make_agent([route("api", h2up.url)])
    status, _, doc = agent.call("GET", "/v1/egress/api/graceful")
    assert status == 200 and doc == {"ok": True}
    conn = agent.conn()  # an upload under way when the GOAWAY comes: it is finished and answered
    conn.send(b"POST /v1/egress/api/echo?goaway-on-headers HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\n\r\nabcd")
    time.sleep(0.3)
    conn.send(b"efgh")
    status, _, body = conn.response()
    assert status == 200 and json.loads(body)["body"] == "abcdefgh"
    assert agent.call("GET", "/v1/egress/api/ok")[0] == 200
    assert len(h2up.conns) == 3 and h2up.errors == 0


def test_http2_streams_the_upstream_opens_end_its_connection_at_once(
    make_agent: Callable[..., Agent], h2up: H2Upstream
) -> None:
    """A server may not open streams to a client that allows none (SETTINGS_MAX_CONCURRENT_STREAMS 0):
    thousands of such HEADERS cost the agent nothing kept, and its other callers nothing at all."""
    agent = make_agent([route("api", h2up.url)])
    status, _, doc = agent.call("GET", "/v1/egress/api/flood?n=5000")
    assert status == 502 and doc["error"]["code"] == "bad_upstream"
    pool = agent.served.api.egress._upstreams
    assert pool is not None and agent.served.call(lambda: sum(len(v) for v in pool.h2.values())) == 0
    assert agent.call("GET", "/v1/secrets/other/key")[0] == 200
    assert agent.call("GET", "/v1/egress/api/ok")[0] == 200


def test_http2_a_refused_post_is_sent_again(make_agent: Callable[..., Agent], h2up: H2Upstream) -> None:
    """REFUSED_STREAM says the upstream did nothing with the request (RFC 9113 §8.7): safe to send
    again whatever the method."""
    agent = make_agent([route("api", h2up.url)])
    status, _, doc = agent.call("POST", "/v1/egress/api/refuse-once", body=b"x")
    assert status == 200 and doc == {"ok": True} and h2up.refused == 1 and len(h2up.seen) == 2


@pytest.mark.parametrize("warm", [True, False])
def test_http2_never_more_streams_than_the_upstream_allows(
    make_agent: Callable[..., Agent], pki: tuple[Path, Path, Path], warm: bool
) -> None:
    """Streams handed out count against the upstream's limit before they open (a streamed upload waits
    for its body first), and a new connection takes none before the upstream's SETTINGS say how many."""
    up = H2Upstream(pki[1], pki[2], max_streams=2)
    try:
        agent = make_agent([route("api", up.url)])
        if warm:
            assert agent.call("GET", "/v1/egress/api/ok")[0] == 200
        conns = [agent.conn() for _ in range(5)]
        for c in conns:  # streamed uploads: each call holds its stream while its body comes
            c.send(b"PUT /v1/egress/api/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n")
        time.sleep(0.3)
        for c in conns:
            c.send(b"abcd")
        assert [c.response()[0] for c in conns] == [200] * 5
        got = _at_once(agent, 6, "/v1/egress/api/hold?s=0.3")
        assert [g[0] for g in got] == [200] * 6
        assert up.errors == 0 and up.most_streams <= 2
    finally:
        up.close()


def test_http2_a_call_whose_new_connection_was_filled_meanwhile_goes_on_another(pki: tuple[Path, Path, Path]) -> None:
    """Calls that come while a new connection waits for the upstream's SETTINGS may take all its
    streams before the call that made it resumes: that call then goes on as theirs would (another
    connection here), where it failed and closed the connection under the others' streams (CI saw it)."""
    import ssl

    from vault_edge.agent.upstream import Leg, Pool

    up = H2Upstream(pki[1], pki[2], max_streams=1)
    origin = ("https", "127.0.0.1", up.port)

    async def ok(leg: Leg) -> None:
        leg.begin(False)
        leg.start(b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"", False, True)
        await leg.head(5)
        body = b""
        while chunk := await leg.read(5):
            body += chunk
        assert leg.status == 200 and json.loads(body) == {"ok": True}
        leg.close()

    async def go() -> None:
        pool = Pool(ssl.create_default_context(cafile=str(pki[0])), http2=True)
        settled, taken = pool._settled, []

        async def settle_then_lose_the_room(h2c: Any, timeout: float) -> None:
            await settled(h2c, timeout)
            if not taken:
                taken.append(pool.idle_conn(origin))  # a call that came meanwhile

        pool._settled = settle_then_lose_the_room  # type: ignore[method-assign]
        leg = await pool.connect(origin, 5)
        assert taken[0] is not None and leg is not taken[0] and len(pool.h2[origin]) == 2
        await ok(taken[0])
        await ok(leg)
        pool.close()

    try:
        asyncio.run(go())
    finally:
        up.close()


def test_http2_slow_workers_cannot_starve_a_connection(pki: tuple[Path, Path, Path]) -> None:
    """Each stream may hold its window unread (a worker that does not read): a connection carries no
    more streams than its own window holds, so another call goes on another connection and is served."""
    import ssl

    from vault_edge.agent.upstream import Pool
    from vault_edge.agent.upstream_h2 import MAX_STREAMS

    up = H2Upstream(pki[1], pki[2])
    origin = ("https", "127.0.0.1", up.port)

    async def call(pool: Pool, target: str) -> Any:
        leg, _ = await pool.get(origin, 5)
        leg.begin(False)
        leg.start(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(), b"", False, True)
        await leg.head(5)
        return leg

    async def go() -> None:
        pool = Pool(ssl.create_default_context(cafile=str(pki[0])), http2=True)
        slow = [await call(pool, "/big?n=1000000") for _ in range(MAX_STREAMS)]
        await asyncio.sleep(0.5)  # none of them read: their windows fill
        fast = await call(pool, "/big?n=10")
        assert await fast.read(3) == b"x" * 10
        assert len(pool.h2[origin]) == 2
        for s in [*slow, fast]:
            s.close()
        pool.close()

    try:
        asyncio.run(go())
    finally:
        up.close()
