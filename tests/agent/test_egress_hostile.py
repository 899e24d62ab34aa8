"""The egress path against an upstream that sends what it likes, byte for byte (scripted servers:
tests/agent/egress_hostile.py), and against callers that send what HTTP barely allows. Each test
failed before the change that made it pass (found by a review of the egress path). The fixtures are
test_egress's, with its leak check: no key reaches a worker or the log, no upstream's doing is
logged as a bug of the agent."""

from __future__ import annotations

import socket
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.agent.egress_hostile import Scripted, frame, settings
from tests.agent.egress_upstream import Upstream
from tests.agent.test_egress import Agent, make_agent, other, pki, route  # noqa: F401 (fixtures)
from vault_edge.wire.egress import WireError, parse_upstream

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
def scripted(pki: tuple[Path, Path, Path]) -> Iterator[Callable[..., Scripted]]:  # noqa: F811
    made: list[Scripted] = []

    def make(on_request: Callable[[Any, int], None], **kw: Any) -> Scripted:
        up = Scripted(pki[1], pki[2], on_request, **kw)
        made.append(up)
        return up

    yield make
    for up in made:
        up.close()


def _h2_conns(agent: Agent) -> int:
    pool = agent.served.api.egress._upstreams
    assert pool is not None
    return agent.served.call(lambda: sum(len(v) for v in pool.h2.values()))  # type: ignore[no-any-return]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- HTTP/1.1 upstreams ---------------------------------------------------------------------------
@pytest.mark.parametrize("tail", ["a whole answer", "the start of one"])
def test_bytes_after_an_answer_in_the_same_read_never_reach_a_worker_nor_the_pool(
    make_agent: Callable[..., Agent],  # noqa: F811
    scripted: Callable[..., Scripted],
    tail: str,
) -> None:
    """llhttp parses a second answer that arrives with the first: it is not relayed (as the answer to
    the worker's next, pipelined request) and the connection, out of step, is not pooled."""
    forged = b'HTTP/1.1 200 OK\r\nContent-Length: 18\r\n\r\n{"value":"forged"}'
    first = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(forged), b"a" * len(forged))
    extra = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(forged)
    extra += forged if tail == "a whole answer" else b""

    def answer(conn: Any, n: int) -> None:
        conn.write(first + extra if conn.up.requests == 1 else OK)

    up = scripted(answer, alpn="http/1.1")
    agent = make_agent([route("api", up.url)])
    conn = agent.conn()
    conn.send(b"GET /v1/egress/api/x HTTP/1.1\r\nHost: a\r\n\r\nGET /v1/secrets/other/key HTTP/1.1\r\nHost: a\r\n\r\n")
    assert conn.response() == (200, {"content-length": str(len(forged))}, b"a" * len(forged))
    status, _, body = conn.response()
    assert status == 200 and b"forged" not in body and b"other-secret-value" in body
    assert agent.call("GET", "/v1/egress/api/x")[0::2] == (200, b"ok")
    assert len(up.conns) == 2  # a new connection for the next call


def test_an_answer_without_a_valid_status_is_a_502(
    make_agent: Callable[..., Agent],  # noqa: F811
    scripted: Callable[..., Scripted],
) -> None:
    up = scripted(lambda conn, n: conn.write(b"HTTP/1.1 000 OK\r\nContent-Length: 2\r\n\r\nok"), alpn="http/1.1")
    agent = make_agent([route("api", up.url)])
    status, _, doc = agent.call("GET", "/v1/egress/api/x")
    assert status == 502 and doc["error"]["code"] == "bad_upstream"


# -- callers --------------------------------------------------------------------------------------
def test_an_empty_line_before_the_request_line_is_ignored(
    make_agent: Callable[..., Agent],  # noqa: F811
    scripted: Callable[..., Scripted],
) -> None:
    """RFC 9112 §2.2: the request line goes up as the request line (it went up as a header field)."""
    up = scripted(lambda conn, n: conn.write(OK), alpn="http/1.1")
    agent = make_agent([route("api", up.url)])
    conn = agent.conn()
    conn.send(b"\r\nGET /v1/egress/api/x?a=b:c HTTP/1.1\r\nHost: a\r\n\r\n\r\nGET /v1/health HTTP/1.1\r\n\r\n")
    assert conn.response()[0::2] == (200, b"ok")
    assert conn.response()[0] == 200
    assert up.heads[-1].startswith(b"GET /x?a=b:c HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"/v1/egress" not in up.heads[-1]  # (it went up as a field: 'get /v1/egress/api/x?a=b: c HTTP/1.1')


def test_an_error_the_agent_makes_for_a_head_has_no_body(make_agent: Callable[..., Agent]) -> None:  # noqa: F811
    """A body after a HEAD's answer would be read as the answer to the worker's next request."""
    agent = make_agent([route("down", f"https://127.0.0.1:{_free_port()}")])
    conn = agent.conn()
    conn.send(b"HEAD /v1/egress/down/x HTTP/1.1\r\nHost: a\r\n\r\nGET /v1/health HTTP/1.1\r\nHost: a\r\n\r\n")
    status, headers = conn.head()
    assert status == 502 and int(headers["content-length"]) > 0
    assert conn.response()[0] == 200 and conn.buf == b""


def test_an_answer_head_that_comes_while_the_worker_is_not_reading_is_kept(
    make_agent: Callable[..., Agent],  # noqa: F811
    other: Upstream,  # noqa: F811
) -> None:
    """The worker's socket full (thousands of answers it has not read yet): the egress answer's head
    still goes before its body (the body went alone once the worker read again)."""
    agent = make_agent([route("api", other.url)])
    conn = agent.conn()
    n = 3000
    conn.send(b"GET /v1/secrets/other/key HTTP/1.1\r\nHost: a\r\n\r\n" * n + b"GET /v1/egress/api/ok HTTP/1.1\r\n\r\n")
    time.sleep(1.0)  # the upstream answers meanwhile
    for _ in range(n):
        assert conn.response()[0] == 200
    status, _, body = conn.response()
    assert status == 200 and body


def test_a_body_of_tiny_chunks_is_held_within_the_body_buffer(make_agent: Callable[..., Agent]) -> None:  # noqa: F811
    """Each chunk was kept as an object of its own while the upstream connection was being made: a
    body of 2-byte chunks held ~20 times the body buffer (1 MiB) before the worker was paused."""
    hole = socket.socket()  # accepts TCP (its backlog), never TLS: the call waits for its connection
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    agent = make_agent([route("api", f"https://127.0.0.1:{hole.getsockname()[1]}")], timeout=30)
    conn = agent.conn()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        conn.send(b"POST /v1/egress/api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.sock.settimeout(2)
        piece, sent = b"2\r\nab\r\n" * 10000, 0
        with pytest.raises(TimeoutError):  # the agent stops reading: the worker is paused
            while sent < 64 << 20:
                conn.sock.sendall(piece)
                sent += len(piece)
        time.sleep(0.5)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        conn.sock.close()
        hole.close()
    assert held < 6 << 20, held


@pytest.mark.parametrize(
    "target",
    [
        "/v1/egress/api/v1/..;/admin/echo",  # servlet containers read '..;x' as '..'
        "/v1/egress/api/v1/%2e%2e;x/admin/echo",
        "{url}/v1/..;/admin/echo",
        "/v1/egress/api/v1/echo#x?y",
    ],
)
def test_dot_segments_with_parameters_and_fragments_are_refused(
    make_agent: Callable[..., Agent],  # noqa: F811
    other: Upstream,  # noqa: F811
    target: str,
) -> None:
    agent = make_agent([route("api", other.url, paths=["/v1/"])])
    status, _, doc = agent.call("GET", target.format(url=other.url))
    assert status == 400 and doc["error"]["code"] == "bad_request"
    assert other.seen == []


@pytest.mark.parametrize(
    "url",
    [
        "https://a..example.com",
        "https://" + "a" * 64 + ".example.com",
        "https://-a.example.com",
        "https://a-.example.com",
    ],
)
def test_an_upstream_host_that_dns_cannot_carry_is_refused(url: str) -> None:
    """(A label IDNA refuses failed in the agent, at each call: a 500, or a wait for the timeout.)"""
    with pytest.raises(WireError):
        parse_upstream(url)


# -- HTTP/2 upstreams -----------------------------------------------------------------------------
def _ok(conn: Any, sid: int) -> None:
    conn.write(conn.headers(sid, [(b":status", b"200"), (b"content-length", b"2")]) + conn.data(sid, b"ok", end=True))


def test_http2_a_flood_of_frames_for_no_call_ends_its_connection(
    make_agent: Callable[..., Agent],  # noqa: F811
    scripted: Callable[..., Scripted],
) -> None:
    """PINGs by the ten thousand (each answered by h2, each ~20 µs of the agent's loop; unread, their
    answers piled up in the agent without bound): the connection ends, its call gets a 502, the
    agent's other callers are served."""

    def answer(conn: Any, sid: int) -> None:
        if conn.up.requests == 1:
            conn.transport.pause_reading()  # nor does it read the answers
            conn.write(frame(6, 0, 0, b"12345678") * 50_000)
        _ok(conn, sid)

    up = scripted(answer)
    agent = make_agent([route("api", up.url)])
    status, _, doc = agent.call("GET", "/v1/egress/api/x")
    assert status == 502 and doc["error"]["code"] == "bad_upstream"
    assert _h2_conns(agent) == 0
    assert agent.call("GET", "/v1/secrets/other/key")[0] == 200
    assert agent.call("GET", "/v1/egress/api/x")[0::2] == (200, b"ok")


def test_http2_a_head_answer_the_upstream_never_ends_leaves_no_stream_behind(
    make_agent: Callable[..., Agent],  # noqa: F811
    scripted: Callable[..., Scripted],
) -> None:
    """A HEAD's answer is whole with its head; its stream, never ended by the upstream, is reset (it
    counted against the upstream's limit, open, and the connection ended up refusing every call)."""

    def answer(conn: Any, sid: int) -> None:
        if conn.up.requests <= 2:
            conn.write(conn.headers(sid, [(b":status", b"200")]))  # no END_STREAM
        else:
            _ok(conn, sid)

    up = scripted(answer, initial=settings(MAX_CONCURRENT_STREAMS=2))
    agent = make_agent([route("api", up.url, methods=["GET", "HEAD"])])
    for _ in range(2):
        assert agent.conn().request("HEAD", "/v1/egress/api/x")[0] == 200
    assert [agent.call("GET", "/v1/egress/api/x")[0] for _ in range(3)] == [200] * 3


def test_http2_an_upstream_that_allows_no_stream_keeps_no_connection(
    make_agent: Callable[..., Agent],  # noqa: F811
    scripted: Callable[..., Scripted],
) -> None:
    up = scripted(_ok, initial=settings(MAX_CONCURRENT_STREAMS=0))
    agent = make_agent([route("api", up.url)])
    for _ in range(5):
        status, _, doc = agent.call("GET", "/v1/egress/api/x")
        assert status == 502 and doc["error"]["code"] == "bad_upstream"
    assert _h2_conns(agent) == 0
    deadline = time.monotonic() + 5
    while up.lost < len(up.conns) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert up.requests == 0 and up.lost == len(up.conns) == 5


def test_a_key_an_upstream_echoes_percent_encoded_is_scrubbed(
    make_agent: Callable[..., Agent],  # noqa: F811
    scripted: Callable[..., Scripted],
) -> None:
    """A header route's key, put by the upstream in a URL (a redirect's Location), percent-encoded:
    overwritten as its raw form is (only a query route's encoded form was)."""
    value = "sk/live+0123456789=="
    encoded = quote(value, safe="").encode()

    def answer(conn: Any, n: int) -> None:
        conn.write(
            b"HTTP/1.1 302 Found\r\nLocation: https://x.example/cb?k=" + encoded + b"\r\nContent-Length: 0\r\n\r\n"
        )

    up = scripted(answer, alpn="http/1.1")
    agent = make_agent([])
    agent.install([route("api", up.url)], value=value)
    status, headers, _ = agent.call("GET", "/v1/egress/api/x")
    assert status == 302 and headers["location"] == "https://x.example/cb?k=" + "*" * len(encoded)
    assert b"Bearer " + value.encode() in up.heads[-1]  # (the upstream did get the key)
