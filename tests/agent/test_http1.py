"""The agent's HTTP/1.1 client (``vault_edge.agent.http1``) against a real socket that answers with
whatever bytes a hostile relay could send.

Anything on the path is a transient failure (``PathFailure``); the body is read raw (never decoded)
and never past its limit; a connection is reused only after a clean, framed answer.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from vault_edge.agent.http1 import Client, PathFailure

OPENSSL_REQ = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
OPENSSL_REQ += ["-days", "1", "-subj", "/CN=127.0.0.1"]
Reply = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A TCP server on 127.0.0.1 that reads each request head (and a Content-Length body) and lets
    ``reply`` write anything back. Counts connections and requests; records what was asked."""

    def __init__(self, reply: Reply) -> None:
        self.reply, self.connections, self.requests = reply, 0, []  # type: ignore[var-annotated]
        self.sent = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                await self.reply(head, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.srv = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.srv.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.srv.close()
        for w in self.writers:
            w.close()
        await asyncio.sleep(0.01)  # let the transports close before the loop does


def _fixed(raw: bytes) -> Reply:
    async def reply(head: bytes, w: asyncio.StreamWriter) -> None:
        w.write(raw)
        await w.drain()

    return reply


def run(reply: Reply, limit: int = 1 << 20, n: int = 1, timeout: float = 10.0) -> tuple[Server, list[object]]:
    server = Server(reply)

    async def go() -> list[object]:
        out: list[object] = []
        async with server as url:
            client = Client(url, timeout=timeout)
            for _ in range(n):
                try:
                    a = await client.request("GET", "/v1/agent/sync?since=1", headers={"X-A": "b"}, limit=limit)
                    out.append((a.status_code, a.content, dict(a.headers)))
                except PathFailure as exc:
                    out.append(exc)
            await client.aclose()
        return out

    return server, asyncio.run(go())


def test_a_plain_answer_is_read_and_the_connection_kept_alive() -> None:
    server, out = run(_fixed(b'HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX-Sig: abc\r\n\r\n{"ok": true}'), n=3)
    assert out == [(200, b'{"ok": true}', {"content-length": "12", "x-sig": "abc"})] * 3
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"GET /v1/agent/sync?since=1 HTTP/1.1\r\n")
    assert b"\r\nAccept-Encoding: identity\r\n" in first and b"\r\nX-A: b\r\n" in first
    assert b"\r\nHost: 127.0.0.1:" in first


def test_a_chunked_answer_streamed_in_pieces_is_joined() -> None:
    async def reply(head: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"):
            await w.drain()
            await asyncio.sleep(0.01)
            w.write(piece)

    server, out = run(reply, n=2)
    assert [o[1] for o in out] == [b"hello world"] * 2  # type: ignore[index]
    assert server.connections == 1


def test_an_answer_ended_by_the_connection_is_read_and_the_connection_not_reused() -> None:
    async def reply(head: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.0 200 OK\r\n\r\nto the end")
        await w.drain()
        w.close()

    server, out = run(reply, n=2)
    assert [o[1] for o in out] == [b"to the end"] * 2  # type: ignore[index]
    assert server.connections == 2


def test_connection_close_is_honoured() -> None:
    server, out = run(_fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"), n=2)
    assert [o[1] for o in out] == [b"x", b"x"]  # type: ignore[index]
    assert server.connections == 2


@pytest.mark.parametrize("encoding", ["gzip", "br", "x-bogus", "identity, gzip"])
def test_a_content_encoding_other_than_identity_is_refused_unread(encoding: str) -> None:
    raw = f"HTTP/1.1 200 OK\r\nContent-Encoding: {encoding}\r\nContent-Length: 9\r\n\r\n".encode() + b"\x1f\x8bnotgzip"
    _server, out = run(_fixed(raw))
    assert isinstance(out[0], PathFailure) and "Content-Encoding" in str(out[0])


def test_a_body_past_the_limit_is_not_read_to_its_end() -> None:
    async def endless(head: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            w.write(b"1000\r\n" + b"0" * 4096 + b"\r\n")
            server.sent += 4096
            await w.drain()

    server = Server(endless)

    async def go() -> object:
        async with server as url:
            try:
                return await Client(url).request("GET", "/", headers={}, limit=64 * 1024)
            except PathFailure as exc:
                return exc

    out = asyncio.run(go())
    assert isinstance(out, PathFailure) and "over" in str(out)
    assert server.sent < 64 * 1024 + (4 << 20)  # stopped: the connection was dropped, not drained


def test_a_declared_length_past_the_limit_is_refused_unread() -> None:
    _server, out = run(_fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 10485760\r\n\r\nx"), limit=1 << 20)
    assert isinstance(out[0], PathFailure) and "10485760 bytes, over" in str(out[0])


def test_an_error_answer_is_held_to_its_own_limit() -> None:
    server = Server(_fixed(b"HTTP/1.1 503 Busy\r\nContent-Length: 70000\r\n\r\n" + b"e" * 70000))

    async def go() -> object:
        async with server as url:
            try:
                return await Client(url).request("GET", "/", headers={}, limit=1 << 20, error_limit=64 * 1024)
            except PathFailure as exc:
                return exc

    out = asyncio.run(go())
    assert isinstance(out, PathFailure) and "over the 65536" in str(out)


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed the connection in the middle"),
        (b"junk junk junk\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", "malformed"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n", "too large"),
        (b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", "switched"),
    ],
)
def test_a_broken_answer_is_a_path_failure(raw: bytes, what: str) -> None:
    async def reply(head: bytes, w: asyncio.StreamWriter) -> None:
        w.write(raw)
        await w.drain()
        w.close()

    _server, out = run(reply)
    assert isinstance(out[0], PathFailure) and what in str(out[0]), out


def test_no_answer_in_time_is_a_path_failure() -> None:
    async def silent(head: bytes, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    _server, out = run(silent, timeout=0.2)
    assert isinstance(out[0], PathFailure) and "timed out" in str(out[0])


def test_nobody_listening_is_a_path_failure() -> None:
    async def go() -> object:
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        srv.close()
        await srv.wait_closed()
        try:
            return await Client(f"http://127.0.0.1:{port}").request("GET", "/", headers={}, limit=10)
        except PathFailure as exc:
            return exc

    out = asyncio.run(go())
    assert isinstance(out, PathFailure) and "could not be reached (ConnectionRefusedError)" in str(out)


def test_bytes_between_answers_drop_the_connection() -> None:
    server, out = run(_fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxEXTRA"), n=2)
    assert [o[1] for o in out] == [b"x", b"x"]  # type: ignore[index]
    assert server.connections == 2  # the first connection was not reused


def test_an_untrusted_certificate_names_the_problem_and_the_option(tmp_path: Path) -> None:
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        [*OPENSSL_REQ, "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    async def go() -> list[object]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await r.readuntil(b"\r\n\r\n")
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await w.drain()
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                pass
            finally:
                w.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        url = f"https://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        out: list[object] = []
        for ca_file in (None, str(cert)):  # the system's CAs, then the test's own
            client = Client(url, ca_file=ca_file)
            try:
                a = await client.request("GET", "/", headers={}, limit=10)
                out.append(a.content)
            except PathFailure as exc:
                out.append(exc)
            await client.aclose()
        srv.close()
        await asyncio.sleep(0.05)
        return out

    refused, trusted = asyncio.run(go())
    assert isinstance(refused, PathFailure) and "certificate" in str(refused) and "--tls-ca" in str(refused)
    assert trusted == b"ok"


def test_an_endless_header_is_refused_past_the_head_limit() -> None:
    """llhttp keeps a field's value until the field ends: one that never ends grew the agent's memory
    (and its CPU: the value is copied as it grows) without bound, each byte restarting the wait."""

    async def endless(head: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nX-Pad: ")
        try:
            for _ in range(1024):  # up to 64 MiB
                w.write(b"a" * 65536)
                await w.drain()
        except ConnectionError:
            return

    _server, out = run(endless, timeout=5)
    assert isinstance(out[0], PathFailure) and "too large" in str(out[0]), out


@pytest.mark.parametrize(
    ("prefix", "unit"),
    [
        (b"", b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"),  # interim answers, one by one
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", b"x"),  # a body, a byte at a time
        (b"HTTP/1.1 200 OK\r\n", b"X"),  # a head, a byte at a time
    ],
)
def test_an_exchange_has_a_deadline_whatever_trickles_in(prefix: bytes, unit: bytes) -> None:
    """A relay sending a byte just within each wait held the poll forever, the agent none the wiser."""

    async def trickle(head: bytes, w: asyncio.StreamWriter) -> None:
        w.write(prefix)
        try:
            while True:
                await asyncio.sleep(0.2)
                w.write(unit)
                await w.drain()
        except ConnectionError:
            return

    async def go() -> object:
        server = Server(trickle)
        async with server as url:
            client = Client(url, timeout=0.5, connect_timeout=0.5, slack=0.5)
            try:
                async with asyncio.timeout(10):
                    return await client.request("GET", "/", headers={}, limit=1 << 20)
            except PathFailure as exc:
                return exc
            finally:
                await client.aclose()

    out = asyncio.run(go())
    assert isinstance(out, PathFailure) and ("took over" in str(out) or "interim" in str(out)), out
