"""A real HTTPS upstream that speaks HTTP/2 only (ALPN ``h2``), for the egress tests: the same paths
and the same record (``seen``, ``chunk_times``, ``aborted``, ``accept``, ``conns``) as
:class:`tests.agent.egress_upstream.Upstream`, served by the ``h2`` package's server side on an asyncio
loop in a thread, with flow control both ways. Also:

    /refuse-once     the first call: RST_STREAM REFUSED_STREAM (never processed); then 200 {"ok": true}
    /goaway          200 {"ok": true}, then GOAWAY naming this stream as the last: the connection ends
    /hold?s=N        200 after N seconds (counts the streams open at once: ``most_streams``)
    /garbage         a HEADERS frame HPACK cannot decode (a connection error for the client)
    /evil-header?kind=K  an answer with a field HTTP/2 forbids (crlf, upper, colon, pseudo, nul)
    /graceful        GOAWAY naming this stream as the last (it is processed), then, 0.3 s later, 200
    /flood?n=N       N HEADERS frames on even stream ids (streams a server may not open), then 200
    ...?goaway-on-headers   any path: GOAWAY naming this stream as soon as its HEADERS arrive (an
                     upload still coming goes on)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
from hpack import NeverIndexedHeaderTuple

from tests.agent.egress_upstream import Record, Seen


def _frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    """A frame written as it is, past this side's own h2 state (what a broken or hostile server sends)."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


def _goaway(last: int) -> bytes:
    return _frame(7, 0, 0, last.to_bytes(4, "big") + b"\0\0\0\0")


class _Gone(Exception):
    pass


class _Handle:
    """An accepted connection, as the tests see it (``shutdown``: the upstream drops it)."""

    def __init__(self, proto: _Serve) -> None:
        self.proto = proto

    def shutdown(self, how: int) -> None:
        self.proto.up.loop.call_soon_threadsafe(self.proto.transport.abort)


class _Serve(asyncio.Protocol):
    def __init__(self, up: H2Upstream) -> None:
        self.up = up
        self.reqs: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
        self.reset: set[int] = set()
        self.window = asyncio.Event()
        self.open = 0
        self.gone = False  # this side sent GOAWAY

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.h2.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.up.max_streams}
        )
        self.h2.initiate_connection()
        self.flush()
        self.up.conns.append(_Handle(self))

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            if not self.gone:  # (after its own GOAWAY, h2's server side takes no frame at all)
                self.up.errors += 1
            self.flush()
            self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                fields = [(k.decode(), v.decode()) for k, v in ev.headers or []]
                if "goaway-on-headers" in dict(fields)[":path"]:
                    self.transport.write(_goaway(ev.stream_id or 0))
                hidden = {h[0].decode() for h in ev.headers or [] if isinstance(h, NeverIndexedHeaderTuple)}
                self.up.never_indexed.append(hidden)
                self.reqs[ev.stream_id or 0] = (fields, bytearray())
            elif isinstance(ev, h2.events.DataReceived):
                sid = ev.stream_id or 0
                self.reqs[sid][1].extend(ev.data or b"")
                self.up.chunk_times.append(time.monotonic())
                self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
            elif isinstance(ev, h2.events.StreamEnded):
                sid = ev.stream_id or 0
                fields, body = self.reqs.pop(sid)
                asyncio.get_running_loop().create_task(self.handle(sid, fields, bytes(body)))
            elif isinstance(ev, h2.events.StreamReset):
                self.reset.add(ev.stream_id or 0)
                self.reqs.pop(ev.stream_id or 0, None)
                self.window.set()
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self.window.set()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.window.set()

    # -- answering
    def start(self, sid: int, status: int, headers: list[tuple[str, str]], end: bool = False) -> None:
        if sid in self.reset:
            raise _Gone
        fields = [(":status", str(status)), *headers]
        self.h2.send_headers(sid, [(k.encode(), v.encode()) for k, v in fields], end_stream=end)
        self.flush()

    async def send(self, sid: int, data: bytes, end: bool = False) -> None:
        while True:
            if sid in self.reset or self.transport.is_closing():
                raise _Gone
            n = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size, len(data))
            if n > 0 or not data:
                piece, data = data[:n], data[n:]
                self.h2.send_data(sid, piece, end_stream=end and not data)
                self.flush()
                if not data:
                    return
                continue
            self.window.clear()
            await self.window.wait()

    async def json(self, sid: int, status: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        self.start(sid, status, [("content-type", "application/json"), ("content-length", str(len(body)))])
        await self.send(sid, body, end=True)

    async def stream(self, sid: int, ctype: str, pieces: AsyncIterator[bytes]) -> None:
        self.start(sid, 200, [("content-type", ctype)])
        try:
            async for p in pieces:
                await self.send(sid, p)
            await self.send(sid, b"", end=True)
        except _Gone:
            self.up.aborted += 1  # the agent reset the stream: its worker went away

    async def handle(self, sid: int, fields: list[tuple[str, str]], body: bytes) -> None:
        up = self.up
        self.open += 1
        up.most_streams = max(up.most_streams, self.open)
        try:
            await self._handle(sid, fields, body)
        except (_Gone, h2.exceptions.StreamClosedError):
            pass
        finally:
            self.open -= 1

    async def _handle(self, sid: int, fields: list[tuple[str, str]], body: bytes) -> None:
        up = self.up
        pseudo = {k: v for k, v in fields if k.startswith(":")}
        headers = [("host", pseudo[":authority"]), *((k, v) for k, v in fields if not k.startswith(":"))]
        method, target = pseudo[":method"], pseudo[":path"]
        seen = Seen(method, target, headers, body)
        up.record(seen)
        u = urlsplit(target)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        path = u.path
        if path.endswith("/echo"):
            await self.json(
                sid, 200, {"method": method, "target": target, "headers": headers, "body": body.decode("latin-1")}
            )
        elif path.endswith("/ok"):
            if method == "HEAD":
                self.start(sid, 200, [("content-type", "application/json")], end=True)
            else:
                await self.json(sid, 200, {"ok": True})
        elif path.endswith("/auth"):
            got = seen.header("authorization")
            if got and got[0] == up.accept:
                await self.json(sid, 200, {"ok": True, "body": body.decode("latin-1")})
            else:
                await self.json(sid, 401, {"error": "bad key", "got": got[0] if got else None})
        elif path.endswith("/redirect"):
            self.start(sid, 302, [("location", q["to"]), ("content-length", "0")], end=True)
        elif path.endswith("/status"):
            await self.json(sid, int(q["code"]), {"status": int(q["code"])})
        elif path.endswith(("/slow", "/hold")):
            await asyncio.sleep(float(q.get("s", "3")))
            await self.json(sid, 200, {"slow": True})
        elif path.endswith("/big"):
            size = int(q["n"])
            self.start(sid, 200, [("content-length", str(size))])
            with contextlib.suppress(_Gone):
                for i in range(0, size, 65536):
                    await self.send(sid, b"x" * min(65536, size - i), end=i + 65536 >= size)

        elif path.endswith("/stream"):

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(int(q["n"]) // 65536):
                    yield b"y" * 65536

            await self.stream(sid, "application/octet-stream", chunks())
        elif path.endswith("/sse"):
            gap = float(q.get("gap", "0.2"))

            async def events() -> AsyncIterator[bytes]:
                for i in range(int(q.get("n", "3"))):
                    if i:
                        await asyncio.sleep(gap)
                    yield f"id: {i}\ndata: {json.dumps({'i': i, 'sent': time.time()})}\n\n".encode()

            await self.stream(sid, "text/event-stream", events())
        elif path.endswith("/refuse-once") and not up.refused:
            up.refused += 1
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            self.flush()
        elif path.endswith("/refuse-once"):
            await self.json(sid, 200, {"ok": True})
        elif path.endswith("/evil-header"):  # a field HTTP/2 forbids, sent as h2 would never send it
            name, value = {
                "crlf": (b"x-evil", b"a\r\nset-cookie: pwned=1"),
                "upper": (b"X-Evil", b"1"),
                "colon": (b"x:evil", b"1"),
                "pseudo": (b":path", b"/"),
                "nul": (b"x-evil", b"a\x00b"),
            }[q["kind"]]
            block = hpack.Encoder().encode(
                [NeverIndexedHeaderTuple(b":status", b"200"), NeverIndexedHeaderTuple(name, value)], huffman=False
            )
            self.transport.write(
                _frame(1, 0x5, sid, block)
            )  # (the upstream's own h2 state thinks the stream still open)
        elif path.endswith("/graceful"):
            self.transport.write(_goaway(sid))
            await asyncio.sleep(0.3)
            await self.json(sid, 200, {"ok": True})
        elif path.endswith("/flood"):
            block = hpack.Encoder().encode(
                [NeverIndexedHeaderTuple(b":method", b"GET"), NeverIndexedHeaderTuple(b":path", b"/")], huffman=False
            )
            self.transport.write(b"".join(_frame(1, 0x4, 2 * (i + 1), block) for i in range(int(q["n"]))))
            await self.json(sid, 200, {"ok": True})
        elif path.endswith("/garbage"):  # a HEADERS frame whose HPACK block cannot be decoded
            self.gone = True
            self.transport.write(_frame(1, 0x5, sid, b"\xff\xff\xff"))
        elif path.endswith("/goaway"):
            await self.json(sid, 200, {"ok": True})
            self.gone = True
            self.h2.close_connection(last_stream_id=sid)
            self.flush()
        else:
            await self.json(sid, 404, {"error": "no such path"})


class H2Upstream(Record):
    """``H2Upstream(cert, key)`` serves HTTP/2 over TLS on 127.0.0.1 (a free port) until ``close()``."""

    protocol = "h2"

    def __init__(self, cert: Path, key: Path, max_streams: int = 100) -> None:
        super().__init__()
        self.max_streams = max_streams
        self.most_streams = 0  # the most streams open at once on one connection
        self.refused = 0
        self.never_indexed: list[set[str]] = []  # per request, the fields HPACK was told never to index
        self.errors = 0  # connections that broke the protocol
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(["h2"])
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        make = self.loop.create_server(lambda: _Serve(self), "127.0.0.1", 0, ssl=ctx)
        self.server = asyncio.run_coroutine_threadsafe(make, self.loop).result(timeout=10)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop listening and drop the connections: the upstream is down (again: nothing more)."""
        if self.loop.is_closed():
            return

        async def stop() -> None:
            self.server.close()
            for c in self.conns:
                c.proto.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
