"""Scripted upstreams for the hostile-upstream tests: TLS servers that answer what a test tells them,
byte for byte, whatever the protocol allows (tests/agent/test_egress_hostile.py).

``Scripted(cert, key, on_request, alpn="h2")`` speaks raw HTTP/2 frames: it sends its SETTINGS
(``initial``), acknowledges the client's, and calls ``on_request(conn, stream_id)`` for each HEADERS
frame; ``conn.headers``/``conn.data``/``conn.write`` build and send frames. With ``alpn="http/1.1"``
it reads request heads (bodies by Content-Length) and calls ``on_request(conn, n)`` for the n-th
request on a connection, which writes whatever bytes it likes.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hpack

_SETTINGS = {"MAX_CONCURRENT_STREAMS": 3, "INITIAL_WINDOW_SIZE": 4, "MAX_FRAME_SIZE": 5}


def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


def settings(**values: int) -> bytes:
    return frame(4, 0, 0, b"".join(struct.pack(">HI", _SETTINGS[k], v) for k, v in values.items()))


class _H2(asyncio.Protocol):
    def __init__(self, up: Scripted) -> None:
        self.up, self.buf, self.preface = up, b"", False
        self.encoder = hpack.Encoder()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.up.conns.append(self)
        transport.write(self.up.initial)

    def headers(self, sid: int, fields: list[tuple[bytes, bytes]], end: bool = False) -> bytes:
        return frame(1, 0x4 | (0x1 if end else 0), sid, self.encoder.encode(fields, huffman=False))

    @staticmethod
    def data(sid: int, payload: bytes, end: bool = False) -> bytes:
        return frame(0, 0x1 if end else 0, sid, payload)

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.preface:
            if len(self.buf) < 24:
                return
            self.buf, self.preface = self.buf[24:], True
        while len(self.buf) >= 9:
            n = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + n:
                return
            kind, flags, sid = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            self.buf = self.buf[9 + n :]
            if kind == 4 and not flags & 1:  # the client's SETTINGS: acknowledged
                self.write(frame(4, 1, 0, b""))
            elif kind == 1:
                self.up.requests += 1
                self.up.on_request(self, sid)

    def connection_lost(self, exc: Exception | None) -> None:
        self.up.lost += 1


class _H1(asyncio.Protocol):
    def __init__(self, up: Scripted) -> None:
        self.up, self.buf, self.n = up, b"", 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.up.conns.append(self)

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buf = rest[length:]
            self.n += 1
            self.up.requests += 1
            self.up.heads.append(head)
            self.up.on_request(self, self.n)

    def connection_lost(self, exc: Exception | None) -> None:
        self.up.lost += 1


class Scripted:
    def __init__(
        self,
        cert: Path,
        key: Path,
        on_request: Callable[[Any, int], None],
        alpn: str = "h2",
        initial: bytes | None = None,
    ) -> None:
        self.on_request = on_request
        self.initial = settings(MAX_CONCURRENT_STREAMS=100) if initial is None else initial
        self.conns: list[Any] = []
        self.heads: list[bytes] = []  # HTTP/1.1 request heads, as received
        self.requests = self.lost = 0
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols([alpn])
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        proto = _H2 if alpn == "h2" else _H1
        make = self.loop.create_server(lambda: proto(self), "127.0.0.1", 0, ssl=ctx)
        self.server = asyncio.run_coroutine_threadsafe(make, self.loop).result(timeout=10)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for c in self.conns:
                c.transport.abort()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
