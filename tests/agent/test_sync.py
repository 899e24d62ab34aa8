"""The agent's HTTP exchange with the control plane, against hostile answers (httpx.MockTransport).

Anything on the path is a transient failure (``PathFailure``), whatever exception class the
exchange raises; the body is read raw (never decoded) and never past its limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from vault_edge.agent.sync import PathFailure, fetch


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
