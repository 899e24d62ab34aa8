"""The agent's HTTP exchange with the control plane, against hostile answers (httpx.MockTransport).

Anything on the path is a transient failure (``PathFailure``), whatever exception class the
exchange raises; the body is read raw (never decoded) and never past its limit. After a failed
poll, the wait is the back-off or a 503's Retry-After, never a tight loop.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from vault_edge.agent import identity as ident
from vault_edge.agent.cache import DiskCache
from vault_edge.agent.sync import MIN_POLL_GAP_S, RETRY_AFTER_CAP_S, Backoff, PathFailure, Syncer, fetch
from vault_edge.agent.view import AgentState


def _run(handler: httpx.MockTransport, limit: int = 1 << 20) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        async with httpx.AsyncClient(transport=handler, base_url="http://cp") as http:
            answer = await fetch(http, "GET", "/v1/agent/sync", headers={}, limit=limit)
            return answer.status_code, answer.content

    return asyncio.run(go())


def test_identity_is_asked_for_and_a_plain_answer_read() -> None:
    seen: list[httpx.Request] = []

    async def body() -> AsyncIterator[bytes]:
        yield b'{"ok": '
        yield b"true}"

    def handle(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, content=body())  # streamed, as from the network

    assert _run(httpx.MockTransport(handle)) == (200, b'{"ok": true}')
    assert seen[0].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("encoding", ["gzip", "br", "x-bogus", "identity, gzip"])
def test_a_content_encoding_other_than_identity_is_refused_unread(encoding: str) -> None:
    read = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal read
        read += 1
        yield b"\x1f\x8b not really gzip"

    def handle(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-encoding": encoding}, content=body())

    with pytest.raises(PathFailure, match="Content-Encoding"):
        _run(httpx.MockTransport(handle))
    assert read == 0


def test_a_body_past_the_limit_is_not_read_to_its_end() -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while True:
            sent += 1
            yield b"0" * 4096

    def handle(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    with pytest.raises(PathFailure, match="over"):
        _run(httpx.MockTransport(handle), limit=64 * 1024)
    assert sent <= 17


def test_a_declared_length_past_the_limit_is_refused_unread() -> None:
    def handle(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-length": str(10 << 20)}, content=b"x")

    with pytest.raises(PathFailure, match="over"):
        _run(httpx.MockTransport(handle), limit=1 << 20)


@pytest.mark.parametrize(
    "exc",
    [
        httpx.DecodingError("bad gzip"),
        httpx.ReadError("reset"),
        httpx.RemoteProtocolError("junk"),
        httpx.ReadTimeout("slow"),
        httpx.ProxyError("proxy"),
        httpx.UnsupportedProtocol("h9"),
        httpx.TooManyRedirects("loop"),
        httpx.StreamClosed(),
        OSError("EMFILE"),
    ],
)
def test_every_exception_of_the_exchange_is_a_path_failure(exc: Exception) -> None:
    def handle(req: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(PathFailure) as caught:
        _run(httpx.MockTransport(handle))
    assert type(exc).__name__ in str(caught.value)


# -- the wait after a failed poll ---------------------------------------------------------------
def _syncer(tmp_path: Path) -> Syncer:
    syncer = Syncer(ident.load_or_create(tmp_path / "state"), AgentState(), DiskCache(tmp_path / "state"), "http://cp")
    syncer.backoff = Backoff(rng=random.Random(7))
    return syncer


def test_without_a_hint_the_back_off_grows_to_its_cap(tmp_path: Path) -> None:
    s = _syncer(tmp_path)
    delays = [s._sync_delay(PathFailure("ConnectError"), 0.01) for _ in range(40)]
    assert all(0 <= d <= 30 for d in delays) and max(delays[20:]) > 8  # the back-off reached its tens of seconds


def test_a_503_retry_after_replaces_the_back_off_spread_and_capped(tmp_path: Path) -> None:
    s = _syncer(tmp_path)
    for _ in range(10):
        s._sync_delay(PathFailure("ConnectError"), 0.01)  # a long outage: the back-off is at its cap
    held = [s._sync_delay(PathFailure("503: sealed", retry_after=0.0), 2.1) for _ in range(20)]
    assert held == [0.0] * 20  # held by a sealed server for its wait: back in a held poll at once
    shed = [s._sync_delay(PathFailure("503: sealed", retry_after=10.0), 0.01) for _ in range(20)]
    assert all(10 <= d <= 20 for d in shed) and len(set(shed)) > 1  # honoured, spread over [hint, 2 * hint]
    huge = s._sync_delay(PathFailure("503", retry_after=RETRY_AFTER_CAP_S), 0.01)
    assert huge == s.backoff.cap  # a relay's huge hint waits no longer than the back-off ever would


def test_no_answer_makes_the_poll_loop_spin(tmp_path: Path) -> None:
    """A relay answering every poll at once with ``503 Retry-After: 0``: polls start at least
    MIN_POLL_GAP_S apart, jittered (a fleet behind that relay does not poll in lockstep)."""
    s = _syncer(tmp_path)
    gaps = [elapsed + s._sync_delay(PathFailure("503", retry_after=0.0), elapsed) for elapsed in (0.0, 0.001, 0.3)]
    gaps += [0.0 + s._sync_delay(PathFailure("503", retry_after=0.0), 0.0) for _ in range(20)]
    assert all(MIN_POLL_GAP_S <= g <= 2 * MIN_POLL_GAP_S for g in gaps), gaps
    assert len(set(gaps)) > 1
