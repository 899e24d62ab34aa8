"""HTTP/1.1 on plain asyncio: a keep-alive pool of connections, for the egress proxy's upstreams (and,
through :mod:`vault_edge.agent.http1`, the agent's exchanges with its control plane). For the egress
proxy the pool offers HTTP/2 as well, taken where an upstream picks it (:mod:`vault_edge.agent.upstream_h2`).

Why not httpx: the agent's egress path measured ~1.5 ms of CPU per request through
httpx/httpcore/anyio (bench/egress.py, agent CPU-bound at ~450 req/s). This module is what the path
needs and nothing more: one ``asyncio.Protocol`` per connection (``loop.create_connection`` with a
verifying ``ssl.SSLContext``: the system's CAs or ``--egress-ca``; uvloop's TLS when the agent runs on
uvloop), the response parsed by httptools (llhttp: the status line, headers, Content-Length or
chunked bodies, all in C), bodies handed over as they arrive.

* **Pool**: idle connections kept per (scheme, host, port), the warmest reused first, at most
  ``max_idle`` per origin, dropped after ``idle_expiry`` seconds unused or as soon as the upstream
  closes them (the loop sees the close while they sit idle). A connection goes back to the pool only
  after a whole, keep-alive answer was read and nothing else arrived: one that was half used (the
  worker left mid-answer, a timeout, a parse error, an answer framed by the close) is closed.
* **One request at a time per connection**, no pipelining. The request head and body are written by
  the caller (``send``, or ``push`` without waiting), the answer read with ``head()`` then ``read()``
  until it gives ``b""``; or, with ``notify`` set, the caller is called back as the answer arrives
  and takes what has come with ``take()`` (the egress proxy's callback relay).
* **Flow control** both ways: writes wait while the transport's buffer is over its high-water mark
  (``pause_writing``); reading from the upstream stops while more than ``HIGH_WATER`` bytes of the
  answer wait unread, and resumes as the caller takes them.
* **Timeouts**: connecting (TCP and the TLS handshake), each write that has to wait, and each wait
  for the answer's bytes: ``timeout`` seconds each. A stream may last as long as data keeps coming.
* Interim answers (1xx: 100 Continue, 103 Early Hints) are dropped; the final one is returned. A 101
  (protocol switch) is a protocol error: the agent never asks for one (Upgrade is dropped).

Errors are :class:`UpstreamError` (``kind``: ``connect``, ``timeout``, ``closed``, ``protocol``):
their messages name what happened and exception types, never a URL, a header or body bytes (the
request holds the key). Imports nothing of the rest of the agent.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeAlias, cast

import httptools

if TYPE_CHECKING:
    from vault_edge.agent.upstream_h2 import H2Conn, Stream

HIGH_WATER: Final = 256 << 10  # answer bytes buffered unread before the upstream is paused
LOW_WATER: Final = 64 << 10
MAX_IDLE: Final = 64  # idle connections kept per origin
IDLE_EXPIRY_S: Final = 30.0
READ_BUFFER: Final = 64 << 10  # bytes a read may take at once (shared by the pool's connections)
_MAX_HEAD_BYTES: Final = 64 << 10  # an answer's status line and headers
_MAX_HEADERS: Final = 100  # header fields in one answer
_MAX_INTERIM: Final = 16  # 1xx answers before the final one

Origin = tuple[str, str, int]  # scheme, host (IPv6 in brackets), port
_LAST_CHUNK: Final = b"0\r\n\r\n"


class UpstreamError(Exception):
    """The upstream call failed: ``kind`` is ``connect``, ``timeout``, ``closed`` or ``protocol``;
    ``unprocessed``: the upstream said it did not act on the request (HTTP/2's REFUSED_STREAM, or a
    GOAWAY before its stream), so it may be sent again. The message holds no request bytes."""

    def __init__(self, kind: str, message: str, *, unprocessed: bool = False) -> None:
        super().__init__(message)
        self.kind, self.unprocessed = kind, unprocessed


def expire(fut: asyncio.Future[None], what: str) -> None:
    if not fut.done():
        fut.set_exception(UpstreamError("timeout", f"timed out {what}"))


class Answering:
    """What a caller waits on, over either protocol (an HTTP/1.1 :class:`Connection`, an HTTP/2
    ``Stream``): the answer's head, then its body as it arrives; ``wake`` tells the caller (its waiter,
    or its ``notify`` callback) that something changed."""

    pool: Pool
    loop: asyncio.AbstractEventLoop
    waiter: asyncio.Future[None] | None
    notify: Callable[[], None] | None
    head_done: bool
    complete: bool
    chunks: deque[bytes]
    error: UpstreamError | None

    def wake(self) -> None:
        if self.notify is not None:
            self.notify()
            return
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self, timeout: float, what: str) -> None:
        fut = self.loop.create_future()
        self.waiter = fut
        timer = self.loop.call_later(timeout, expire, fut, what)
        try:
            await fut
        finally:
            timer.cancel()
            self.waiter = None

    async def head(self, timeout: float) -> None:
        """Wait for the answer's status and headers (``status``, ``headers``)."""
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait(timeout, f"waiting for {self.pool.peer}'s answer")

    async def read(self, timeout: float) -> bytes:
        """The answer's body bytes that have arrived (waiting for some); ``b""`` at its end."""
        while not self.chunks:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait(timeout, f"reading {self.pool.peer}'s answer")
        return self.take()

    def take(self) -> bytes:
        raise NotImplementedError


class Connection(Answering, asyncio.BufferedProtocol):
    """One upstream connection: one request at a time, its answer parsed as it arrives.

    A buffered protocol: the transport reads into the pool's buffer (``get_buffer``), parsed at once
    (``buffer_updated``: llhttp copies out what it keeps), so no read allocates. With a plain
    ``Protocol`` uvloop's TLS reads each record into a fresh 256 KiB object, shrunk and freed again: an
    mmap, an mremap and a munmap per answer, ~6% of the agent's CPU per egress call (py-spy --native,
    bench/egress.py at 16 connections)."""

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self.pool, self.origin, self.loop = pool, origin, pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.write_paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.notify: Callable[[], None] | None = None  # called instead of waking a waiter (a callback relay)
        self.idle_since = 0.0
        self.uses = 0
        self.chunked_up = False  # the request body goes up chunked (``start``, ``more``)
        self.upgraded: H2Conn | None = None  # the upstream picked HTTP/2: this connection is now that
        self._clear()

    def _clear(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.before_head = 0  # bytes fed before the final answer's head was whole (1xx answers too)
        self.interim = 0  # 1xx answers dropped
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.until_close = False  # the answer's body is framed by the close
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.got_bytes = False  # anything of the answer arrived (a reused connection that gets none may be retried)
        self.error: UpstreamError | None = None
        self.head_only = False
        self.reading_paused = False

    def __repr__(self) -> str:
        return f"<upstream Connection {self.origin[1]}:{self.origin[2]} uses={self.uses}>"

    # -- asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.pool.http2:  # the TLS handshake is over: did the upstream pick HTTP/2 (ALPN)?
            tls = transport.get_extra_info("ssl_object")
            if tls is not None and tls.selected_alpn_protocol() == "h2":
                from vault_edge.agent.upstream_h2 import H2Conn  # loaded only for an upstream that speaks it

                self.upgraded = H2Conn(self.pool, self.origin, self.transport)
                self.transport.set_protocol(self.upgraded)  # before any byte is read

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.pool.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.pool.read_buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        self.got_bytes = True
        if self.complete or self.error is not None or self.idle_since:
            # bytes nobody asked for (after a whole answer, or while idle): the connection is out of step
            self._fail(UpstreamError("protocol", f"{self.pool.peer} sent bytes outside an answer"))
            return
        if not self.head_done:  # llhttp keeps a field's value until the field ends: bounded here
            if self.before_head > _MAX_HEAD_BYTES:
                self._fail(UpstreamError("protocol", f"{self.pool.peer}'s answer head is too large"))
                self.wake()
                return
            self.before_head += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:  # raised by a callback below: its own error
            ctx = exc.__context__
            self._fail(ctx if isinstance(ctx, UpstreamError) else UpstreamError("protocol", type(ctx).__name__))
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("protocol", f"{self.pool.peer} switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("protocol", f"{self.pool.peer}'s answer is malformed ({type(exc).__name__})"))
        self.wake()

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.head_done and not self.complete and self.until_close and self.error is None:
            self.complete = True  # the close ends a body framed by it
        elif not self.complete and self.error is None:
            what = "before its answer" if not self.head_done else "in the middle of its answer"
            self.error = UpstreamError("closed", f"{self.pool.peer} closed the connection {what}")
        self.keep_alive = False
        self.wake()
        self.pool._forget(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.wake()

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:  # a second answer in the read that ended the first: never relayed, nor kept
            raise UpstreamError("protocol", f"{self.pool.peer} sent bytes outside an answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:  # a chunked answer's trailers: dropped
            return
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > _MAX_HEAD_BYTES or len(self.headers) >= _MAX_HEADERS:
            raise UpstreamError("protocol", f"{self.pool.peer}'s answer head is too large")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        status = p.get_status_code()
        if 100 <= status < 200:  # interim: dropped (llhttp ends it here, with no body)
            self.interim += 1
            if self.interim > _MAX_INTERIM:
                raise UpstreamError("protocol", f"{self.pool.peer} sent too many interim answers")
            self.headers, self.head_bytes = [], 0
            return
        if not 200 <= status <= 599:
            raise UpstreamError("protocol", f"{self.pool.peer}'s answer has no valid status")
        self.status, self.head_done = status, True
        self.keep_alive = p.should_keep_alive()
        framed = False
        for n, v in self.headers:
            n = n.lower()
            if n == b"content-length" or (n == b"transfer-encoding" and v.strip().lower().endswith(b"chunked")):
                framed = True
        self.until_close = not framed and status not in (204, 304) and not self.head_only
        if self.head_only:  # no body follows an answer to HEAD; llhttp cannot be told: not reused
            self.complete, self.keep_alive = True, False

    def on_body(self, body: bytes) -> None:
        if self.head_only:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True

    # -- internals
    def _fail(self, err: UpstreamError) -> None:
        if self.error is None:
            self.error = err
        self.keep_alive = False
        self.close()

    # -- the caller's side
    def begin(self, head_only: bool) -> None:
        """Ready for a new request (``head_only``: it is a HEAD, no body will follow its answer)."""
        self._clear()
        self.idle_since = 0.0
        self.uses += 1
        self.head_only = head_only

    def push(self, data: bytes) -> None:
        """Write request bytes without waiting (the transport buffers what the upstream has not taken)."""
        if self.lost or self.transport is None:
            raise self.error or UpstreamError("closed", f"{self.pool.peer} closed the connection")
        self.transport.write(data)

    def start(self, head: bytes, body: bytes, chunked: bool, end: bool, secret: frozenset[bytes] = frozenset()) -> None:
        """Write the request's head and what there is of its body (``end``: that is all of it),
        framed (``chunked``: as chunks, the last one with ``end``), without waiting. (``secret``, the
        fields that hold the key, matters to HTTP/2's header compression only.)"""
        self.chunked_up = chunked
        if chunked:
            body = _chunk(body) + (_LAST_CHUNK if end else b"")
        self.push(head + body)

    async def more(self, data: bytes, timeout: float) -> None:
        """More of the request body (``b""``: its end), framed as ``start`` began; waits while the
        upstream does not take it."""
        if self.chunked_up:
            await self.send(_chunk(data) if data else _LAST_CHUNK, timeout)
        elif data:
            await self.send(data, timeout)

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout``) while the upstream does not take what was written."""
        await self.send(b"", timeout)

    async def send(self, data: bytes, timeout: float) -> None:
        """Write request bytes; wait (at most ``timeout``) while the upstream does not take them."""
        if self.lost or self.transport is None:
            raise self.error or UpstreamError("closed", f"{self.pool.peer} closed the connection")
        self.transport.write(data)
        while self.write_paused and not self.lost:
            await self._wait(timeout, f"writing to {self.pool.peer}")
        if self.lost and not self.head_done:
            raise self.error or UpstreamError("closed", f"{self.pool.peer} closed the connection")

    def take(self) -> bytes:
        """The answer's body bytes that have arrived, without waiting (``b""``: none yet)."""
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.reading_paused and self.transport is not None and not self.lost:
            self.reading_paused = False
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.lost and self.error is None and not self.chunks

    def close(self) -> None:
        """Drop the connection at once: ``abort``, not TLS's graceful close, which would keep the socket
        (and an upstream still streaming to it) until the peer answers the close_notify or a timeout."""
        if self.transport is not None and not self.lost:
            self.transport.abort()  # connection_lost follows (forgotten by the pool then)


def _chunk(data: bytes | bytearray) -> bytes:
    return b"%x\r\n" % len(data) + bytes(data) + b"\r\n" if data else b""


Leg: TypeAlias = "Connection | Stream"  # one call's way to its upstream: a connection, or an HTTP/2 stream


class Pool:
    """Keep-alive connections per origin. ``get`` gives one (idle or new); ``release`` takes it back
    if it can serve another request, else closes it. With ``http2``, TLS connections offer HTTP/2 too
    (ALPN): an upstream that picks it gets one connection carrying many calls, each a stream
    (:mod:`vault_edge.agent.upstream_h2`), for as long as it has room."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        max_idle: int = MAX_IDLE,
        idle_expiry: float = IDLE_EXPIRY_S,
        loop: asyncio.AbstractEventLoop | None = None,
        peer: str = "the upstream",
        http2: bool = False,
    ) -> None:
        self.ssl_context, self.peer = ssl_context, peer  # ``peer``: what messages call the other side
        self.http2 = http2
        if http2:
            ssl_context.set_alpn_protocols(["h2", "http/1.1"])
        self.h2: dict[Origin, list[H2Conn]] = {}  # HTTP/2 connections by origin
        self.h2_origins: set[Origin] = set()  # the upstreams whose last new connection picked HTTP/2
        self.connecting: dict[Origin, asyncio.Future[None]] = {}  # a connection being made, by origin
        self.max_idle, self.idle_expiry = max_idle, idle_expiry
        self.loop = loop or asyncio.get_running_loop()
        self.idle: dict[Origin, list[Connection]] = {}
        # what every connection of the pool reads into: the loop hands each read over before the next
        self.read_buffer = memoryview(bytearray(READ_BUFFER))
        self.opened = 0  # connections made since start (metrics, tests)

    async def get(self, origin: Origin, timeout: float) -> tuple[Leg, bool]:
        """A connection to ``origin`` and whether it was reused from the pool."""
        conn = self.idle_conn(origin)
        if conn is not None:
            return conn, True
        return await self.connect(origin, timeout), False

    def idle_conn(self, origin: Origin) -> Leg | None:
        """A new stream on an HTTP/2 connection to ``origin`` with room for it, or an idle connection
        to ``origin`` from the pool (the warmest), or None."""
        multi = self.h2.get(origin)
        if multi:
            now = self.loop.time()
            for h2c in list(multi):
                if h2c.idle_since and now - h2c.idle_since >= self.idle_expiry:
                    h2c.close()  # unused for too long (and forgotten)
                elif h2c.has_room():
                    return h2c.stream()
        idle = self.idle.get(origin)
        if idle:
            now = self.loop.time()
            while idle:
                conn = idle.pop()
                if not conn.lost and now - conn.idle_since < self.idle_expiry:
                    return conn
                conn.close()
        return None

    async def connect(self, origin: Origin, timeout: float) -> Leg:
        """A new connection to ``origin`` (a stream on it if the upstream picks HTTP/2). To an upstream
        known to speak HTTP/2, one connection is made at a time: the calls that come meanwhile wait for
        it and take streams on it while it has room."""
        while True:
            while origin in self.h2_origins and (pending := self.connecting.get(origin)) is not None:
                try:
                    async with asyncio.timeout(timeout):
                        await asyncio.shield(pending)
                except TimeoutError:
                    raise UpstreamError("timeout", f"timed out connecting to {self.peer}") from None
                if (leg := self.idle_conn(origin)) is not None:
                    return leg
            done: asyncio.Future[None] = self.loop.create_future()
            first = self.connecting.setdefault(origin, done) is done  # (HTTP/1.1: several at once)
            try:
                proto = await self._connect(origin, timeout)
                self.opened += 1
                h2c = proto.upgraded
                if h2c is None:
                    self.h2_origins.discard(origin)
                    return proto
                self.h2_origins.add(origin)
                self.h2.setdefault(origin, []).append(h2c)
                await self._settled(h2c, timeout)  # (the callers waiting meanwhile then see its real limit)
                if h2c.has_room():
                    return h2c.stream()
                if h2c.closing:  # a GOAWAY already: nothing was sent
                    h2c.close()
                    raise UpstreamError("closed", f"{self.peer} closed the connection", unprocessed=True)
                if not h2c.limit():  # SETTINGS_MAX_CONCURRENT_STREAMS 0
                    h2c.close()
                    raise UpstreamError("protocol", f"{self.peer} allows no HTTP/2 stream")
                # calls that came meanwhile took its streams: as theirs would, this one waits for room
                # or makes another connection
            finally:
                if first:
                    del self.connecting[origin]
                done.set_result(None)
            if (leg := self.idle_conn(origin)) is not None:
                return leg

    async def _settled(self, h2c: H2Conn, timeout: float) -> None:
        """Wait for a new HTTP/2 connection's first SETTINGS from the upstream (sent at once after the
        handshake, as its preface): its stream limit, before any stream goes out."""
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(h2c.settled)
        except TimeoutError:
            h2c.close()
            raise UpstreamError("timeout", f"timed out waiting for {self.peer}'s HTTP/2 settings") from None
        if h2c.lost:
            raise UpstreamError("closed", f"{self.peer} closed the connection")

    async def _connect(self, origin: Origin, timeout: float) -> Connection:
        scheme, host, port = origin
        bare = host.strip("[]")
        tls = self.ssl_context if scheme == "https" else None
        try:
            async with asyncio.timeout(timeout):
                _, proto = await self.loop.create_connection(
                    lambda: Connection(self, origin),
                    bare,
                    port,
                    ssl=tls,
                    server_hostname=bare if tls is not None else None,
                    ssl_handshake_timeout=timeout if tls is not None else None,
                )
        except TimeoutError:
            raise UpstreamError("timeout", f"timed out connecting to {self.peer}") from None
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamError("connect", f"{self.peer}'s certificate was refused ({exc.verify_message})") from None
        except (OSError, ssl.SSLError, ValueError) as exc:  # (ValueError: a host name IDNA cannot encode)
            raise UpstreamError("connect", f"{self.peer} could not be reached ({type(exc).__name__})") from None
        return proto

    def release(self, conn: Leg) -> None:
        if not conn.reusable():
            conn.close()
            return
        now = self.loop.time()
        assert isinstance(conn, Connection)  # a stream is never reusable
        idle = self.idle.setdefault(conn.origin, [])
        while idle and (idle[0].lost or now - idle[0].idle_since >= self.idle_expiry):
            idle.pop(0).close()  # the oldest first: expired ones go
        conn.idle_since = now
        idle.append(conn)
        if len(idle) > self.max_idle:
            idle.pop(0).close()

    def _forget(self, conn: Connection) -> None:
        idle = self.idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    def _forget_h2(self, h2c: H2Conn) -> None:
        multi = self.h2.get(h2c.origin)
        if multi and h2c in multi:
            multi.remove(h2c)

    def idle_count(self) -> int:
        return sum(len(v) for v in self.idle.values())

    def close(self) -> None:
        for idle in self.idle.values():
            for conn in idle:
                conn.close()
        self.idle.clear()
        for multi in self.h2.values():
            for h2c in list(multi):
                h2c.close()
        self.h2.clear()
