"""HTTP/2 to an upstream that offers it: one TLS connection per upstream carrying many calls at once.

The egress pool (:mod:`vault_edge.agent.upstream`) offers ALPN ``h2`` and ``http/1.1`` on its TLS
connections; when the upstream picks ``h2``, the connection is handed to an :class:`H2Conn` here as
soon as the handshake ends (``Connection.connection_made``), before any byte of it is read. The
framing, HPACK and the protocol's state machine are the ``h2`` package's (the hyper project's; what
httpx speaks HTTP/2 with); sockets, timers and flow control towards the worker are ours, on the same
loop, with the same face as an HTTP/1.1 connection: each call is a :class:`Stream` the egress proxy
drives exactly as it drives a :class:`~vault_edge.agent.upstream.Connection` (``begin``, ``start``,
``more``, ``head``, ``read``/``take``, ``notify``, ``close``).

* **Multiplexing**: calls to one upstream share its connection while it has room (the peer's
  ``SETTINGS_MAX_CONCURRENT_STREAMS``); past that, or after the peer's GOAWAY, the pool opens another.
  A connection with no streams for ``idle_expiry`` seconds is closed when next looked at.
* **The request**: the egress proxy's HTTP/1.1 head (which it builds the same for both) turned into
  HTTP/2's fields (``:method``, ``:scheme``, ``:authority`` from ``Host``, ``:path``; names lower-case;
  framing headers dropped: HTTP/2 frames the body itself), the body in DATA frames as the flow-control
  windows allow, END_STREAM with its last piece.
* **The answer**: ``:status`` and the fields (validated by ``h2``: no connection-specific field gets
  through), interim (1xx) answers and trailers dropped, DATA handed over as it arrives. Flow control
  towards the upstream is the worker's pace: a stream's received bytes are acknowledged (WINDOW_UPDATE)
  only as the caller takes them, and its window is ``HIGH_WATER`` as for HTTP/1.1's pause.
* **Ending**: a stream whose answer was read whole ends quietly; any other (the worker left, a
  timeout, an unusable answer) is reset (RST_STREAM CANCEL): the upstream stops, the connection and
  its other streams go on. A stream the upstream refused or never processed (REFUSED_STREAM, a
  GOAWAY naming an earlier stream, the connection lost before any answer) fails as ``closed`` with
  nothing received: the egress proxy retries idempotent calls on a new stream, as it does a stale
  HTTP/1.1 connection.

* **A hostile upstream**: frames that carry nothing for a call (``NOISE_MAX`` of them within
  ``NOISE_WINDOW_S``) end the connection; while the upstream does not read what it is sent (the
  transport's buffer full), it is not read either, so what h2 answers by itself (PING and SETTINGS
  ACKs, resets) cannot pile up; a stream the upstream never ends is reset, even a HEAD's whole answer.

Errors are :class:`~vault_edge.agent.upstream.UpstreamError`; as there, their messages name what
happened, never a header or body bytes (the request holds the key). ``h2`` is imported only when an
upstream picks HTTP/2: an agent with no such upstream never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack.hpack
import hpack.table
from hpack import HeaderTuple, NeverIndexedHeaderTuple

from vault_edge.agent.upstream import HIGH_WATER, Answering, UpstreamError

if TYPE_CHECKING:
    from vault_edge.agent.upstream import Origin, Pool

log = logging.getLogger("vault_edge.agent.upstream")


class _Dropped:
    """HPACK logs every field it encodes or decodes, values included (the request carries the key), at
    DEBUG only, ~20 calls per request: its modules' loggers are replaced by this, which drops them
    whatever the levels are, at the cost of a call."""

    def debug(self, *args: object, **kwargs: object) -> None:
        pass


hpack.hpack.log = hpack.table.log = _Dropped()  # type: ignore[assignment]

CONN_WINDOW: Final = 16 << 20  # the connection's receive window: the sum of what all its streams may hold unread
MAX_HEADER_LIST: Final = 64 << 10  # an answer's fields (HPACK-decoded), as HTTP/1.1's head limit
_MAX_HEADERS: Final = 100
_SEND_HIGH: Final = 64 << 10  # request bytes waiting for the peer's window before ``more`` waits
_FRAMING: Final = frozenset({b"host", b"transfer-encoding", b"connection", b"keep-alive", b"upgrade", b"te"})
_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")  # a lower-case token (no pseudo-field)
_BAD_VALUE: Final = re.compile(rb"[\x00\r\n]")
_ALWAYS_SECRET: Final = frozenset({b"authorization", b"proxy-authorization", b"cookie"})  # never indexed either
MAX_STREAMS: Final = CONN_WINDOW // HIGH_WATER  # streams per connection: each may hold its window unread
_CLIENT_OPEN: Final = h2.connection.ConnectionState.CLIENT_OPEN
_RECV_GOAWAY: Final = h2.connection.ConnectionInputs.RECV_GOAWAY
_CANCEL: Final = h2.errors.ErrorCodes.CANCEL
_REFUSED: Final = h2.errors.ErrorCodes.REFUSED_STREAM
_CALM: Final = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
# Frames that carry nothing for a call (PING, SETTINGS, PRIORITY, unknown types, empty DATA, 1xx
# answers, window updates while nothing is being sent, what h2 answers by itself: ACKs, resets) cost
# the loop h2's work each (~20 µs): past NOISE_MAX of them in NOISE_WINDOW_S, the connection is a
# flood and ends (GOAWAY ENHANCE_YOUR_CALM), its calls with a 502, as nghttp2 and Go's HTTP/2 do.
NOISE_MAX: Final = 2000
NOISE_WINDOW_S: Final = 10.0
_SLICE: Final = 16 << 10  # h2 is fed this much at a time, so a flood is seen within a read
_NOISE: Final = (
    h2.events.PingReceived,
    h2.events.PingAckReceived,
    h2.events.RemoteSettingsChanged,
    h2.events.SettingsAcknowledged,
    h2.events.PriorityUpdated,
    h2.events.UnknownFrameReceived,
    h2.events.InformationalResponseReceived,
    h2.events.AlternativeServiceAvailable,
)


class H2Conn(asyncio.BufferedProtocol):
    """One HTTP/2 connection to an upstream: the streams open on it, by id. A buffered protocol, as
    the HTTP/1.1 connection is: TLS reads land in the pool's buffer (a plain Protocol's would each
    allocate a 256 KiB object)."""

    def __init__(self, pool: Pool, origin: Origin, transport: asyncio.Transport) -> None:
        self.pool, self.origin, self.loop, self.transport = pool, origin, pool.loop, transport
        # h2's own checks of header fields walk every byte in Python (most of its cost per call): the
        # fields going up are the egress proxy's (names lower-case tokens, values without CR, LF or
        # NUL: the socket's parser and the injection checks see to that), and those coming down are
        # checked here, with regular expressions (``Stream.response``)
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=config)
        encode = self.h2.encoder.encode  # HPACK without Huffman coding (pure Python, bit by bit): fields
        # repeated on one connection are indexed anyway; the key's are sent as they are either way
        self.h2.encoder.encode = lambda headers, huffman=False: encode(headers, huffman=False)  # type: ignore[method-assign]
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                # streams the upstream would open (even ids) are a protocol error at once, not kept
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: HIGH_WATER,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            },
        )
        # After a GOAWAY, h2's connection state machine takes no frame at all (python-hyper/h2#1181),
        # not even those of the streams the GOAWAY lets finish: this connection stays open for them
        # (``closing`` keeps new streams off it). A test holds it to that (a graceful GOAWAY).
        sm = self.h2.state_machine
        sm._transitions = {**sm._transitions, (_CLIENT_OPEN, _RECV_GOAWAY): (None, _CLIENT_OPEN)}
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONN_WINDOW - 65535)
        self.streams: dict[int, Stream] = {}
        self.pending: set[Stream] = set()  # streams handed out, not yet opened: they count against the limit
        self.lost = self.closing = False  # closing: GOAWAY received, ids ran out, or closed: no new streams
        # the upstream's SETTINGS (its preface: its stream limit, its windows): no stream is handed out
        # before them (the pool waits for ``settled``), or more than its limit could go out at once
        self.settled: asyncio.Future[None] = self.loop.create_future()
        self.write_paused = False
        self.idle_since = self.loop.time()
        self.noise, self.noise_since = 0, self.idle_since
        self.pumped = False  # request bytes went out while a read was handled
        self.flush()

    def __repr__(self) -> str:
        return f"<upstream H2Conn {self.origin[1]}:{self.origin[2]} streams={len(self.streams)}>"

    # -- the pool's side
    def limit(self) -> int:
        """Streams it may carry at once: the upstream's limit, at most ``MAX_STREAMS``."""
        return min(self.h2.remote_settings.max_concurrent_streams, MAX_STREAMS)

    def has_room(self) -> bool:
        if self.lost or self.closing or not self.settled.done():
            return False
        return len(self.streams) + len(self.pending) < self.limit()

    def stream(self) -> Stream:
        self.idle_since = 0.0
        st = Stream(self)
        self.pending.add(st)
        return st

    def close(self) -> None:
        self.closing = True
        self.pool._forget_h2(self)  # at once: connection_lost comes loop turns later (TLS's layers)
        if not self.lost:
            self.transport.abort()  # connection_lost follows

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # made in __init__ (the HTTP/1.1 protocol it replaces saw the transport first)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.pool.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self.pool.read_buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        touched: set[Stream] = set()
        try:
            for i in range(0, len(data), _SLICE):
                self.pumped = False
                for ev in self.h2.receive_data(data[i : i + _SLICE] if len(data) > _SLICE else data):
                    self._event(ev, touched)
                # what h2 answers by itself (ACKs, resets of frames on ended streams) counts as noise,
                # unless request bytes went too (windows opened)
                out = self.h2.data_to_send()
                if not self.pumped:
                    self.noise += len(out) // 13
                if out and not self.lost:
                    self.transport.write(out)
                if self.noise > NOISE_MAX and self._flooded():
                    break
        except Exception as exc:  # h2's ProtocolError (HPACK's and framing's included), or a bug here:
            # this connection's calls fail, never the agent
            if not isinstance(exc, h2.exceptions.ProtocolError):
                log.error("internal error reading an HTTP/2 upstream (%s)", type(exc).__name__)
            self._fail_all(UpstreamError("protocol", f"{self.pool.peer} broke HTTP/2 ({type(exc).__name__})"))
            self.flush()  # the GOAWAY h2 prepared, if it did
            self.close()
            return
        for s in touched:
            s.wake()

    def _flooded(self) -> bool:
        """Past ``NOISE_MAX`` noise frames: a flood if they came within ``NOISE_WINDOW_S`` (the
        connection ends), else the count starts again."""
        now = self.loop.time()
        if now - self.noise_since >= NOISE_WINDOW_S:
            self.noise, self.noise_since = 0, now
            return False
        log.warning("HTTP/2 upstream %s floods the connection with frames for no call; closing it", self.pool.peer)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(_CALM)
        self.flush()
        self._fail_all(UpstreamError("protocol", f"{self.pool.peer} flooded the connection"))
        self.close()
        return True

    def _event(self, ev: h2.events.Event, touched: set[Stream]) -> None:
        if isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id or 0
            st = self.streams.get(sid)
            if st is None:  # a stream already ended here: its bytes go back to the connection's window
                self.noise += 1
                self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
                return
            if not ev.data and ev.stream_ended is None:
                self.noise += 1
            st.data(ev.data or b"", ev.flow_controlled_length or 0)
            touched.add(st)
            return
        if isinstance(ev, _NOISE) or (
            isinstance(ev, h2.events.WindowUpdated) and not any(not st.sent_end for st in self.streams.values())
        ):
            self.noise += 1
        if isinstance(ev, h2.events.ResponseReceived):
            st = self.streams.get(ev.stream_id or 0)
            if st is not None:
                st.response(ev.headers or [])
                touched.add(st)
        elif isinstance(ev, h2.events.StreamEnded):
            st = self.streams.get(ev.stream_id or 0)
            if st is not None:
                st.ended()
                touched.add(st)
        elif isinstance(ev, h2.events.StreamReset):
            st = self.streams.get(ev.stream_id or 0)
            if st is None:
                self.noise += 1
            else:
                refused = ev.error_code == _REFUSED and not st.got_bytes
                what = "refused" if refused else "reset"
                st.fail(UpstreamError("closed", f"{self.pool.peer} {what} the stream", unprocessed=refused))
                touched.add(st)
        elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            if not self.settled.done():
                self.settled.set_result(None)
            sid = getattr(ev, "stream_id", 0) or 0
            for st in [self.streams[sid]] if sid in self.streams else list(self.streams.values()):
                if st.pump():
                    touched.add(st)
                    self.pumped = True
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.closing = True
            last = ev.last_stream_id if ev.last_stream_id is not None else 0
            for sid, st in list(self.streams.items()):
                if sid > last:  # never processed: as a stale keep-alive connection (retried if idempotent)
                    err = UpstreamError(
                        "closed", f"{self.pool.peer} closed the connection before its answer", unprocessed=True
                    )
                    st.fail(err)
                    touched.add(st)
            if not self.streams and not self.pending:
                self.close()
        # interim answers, trailers, pings (answered by h2), settings acks, priority: nothing to do

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.settled.done():
            self.settled.set_result(None)  # (the pool sees ``lost``)
        self._fail_all(UpstreamError("closed", f"{self.pool.peer} closed the connection"))
        self.pool._forget_h2(self)

    def pause_writing(self) -> None:
        # the upstream does not read what it is sent: nor is it read (what it sends may need answers:
        # PING and SETTINGS ACKs, resets, which would pile up here unbounded)
        self.write_paused = True
        if not self.lost:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.lost:
            self.transport.resume_reading()
        for st in list(self.streams.values()):
            st.wake()

    # -- internals
    def _fail_all(self, err: UpstreamError) -> None:
        for st in list(self.streams.values()):
            st.fail(err)
            st.wake()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.lost:
            self.transport.write(data)

    def open(self, st: Stream, fields: list[HeaderTuple], end: bool) -> int:
        try:
            sid = self.h2.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            self.closing = True
            raise UpstreamError(
                "closed", f"{self.pool.peer}'s connection has no stream ids left", unprocessed=True
            ) from None
        try:
            self.h2.send_headers(sid, fields, end_stream=end)
        except h2.exceptions.TooManyStreamsError:  # h2 counts streams the upstream has not ended: full
            self.closing = True
            raise UpstreamError("closed", f"{self.pool.peer}'s connection is full", unprocessed=True) from None
        except h2.exceptions.ProtocolError as exc:  # the connection's state takes no new stream
            raise UpstreamError("protocol", f"the request cannot go over HTTP/2 ({type(exc).__name__})") from None
        self.pending.discard(st)
        self.streams[sid] = st
        return sid

    def forget(self, st: Stream, reset: bool) -> None:
        sid = st.stream_id
        if self.streams.pop(sid, None) is None:
            self.pending.discard(st)  # handed out, never opened (the worker left before its body came)
            self._idle()
            return
        # (ProtocolError: the peer closed the stream meanwhile, or broke the connection, which is closing)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            if st.unacked:  # what it left unread goes back to the connection's window
                self.h2.acknowledge_received_data(st.unacked, sid)
            if reset and not self.lost:
                self.h2.reset_stream(sid, _CANCEL)
        st.unacked = 0
        self.flush()
        self._idle()

    def _idle(self) -> None:
        if not self.streams and not self.pending:
            self.idle_since = self.loop.time()
            if self.closing:
                self.close()


class Stream(Answering):
    """One call on an :class:`H2Conn`: the face of an HTTP/1.1 ``Connection`` for the egress proxy.
    Used once: ``close`` ends it (quietly if its answer was read whole, else with a reset)."""

    __slots__ = (
        "chunks",
        "complete",
        "conn",
        "end_seen",
        "error",
        "got_bytes",
        "head_done",
        "head_only",
        "headers",
        "keep_alive",
        "loop",
        "notify",
        "origin",
        "out",
        "out_end",
        "pool",
        "sent_end",
        "status",
        "stream_id",
        "unacked",
        "waiter",
    )

    def __init__(self, conn: H2Conn) -> None:
        self.conn, self.pool, self.origin, self.loop = conn, conn.pool, conn.origin, conn.loop
        self.stream_id = 0
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = self.complete = self.got_bytes = self.head_only = False
        self.end_seen = False  # the upstream's END_STREAM (a HEAD's answer is complete before it)
        self.keep_alive = True
        self.chunks: deque[bytes] = deque()
        self.unacked = 0
        self.error: UpstreamError | None = None
        self.notify: Callable[[], None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.out = bytearray()  # request body bytes waiting for the peer's flow-control window
        self.out_end = self.sent_end = False

    def __repr__(self) -> str:
        return f"<upstream Stream {self.origin[1]}:{self.origin[2]} id={self.stream_id}>"

    # -- from the connection
    def response(self, fields: list[tuple[bytes, bytes]]) -> None:
        """The answer's head: one ``:status`` first, then fields whose names are lower-case tokens and
        whose values hold no CR, LF or NUL (RFC 9113 §8.2.1, §8.3): anything else is a broken answer,
        never relayed (a CR LF would split the worker's HTTP/1.1 answer)."""
        self.got_bytes = True
        status, headers, size, bad = 0, [], 0, False
        for i, (n, v) in enumerate(fields):
            if n == b":status" and not i:
                status = int(v) if v.isdigit() and len(v) == 3 else 0
            elif _NAME.match(n) is None or _BAD_VALUE.search(v) is not None:
                bad = True
            else:
                headers.append((n, v.strip(b" \t")))
                size += len(n) + len(v) + 32
        if bad or not 200 <= status <= 599 or len(headers) > _MAX_HEADERS or size > MAX_HEADER_LIST:
            self.fail(UpstreamError("protocol", f"{self.pool.peer}'s answer head is unusable"))
            return
        self.status, self.headers, self.head_done = status, headers, True
        if self.head_only:
            self.complete = True

    def data(self, data: bytes, flow: int) -> None:
        self.got_bytes = True
        self.unacked += flow
        if self.head_only or not data:
            self.ack()
            return
        self.chunks.append(data)

    def ended(self) -> None:
        self.end_seen = True
        if self.head_done:
            self.complete = True
        elif self.error is None:
            self.fail(UpstreamError("protocol", f"{self.pool.peer} ended the stream without an answer"))

    def fail(self, err: UpstreamError) -> None:
        if self.error is None and not self.complete:
            self.error = err
        self.keep_alive = False

    def pump(self) -> bool:
        """Send what the peer's windows now allow of the waiting body; True if any went."""
        if self.error is not None or self.sent_end or not self.stream_id:
            return False
        h2c, sid, moved = self.conn.h2, self.stream_id, False
        try:
            while self.out:
                n = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size, len(self.out))
                if n <= 0:
                    break
                last = self.out_end and n == len(self.out)
                h2c.send_data(sid, bytes(self.out[:n]), end_stream=last)
                del self.out[:n]
                self.sent_end, moved = last, True
            if not self.out and self.out_end and not self.sent_end:
                h2c.end_stream(sid)
                self.sent_end = moved = True
        except h2.exceptions.StreamClosedError:  # the upstream ended it (answered early, or reset it)
            self.out.clear()
            self.sent_end = True
        except h2.exceptions.ProtocolError as exc:  # the connection takes no more (it is breaking)
            self.out.clear()
            self.fail(UpstreamError("closed", f"{self.pool.peer}'s connection ended ({type(exc).__name__})"))
            return True
        return moved

    def ack(self) -> None:
        if self.unacked and self.stream_id in self.conn.streams:
            self.conn.h2.acknowledge_received_data(self.unacked, self.stream_id)
            self.unacked = 0
            self.conn.flush()

    # -- the caller's side (as ``upstream.Connection``)
    def begin(self, head_only: bool) -> None:
        self.head_only = head_only

    def start(self, head: bytes, body: bytes, chunked: bool, end: bool, secret: frozenset[bytes] = frozenset()) -> None:
        """Open the stream with the request (its HTTP/1.1 head as the egress proxy builds it, and what
        there is of the body; ``end``: that is all of it). Does not wait. The fields named in ``secret``
        (``:path`` for the path) hold the key: HPACK never indexes them (RFC 7541 §7.1.3), here or in
        any intermediary that re-encodes them."""
        conn = self.conn
        if conn.lost or conn.closing:  # nothing went out: as a stream never processed
            raise UpstreamError("closed", f"{self.pool.peer} closed the connection", unprocessed=True)
        lines = head.split(b"\r\n")
        method, target, _ = lines[0].split(b" ", 2)
        authority = b""
        fields: list[HeaderTuple] = []
        for line in lines[1:]:
            if not line:
                continue
            name, _, value = line.partition(b": ")
            name = name.lower()
            if name == b"host":
                authority = value
            elif name not in _FRAMING:
                fields.append(_field(name, value, secret))
        pseudo = [
            HeaderTuple(b":method", method),
            HeaderTuple(b":scheme", b"https"),
            HeaderTuple(b":authority", authority),
            _field(b":path", target, secret),
        ]
        self.stream_id = conn.open(self, pseudo + fields, end and not body)
        self.out += body
        self.out_end = end
        self.sent_end = end and not body
        self.pump()
        conn.flush()

    async def more(self, data: bytes, timeout: float) -> None:
        """More of the request body (``b""``: its end); waits while the peer does not take it. Once
        the answer's head is here, a stream the upstream ended takes no more and the call goes on with
        the answer (as on HTTP/1.1)."""
        if self.error is not None:
            if not self.head_done:
                raise self.error
            return
        if data:
            self.out += data
        else:
            self.out_end = True
        self.pump()
        self.conn.flush()
        await self.drain(timeout)

    async def drain(self, timeout: float) -> None:
        while (len(self.out) > _SEND_HIGH or self.conn.write_paused) and self.error is None:
            await self._wait(timeout, f"writing to {self.pool.peer}")
        if self.error is not None and not self.head_done:
            raise self.error

    def take(self) -> bytes:
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.ack()  # the upstream may send as much again
        return data

    def reusable(self) -> bool:
        return False  # a stream serves one call; its connection stays with the pool

    def close(self) -> None:
        """End the stream: quietly if the answer was read whole and the request sent whole, else with
        a reset (the upstream stops sending)."""
        self.notify = None
        whole = self.end_seen and self.complete and self.error is None and not self.chunks and self.sent_end
        self.conn.forget(self, reset=not whole)


def _field(name: bytes, value: bytes, secret: frozenset[bytes]) -> HeaderTuple:
    if name in secret or name in _ALWAYS_SECRET:
        return NeverIndexedHeaderTuple(name, value)
    return HeaderTuple(name, value)
