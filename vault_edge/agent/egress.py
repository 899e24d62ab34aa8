"""The agent's egress proxy: keyless workers. A worker calls an upstream API through the agent, which
adds the key itself; the worker never holds it.

Two ways in, on the agent's socket (``Api.answer`` sends both here before anything else):

    GET|POST|... /v1/egress/{route}/{path}?{query}     a binding to the socket (workerd, curl --unix-socket)
    GET|POST|... https://api.example.com/{path}         a forward proxy (absolute URI: workerd's
                                                        ``globalOutbound`` with ``style = proxy``)

A forward-proxy request is served by a route whose upstream has its scheme, host and port; a host no
route names gets 403. Either way, in this order: the caller's policy (``egress`` patterns, as for
reads: uid/gid/exe, binding tokens; 403 whether or not the route exists), the agent's readiness
(503, as for reads), the route's methods (405), the path (400 for ``.``/``..`` segments or encoded
separators, which an upstream could resolve past a prefix; 403 outside the route's prefixes), the
secret (the current value, read at each call: the next call after a rotation uses the new key).

Hygiene, on the way up: hop-by-hop headers are dropped (RFC 9110 §7.6.1: Connection and the headers
it names, Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade, Proxy-Authorization),
and with them Host (set from the route), Expect, X-Vault-Edge-Token (the worker's capability, never
the upstream's business), Accept-Encoding (so the answer can be scrubbed, below) and the worker's own
credential where the route injects one (the injected header, Authorization for Basic, the injected
query parameter), before the injection is added. TLS is verified (system CAs, or ``--egress-ca``);
connections are kept alive and pooled per upstream (``agent/upstream.py``: HTTP/1.1 on plain asyncio
Protocols, answers parsed by httptools; HTTP/2 where the upstream picks it in the TLS handshake,
``agent/upstream_h2.py``: one connection per upstream carrying the calls as streams). The request body streams up as the worker sends
it (Content-Length framed, or chunked when the worker's was), never held whole. No redirect is
followed: a 3xx goes back to the worker, which may call the new URL through the agent like any other
(judged by the routes again).

On the way down: hop-by-hop headers dropped, the body streamed as it comes (server-sent events
arrive one by one), framed by its Content-Length, chunked, or by the close; every form of the
injected value (raw, in the header's template, Base64 for Basic, percent-encoded for a query) that an
upstream would echo, in a header or in the body, is overwritten with ``*`` of the same length (across
chunk boundaries too; only values of at least 6 bytes, and only bytes the agent can see: a body the
upstream compresses anyway is not scrubbed). Errors the agent makes itself (502 ``upstream_unreachable``,
504 ``upstream_timeout``, 502 ``answer_too_large``, 502 ``bad_secret``...) say what happened and
never hold the value, nor does a log line: logs name routes, statuses and exception types only.

Two ways through, one behaviour: a call whose request body is whole when its head arrives (no body,
or one that came with it: nearly every API call) is served from callbacks (``_Direct``: the request
written on an idle pooled connection at once, the answer relayed to the worker from the upstream
connection's callbacks; no task or generator per call, the agent's hot path); a streamed upload, or a
route that retries a 401 with the previous value, by a coroutine (``_run``). Both relay the answer
through ``_Relay``.

Bounds: the request body (``max_body``; Content-Length framed, or chunked: the transport decodes it,
strictly, and it goes up chunked as it comes, extensions and trailers dropped), the answer
(``max_answer`` bytes relayed; past it the connection is cut), ``timeout`` for connecting, each write and each read (a stream may last as long as data keeps coming). A failure of
any kind costs the request it belongs to, never the agent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, NamedTuple
from urllib.parse import unquote, urlsplit

from vault_edge.agent.endpoint import STATUS_LINE, Answer, Body, Exchange, Request, Sink
from vault_edge.agent.peercred import Caller
from vault_edge.agent.policy import Policy
from vault_edge.agent.upstream import Leg, Pool, UpstreamError
from vault_edge.agent.view import AgentState, View
from vault_edge.wire import egress as wegress

log = logging.getLogger("vault_edge.agent.egress")

PREFIX: Final = "/v1/egress/"
MAX_BODY: Final = 8 << 20  # request body bytes
MAX_ANSWER: Final = 64 << 20  # answer body bytes relayed
TIMEOUT_S: Final = 60.0
REPLAY_MAX: Final = 64 << 10  # request bodies up to this are kept as they go up, to be sent again
SCRUB_MIN: Final = 6  # shorter values are not scrubbed from answers (they would match by chance)
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
_DROP_UP: Final = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-vault-edge-token", b"accept-encoding"}
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_STATUS: Final = {200: STATUS_LINE[200]}
_ROUTE_RE = re.compile(r"([a-z0-9][a-z0-9_\-]{0,62})(?=[/?]|$)")
_BAD_ESCAPES = re.compile(r"%(2[fF]|5[cC]|00)")


@dataclass(frozen=True)
class EgressSettings:
    ca_file: str | None = None  # CA bundle for upstreams (default: the system's)
    timeout: float = TIMEOUT_S
    max_body: int = MAX_BODY
    max_answer: int = MAX_ANSWER
    http2: bool = True  # offered to upstreams (ALPN), taken where they pick it


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str, extra: bytes = b"") -> None:
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


class _Call(NamedTuple):
    """One upstream call, ready to go: nothing in its repr (headers and URL may hold the key). (A named
    tuple: one is made per request, and a frozen dataclass's __init__ costs several times more.)"""

    route: str
    method: str
    origin: tuple[str, str, int]
    head: bytes  # the request head for the upstream, framing included (holds the key)
    needles: tuple[bytes, ...]
    keep_alive: bool
    http10: bool
    chunked: bool = False  # the body goes up chunked (the worker's was: its length is not known)
    secret: frozenset[bytes] = frozenset()  # the fields the key is in (lower-case; ``:path`` for a query)
    retry: _Call | None = None  # the same call with the previous value (a 401 during the grace)

    def __repr__(self) -> str:
        return f"_Call(route={self.route!r}, method={self.method})"

    def __str__(self) -> str:
        return self.__repr__()


Error = Callable[..., bytes]  # Api.error(status, code, message, *, close=False, extra=b"")

# upper bounds (seconds) of the histogram of the time from a call reaching the agent to its upstream
# answer's head (what the agent and the upstream add, the worker's own hop aside)
LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RouteStats:
    """Per-route counters for the metrics endpoint (read at scrape time): calls that went upstream,
    upstream answers by status class, calls that failed by kind, and the answer-head latency."""

    __slots__ = ("buckets", "classes", "failures", "latency_sum", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.classes = [0, 0, 0, 0, 0]  # 1xx..5xx
        self.failures: dict[str, int] = {}  # connect, timeout, closed, protocol
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: over the largest bound
        self.latency_sum = 0.0

    def answered(self, status: int, seconds: float) -> None:
        self.classes[min(max(status // 100, 1), 5) - 1] += 1
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds


class Egress:
    """The egress side of the agent's API: ``answer`` gives an error Answer or an Exchange."""

    def __init__(self, state: AgentState, policy: Policy, error: Error, settings: EgressSettings | None = None) -> None:
        self.state, self.policy, self.error = state, policy, error
        self.settings = settings or EgressSettings()
        self._view: View | None = None
        self._by_name: dict[str, wegress.Parsed] = {}
        self._by_origin: dict[tuple[str, str, int], list[wegress.Parsed]] = {}
        self._upstreams: Pool | None = None
        # injections rendered, by (spec, value): the next value after a rotation is a new key
        self._rendered: dict[tuple[str, bytes], tuple[str, tuple[bytes, ...]]] = {}
        self._orders: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}  # needles → scrub order (as _rendered)
        self._secret: dict[str, frozenset[bytes]] = {}  # by route name: the fields its key goes in (_Call.secret)
        self.stats: dict[str, RouteStats] = {}  # by route name (metrics)
        self.counting_since = int(time.time())  # the stats are cumulative from here (the agent's start)

    def report(self) -> str | None:
        """The per-route counters as the sync request carries them to the control plane
        (``wire.egress.Report``), or None before any egress call."""
        if not self.stats:
            return None
        counts = {
            name: (s.requests, *s.classes, sum(s.failures.values()), round(s.latency_sum * 1000))
            for name, s in self.stats.items()
        }
        return wegress.Report.of(self.counting_since, counts).encode()

    async def aclose(self) -> None:
        if self._upstreams is not None:
            self._upstreams.close()
            self._upstreams = None

    # -- routing and policy -------------------------------------------------------------------
    def _index(self) -> None:
        view = self.state.view
        if view is self._view:
            return
        by_name: dict[str, wegress.Parsed] = {}
        by_origin: dict[tuple[str, str, int], list[wegress.Parsed]] = {}
        secret: dict[str, frozenset[bytes]] = {}
        for r in view.egress:
            try:
                p = wegress.route_from_json(r.to_json())
            except ValueError:
                continue
            by_name[p.name] = p
            by_origin.setdefault(p.upstream.origin, []).append(p)
            secret[p.name] = frozenset(b":path" if i.kind == "query" else i.name.encode() for i in p.injections)
        self._view, self._by_name, self._by_origin, self._secret = view, by_name, by_origin, secret

    def answer(self, req: Request, caller: Caller) -> Answer | Exchange:
        """The egress answer to ``req``: refusals as whole answers (never cached), calls as Exchanges."""
        try:
            call = self._plan(req, caller)
        except _Refusal as r:
            return self._refuse(
                req, self.made(req.method, r.status, r.code, str(r), extra=r.extra, close=not req.keep_alive)
            )
        except Exception as exc:  # a bug costs this request, and says nothing of its content
            log.error("internal error routing an egress request (%s)", type(exc).__name__)
            return self._refuse(req, self.made(req.method, 500, "internal", "internal error", close=not req.keep_alive))
        ex = Exchange(self.settings.max_body, lambda body: self._run(ex, call, body))
        if call.retry is None:  # (a 401 retried with the previous value takes the coroutine's way)
            ex.direct = lambda body, sink: _Direct(self, ex, call, body, sink)
        return ex

    def made(self, method: str, status: int, code: str, message: str, *, close: bool, extra: bytes = b"") -> bytes:
        """An answer the agent makes itself (the JSON error shape), as ``method`` takes it: to a HEAD,
        its head only (RFC 9110 §9.3.2): a body would be read as the answer to the worker's next request."""
        data = self.error(status, code, message, close=close, extra=extra)
        return data[: data.index(b"\r\n\r\n") + 4] if method == "HEAD" else data

    def _refuse(self, req: Request, data: bytes) -> Answer | Exchange:
        """A refusal; for a request with a body, as an Exchange, so that the body is read (and dropped)
        and the worker gets the refusal itself, not a 413 for a body the agent did not want."""
        if not req.body_len:
            return Answer(data, False)

        async def once(body: Body) -> AsyncIterator[bytes]:
            await body.drain()
            yield data

        return Exchange(self.settings.max_body, once)

    def _plan(self, req: Request, caller: Caller) -> _Call:
        self._index()
        target = req.target
        if target.startswith(PREFIX):
            m = _ROUTE_RE.match(target, len(PREFIX))
            if m is None:
                raise _Refusal(400, "bad_request", "egress calls are /v1/egress/{route}/{path}")
            name, rest = m.group(1), target[m.end() :]
            if not self.policy.allows_egress(caller, req.token, name):
                raise _Refusal(403, "forbidden", f"the caller may not call egress route {name!r}")
            route = self._by_name.get(name)
            if route is None:
                raise _Refusal(404, "not_found", f"no egress route {name!r} here")
            if "#" in rest:  # (a proxied URI's fragment is refused too)
                raise _Refusal(400, "bad_request", "no fragment ('#') in an egress request")
            path, _, query = (rest if rest.startswith("/") else "/" + rest).partition("?")
            path = route.upstream.base + path if path != "/" or not route.upstream.base else route.upstream.base
        else:
            route, path, query = self._by_url(req, caller, target)
        self._ready()
        if req.method not in route.route.methods:
            allow = ", ".join(route.route.methods).encode()
            raise _Refusal(
                405,
                "method_not_allowed",
                f"egress route {route.name!r} takes {allow.decode()}",
                b"Allow: " + allow + b"\r\n",
            )
        _check_path(path)
        if not route.allows_path(path):
            raise _Refusal(403, "forbidden", f"egress route {route.name!r} does not allow this path")
        view = self.state.view
        entry = view.lookup(route.route.secret)
        if entry is None:
            raise _Refusal(503, "not_ready", f"this agent holds no value of egress route {route.name!r}'s secret")
        call = self._build(req, route, path, query, entry.value)
        if route.route.retry_previous_on_401:
            prev = view.lookup(route.route.secret, stage="previous", now=self.state.clock.wall())
            if prev is not None and prev.value != entry.value:
                try:
                    retry = self._build(req, route, path, query, prev.value)
                except _Refusal:  # the previous value cannot be injected: no retry with it
                    return call
                # either answer is scrubbed of both values: an upstream may echo either
                needles = call.needles + retry.needles
                call = call._replace(needles=needles, retry=retry._replace(needles=needles))
        return call

    def _by_url(self, req: Request, caller: Caller, target: str) -> tuple[wegress.Parsed, str, str]:
        try:
            u = urlsplit(target)
            port = u.port
        except ValueError:
            raise _Refusal(400, "bad_request", "not a valid absolute URI") from None
        if u.username is not None or u.password is not None or u.fragment:
            raise _Refusal(400, "bad_request", "no user info or fragment in a proxied URI")
        host = (u.hostname or "").lower()
        origin = (u.scheme, f"[{host}]" if ":" in host else host, port or (443 if u.scheme == "https" else 80))
        routes = self._by_origin.get(origin, [])
        path = u.path or "/"
        mine = [r for r in routes if self.policy.allows_egress(caller, req.token, r.name)]
        if not mine:  # the same answer whether no route names the host or none is the caller's
            raise _Refusal(403, "forbidden", f"no egress route for {u.scheme}://{host[:253]} that this caller may call")
        fitting = [r for r in mine if r.allows_path(path) and req.method in r.route.methods]
        return (fitting or mine)[0], path, u.query

    def _ready(self) -> None:
        st = self.state
        if not st.loaded:
            raise _Refusal(503, "not_ready", "the agent has no secrets yet (first sync or cache load pending)")
        if st.too_stale():
            raise _Refusal(503, "too_stale", "the agent has not heard from the control plane within --max-stale")

    def _build(self, req: Request, route: wegress.Parsed, path: str, query: str, value: bytes) -> _Call:
        inject_headers: list[tuple[bytes, bytes]] = []
        inject_query: list[tuple[str, str]] = []
        needles: list[bytes] = []
        for inj in route.injections:
            key = (inj.spec, value)
            done = self._rendered.get(key)
            if done is None:
                try:
                    done = inj.render(value)
                except wegress.InjectError as exc:
                    raise _Refusal(502, "bad_secret", f"egress route {route.name!r}: {exc}") from None
                if len(self._rendered) >= 256:
                    self._rendered.clear()
                    self._orders.clear()
                self._rendered[key] = done
            text, forms = done
            needles.extend(forms)
            if inj.kind == "query":
                inject_query.append((inj.name, text))
            else:
                inject_headers.append((inj.name.encode(), text.encode()))
        drop = _DROP_UP.union(n for n, _ in inject_headers) if inject_headers else _DROP_UP
        lines = req.head.split(b"\r\n")
        headers: list[tuple[bytes, bytes]] = []
        named: set[bytes] = set()
        for line in lines[1:]:
            if not line:
                continue
            name, _, v = line.partition(b":")
            n = name.strip().lower()
            if n == b"connection":
                named.update(t.strip().lower() for t in v.split(b","))
            if n not in drop:
                headers.append((n, v.strip(b" \t")))
        if named:  # the headers Connection names are hop-by-hop too (wherever they came)
            headers = [(n, v) for n, v in headers if n not in named]
        headers.extend(inject_headers)
        if inject_query:
            names = {k for k, _ in inject_query}
            kept = [p for p in query.split("&") if p and unquote(p.partition("=")[0]) not in names]
            query = "&".join([*kept, *(f"{k}={v}" for k, v in inject_query)])
        up = route.upstream
        target = path + ("?" + query if query else "")
        if req.body_len > 0:
            headers.append((b"content-length", b"%d" % req.body_len))
        elif req.body_len < 0:
            headers.append((b"transfer-encoding", b"chunked"))
        elif req.method in ("POST", "PUT", "PATCH"):
            headers.append((b"content-length", b"0"))
        head = b"".join(
            (
                f"{req.method} {target} HTTP/1.1\r\nhost: {up.authority}\r\n".encode("ascii"),
                *(n + b": " + v + b"\r\n" for n, v in headers),
                b"\r\n",
            )
        )
        return _Call(
            route.name,
            req.method,
            up.origin,
            head,
            tuple(needles),
            req.keep_alive,
            lines[0].endswith(b"HTTP/1.0"),
            req.body_len < 0,
            self._secret[route.name],
        )

    # -- the call ------------------------------------------------------------------------------
    def _scrub_order(self, needles: tuple[bytes, ...]) -> tuple[bytes, ...]:
        order = self._orders.get(needles)
        if order is None:
            if len(self._orders) >= 256:
                self._orders.clear()
            order = self._orders[needles] = _scrub_order(needles)
        return order

    def _stats(self, route: str) -> RouteStats:
        stats = self.stats.get(route)
        if stats is None:
            stats = self.stats[route] = RouteStats()
        return stats

    def _pool(self) -> Pool:
        if self._upstreams is None:
            s = self.settings
            ctx = ssl.create_default_context(cafile=s.ca_file) if s.ca_file else ssl.create_default_context()
            self._upstreams = Pool(ctx, http2=s.http2)
        return self._upstreams

    async def _run(self, ex: Exchange, call: _Call, body: Body) -> AsyncIterator[bytes]:
        pool = self._pool()
        # The body is kept as it goes up while it is small enough to send again: a pooled connection
        # the upstream closed as the request went out is retried once (idempotent methods), and a 401
        # during a rotation's grace once with the previous value (routes that ask for it).
        kept: bytearray | None = bytearray() if body.length <= REPLAY_MAX else None  # chunked: -1
        conn: Leg | None = None
        ok = False
        stats = self._stats(call.route)
        stats.requests += 1
        started = time.monotonic()
        try:
            try:
                conn = await self._call(pool, call, body, kept)
                if conn.status == 401 and call.retry is not None and _whole(kept, body):
                    await self._discard(conn)
                    pool.release(conn)
                    conn = None
                    log.info(
                        "egress %s: upstream 401 to the current value; retrying once with the previous", call.route
                    )
                    call = call.retry
                    assert kept is not None
                    conn = await self._call(pool, call, Body.of(bytes(kept)), None)
            except UpstreamError as exc:
                stats.failures[exc.kind] = stats.failures.get(exc.kind, 0) + 1
                yield self._failed(call, exc)
                return
            stats.answered(conn.status, time.monotonic() - started)
            async for piece in self._relay(ex, call, conn):
                yield piece
            ok = True
        finally:
            if conn is not None:
                if ok:
                    pool.release(conn)
                else:
                    conn.close()

    async def _call(self, pool: Pool, call: _Call, body: Body, kept: bytearray | None) -> Leg:
        """Send ``call`` (its body as it comes, kept in ``kept`` if given) and wait for the answer's head
        on a pooled connection; once more on a new one if the pooled one turns out closed."""
        t = self.settings.timeout
        for attempt in (0, 1):
            conn: Leg | None = None
            reused = False
            try:
                conn, reused = await pool.get(call.origin, t)
                conn.begin(call.method == "HEAD")
                if attempt:
                    assert kept is not None
                    conn.start(call.head, bytes(kept), call.chunked, True, call.secret)
                    await conn.drain(t)
                else:
                    await self._send(conn, call, body, kept, t)
                await conn.head(t)
                return conn
            except UpstreamError as exc:
                # a stale pooled connection: idempotent methods; a request the upstream did not
                # act on (RFC 9113 §8.7): any
                retry = (
                    not attempt
                    and exc.kind == "closed"
                    and conn is not None
                    and not conn.got_bytes
                    and (exc.unprocessed or (reused and call.method in _IDEMPOTENT))
                    and _whole(kept, body)
                )
                if conn is not None:
                    conn.close()
                if not retry:
                    raise
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
        raise AssertionError("unreachable")

    async def _discard(self, conn: Leg) -> None:
        """Read an answer to its end and drop it (a 401 retried), within the answer limit."""
        left = self.settings.max_answer
        while chunk := await conn.read(self.settings.timeout):
            left -= len(chunk)
            if left < 0:
                conn.keep_alive = False
                return

    @staticmethod
    async def _send(conn: Leg, call: _Call, body: Body, kept: bytearray | None, t: float) -> None:
        """The request head with what has come of the body, then the rest of the body as it comes
        (the connection frames it: chunks when the body goes up chunked). ``kept`` takes the body
        while it stays within ``REPLAY_MAX`` bytes (see ``_whole``)."""
        data = await body.read()
        if kept is not None and len(kept) + len(data) <= REPLAY_MAX:
            kept += data
        conn.start(call.head, data, call.chunked, not data, call.secret)
        await conn.drain(t)
        while data:
            data = await body.read()
            if kept is not None and len(kept) + len(data) <= REPLAY_MAX:
                kept += data
            await conn.more(data, t)

    def _failed(self, call: _Call, exc: UpstreamError) -> bytes:
        close = not call.keep_alive
        if exc.kind == "timeout":
            log.warning("egress %s: upstream timed out", call.route)
            return self.made(
                call.method,
                504,
                "upstream_timeout",
                f"egress route {call.route!r}: the upstream did not answer in {self.settings.timeout:g}s",
                close=close,
            )
        if exc.kind == "protocol":
            log.warning("egress %s: malformed upstream answer (%s)", call.route, exc)
            return self.made(
                call.method,
                502,
                "bad_upstream",
                f"egress route {call.route!r}: the upstream's answer is malformed",
                close=close,
            )
        log.warning("egress %s: upstream unreachable (%s)", call.route, exc)
        return self.made(
            call.method,
            502,
            "upstream_unreachable",
            f"egress route {call.route!r}: the upstream could not be reached ({exc})",
            close=close,
        )

    async def _relay(self, ex: Exchange, call: _Call, conn: Leg) -> AsyncIterator[bytes]:
        relay = _Relay(self, ex, call)
        try:
            head = relay.head(conn)
        except _Bad as bad:
            yield bad.data
            return
        if relay.bodyless:
            yield head
            return
        pending = [head]
        t = self.settings.timeout
        while True:
            if pending and not conn.chunks and not conn.complete:  # about to wait: send what is here
                yield b"".join(pending)
                pending.clear()
            try:
                chunk = await conn.read(t)
            except UpstreamError as exc:  # the answer is cut: so is the worker's
                relay.cut(exc)
                if pending:
                    yield b"".join(pending)
                return
            if not chunk:
                break
            piece = relay.feed(chunk)
            if piece is None:  # over the limit: cut
                if pending:
                    yield b"".join(pending)
                return
            if piece:
                pending.append(piece)
        pending.append(relay.end())
        yield b"".join(pending)


class _Direct:
    """One egress call with its request body whole, served from callbacks (no task, no generator):
    the request goes up at once on an idle pooled connection (a new one is made by a small task when
    there is none), the upstream connection's callbacks (``Connection.notify``) call :meth:`wake`, which
    relays what has arrived to the worker (``Sink.write``) through the same :class:`_Relay` as the
    coroutine's way, pausing while the worker does not read (the upstream connection buffers up to its
    high-water mark, then stops reading). One timer per call: no progress for ``timeout`` seconds
    (connecting, sending, waiting for the head or for more of the body) ends it, as a 504 before the
    head, a cut answer after. A pooled connection the upstream had closed before answering is replaced
    once for idempotent methods, as on the other way (and a stream an HTTP/2 upstream did not act on,
    refused or past its GOAWAY, by a new stream, whatever the method). The worker leaving (``cancel``) drops the
    upstream connection."""

    __slots__ = (
        "body",
        "call",
        "conn",
        "connecting",
        "egress",
        "ex",
        "finished",
        "last",
        "loop",
        "relay",
        "retried",
        "reused",
        "sink",
        "started",
        "stats",
        "timer",
    )

    def __init__(self, egress: Egress, ex: Exchange, call: _Call, body: bytes, sink: Sink) -> None:
        self.egress, self.ex, self.call, self.sink = egress, ex, call, sink
        self.body = body
        self.conn: Leg | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.relay: _Relay | None = None
        self.finished = self.retried = self.reused = False
        self.stats = egress._stats(call.route)
        self.stats.requests += 1
        self.started = time.monotonic()
        pool = egress._pool()
        loop = self.loop = pool.loop
        self.last = loop.time()
        self.timer = loop.call_later(egress.settings.timeout, self._tick)
        conn = pool.idle_conn(call.origin)
        if conn is None:
            self._connect()
        else:
            self._send(conn, True)

    # -- Direct (the worker's side)
    def cancel(self) -> None:
        self._end(False, notify=False)

    def resume(self) -> None:
        if not self.finished and self.relay is not None:
            self.loop.call_soon(self.wake)  # not from within the transport's callback

    # -- the upstream's side
    def _connect(self) -> None:
        self.connecting = self.loop.create_task(self._connected())

    async def _connected(self) -> None:
        try:
            conn = await self.egress._pool().connect(self.call.origin, self.egress.settings.timeout)
        except UpstreamError as exc:
            self.connecting = None
            self._fail(exc)
            return
        except Exception as exc:  # a bug: this call fails at once (not at its timeout), the agent goes on
            log.error("internal error connecting to an egress upstream (%s)", type(exc).__name__)
            self.connecting = None
            self._fail(UpstreamError("connect", "internal error"))
            return
        self.connecting = None
        if self.finished:
            conn.close()
            return
        self._send(conn, False)

    def _send(self, conn: Leg, reused: bool) -> None:
        self.conn, self.reused = conn, reused
        conn.begin(self.call.method == "HEAD")
        conn.notify = self.wake
        try:
            conn.start(self.call.head, self.body, self.call.chunked, True, self.call.secret)
        except UpstreamError as exc:
            self.loop.call_soon(self._fail, exc)  # never done() from within the start

    def wake(self) -> None:
        """Relay whatever the upstream connection has for the worker now (from the upstream connection's
        callbacks, and when the worker reads again). A bug costs this call, and says nothing of it."""
        try:
            self._relay_now()
        except Exception as exc:
            log.error("internal error relaying an egress answer (%s)", type(exc).__name__)
            self.ex.close = True
            if self.relay is None and not self.finished:
                self.sink.write(self.egress.made(self.call.method, 500, "internal", "internal error", close=True))
            self._end(False)

    def _relay_now(self) -> None:
        conn = self.conn
        if self.finished or conn is None:
            return
        self.last = self.loop.time()
        pending: list[bytes] = []
        relay = self.relay
        if relay is None:
            if not conn.head_done:
                if conn.error is not None:
                    self._fail(conn.error)
                return
            self.stats.answered(conn.status, time.monotonic() - self.started)
            relay = _Relay(self.egress, self.ex, self.call)
            try:
                pending.append(relay.head(conn))
            except _Bad as bad:
                self.sink.write(bad.data)
                self._end(False)
                return
            self.relay = relay  # from here on, the worker has (or is about to have) the head
            if relay.bodyless:
                self.sink.write(pending[0])
                self._end(True)
                return
        sink = self.sink
        if sink.write_blocked:  # the body waits for the worker to read (``resume``); the head goes now
            if pending:
                sink.write(pending[0])
            return
        while conn.chunks:
            piece = relay.feed(conn.take())
            if piece is None:  # over the limit: the answer is cut
                if pending:
                    sink.write(b"".join(pending))
                self._end(False)
                return
            if piece:
                pending.append(piece)
        if conn.complete:
            pending.append(relay.end())
            sink.write(b"".join(pending))
            self._end(True)
            return
        if pending:
            sink.write(b"".join(pending))
        if conn.error is not None:  # the answer is cut: so is the worker's
            relay.cut(conn.error)
            self._end(False)

    def _fail(self, exc: UpstreamError) -> None:
        """No answer from the upstream: once more on a new connection where that is safe, else an error."""
        if self.finished:
            return
        conn = self.conn
        if (
            not self.retried
            and exc.kind == "closed"
            and conn is not None
            and not conn.got_bytes
            and (exc.unprocessed or (self.reused and self.call.method in _IDEMPOTENT))
        ):
            self.retried = True
            conn.notify = None
            conn.close()
            self.conn = None
            # a stream the upstream did not act on: a new stream (on any connection with room); else
            # a new connection, not another pooled one that may be as stale
            leg = self.egress._pool().idle_conn(self.call.origin) if exc.unprocessed else None
            if leg is None:
                self._connect()
            else:
                self._send(leg, True)
            return
        self.stats.failures[exc.kind] = self.stats.failures.get(exc.kind, 0) + 1
        self.sink.write(self.egress._failed(self.call, exc))
        self._end(False)

    def _tick(self) -> None:
        if self.finished:
            return
        t = self.egress.settings.timeout
        left = self.last + t - self.loop.time()
        if left > 0 or self.sink.write_blocked:  # progress meanwhile, or the worker is the slow one
            self.timer = self.loop.call_later(left if left > 0 else t, self._tick)
            return
        exc = UpstreamError("timeout", "timed out")
        if self.relay is None:
            if self.connecting is not None:
                self.connecting.cancel()
                self.connecting = None
            self._fail(exc)
        else:
            self.relay.cut(exc)
            self._end(False)

    def _end(self, ok: bool, *, notify: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        self.timer.cancel()
        if self.connecting is not None:
            self.connecting.cancel()
        conn = self.conn
        if conn is not None:
            conn.notify = None
            if ok:
                self.egress._pool().release(conn)
            else:
                conn.close()
        if notify:
            self.sink.done(self.ex)


class _Bad(Exception):
    """An answer the agent makes instead of the upstream's (its head was unusable)."""

    def __init__(self, data: bytes) -> None:
        super().__init__("unusable upstream answer")
        self.data = data


class _Relay:
    """The answer on its way down, for either path (the coroutine's ``_relay``, the callbacks'
    ``_Direct``): ``head`` rewrites the head (hop-by-hop headers dropped, the key scrubbed, the framing
    chosen) or raises ``_Bad``; ``feed`` scrubs and frames each piece of the body (None past
    ``max_answer``: the answer is cut); ``end`` the rest. The connection to the worker is marked to close
    (``ex.close``) wherever the answer cannot be framed whole."""

    __slots__ = ("bodyless", "call", "chunked", "egress", "ex", "length", "relayed", "scrub")

    def __init__(self, egress: Egress, ex: Exchange, call: _Call) -> None:
        self.egress, self.ex, self.call = egress, ex, call
        self.length: int | None = None
        self.chunked = self.bodyless = False
        self.relayed = 0
        self.scrub: _Scrubber | None = None

    def head(self, conn: Leg) -> bytes:
        call, eg = self.call, self.egress
        status = conn.status
        length: int | None = None
        raw = conn.headers
        named = {t.strip().lower() for k, v in raw if k.lower() == b"connection" for t in v.split(b",")}
        out: list[bytes] = []
        for k, v in raw:
            n = k.lower()
            if n in HOP_BY_HOP or n in named:
                continue
            if n == b"content-length":
                if not v.isdigit() or len(v) > 18 or (length is not None and int(v) != length):
                    conn.keep_alive = False
                    raise _Bad(
                        eg.made(
                            call.method,
                            502,
                            "bad_upstream",
                            f"egress route {call.route!r}: the upstream's answer is malformed (Content-Length)",
                            close=not call.keep_alive,
                        )
                    )
                if length is not None:
                    continue
                length = int(v)
            if b"\r" in v or b"\n" in v:
                continue
            out.append(k + b": " + _scrub_all(v, call.needles) + b"\r\n")
        self.length = length
        bodyless = self.bodyless = call.method == "HEAD" or status in (204, 304)
        max_answer = eg.settings.max_answer
        if not bodyless and length is not None and length > max_answer:
            conn.keep_alive = False
            raise _Bad(
                eg.made(
                    call.method,
                    502,
                    "answer_too_large",
                    f"egress route {call.route!r}: the upstream's answer is over {max_answer} bytes",
                    close=not call.keep_alive,
                )
            )
        close = b"" if call.keep_alive else b"Connection: close\r\n"
        if not bodyless and length is None:
            if call.keep_alive and not call.http10:
                self.chunked = True
                out.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.ex.close = True
                close = b"Connection: close\r\n"
        line = _STATUS.get(status)
        if line is None:
            try:
                phrase = HTTPStatus(status).phrase
            except ValueError:
                phrase = "Unknown"
            line = b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode())
        log.debug("egress %s: %s %d", call.route, call.method, status)
        if not bodyless:
            self.scrub = _Scrubber(eg._scrub_order(call.needles), ordered=True)
        return b"".join((line, *out, close, b"\r\n"))

    def feed(self, chunk: bytes) -> bytes | None:
        self.relayed += len(chunk)
        if self.length is not None and self.relayed > self.length:  # (both parsers hold an answer to it)
            log.warning("egress %s: answer longer than its Content-Length; connection cut", self.call.route)
            self.ex.close = True  # the rest would be read as the answer to the worker's next request
            return None
        if self.relayed > self.egress.settings.max_answer:
            log.warning(
                "egress %s: answer over %d bytes; connection cut", self.call.route, self.egress.settings.max_answer
            )
            self.ex.close = True
            return None
        assert self.scrub is not None
        data = self.scrub.feed(chunk)
        if data and self.chunked:
            return b"%x\r\n%b\r\n" % (len(data), data)
        return data

    def end(self) -> bytes:
        assert self.scrub is not None
        tail = self.scrub.flush()
        if tail and self.chunked:
            tail = b"%x\r\n%b\r\n" % (len(tail), tail)
        if self.chunked:
            tail += b"0\r\n\r\n"
        if self.length is not None and self.relayed != self.length:
            self.ex.close = True
        return tail

    def cut(self, exc: UpstreamError) -> None:
        log.warning("egress %s: upstream answer cut (%s)", self.call.route, exc)
        self.ex.close = True


def _whole(kept: bytearray | None, body: Body) -> bool:
    """``kept`` holds the whole request body (all of it read, none of it left out): it can be sent again."""
    return kept is not None and body.complete and len(kept) == body.received


def _check_path(path: str) -> None:
    if "\\" in path or _BAD_ESCAPES.search(path):
        raise _Refusal(400, "bad_request", "encoded '/', '\\' or NUL in an egress path")
    for seg in path.split("/"):
        # (``..;x``: servlet containers take what precedes a ';' as the segment)
        if unquote(seg).partition(";")[0] in (".", ".."):
            raise _Refusal(400, "bad_request", "'.' or '..' segments in an egress path")


def _scrub_all(data: bytes, needles: tuple[bytes, ...]) -> bytes:
    for n in needles:
        if len(n) >= SCRUB_MIN and n in data:
            data = data.replace(n, b"*" * len(n))
    return data


def _scrub_order(needles: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The needles worth scrubbing, longest first."""
    return tuple(sorted({n for n in needles if len(n) >= SCRUB_MIN}, key=len, reverse=True))


class _Scrubber:
    """Overwrites the needles in a stream, across chunk boundaries: a chunk's tail that could begin a
    needle is held back until the next chunk (or the end) tells. Same length in and out."""

    def __init__(self, needles: tuple[bytes, ...], ordered: bool = False) -> None:
        self.needles = needles if ordered else _scrub_order(needles)
        self.held = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self.needles:
            return chunk
        data = _scrub_all(self.held + chunk, self.needles)
        hold, end = 0, len(data)
        for n in self.needles:  # the longest tail of data that begins a needle: where its first byte is
            first = n[:1]
            i = data.find(first, max(0, end - len(n) + 1))
            while i >= 0 and end - i > hold:
                if n.startswith(data[i:]):
                    hold = end - i
                    break
                i = data.find(first, i + 1)
        self.held = data[len(data) - hold :] if hold else b""
        return data[: len(data) - hold]

    def flush(self) -> bytes:
        out, self.held = self.held, b""
        return out
