"""The agent's socket transport with its API, in this process: connections over socketpairs.

The real ``Listener`` and connection protocol serve the real ``Api`` on a uvloop loop in a thread
(``tests.agent.inproc.Served``); time is a ``FakeClock`` the tests move, state changes are made as the
sync loop makes them. What needs the kernel or a process of its own (peer credentials of another
user, socket files and modes, memory, logs) is in ``test_endpoint_process``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.agent.inproc import FakeClock, Served, make_state
from tests.agent.support import RawConn, get
from vault_edge.agent.endpoint import MAX_HEAD
from vault_edge.agent.policy import Policy


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """serve(docs=None, *, policy=None, head_timeout=..., idle_timeout=..., **state options) → Served."""
    started: list[Served] = []

    def start(
        docs: list[dict[str, Any]] | None = None,
        *,
        policy: Policy | None = None,
        head_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        **state: Any,
    ) -> Served:
        served = Served(
            make_state(FakeClock(), docs, **state), policy, head_timeout=head_timeout, idle_timeout=idle_timeout
        )
        started.append(served)
        return served

    yield start
    for s in started:
        s.close()


@pytest.fixture
def agent(serve: Callable[..., Served]) -> Served:
    return serve()


def read(c: RawConn, target: str, headers: str = "") -> Any:
    c.send(get(target, headers))
    return c.response()


# -- the per-connection answer cache ----------------------------------------------------------------


def test_a_new_view_is_served_at_once_on_a_warm_connection(agent: Served) -> None:
    with agent.conn() as reader:
        for _ in range(3):  # warm: these answers are cached by the connection
            r = read(reader, "/v1/secrets/db/main")
            assert r.json()["value"] == "hunter2" and r.headers["x-vault-edge-revision"] == "1"
        agent.install_next()
        r = read(reader, "/v1/secrets/db/main")
        assert r.headers["x-vault-edge-revision"] == "2"
        assert r.json() == {
            "name": "db/main",
            "value": "hunter2-r2",
            "encoding": "utf-8",
            "version": 4,
            "stage": "current",
            "revision": 2,
        }


def test_the_age_header_ticks_over_on_a_warm_connection(serve: Callable[..., Served]) -> None:
    agent = serve(contact_age=5)
    with agent.conn() as c:
        assert [read(c, "/v1/secrets/db/main").headers["age"] for _ in range(3)] == ["5", "5", "5"]
        agent.clock.advance(0.999)
        assert read(c, "/v1/secrets/db/main").headers["age"] == "5"
        agent.clock.advance(0.001)
        assert read(c, "/v1/secrets/db/main").headers["age"] == "6"  # the cached answer did not stick
        agent.clock.advance(100)
        assert read(c, "/v1/secrets/db/main").headers["age"] == "106"
        agent.contact()  # a contact resets it at once
        assert read(c, "/v1/secrets/db/main").headers["age"] == "0"


def test_too_stale_is_not_hidden_by_a_cached_answer(serve: Callable[..., Served]) -> None:
    agent = serve(max_stale=1.5)
    with agent.conn() as c:
        for _ in range(3):
            assert read(c, "/v1/secrets/db/main").status == 200
        agent.clock.advance(1.5)
        assert read(c, "/v1/secrets/db/main").status == 200
        agent.clock.advance(0.001)
        r = read(c, "/v1/secrets/db/main")
        assert (r.status, r.json()["error"]["code"]) == (503, "too_stale")
        assert read(c, "/v1/health").status == 200
        agent.contact()
        assert read(c, "/v1/secrets/db/main").status == 200


def test_a_grace_period_ends_on_a_warm_connection(serve: Callable[..., Served]) -> None:
    agent = serve(
        [
            {"name": "k", "version": 2, "stage": "current", "value": "new"},
            {"name": "k", "version": 1, "stage": "previous", "value": "old", "expires_in": 3},
        ]
    )
    with agent.conn() as c:
        for _ in range(3):
            assert read(c, "/v1/secrets/k?stage=previous").json()["value"] == "old"
        agent.clock.date += 3  # wall clock only: a grace period's end is a date
        assert read(c, "/v1/secrets/k?stage=previous").status == 404
        assert read(c, "/v1/secrets/k").json()["value"] == "new"


def test_token_answers_are_not_shared_across_requests_on_one_connection(
    serve: Callable[..., Served], tmp_path: Path
) -> None:
    token = "tok-A-0123456789abcdef0123456789abcdef012"
    f = tmp_path / "policy.toml"
    f.write_text(
        f'[[rule]]\nuid = {os.getuid()}\nsecrets = ["*"]\n\n'
        f'[[rule]]\ntoken_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\nsecrets = ["tenant-a/*"]\n'
    )
    agent = serve(policy=Policy.load(f))
    with agent.conn() as c:
        for _ in range(3):
            assert read(c, "/v1/secrets/db/main", f"X-Vault-Edge-Token: {token}\r\n").status == 403
            assert read(c, "/v1/secrets/db/main").status == 200
        assert read(c, "/v1/secrets/db/main", "X-Vault-Edge-Token: a\r\nX-Vault-Edge-Token: b\r\n").status == 400


def test_the_cache_is_bounded_per_connection(agent: Served) -> None:
    with agent.conn() as c:
        for i in range(500):  # distinct heads, each cacheable: the cache is dropped past its bounds
            assert read(c, "/v1/secrets/db/main", f"X-N: {i}\r\n").status == 200
        conn = agent.call(lambda: next(iter(agent.listener.conns)))
        assert len(conn.cache) <= 64 and conn.cache_bytes <= 65_536


# -- requests on one connection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/v1/secrets/db/main?version=abc",
        "/v1/secrets/%ff",
        "/v1/secrets/a//b",
        "/v1/watch?wait=soon",
        "/v1/nope",
        "/v1/secrets/nope",
    ],
)
def test_refused_requests_keep_the_connection_open(agent: Served, target: str) -> None:
    with agent.conn() as c:
        assert read(c, target).status in (400, 404)
        assert read(c, "/v1/secrets/db/main").json()["value"] == "hunter2"


def test_a_head_request_gets_its_405_without_a_body(agent: Served) -> None:
    with agent.conn() as c:
        c.send(b"HEAD /v1/secrets/db/main HTTP/1.1\r\nHost: a\r\n\r\n" + get("/v1/secrets/openai"))
        c.sock.settimeout(2)
        data = b""
        while b"sk-" not in data:
            data += c.sock.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 405 ") and b"Allow: GET" in head
        assert rest.startswith(b"HTTP/1.1 200 ")  # nothing between: the client stays in step


def test_pipelined_requests_are_answered_in_order(agent: Served) -> None:
    names = ["db/main", "openai", "bin", "old", "db/main", "nope", "tenant-a/key"] * 20
    with agent.conn() as c:
        c.send(b"".join(get(f"/v1/secrets/{n}") for n in names))
        for n in names:
            r = c.response()
            assert r.status == 404 if n == "nope" else r.json()["name"] == n


def test_a_head_split_into_single_bytes(agent: Served) -> None:
    with agent.conn() as c:
        for b in get("/v1/secrets/db/main", "Accept: application/octet-stream\r\n"):
            c.send(bytes([b]))
        assert c.response().body == b"hunter2"


def test_connection_close_and_http10(agent: Served) -> None:
    with agent.conn() as c:
        c.send(get("/v1/secrets/db/main", "Connection: close\r\n") + get("/v1/secrets/openai"))
        r = c.response()
        assert r.status == 200 and r.headers["connection"] == "close"
        assert c.closed()  # and the pipelined request behind it was not answered
    with agent.conn() as c:
        c.send(b"GET /v1/secrets/db/main HTTP/1.0\r\n\r\n")
        assert c.response().json()["value"] == "hunter2"
        assert c.closed()
    with agent.conn() as c:
        for _ in range(2):
            c.send(b"GET /v1/secrets/db/main HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert c.response().status == 200


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"garbage\r\n\r\n", 400),
        (b"GET /v1/secrets/db/main\r\n\r\n", 505),  # HTTP/0.9
        (b"GET /v1/secrets/db/main HTTP/2.0\r\n\r\n", 505),
        (b"GET /v1/secrets/db/main FTP/1.1\r\n\r\n", 400),
        (b"G(T /v1/secrets/db/main HTTP/1.1\r\n\r\n", 400),
        (b"GET ftp://agent/v1/secrets/db/main HTTP/1.1\r\n\r\n", 400),  # absolute http(s) URIs go to the egress proxy
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
        (b"GET /v1/secrets/db/main HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n", 400),
        (b"GET /v1/secrets/db/main HTTP/1.1\nHost: a\n\n", 400),
        (b"GET /v1/secrets/db/main HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET /v1/secrets/db/main HTTP/1.1\r\nX: " + b"a" * 9000, 431),
    ],
)
def test_malformed_heads_get_a_4xx_and_a_clean_close(agent: Served, raw: bytes, status: int) -> None:
    with agent.conn() as c:
        c.send(raw)
        r = c.response()
        assert r.status == status, r.body
        assert r.headers["connection"] == "close"
        assert r.headers["x-vault-edge-revision"] == "1"  # the API's headers, on the transport's refusals too
        assert r.json()["error"]["code"] == "bad_request"
        assert c.closed()
    with agent.conn() as c:
        assert read(c, "/v1/secrets/db/main").status == 200


# -- long-poll --------------------------------------------------------------------------------------


def test_watch_returns_when_the_revision_passes(agent: Served) -> None:
    with agent.conn() as c:
        c.send(get("/v1/watch?since=1&wait=30"))
        time.sleep(0.01)
        agent.install_next()
        r = c.response()
        assert r.status == 200 and r.json() == {"revision": 2, "changed": True}
        assert r.headers["x-vault-edge-revision"] == "2"
        assert read(c, "/v1/watch?since=0&wait=30").json() == {"revision": 2, "changed": True}  # past: at once


def test_watch_times_out_unchanged(agent: Served) -> None:
    with agent.conn() as c:
        t0 = time.monotonic()
        assert read(c, "/v1/watch?since=1&wait=0.05").json() == {"revision": 1, "changed": False}
        assert time.monotonic() - t0 >= 0.05  # the loop's timer: the fake clock does not hold it


def test_pipelined_requests_wait_behind_a_watch_in_order(agent: Served) -> None:
    with agent.conn() as c:
        c.send(get("/v1/watch?wait=0.02") + get("/v1/secrets/openai") + get("/v1/secrets/db/main"))
        assert c.response().json() == {"revision": 1, "changed": False}
        assert c.response().json()["name"] == "openai"
        assert c.response().json()["name"] == "db/main"


def test_a_long_pipeline_behind_a_watch(agent: Served) -> None:
    names = ["db/main", "openai", "bin"] * 200  # well over a head's worth of bytes waits behind the watch
    with agent.conn() as c:
        c.send(get("/v1/watch?wait=0.05") + b"".join(get(f"/v1/secrets/{n}") for n in names))
        assert len(names) * len(get("/v1/secrets/db/main")) > MAX_HEAD
        assert c.response().json()["changed"] is False
        assert [c.response().json()["name"] for _ in names] == names


def test_a_half_closed_client_still_gets_its_long_poll_answers(agent: Served) -> None:
    with agent.conn() as c:
        c.send(get("/v1/watch?wait=0.02") + get("/v1/secrets/openai"))
        c.sock.shutdown(socket.SHUT_WR)
        assert c.response().json()["changed"] is False
        assert c.response().json()["name"] == "openai"
        assert c.closed()


def test_clients_leaving_during_a_watch(agent: Served) -> None:
    for _ in range(50):
        with agent.conn() as c:
            c.send(get("/v1/watch?wait=300"))
    with agent.conn() as c:
        assert read(c, "/v1/secrets/db/main").status == 200
    # A client's end looks like a half-close (answers still owed): each connection is held until its
    # watch ends, then closed (the answer cannot be written).
    agent.install_next()
    deadline = time.monotonic() + 5
    while agent.open_conns() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert agent.open_conns() == 0


# -- slow heads, idle connections (the sweeper, by the app's clock) ---------------------------------


def test_an_unfinished_head_is_timed_out(serve: Callable[..., Served]) -> None:
    agent = serve(head_timeout=1)
    with agent.conn() as slow, agent.conn() as idle, agent.conn() as busy:
        slow.send(b"GET /v1/secrets/db/main HTTP/1.1\r\nHost: a\r\n")
        assert read(idle, "/v1/secrets/db/main").status == 200
        for _ in range(5):  # a busy keep-alive client is never cut off
            agent.clock.advance(0.5)
            agent.sweep()
            assert read(busy, "/v1/secrets/db/main").status == 200
        r = slow.response()
        assert r.status == 408 and r.json()["error"]["message"] == "the request head was not finished in time"
        assert slow.closed()
        assert read(idle, "/v1/secrets/db/main").status == 200  # idle, with nothing pending: stays open


def test_idle_connections_are_closed_after_the_idle_timeout(serve: Callable[..., Served]) -> None:
    agent = serve(idle_timeout=60)
    with agent.conn() as idle, agent.conn() as busy, agent.conn() as watching:
        assert read(idle, "/v1/secrets/db/main").status == 200
        watching.send(get("/v1/watch?wait=300"))
        for _ in range(8):  # 80 s of sweeps, 10 s apart
            agent.clock.advance(10)
            agent.sweep()
            assert read(busy, "/v1/secrets/db/main").status == 200
        assert idle.closed()
        assert agent.open_conns() == 2  # the busy one, and the one holding a watch
        agent.install_next()
        assert watching.response().json() == {"revision": 2, "changed": True}


# -- chunked request bodies (an Exchange's) --------------------------------------------------------
@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (b"0\r\n\r\n", b""),
        (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"5;a=b;c\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
        (b"A\r\n0123456789\r\n0\r\nX-T: 1\r\nY-T: 2\r\n\r\n", b"0123456789"),
        (b"000001\r\n\n\r\n0;x\r\n\r\n", b"\n"),
    ],
)
def test_the_dechunker_decodes_however_the_bytes_are_split(framing: bytes, body: bytes) -> None:
    from vault_edge.agent.endpoint import Dechunker

    after = b"GET /next HTTP/1.1\r\n\r\n"
    for cut in range(len(framing) + 1):
        d, got, rest = Dechunker(1 << 20), b"", b""
        for part in (framing[:cut], framing[cut:] + after):
            used, piece = d.feed(part)
            got += piece
            rest = part[used:]
        assert d.done and got == body and rest == after, cut


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=40), max_size=12),
    exts=st.lists(st.sampled_from([b"", b";a=b", b";x"]), min_size=13, max_size=13),
    trailers=st.sampled_from([b"", b"X-T: 1\r\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=6),
)
def test_the_dechunker_decodes_any_chunking_however_it_is_read(
    chunks: list[bytes], exts: list[bytes], trailers: bytes, cuts: list[int]
) -> None:
    """Whatever the chunk sizes (empty data bytes never end the body: size 0 does), extensions and
    trailers, and wherever the reads split the bytes: the body whole, and what follows left alone."""
    from vault_edge.agent.endpoint import Dechunker

    framing = b"".join(b"%x%b\r\n%b\r\n" % (len(c), exts[i], c) for i, c in enumerate(chunks) if c)
    framing += b"0" + exts[-1] + b"\r\n" + trailers + b"\r\n"
    after = b"GET /next HTTP/1.1\r\n\r\n"
    data = framing + after
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    d, got, rest = Dechunker(1 << 20), b"", b""
    for a, b in pairwise(bounds):
        part = rest + data[a:b]
        used, piece = d.feed(part)
        got += piece
        rest = part[used:]
        if d.done:
            rest += data[b:]
            break
    assert d.done and got == b"".join(chunks) and rest == after


def test_the_dechunker_counts_against_its_limit() -> None:
    from vault_edge.agent.endpoint import BadRequest, Dechunker

    d = Dechunker(10)
    d.feed(b"6\r\nabcdef\r\n")
    with pytest.raises(BadRequest) as exc:
        d.feed(b"5\r\n")
    assert exc.value.status == 413


def test_pipelined_reads_a_client_does_not_read_hold_no_more_than_a_few_answers() -> None:
    """A caller allowed one large secret, sending 64 KiB of requests for it in one write and reading
    nothing: the agent answered them all at once, 128 MiB queued for a client that did not read (and
    as much again per connection). Answers go in batches while the client reads; all of them, in order."""
    served = Served(make_state(FakeClock(), [{"name": "big", "value": "x" * 65536}]))
    try:
        c = served.pair()
        req = b"GET /v1/secrets/big HTTP/1.1\r\n\r\n"
        n = 65536 // len(req)
        c.sendall(req * n)
        time.sleep(1.0)
        held = served.call(
            lambda: max(x.transport.get_write_buffer_size() for x in served.listener.conns if x.transport)
        )
        assert held < 4 << 20, held
        got = bytearray()
        c.settimeout(2)
        try:  # every answer comes, once the client reads
            while chunk := c.recv(1 << 20):
                got += chunk
        except TimeoutError:
            pass
        assert got.count(b"HTTP/1.1 200 OK") == n and len(got) > n * 65536
        c.close()
    finally:
        served.close()
