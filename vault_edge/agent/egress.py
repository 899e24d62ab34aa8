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
connections are kept alive and pooled per upstream (httpx's transport: HTTP/1.1; HTTP/2 needs ``h2``,
not installed). No redirect is followed: a 3xx goes back to the worker, which may call the new URL
through the agent like any other (judged by the routes again).

On the way down: hop-by-hop headers dropped, the body streamed as it comes (server-sent events
arrive one by one), framed by its Content-Length, chunked, or by the close; every form of the
injected value (raw, in the header's template, Base64 for Basic, percent-encoded for a query) that an
upstream would echo, in a header or in the body, is overwritten with ``*`` of the same length (across
chunk boundaries too; only values of at least 6 bytes, and only bytes the agent can see: a body the
upstream compresses anyway is not scrubbed). Errors the agent makes itself (502 ``upstream_unreachable``,
504 ``upstream_timeout``, 502 ``answer_too_large``, 502 ``bad_secret``...) say what happened and
never hold the value, nor does a log line: logs name routes, statuses and exception types only.

Bounds: the request body (Content-Length, ``max_body``; the transport refuses chunked uploads with
411), the answer (``max_answer`` bytes relayed; past it the connection is cut), ``timeout`` for
connecting, each write and each read (a stream may last as long as data keeps coming). A failure of
any kind costs the request it belongs to, never the agent.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, urlsplit

from vault_edge.agent.endpoint import Answer, Exchange, Request
from vault_edge.agent.peercred import Caller
from vault_edge.agent.policy import Policy
from vault_edge.agent.view import AgentState, View
from vault_edge.wire import egress as wegress

if TYPE_CHECKING:  # httpx is imported at the first egress call: the socket API's import stays light
    import httpx

log = logging.getLogger("vault_edge.agent.egress")

PREFIX: Final = "/v1/egress/"
MAX_BODY: Final = 8 << 20  # request body bytes
MAX_ANSWER: Final = 64 << 20  # answer body bytes relayed
TIMEOUT_S: Final = 60.0
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
_ROUTE_RE = re.compile(r"([a-z0-9][a-z0-9_\-]{0,62})(?=[/?]|$)")
_BAD_ESCAPES = re.compile(r"%(2[fF]|5[cC]|00)")


@dataclass(frozen=True)
class EgressSettings:
    ca_file: str | None = None  # CA bundle for upstreams (default: the system's)
    timeout: float = TIMEOUT_S
    max_body: int = MAX_BODY
    max_answer: int = MAX_ANSWER


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str, extra: bytes = b"") -> None:
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


@dataclass(frozen=True)
class _Call:
    """One upstream call, ready to go: nothing in its repr (headers and URL may hold the key)."""

    route: str
    method: str
    url: str
    headers: list[tuple[bytes, bytes]]
    needles: tuple[bytes, ...]
    keep_alive: bool
    http10: bool

    def __repr__(self) -> str:
        return f"_Call(route={self.route!r}, method={self.method})"


Error = Callable[..., bytes]  # Api.error(status, code, message, *, close=False, extra=b"")


class Egress:
    """The egress side of the agent's API: ``answer`` gives an error Answer or an Exchange."""

    def __init__(self, state: AgentState, policy: Policy, error: Error, settings: EgressSettings | None = None) -> None:
        self.state, self.policy, self.error = state, policy, error
        self.settings = settings or EgressSettings()
        self._view: View | None = None
        self._by_name: dict[str, wegress.Parsed] = {}
        self._by_origin: dict[tuple[str, str, int], list[wegress.Parsed]] = {}
        self._transport: httpx.AsyncHTTPTransport | None = None

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None

    # -- routing and policy -------------------------------------------------------------------
    def _index(self) -> None:
        view = self.state.view
        if view is self._view:
            return
        by_name: dict[str, wegress.Parsed] = {}
        by_origin: dict[tuple[str, str, int], list[wegress.Parsed]] = {}
        for r in view.egress:
            try:
                p = wegress.route_from_json(r.to_json())
            except ValueError:
                continue
            by_name[p.name] = p
            by_origin.setdefault(p.upstream.origin, []).append(p)
        self._view, self._by_name, self._by_origin = view, by_name, by_origin

    def answer(self, req: Request, caller: Caller) -> Answer | Exchange:
        """The egress answer to ``req``: refusals as whole answers (never cached), calls as Exchanges."""
        try:
            call = self._plan(req, caller)
        except _Refusal as r:
            return self._refuse(req, self.error(r.status, r.code, str(r), extra=r.extra, close=not req.keep_alive))
        except Exception as exc:  # a bug costs this request, and says nothing of its content
            log.error("internal error routing an egress request (%s)", type(exc).__name__)
            return self._refuse(req, self.error(500, "internal", "internal error", close=not req.keep_alive))
        ex = Exchange(self.settings.max_body, lambda body: self._run(ex, call, body))
        return ex

    def _refuse(self, req: Request, data: bytes) -> Answer | Exchange:
        """A refusal; for a request with a body, as an Exchange, so that the body is read (and dropped)
        and the worker gets the refusal itself, not a 413 for a body the agent did not want."""
        if not req.body_len:
            return Answer(data, False)

        async def once(_body: bytes) -> AsyncIterator[bytes]:
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
        entry = self.state.view.lookup(route.route.secret)
        if entry is None:
            raise _Refusal(503, "not_ready", f"this agent holds no value of egress route {route.name!r}'s secret")
        return self._build(req, route, path, query, entry.value)

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
            try:
                text, forms = inj.render(value)
            except wegress.InjectError as exc:
                raise _Refusal(502, "bad_secret", f"egress route {route.name!r}: {exc}") from None
            needles.extend(forms)
            if inj.kind == "query":
                inject_query.append((inj.name, text))
            else:
                inject_headers.append((inj.name.encode(), text.encode()))
        dropped = {n for n, _ in inject_headers}
        lines = req.head.split(b"\r\n")
        headers: list[tuple[bytes, bytes]] = []
        named: set[bytes] = set()
        raw: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            if not line:
                continue
            name, _, v = line.partition(b":")
            n, v = name.strip().lower(), v.strip(b" \t")
            if n == b"connection":
                named.update(t.strip().lower() for t in v.split(b","))
            raw.append((n, v))
        for n, v in raw:
            if n in _DROP_UP or n in named or n in dropped:
                continue
            headers.append((n, v))
        headers.extend(inject_headers)
        if inject_query:
            names = {k for k, _ in inject_query}
            kept = [p for p in query.split("&") if p and unquote(p.partition("=")[0]) not in names]
            query = "&".join([*kept, *(f"{k}={v}" for k, v in inject_query)])
        url = route.upstream.url(path + ("?" + query if query else ""))
        return _Call(
            route.name, req.method, url, headers, tuple(needles), req.keep_alive, lines[0].endswith(b"HTTP/1.0")
        )

    # -- the call ------------------------------------------------------------------------------
    def _client(self) -> httpx.AsyncHTTPTransport:
        import httpx

        if self._transport is None:
            s = self.settings
            ctx = ssl.create_default_context(cafile=s.ca_file) if s.ca_file else ssl.create_default_context()
            # The transport alone: no cookie jar shared between callers, no redirects, no .netrc or proxy
            # settings from the environment, no default headers. httpx's own loggers stay at WARNING
            # (``agent run`` sets them), so no URL (which may hold a query-injected key) is logged.
            self._transport = httpx.AsyncHTTPTransport(
                verify=ctx,
                trust_env=False,
                retries=0,
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=64, keepalive_expiry=30.0),
            )
        return self._transport

    async def _run(self, ex: Exchange, call: _Call, body: bytes) -> AsyncIterator[bytes]:
        import httpx

        s = self.settings
        t = s.timeout
        close = b"" if call.keep_alive else b"Connection: close\r\n"
        try:
            request = httpx.Request(
                call.method,
                call.url,
                headers=call.headers,
                content=body if body or call.method in ("POST", "PUT", "PATCH") else None,
                extensions={"timeout": {"connect": t, "read": t, "write": t, "pool": t}},
            )
        except (httpx.InvalidURL, ValueError, TypeError):
            yield self.error(
                400,
                "bad_request",
                f"egress route {call.route!r}: the request cannot be sent upstream (an invalid URL or header)",
                close=not call.keep_alive,
            )
            return
        try:
            resp = await self._client().handle_async_request(request)
        except httpx.TimeoutException:
            log.warning("egress %s: upstream timed out", call.route)
            yield self.error(
                504,
                "upstream_timeout",
                f"egress route {call.route!r}: the upstream did not answer in {t:g}s",
                close=not call.keep_alive,
            )
            return
        except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
            log.warning("egress %s: upstream unreachable (%s)", call.route, type(exc).__name__)
            yield self.error(
                502,
                "upstream_unreachable",
                f"egress route {call.route!r}: the upstream could not be reached ({type(exc).__name__})",
                close=not call.keep_alive,
            )
            return
        try:
            async for piece in self._relay(ex, call, resp, close):
                yield piece
        finally:
            await resp.aclose()

    async def _relay(self, ex: Exchange, call: _Call, resp: httpx.Response, close: bytes) -> AsyncIterator[bytes]:
        import httpx

        s = self.settings
        status = resp.status_code
        length: int | None = None
        named = {t.strip().lower() for k, v in resp.headers.raw if k.lower() == b"connection" for t in v.split(b",")}
        out: list[bytes] = []
        for k, v in resp.headers.raw:
            n = k.lower()
            if n in HOP_BY_HOP or n in named:
                continue
            if n == b"content-length":
                if not v.isdigit() or len(v) > 18 or (length is not None and int(v) != length):
                    yield self.error(
                        502,
                        "bad_upstream",
                        f"egress route {call.route!r}: the upstream's answer is malformed (Content-Length)",
                        close=not call.keep_alive,
                    )
                    return
                if length is not None:
                    continue
                length = int(v)
            if b"\r" in v or b"\n" in v:
                continue
            out.append(k + b": " + _scrub_all(v, call.needles) + b"\r\n")
        bodyless = call.method == "HEAD" or status in (204, 304) or status < 200
        if not bodyless and length is not None and length > s.max_answer:
            yield self.error(
                502,
                "answer_too_large",
                f"egress route {call.route!r}: the upstream's answer is over {s.max_answer} bytes",
                close=not call.keep_alive,
            )
            return
        chunked = False
        if not bodyless and length is None:
            if call.keep_alive and not call.http10:
                chunked = True
                out.append(b"Transfer-Encoding: chunked\r\n")
            else:
                ex.close = True
                if not close:
                    close = b"Connection: close\r\n"
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        yield b"HTTP/1.1 %d %s\r\n%b%b\r\n" % (status, phrase.encode(), b"".join(out), close)
        log.debug("egress %s: %s %d", call.route, call.method, status)
        if bodyless:
            return
        scrub = _Scrubber(call.needles)
        relayed = 0
        try:
            async for chunk in resp.aiter_raw():
                relayed += len(chunk)
                if relayed > s.max_answer:
                    log.warning("egress %s: answer over %d bytes; connection cut", call.route, s.max_answer)
                    ex.close = True
                    return
                data = scrub.feed(chunk)
                if data:
                    yield b"%x\r\n%b\r\n" % (len(data), data) if chunked else data
        except (httpx.HTTPError, OSError) as exc:  # the answer is cut: so is the worker's
            log.warning("egress %s: upstream answer cut (%s)", call.route, type(exc).__name__)
            ex.close = True
            return
        tail = scrub.flush()
        if tail:
            yield b"%x\r\n%b\r\n" % (len(tail), tail) if chunked else tail
        if chunked:
            yield b"0\r\n\r\n"
        if length is not None and relayed != length:
            ex.close = True


def _check_path(path: str) -> None:
    if "\\" in path or _BAD_ESCAPES.search(path):
        raise _Refusal(400, "bad_request", "encoded '/', '\\' or NUL in an egress path")
    for seg in path.split("/"):
        if unquote(seg) in (".", ".."):
            raise _Refusal(400, "bad_request", "'.' or '..' segments in an egress path")


def _scrub_all(data: bytes, needles: tuple[bytes, ...]) -> bytes:
    for n in needles:
        if len(n) >= SCRUB_MIN and n in data:
            data = data.replace(n, b"*" * len(n))
    return data


class _Scrubber:
    """Overwrites the needles in a stream, across chunk boundaries: a chunk's tail that could begin a
    needle is held back until the next chunk (or the end) tells. Same length in and out."""

    def __init__(self, needles: tuple[bytes, ...]) -> None:
        self.needles = sorted({n for n in needles if len(n) >= SCRUB_MIN}, key=len, reverse=True)
        self.held = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self.needles:
            return chunk
        data = _scrub_all(self.held + chunk, tuple(self.needles))
        hold = 0
        for n in self.needles:
            for k in range(min(len(n) - 1, len(data)), hold, -1):
                if data.endswith(n[:k]):
                    hold = k
                    break
        self.held = data[len(data) - hold :] if hold else b""
        return data[: len(data) - hold]

    def flush(self) -> bytes:
        out, self.held = self.held, b""
        return out
