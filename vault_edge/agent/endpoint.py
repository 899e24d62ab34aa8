"""The agent's socket server: HTTP/1.1 on a unix socket, the transport of the product's hot path.

This module knows nothing of secrets: it binds the socket, admits connections, frames and parses
request heads, answers them in order, caches answers per connection, and closes what must be
closed. What an answer says is the business of an :class:`App` (the agent's is
:class:`vault_edge.agent.api.Api`): one call, ``app.answer(request, caller)``, per request that is
not served from the connection's cache.

Edge workers read secrets here on every request, so the path is built for that read:

* ``asyncio.Protocol`` on the running loop (uvloop when installed: :func:`run`), not streams.
* The caller is read from the kernel once per connection (``peercred``), never from the request.
* Answers the app marks cacheable are cached per connection, keyed by the raw request head: a
  repeated request (the common case: a worker reads the same few names) costs one clock read, one
  dict lookup and one write, and no call into the app. The app says when cached answers go stale:
  its ``epoch`` changes (it starts a new one whenever an answer could change), or its clock passes
  its ``until``, at which point the connection asks it to ``refresh()``.
* Heads are framed here (CRLF CRLF, 8 KiB cap) and parsed by httptools (llhttp), keeping only what
  an app reads (method, target, Accept, X-Vault-Edge-Token, keep-alive, body framing). It measured
  faster than a hand-written parser (bench/head_parse.py) and is the stricter of the two; it only
  runs on a cache miss.
* Pipelined requests are answered in order; a long-poll (the app answers :class:`Hold`) holds the
  ones behind it.
* An app may take a request whole and stream its answer (:class:`Exchange`: the agent's egress
  proxy): the transport reads the request's body (Content-Length framed, or chunked: decoded here,
  extensions and trailers dropped; up to the app's limit), then writes what the app yields as it comes, pausing while the client does not read, and cancels
  the app's work when the client goes away (or, when the body is whole at the head, lets the app
  answer from callbacks: :class:`Direct`, no task). Only then may a request carry a body, or an absolute
  URI (``GET https://host/path``, as forward-proxy clients send) for a target.

Local callers cannot exhaust the agent's descriptors (``Listener``): the listener accepts connections
itself, holds each uid to ``max_conns_per_uid`` (more are closed at once, logged once a minute per
uid), and stops accepting while the open connections would leave fewer than ``FD_RESERVE``
descriptors under the soft limit for the agent's own work (the sync, the disk cache), resuming as
connections close. Keep-alive connections with no request in flight and nothing pending are closed
after ``idle_timeout`` by the sweeper that also times out slow heads. The sweeper tells idle from busy
without touching the hot path: it starts a new cache epoch on every pass (``app.refresh()``), and any
request brings its connection's epoch up to date, so a connection whose epoch is older than the
previous pass has sent nothing since.

Hostile input: heads over 8 KiB get 431, malformed ones 400, request bodies and Transfer-Encoding are
refused (answer, then close) but where an :class:`Exchange` takes them (a body over its limit gets
413, a malformed chunked one 400, a transfer coding other than chunked 501, one not finished within
``BODY_TIMEOUT_S`` 408), heads left unfinished for 10 s
(``head_timeout``) get 408; all close the connection (the app renders these errors, so they carry
its headers), and a client that stops reading is paused at the transport's write-buffer limit.
Nothing here logs or raises with request bytes in it.

Time (head and idle timeouts, the cache's ``until``, refusal log windows) is read from the app's
clock. Imports nothing of the control plane, FastAPI, Starlette, SQLAlchemy or httpx: cold start
matters.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import re
import resource
import socket
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import aclosing
from typing import Any, Final, NamedTuple, Protocol, TypeVar, cast

import httptools

from vault_edge.agent.clock import Clock
from vault_edge.agent.peercred import Caller, peer_of

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_HEAD: Final = 8192  # bytes of request line + headers
HEAD_TIMEOUT_S: Final = 10.0  # an unfinished head older than this is answered 408 and closed
BODY_TIMEOUT_S: Final = 30.0  # an Exchange's request body stalled this long is answered 408
BODY_BUFFER: Final = 1 << 20  # request body bytes held unread before the client is paused
_CACHE_MAX: Final = 64  # cached answers per connection...
_CACHE_BYTES: Final = 65_536  # ...and their bytes: bounded memory per connection, whatever the clients ask
_CACHE_ANSWER_MAX: Final = 16_384  # larger answers are rebuilt each time rather than held
_SWEEP_S: Final = 5.0
IDLE_TIMEOUT_S: Final = 60.0  # a keep-alive connection with nothing in flight is closed after this
MAX_CONNS_PER_UID: Final = 256  # connections one uid may hold; more are closed at accept
FD_RESERVE: Final = 64  # descriptors kept free under the soft limit for the agent's own work
_OUT_BATCH: Final = 256 << 10  # answers to pipelined requests written at a time (then: is the client reading?)
_REFUSAL_LOG_S: Final = 60.0  # refusals of one kind are logged once per this window

REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
STATUS_LINE: Final = {code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in REASONS.items()}
_CHUNK_LINE_MAX: Final = 4096  # a chunk-size line with its extensions
_TRAILERS_MAX: Final = 8192  # a chunked body's trailer section (read and dropped)
_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:;[\x09\x20-\x7e]*)?")
_CHUNK_LINE_RE = re.compile(_CHUNK_SIZE_RE.pattern + rb"\r\n")  # a whole size line in one read
_EXPECT_CONTINUE = re.compile(rb"\r\nexpect:[ \t]*100-continue", re.IGNORECASE)
_TARGET_RE = re.compile(rb"/[\x21-\x7e]*|https?://[\x21-\x7e]+")  # origin- or absolute-form, visible ASCII


class EndpointError(OSError):
    """The socket cannot be served (path taken by a live agent or by a non-socket file)."""


# ------------------------------------------------------------------------- what an app is handed


class Request(NamedTuple):
    method: str
    target: str
    accept: str | None
    token: str | None
    keep_alive: bool
    body_len: int  # -1: chunked (Transfer-Encoding: chunked)
    head: bytes = b""  # the raw head, for apps that read more of it (Exchange)


class BadRequest(Exception):
    """The request cannot be served; ``status`` and the message go back to the client.

    Raised by the head parser (the connection is then closed) and by apps for a well-framed request
    they refuse (the connection stays open)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Answer(NamedTuple):
    """A whole response (status line, headers, body), and whether it may be replayed, byte for byte,
    for the same request head on the same connection until the app's epoch changes."""

    data: bytes
    cacheable: bool


class Hold(NamedTuple):
    """A long-poll: ``wait()`` gives the response when it is due. The connection answers the
    requests pipelined behind it only then, in order."""

    wait: Callable[[], Awaitable[bytes]]


class BodyError(Exception):
    """The request body did not arrive: the client went away, or (:class:`BodyTimeout`) stalled."""


class BodyTimeout(BodyError):
    """No byte of the request body came within ``BODY_TIMEOUT_S``."""


class BodyRefused(BodyError):
    """The transport refused the rest of a chunked body (malformed framing, over the limit): ``status``
    and the message (safe to show) are the answer, if none was begun."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Body:
    """A request body as it arrives, for an :class:`Exchange`: ``await read()`` gives the bytes that
    have come since the last read (waiting for some), ``b""`` at the end. The client is paused while
    more than ``BODY_BUFFER`` bytes wait unread, so a body streams through the agent (to the upstream)
    without being held whole. ``length`` is the Content-Length, or -1 for a chunked body (decoded by
    the transport, which calls ``end()`` at its last chunk); ``received`` counts the bytes so far."""

    __slots__ = ("_flow", "buffered", "chunks", "error", "length", "need", "received", "timeout", "waiter")

    def __init__(self, length: int, flow: Callable[[], None] | None = None, timeout: float | None = None) -> None:
        self.length, self._flow = length, flow
        self.need = length if length >= 0 else 1  # chunked: 1 until the last chunk
        self.timeout = BODY_TIMEOUT_S if timeout is None else timeout
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.received = 0
        self.error: BodyError | None = None
        self.waiter: asyncio.Future[None] | None = None

    @classmethod
    def of(cls, data: bytes) -> Body:
        """A body already whole (tests, replays)."""
        b = cls(len(data))
        b.feed(data)
        return b

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def complete(self) -> bool:
        """All of the body has come and been read."""
        return self.need <= 0 and not self.chunks

    def feed(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)
            if self.length >= 0:
                self.need -= len(data)
            self.received += len(data)
            self.buffered += len(data)
            self._wake()

    def end(self) -> None:
        """A chunked body's last chunk came."""
        self.need = 0
        self._wake()

    def fail(self, error: BodyError | None = None) -> None:
        self.error = error or BodyError("the client went away before the request body was finished")
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def backlog(self) -> bool:
        return self.buffered > BODY_BUFFER

    async def read(self) -> bytes:
        while not self.chunks:
            if self.need <= 0:
                return b""
            if self.error is not None:
                raise self.error
            loop = asyncio.get_running_loop()
            fut = self.waiter = loop.create_future()
            timer = loop.call_later(self.timeout, _stalled, fut)
            try:
                await fut
            finally:
                timer.cancel()
                self.waiter = None
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        was_backlogged, self.buffered = self.backlog, 0
        if was_backlogged and self._flow is not None:
            self._flow()
        return data

    def take(self) -> bytes:
        """What has come of the body, without waiting (a whole body, for a :class:`Direct` exchange)."""
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        return data

    async def drain(self) -> None:
        """Read and drop the rest (a refused request whose connection stays in step)."""
        while await self.read():
            pass


def _stalled(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(BodyTimeout("the request body was not finished in time"))


class Dechunker:
    """Decodes a chunked request body (RFC 9112 §7.1) as its bytes arrive, strictly: CRLF line ends,
    a chunk size of hex digits only (at most 15), extensions bounded and dropped, the trailer section
    bounded and dropped. ``feed(data)`` gives (bytes of ``data`` consumed, the body bytes they held:
    one object, however small the chunks); ``done`` once the last chunk and the trailers are in (what
    follows is the next request's). BadRequest (400, or 413 past ``limit`` body bytes) on anything else."""

    __slots__ = ("done", "left", "limit", "line", "state", "total", "trailers")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.state = 0  # 0: size line, 1: data, 2: CRLF after data, 3: trailer section
        self.left = 0  # data bytes left in the current chunk
        self.line = b""  # a partial line (size line, the CRLF after data, trailers)
        self.total = 0
        self.trailers = 0  # bytes of the trailer section so far
        self.done = False

    def feed(self, data: bytes) -> tuple[int, bytes]:
        out: list[bytes] = []
        pos, n = 0, len(data)
        while pos < n and not self.done:
            if self.state == 1:
                size = min(self.left, n - pos)
                out.append(data[pos : pos + size])
                pos += size
                self.left -= size
                if not self.left:
                    if data.startswith(b"\r\n", pos):  # its CRLF, in the same read (the usual case)
                        pos += 2
                        self.state = 0
                    else:
                        self.state = 2
                continue
            if not self.state and not self.line:  # a size line whole in this read (the usual case)
                m = _CHUNK_LINE_RE.match(data, pos)
                if m is not None and m.end() - pos <= _CHUNK_LINE_MAX:
                    pos = m.end()
                    self._size(int(m.group(1), 16))
                    continue
            if self.state == 2:
                take = data[pos : pos + 2 - len(self.line)]
                self.line += take
                pos += len(take)
                if len(self.line) < 2:
                    break
                if self.line != b"\r\n":
                    raise BadRequest(400, "malformed chunked body (no CRLF after a chunk's data)")
                self.line, self.state = b"", 0
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                self.line += data[pos:]
                pos = n
                self._bound()
                break
            line, pos = self.line + data[pos : end + 1], end + 1
            self.line = b""
            if self.state == 3:
                self.trailers += len(line)
            if len(line) > _CHUNK_LINE_MAX or self.trailers > _TRAILERS_MAX:
                raise BadRequest(400, "malformed chunked body (a chunk-size line or the trailers too long)")
            if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                raise BadRequest(400, "malformed chunked body (lines must end in CRLF)")
            line = line[:-2]
            if self.state == 3:
                if not line:
                    self.done = True
                continue
            m = _CHUNK_SIZE_RE.fullmatch(line)
            if m is None:
                raise BadRequest(400, "malformed chunked body (a chunk size is hex digits)")
            self._size(int(m.group(1), 16))
        return pos, out[0] if len(out) == 1 else b"".join(out)  # one object, however small the chunks

    def _size(self, size: int) -> None:
        self.total += size
        if self.total > self.limit:
            raise BadRequest(413, f"the request body is over {self.limit} bytes")
        self.left, self.state = size, (1 if size else 3)

    def _bound(self) -> None:
        if len(self.line) > _CHUNK_LINE_MAX or self.trailers + len(self.line) > _TRAILERS_MAX:
            raise BadRequest(400, "malformed chunked body (a chunk-size line or the trailers too long)")


class Exchange:
    """A request the app takes whole and answers as a stream (the egress proxy): ``run(body)`` reads
    the request's :class:`Body` as it arrives (at most ``max_body`` bytes) and yields the answer's
    pieces (its head first, framed by the app), written as they come. A client that goes away cancels
    ``run``; a :class:`BodyError` it lets through is answered here (408 for a stalled body). The app
    sets ``close`` to have the connection closed after the answer (a body delimited by the close); a
    body ``run`` left unread closes it too. Never cached; holds the requests pipelined behind it.

    ``direct``, when the app gives one, serves the request without a task when its body is already
    whole (the common case: no body, or a small one that came with the head): ``direct(body, sink)``
    starts it and returns a :class:`Direct`; the app then writes the answer with ``sink.write``
    (stopping while ``sink.write_blocked``, until ``Direct.resume``) and calls ``sink.done(ex)`` once,
    never from within ``direct`` itself."""

    __slots__ = ("close", "direct", "max_body", "run")

    def __init__(self, max_body: int, run: Callable[[Body], AsyncIterator[bytes]]) -> None:
        self.max_body, self.run, self.close = max_body, run, False
        self.direct: Callable[[bytes, Sink], Direct] | None = None


class Sink(Protocol):
    """Where a :class:`Direct` exchange writes its answer: the client's connection."""

    write_blocked: bool  # the client is not reading: stop until Direct.resume()

    def write(self, data: bytes) -> None: ...

    def done(self, ex: Exchange) -> None:
        """The answer is whole (or cut, with ``ex.close``): the connection goes on with the next request."""
        ...


class Direct(Protocol):
    """A request served from callbacks (see :class:`Exchange`)."""

    def cancel(self) -> None:
        """The client went away: drop the work, write nothing more, never call ``done``."""
        ...

    def resume(self) -> None:
        """The client reads again."""
        ...


class App(Protocol):
    """What the endpoint serves. ``epoch`` and ``until`` are read on every request, cache hits
    included, so they are plain attributes; the methods run only on a miss."""

    clock: Clock
    epoch: int  # cached answers of an older epoch are dropped
    until: float  # at or past this monotonic time, refresh() before answering or replaying anything

    @property
    def needs_exe(self) -> bool:
        """Whether the caller's executable path must be read from the kernel at accept."""
        ...

    def refresh(self) -> None:
        """Start a new epoch; bring ``until`` forward."""
        ...

    def answer(self, request: Request, caller: Caller) -> Answer | Hold | Exchange:
        """The response to one parsed request (errors included): raises nothing but bugs."""
        ...

    def error(self, status: int, code: str, message: str, *, close: bool = False) -> bytes:
        """An error response, for refusals made here (framing, timeouts, internal errors)."""
        ...


# ------------------------------------------------------------------------------------- lifecycle


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run the agent's main coroutine on uvloop when installed (about 2x the reads/s), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def serve(
    path: str,
    app: App,
    *,
    mode: int = 0o660,
    head_timeout: float = HEAD_TIMEOUT_S,
    idle_timeout: float = IDLE_TIMEOUT_S,
    max_conns_per_uid: int = MAX_CONNS_PER_UID,
    fd_reserve: int = FD_RESERVE,
) -> Listener:
    """Create the unix socket at ``path`` (mode ``mode``, never world-accessible) and serve ``app``.

    A stale socket file left by a dead agent is removed; a live one, or any other kind of file, is
    not (EndpointError). A request head unfinished after ``head_timeout`` seconds is answered 408; a
    connection idle for ``idle_timeout`` seconds is closed. The caller owns the returned listener:
    ``close()`` it and unlink ``path``.
    """
    if mode & 0o007 or mode & ~0o770:
        raise ValueError(f"socket mode {mode:#o} must give nothing to others (e.g. 0o660 or 0o600)")
    if max_conns_per_uid < 1 or idle_timeout <= 0:
        raise ValueError("max_conns_per_uid must be ≥ 1 and idle_timeout > 0")
    _remove_stale(path)
    sock = _bind(path, mode)
    loop = asyncio.get_running_loop()
    try:
        sock.listen(1024)
        listener = Listener(
            sock,
            app,
            loop,
            max_conns_per_uid=max_conns_per_uid,
            fd_reserve=fd_reserve,
            head_timeout=head_timeout,
            idle_timeout=idle_timeout,
        )
    except BaseException:
        sock.close()
        raise
    listener.start_sweeper()
    return listener


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


class Listener:
    """Accepts connections on the listening socket, admitting each to a ``_Conn`` or closing it.

    Accepting here rather than through ``loop.create_unix_server`` lets the agent stop accepting
    (the kernel's backlog holds what comes meanwhile) and resume, which event loops' servers do not
    offer. Each connection's caller is read from the kernel once, here; a uid holding
    ``max_conns_per_uid`` connections has its next ones closed at once. The connection budget is the
    soft RLIMIT_NOFILE less ``fd_reserve`` less the descriptors open when serving starts.
    """

    def __init__(
        self,
        sock: socket.socket,
        app: App,
        loop: asyncio.AbstractEventLoop,
        *,
        max_conns_per_uid: int = MAX_CONNS_PER_UID,
        fd_reserve: int = FD_RESERVE,
        head_timeout: float = HEAD_TIMEOUT_S,
        idle_timeout: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.sock, self.app, self.loop, self.clock = sock, app, loop, app.clock
        self.conns: set[_Conn] = set()
        self.max_conns_per_uid = max_conns_per_uid
        self.head_timeout, self.idle_timeout = head_timeout, idle_timeout
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_conns = (1 << 30) if soft == resource.RLIM_INFINITY else max(1, soft - fd_reserve - _open_fds())
        self.soft_limit, self.fd_reserve = soft, fd_reserve
        self.per_uid: dict[int, int] = {}
        self.pending = 0  # accepted, protocol not yet attached
        self.accepting = False
        self.serving = True
        self._logged: dict[object, float] = {}  # refusal kind → when last logged
        self._refused: dict[object, int] = {}  # refusal kind → refusals since
        self._mark = app.epoch  # the app's epoch right after the previous sweep
        self.hits_closed = 0  # cache hits of connections since closed (open ones count their own)
        self._fd = sock.fileno()
        self._resume()

    def cache_hits(self) -> int:
        """Answers replayed from connection caches since serving started (read at scrape time)."""
        return self.hits_closed + sum(c.hits for c in self.conns)

    # the AbstractServer methods the agent uses
    def is_serving(self) -> bool:
        return self.serving

    def close(self) -> None:
        if self.serving:
            self.serving = False
            self._pause()
            self.sock.close()

    async def wait_closed(self) -> None:
        return None

    # accepting

    def _resume(self) -> None:
        if self.serving and not self.accepting:
            self.loop.add_reader(self._fd, self._accept)
            self.accepting = True

    def _pause(self) -> None:
        if self.accepting:
            self.loop.remove_reader(self._fd)
            self.accepting = False

    def _full(self) -> bool:
        return len(self.conns) + self.pending >= self.max_conns

    def _accept(self) -> None:
        for _ in range(128):  # a batch per wake-up, then let the loop serve requests
            if self._full():
                self._pause()
                self._note(
                    "budget",
                    "stop accepting connections: %d open, the open-files limit is %d and %d are "
                    "kept for the agent's own work; accepting again as connections close",
                    len(self.conns) + self.pending,
                    self.soft_limit,
                    self.fd_reserve,
                )
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: out of something; the backlog waits a second
                self._pause()
                self.loop.call_later(1.0, self._resume)
                self._note("accept", "cannot accept connections (%s); retrying in 1s", exc.strerror or exc)
                return
            self.adopt(conn)

    def adopt(self, conn: socket.socket) -> None:
        """Serve a connected unix socket as if accepted here (the accept loop's path; tests give one
        end of a ``socket.socketpair()``). Its caller is read from the kernel; the per-uid cap applies."""
        try:
            conn.setblocking(False)
            caller = peer_of(conn, with_exe=self.app.needs_exe)
        except OSError as exc:
            conn.close()
            self._note("cred", "refusing a connection without kernel credentials: %s", exc)
            return
        held = self.per_uid.get(caller.uid, 0)
        if held >= self.max_conns_per_uid:
            conn.close()
            self._note(
                ("uid", caller.uid),
                "uid %d holds %d connections per uid (--max-conns-per-uid): its new connections are closed at once",
                caller.uid,
                held,
            )
            return
        self.per_uid[caller.uid] = held + 1
        self.pending += 1
        self.loop.create_task(self._attach(conn, caller))

    async def _attach(self, conn: socket.socket, caller: Caller) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: _Conn(self, caller), conn)
        except Exception as exc:  # the connection is lost; the listener is not
            conn.close()
            self.release(caller.uid)
            log.warning("could not set up an accepted connection (%s)", type(exc).__name__)
        finally:
            self.pending -= 1

    def release(self, uid: int) -> None:
        """A connection of ``uid`` closed: its slot is free again, and accepting resumes if it stopped."""
        held = self.per_uid.get(uid, 0) - 1
        if held > 0:
            self.per_uid[uid] = held
        else:
            self.per_uid.pop(uid, None)
        if not self.accepting and not self._full():
            self._resume()

    def _note(self, kind: object, msg: str, *args: object) -> None:
        """Log a refusal at most once per window per kind, with how many happened since."""
        now = self.clock.monotonic()
        count = self._refused[kind] = self._refused.get(kind, 0) + 1
        if now - self._logged.get(kind, -math.inf) >= _REFUSAL_LOG_S:
            self._logged[kind] = now
            self._refused[kind] = 0
            log.warning(
                msg + " (%d in this window; next report in %.0fs at the earliest)", *args, count, _REFUSAL_LOG_S
            )
            if len(self._logged) > 4096:  # one entry per uid seen refusing: bounded anyway
                self._logged.clear()
                self._refused.clear()

    # slow heads, idle connections

    def start_sweeper(self) -> None:
        """Sweep every few seconds of the loop's time (see :meth:`sweep`) while serving.

        One timer for the whole server rather than one per request: the hot path arms nothing."""
        every = min(_SWEEP_S, self.head_timeout / 2, self.idle_timeout / 2)

        def tick() -> None:
            if self.serving:
                self.sweep()
                self.loop.call_later(every, tick)

        self.loop.call_later(every, tick)

    def sweep(self) -> None:
        """Close connections whose unfinished head is older than ``head_timeout`` (408) and connections
        idle (nothing in flight, nothing pending) for ``idle_timeout``, by the app's clock.

        Each pass starts a new cache epoch; a request brings its connection's epoch up to date (the
        hot path already compares the two), so a connection still behind the previous pass's epoch
        has sent nothing since then.
        """
        now = self.clock.monotonic()
        limit, idle_limit, mark = now - self.head_timeout, now - self.idle_timeout, self._mark
        for conn in list(self.conns):
            if conn.partial_since is not None:
                if conn.partial_since < limit:
                    conn.refuse(408, "the request head was not finished in time")
            elif conn.epoch >= mark or conn.busy():
                conn.active_at = now
            elif conn.active_at < idle_limit:
                conn.close_idle()
        self.app.refresh()
        self._mark = self.app.epoch


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise EndpointError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: a dead agent's socket
        return
    except OSError as exc:
        raise EndpointError(f"{path}: cannot tell whether another agent serves it: {exc}") from exc
    finally:
        probe.close()
    raise EndpointError(f"another process is already serving on {path}")


def _bind(path: str, mode: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The socket file is created owner-only under a tight umask and widened to `mode` afterwards, so
    # it is never connectable by others, even for an instant. (umask is process-wide; this runs once
    # at start-up, before any thread that could create files.)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.setblocking(False)
    return sock


# ------------------------------------------------------------------------------------------ heads


class HeadParser:
    """Reads one complete request head at a time with httptools (llhttp, Node.js's parser).

    llhttp is strict on syntax (header names and values, Content-Length, line endings); on top of
    it the endpoint wants HTTP/1.0 or 1.1, an origin-form (or absolute-form) ASCII target and at
    most one token header; a body is refused later, unless the app takes it (:class:`Exchange`).
    One instance per connection; a head that fails here ends the connection, so the parser is only
    ever reused from a message boundary.
    """

    __slots__ = (
        "_parser",
        "accept",
        "body_len",
        "keep_alive",
        "method",
        "te",
        "token",
        "tokens",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.accept: bytes | None = None
        self.token: bytes | None = None
        self.tokens = 0
        self.body_len = 0
        self.te: bytes | None = None
        self.method = b""
        self.version = ""
        self.keep_alive = False

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.lower()
        if n == b"accept":
            self.accept = value if self.accept is None else self.accept + b"," + value
        elif n == b"x-vault-edge-token":
            self.token, self.tokens = value, self.tokens + 1
        elif n == b"content-length":
            self.body_len = int(value)  # llhttp has checked the digits, the size and duplicates
        elif n == b"transfer-encoding":
            self.te = value if self.te is None else self.te + b"," + value

    def on_headers_complete(self) -> None:  # llhttp resets these when the message completes
        p = self._parser
        self.method, self.version, self.keep_alive = p.get_method(), p.get_http_version(), p.should_keep_alive()

    def parse(self, head: bytes) -> Request:
        """Parse a head ending in CRLF CRLF. Raises BadRequest."""
        self._reset()
        try:
            self._parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            raise BadRequest(400, "protocol upgrades are not served") from None
        except httptools.HttpParserError as exc:  # the message names the syntax rule, never the bytes
            raise BadRequest(400, f"malformed request head: {exc}") from None
        if self.version not in ("1.1", "1.0"):
            raise BadRequest(505, "only HTTP/1.1 and HTTP/1.0 are served")
        if _TARGET_RE.fullmatch(self.url) is None:
            if self.method == b"CONNECT":
                raise BadRequest(
                    400,
                    "the agent does not tunnel (CONNECT): send the request itself, with an "
                    "absolute URI, and the agent makes the TLS connection",
                )
            raise BadRequest(400, "the request target must be a path (origin-form, ASCII)")
        if self.tokens > 1:
            raise BadRequest(400, "more than one X-Vault-Edge-Token header")
        if self.te is not None and self.te.strip(b" \t").lower() != b"chunked":
            raise BadRequest(501, "the only transfer coding served is chunked")
        return Request(
            self.method.decode("ascii"),
            self.url.decode("ascii"),
            None if self.accept is None else self.accept.decode("latin-1"),
            None if self.token is None else self.token.decode("latin-1"),
            self.keep_alive,
            -1 if self.te is not None else self.body_len,
            head,
        )


# -------------------------------------------------------------------------------------- connection


class _Conn(asyncio.Protocol):
    """One client connection: frame heads, answer them in order, cache answers by head."""

    def __init__(self, listener: Listener, caller: Caller) -> None:
        self.listener = listener  # told when the connection ends (per-uid count, accept budget)
        self.app = listener.app
        self.now = listener.clock.monotonic
        self.caller = caller  # the listener read the kernel's credentials
        self.transport: asyncio.Transport | None = None
        self.released = False
        self.active_at = self.now()  # last sweep that saw it busy (or when it was accepted)
        self.buf = b""
        self.cache: dict[bytes, bytes] = {}
        self.cache_bytes = 0
        self.epoch = -1
        self.closing = False
        self.partial_since: float | None = None  # when an unfinished head started waiting (slow clients)
        self.watch: asyncio.Task[None] | Direct | None = None  # a Hold or an Exchange in progress
        self.direct: Direct | None = None  # the watch, when it is a Direct exchange
        self.exchange_keep_alive = False
        self.write_blocked = False  # the client is not reading its answers
        self.reading_paused = False
        self.heads: HeadParser | None = None  # made at the first cache miss
        self.eof = False  # the client has finished sending (half-close) while a watch was pending
        self.hits = 0  # answers replayed from the cache (metrics; a plain int on the hot path)
        self.body: Body | None = None  # an Exchange's request body while bytes of it are still to come
        self.dechunk: Dechunker | None = None  # ... and its decoder, when chunked
        self.drain: asyncio.Future[None] | None = None  # an Exchange waiting for the client to read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.listener.conns.add(self)

    def busy(self) -> bool:
        """A request in flight or an answer not yet taken by the client."""
        return (
            self.watch is not None
            or bool(self.buf)
            or self.write_blocked
            or (self.transport is not None and self.transport.get_write_buffer_size() > 0)
        )

    def close_idle(self) -> None:
        """Close a keep-alive connection with nothing in flight (clients reconnect, as with any server)."""
        if not self.closing and self.transport is not None:
            self.closing = True
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.conns.discard(self)
        self.listener.hits_closed += self.hits
        self.hits = 0
        if not self.released:
            self.released = True
            self.listener.release(self.caller.uid)
        self.closing = True
        if self.body is not None:
            self.body.fail()
            self.body, self.dechunk = None, None
        if self.watch is not None:
            self.watch.cancel()
            self.direct = None
        self.buf = b""
        self.cache.clear()

    def eof_received(self) -> bool:
        """A half-close during a long-poll keeps the connection open for the answers still owed."""
        if self.watch is not None and not self.closing:
            self.eof = True
            return True
        return False

    # -- flow control: stop reading while answers pile up unread, or while a watch holds the line

    def pause_writing(self) -> None:
        self.write_blocked = True
        self._flow()

    def resume_writing(self) -> None:
        self.write_blocked = False
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)
        if self.direct is not None:
            self.direct.resume()
        elif self.buf:
            asyncio.get_running_loop().call_soon(self._more)  # the requests left while it did not read
        self._flow()

    def _more(self) -> None:
        """Go on with the requests left in the buffer, unless something else holds the connection."""
        if self.buf and self.watch is None and self.body is None and self.direct is None and not self.closing:
            self._process_safely()

    def _flow(self) -> None:
        if self.closing or self.transport is None:
            return
        pause = (
            self.write_blocked
            or (self.watch is not None and len(self.buf) > MAX_HEAD)
            or (self.body is not None and self.body.backlog)
        )
        if pause != self.reading_paused:
            self.reading_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # -- requests

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        app = self.app
        if self.now() >= app.until:
            app.refresh()
        if self.epoch != app.epoch:
            self._drop_cache()
        if not self.buf and self.watch is None and len(data) <= MAX_HEAD:
            hit = self.cache.get(data)  # keys are whole bodiless heads, so data is exactly one request
            if hit is not None:
                self.transport.write(hit)  # type: ignore[union-attr]
                self.hits += 1
                return
        self.buf += data
        self._process_safely()

    def _process_safely(self) -> None:
        try:
            self._process()
        except Exception as exc:  # a bug must cost one connection, not the agent, and leak nothing
            log.error("internal error answering a request on the agent socket (%s)", type(exc).__name__)
            self.refuse(500, "internal error", code="internal")

    def _process(self) -> None:
        """Answer every complete request in the buffer, in order, until a hold or a close."""
        body = self.body
        if body is not None and not self._body_bytes(body, self.buf):  # an Exchange's body, as it comes
            return  # refused: the Exchange answers it
        out: list[bytes] = []
        out_bytes = 0
        buf, pos = self.buf, 0
        app, caller, transport = self.app, self.caller, self.transport
        assert transport is not None
        while pos < len(buf) and not self.closing and self.watch is None and not self.write_blocked:
            if buf.startswith(b"\r\n", pos):  # an empty line before a request line: ignored (RFC 9112 §2.2)
                pos += 2
                continue
            end = buf.find(b"\r\n\r\n", pos, pos + MAX_HEAD + 4)
            if end < 0:
                if len(buf) - pos > MAX_HEAD:
                    self._finish(out, app.error(431, "bad_request", f"request head over {MAX_HEAD} bytes", close=True))
                elif buf.find(b"\n\n", pos) >= 0:
                    self._finish(out, app.error(400, "bad_request", "request lines must end in CRLF", close=True))
                break
            head, pos = buf[pos : end + 4], end + 4
            try:
                if self.heads is None:
                    self.heads = HeadParser()
                req = self.heads.parse(head)
                ans = app.answer(req, caller)  # the one call into the app, on a cache miss
                if isinstance(ans, Exchange):
                    if req.body_len > ans.max_body:
                        raise BadRequest(413, f"the request body is over {ans.max_body} bytes")
                    if req.body_len:
                        self.heads = None  # its parser expects the body it was not fed: a new one for the next
                    body = Body(req.body_len, self._flow)
                    if req.body_len < 0:
                        self.dechunk = Dechunker(ans.max_body)
                        used, piece = self.dechunk.feed(buf[pos:])  # BadRequest before the app runs
                        body.feed(piece)
                        if self.dechunk.done:
                            body.end()
                            self.dechunk = None
                    else:
                        used = min(req.body_len, len(buf) - pos)
                        body.feed(buf[pos : pos + used])
                    self.body = body if body.need else None
                    pos += used
                    if body.need and _EXPECT_CONTINUE.search(head):
                        out.append(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for it otherwise
                    if out:
                        transport.write(b"".join(out))
                        out.clear()
                    self._start_exchange(ans, body, req.keep_alive)
                    break
                if req.body_len < 0:
                    raise BadRequest(400, "request bodies are not accepted (Transfer-Encoding)")
                if req.body_len:
                    raise BadRequest(413, "requests to the agent carry no body")
            except BadRequest as bad:
                self._finish(out, app.error(bad.status, "bad_request", str(bad), close=True))
                break
            if isinstance(ans, Hold):
                self._start_hold(ans, req.keep_alive)
                break
            # only GET is served; a HEAD's 405 must still carry no body, or the client would desync
            data = ans.data if req.method != "HEAD" else ans.data[: ans.data.index(b"\r\n\r\n") + 4]
            if not req.keep_alive:
                self._finish(out, _with_close(data))
                break
            if ans.cacheable and len(data) <= _CACHE_ANSWER_MAX:
                self._remember(head, data)
            out.append(data)
            out_bytes += len(data)
            if out_bytes > _OUT_BATCH:  # pipelined requests: answers go in batches, and stop while
                transport.write(b"".join(out))  # the client does not read them (``write_blocked``;
                out.clear()  # ``resume_writing`` goes on): never more held than its few answers
                out_bytes = 0
        self.buf = b"" if self.closing else buf[pos:]
        if out:
            transport.write(b"".join(out))
        if self.buf and self.watch is None and not self.closing and not self.write_blocked:
            if self.partial_since is None:
                self.partial_since = self.now()
        else:
            self.partial_since = None
        self._flow()

    def _body_bytes(self, body: Body, data: bytes) -> bool:
        """Hand what ``data`` holds of the body in flight over to it; the rest stays in the buffer.
        False when the body is refused (a malformed chunked one, or over the limit): the app's read
        raises, and the connection, out of step, ends with its answer."""
        dechunk = self.dechunk
        if dechunk is None:
            take = data[: body.need]
            body.feed(take)
        else:
            try:
                used, piece = dechunk.feed(data)
            except BadRequest as bad:
                self.buf, self.body, self.dechunk = b"", None, None
                body.fail(BodyRefused(bad.status, str(bad)))
                self._flow()
                return False
            body.feed(piece)
            take = data[:used]
            if dechunk.done:
                body.end()
                self.dechunk = None
        self.buf = data[len(take) :]
        if body.need <= 0:
            self.body = None
        return True

    def _drop_cache(self) -> None:
        self.cache.clear()
        self.cache_bytes = 0
        self.epoch = self.app.epoch

    def _remember(self, head: bytes, data: bytes) -> None:
        size = len(head) + len(data)
        if len(self.cache) >= _CACHE_MAX or self.cache_bytes + size > _CACHE_BYTES:
            self._drop_cache()
        self.cache[head] = data
        self.cache_bytes += size

    def _finish(self, out: list[bytes], last: bytes) -> None:
        """Write what is pending and ``last``, then close (the transport flushes before it closes)."""
        assert self.transport is not None
        out.append(last)
        self.transport.write(b"".join(out))
        out.clear()
        self.closing = True
        self.transport.close()

    def refuse(self, status: int, message: str, code: str = "bad_request") -> None:
        """Answer an error and close, whatever is buffered (slow heads, internal errors)."""
        if self.closing or self.transport is None:
            return
        self.buf = b""
        self._finish([], self.app.error(status, code, message, close=True))

    def _start_hold(self, hold: Hold, keep_alive: bool) -> None:
        async def held() -> None:
            data = await hold.wait()
            self.watch = None
            if self.closing or self.transport is None:
                return
            if not keep_alive:
                self._finish([], _with_close(data))
                return
            self.transport.write(data)
            self._resume()

        self.watch = asyncio.get_running_loop().create_task(held())

    def _resume(self) -> None:
        """After an answer that was held or streamed: serve the requests that arrived meanwhile (or read
        on), and close once everything owed is written and the client sends no more."""
        if self.epoch != self.app.epoch:
            self._drop_cache()
        if self.buf:
            self._process_safely()
        else:
            self._flow()
        if self.eof and self.watch is None and not self.closing and self.transport is not None:
            self.closing = True
            self.transport.close()

    # -- a Direct exchange's Sink
    def write(self, data: bytes) -> None:
        if not self.closing and self.transport is not None:
            self.transport.write(data)

    def done(self, ex: Exchange) -> None:
        self.watch = self.direct = None
        if self.closing or self.transport is None:
            return
        if not self.exchange_keep_alive or ex.close:
            self.closing = True
            self.transport.close()
            return
        self._resume()

    def _start_exchange(self, ex: Exchange, body: Body, keep_alive: bool) -> None:
        self.exchange_keep_alive = keep_alive  # for ``done``, however the exchange ends
        if ex.direct is not None and body.need <= 0:  # the body is whole: no task needed
            self.watch = self.direct = ex.direct(body.take(), self)
            return
        loop = asyncio.get_running_loop()

        async def exchanged() -> None:
            sent = False
            try:
                # an async generator in practice (closed here, so a client that left cancels the app's work)
                async with aclosing(cast(AsyncGenerator[bytes, None], ex.run(body))) as pieces:
                    async for piece in pieces:
                        if self.closing or self.transport is None:
                            return  # the client left: closing the generator cancels the app's work
                        self.transport.write(piece)
                        sent = True
                        while self.write_blocked and not self.closing:
                            self.drain = loop.create_future()
                            await self.drain
            except BodyError as exc:
                self.watch = None
                if not sent and isinstance(exc, BodyTimeout):
                    self.refuse(408, str(exc))
                elif not sent and isinstance(exc, BodyRefused):
                    self.refuse(exc.status, str(exc))
                elif self.transport is not None and not self.closing:
                    self.closing = True
                    self.transport.close()
                return
            except Exception as exc:  # a bug costs this connection, never the agent, and leaks nothing
                log.error("internal error streaming an answer on the agent socket (%s)", type(exc).__name__)
                self.watch = None
                if not sent:
                    self.refuse(500, "internal error", code="internal")
                elif self.transport is not None and not self.closing:
                    self.closing = True
                    self.transport.close()
                return
            if body.need > 0 or body.chunks:  # the app left some of the body unread: out of step
                ex.close = True
                self.body, self.dechunk = None, None
            self.done(ex)  # ends a streamed exchange as a direct one ends

        self.watch = loop.create_task(exchanged())


def _with_close(response: bytes) -> bytes:
    """Add ``Connection: close`` to a built response (for HTTP/1.0 and ``Connection: close`` requests)."""
    head_end = response.index(b"\r\n\r\n")
    return response[:head_end] + b"\r\nConnection: close" + response[head_end:]
