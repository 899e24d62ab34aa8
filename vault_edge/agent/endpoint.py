"""The agent's socket server: HTTP/1.1 on a unix socket, the product's hot path.

Edge workers read secrets here on every request, so the path is built for that read:

* ``asyncio.Protocol`` on the running loop (uvloop when installed: :func:`run`), not streams.
* The caller is read from the kernel once per connection (``peercred``), never from the request.
* Answers are cached per connection, keyed by the raw request head: a repeated request (the common
  case: a worker reads the same few names) costs one dict lookup and one write. The cache is
  dropped whenever an answer could change: a new view (``state.generation``), a new contact with the
  control plane, the integer ``Age`` ticking over, ``--max-stale`` passing, and at least every second.
  Answers about an entry with a grace-period end (``previous``) and health/watch are never cached.
* Heads are framed here (CRLF CRLF, 8 KiB cap) and parsed by httptools (llhttp), keeping only what
  the API reads (method, target, Accept, X-Vault-Edge-Token, keep-alive, body framing). It measured
  faster than a hand-written parser (bench/head_parse.py) and is the stricter of the two; it only
  runs on a cache miss.
* Pipelined requests are answered in order; a long-poll (``/v1/watch``) holds the ones behind it.

Headers on every answer: ``X-Vault-Edge-Revision`` (the view's revision) and ``Age`` (whole seconds
since the agent last heard from the control plane, carried over restarts by the disk cache; ``0``
when it never has: ``/v1/health`` then says ``last_sync_age_s`` null), and ``Cache-Control: no-store``.

Order of checks on a read: 400 (bad request) → 403 (policy: a name the caller may not read is
forbidden whether or not it exists) → 503 (``not_ready``, ``too_stale``) → 404 (absent or past grace).

Local callers cannot exhaust the agent's descriptors (``Listener``): the listener accepts connections
itself, holds each uid to ``max_conns_per_uid`` (more are closed at once, logged once a minute per
uid), and stops accepting while the open connections would leave fewer than ``FD_RESERVE``
descriptors under the soft limit for the agent's own work (the sync, the disk cache), resuming as
connections close. Keep-alive connections with no request in flight and nothing pending are closed
after ``idle_timeout`` by the sweeper that also times out slow heads. The sweeper tells idle from busy
without touching the hot path: it starts a new cache epoch on every pass, and any request brings its
connection's epoch up to date, so a connection whose epoch is older than the previous pass has sent
nothing since.

Hostile input: heads over 8 KiB get 431, malformed ones 400, request bodies and Transfer-Encoding are
refused (answer, then close), heads left unfinished for 10 s (``head_timeout``) get 408; all close the connection, and
a client that stops reading is paused at the transport's write-buffer limit. Nothing here logs or
raises with a secret value in it.

Imports nothing of the control plane, FastAPI, Starlette, SQLAlchemy or httpx: cold start matters.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import re
import resource
import socket
import stat
from collections.abc import Coroutine
from time import monotonic
from typing import Any, Final, NamedTuple, TypeVar, cast
from urllib.parse import unquote

import httptools

from vault_edge.agent.fields import with_field
from vault_edge.agent.peercred import Caller, peer_of
from vault_edge.agent.policy import Policy
from vault_edge.agent.view import AgentState, Entry
from vault_edge.wire import STAGES, b64e, valid_name
from vault_edge.wire.fields import FieldError

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_HEAD: Final = 8192  # bytes of request line + headers
MAX_BATCH: Final = 256  # names in one ?names= read
HEAD_TIMEOUT_S: Final = 10.0  # an unfinished head older than this is answered 408 and closed
WATCH_DEFAULT_S: Final = 30.0
WATCH_MAX_S: Final = 300.0
_CACHE_MAX: Final = 64  # cached answers per connection...
_CACHE_BYTES: Final = 65_536  # ...and their bytes: bounded memory per connection, whatever the clients ask
_CACHE_ANSWER_MAX: Final = 16_384  # larger answers are rebuilt each time rather than held
_SWEEP_S: Final = 5.0
IDLE_TIMEOUT_S: Final = 60.0  # a keep-alive connection with nothing in flight is closed after this
MAX_CONNS_PER_UID: Final = 256  # connections one uid may hold; more are closed at accept
FD_RESERVE: Final = 64  # descriptors kept free under the soft limit for the agent's own work
_REFUSAL_LOG_S: Final = 60.0  # refusals of one kind are logged once per this window

_REASONS: Final = {
    200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 413: "Content Too Large", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}
_STATUS_LINE: Final = {code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in _REASONS.items()}
_JSON: Final = b"application/json"
_OCTETS: Final = b"application/octet-stream"
_TARGET_RE = re.compile(rb"/[\x21-\x7e]*")  # origin-form, visible ASCII only


class EndpointError(OSError):
    """The socket cannot be served (path taken by a live agent or by a non-socket file)."""


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run the agent's main coroutine on uvloop when installed (about 2x the reads/s), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def serve(path: str, state: AgentState, policy: Policy, *, mode: int = 0o660,
                head_timeout: float = HEAD_TIMEOUT_S, idle_timeout: float = IDLE_TIMEOUT_S,
                max_conns_per_uid: int = MAX_CONNS_PER_UID, fd_reserve: int = FD_RESERVE) -> Listener:
    """Create the unix socket at ``path`` (mode ``mode``, never world-accessible) and start serving.

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
    core = _Server(state, policy)
    loop = asyncio.get_running_loop()
    try:
        sock.listen(1024)
        listener = Listener(sock, core, loop, max_conns_per_uid=max_conns_per_uid, fd_reserve=fd_reserve)
    except BaseException:
        sock.close()
        raise
    core.start_sweeper(loop, listener, head_timeout, idle_timeout)
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

    def __init__(self, sock: socket.socket, core: _Server, loop: asyncio.AbstractEventLoop, *,
                 max_conns_per_uid: int, fd_reserve: int) -> None:
        self.sock, self.core, self.loop = sock, core, loop
        self.max_conns_per_uid = max_conns_per_uid
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_conns = (1 << 30) if soft == resource.RLIM_INFINITY else max(1, soft - fd_reserve - _open_fds())
        self.soft_limit, self.fd_reserve = soft, fd_reserve
        self.per_uid: dict[int, int] = {}
        self.pending = 0  # accepted, protocol not yet attached
        self.accepting = False
        self.serving = True
        self._logged: dict[object, float] = {}  # refusal kind → when last logged
        self._refused: dict[object, int] = {}  # refusal kind → refusals since
        self._fd = sock.fileno()
        self._resume()

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
        return len(self.core.conns) + self.pending >= self.max_conns

    def _accept(self) -> None:
        for _ in range(128):  # a batch per wake-up, then let the loop serve requests
            if self._full():
                self._pause()
                self._note("budget", "stop accepting connections: %d open, the open-files limit is %d and %d are "
                           "kept for the agent's own work; accepting again as connections close",
                           len(self.core.conns) + self.pending, self.soft_limit, self.fd_reserve)
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
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(False)
            caller = peer_of(conn, with_exe=self.core.policy.uses_exe)
        except OSError as exc:
            conn.close()
            self._note("cred", "refusing a connection without kernel credentials: %s", exc)
            return
        held = self.per_uid.get(caller.uid, 0)
        if held >= self.max_conns_per_uid:
            conn.close()
            self._note(("uid", caller.uid), "uid %d holds %d connections per uid (--max-conns-per-uid): its new "
                       "connections are closed at once", caller.uid, held)
            return
        self.per_uid[caller.uid] = held + 1
        self.pending += 1
        self.loop.create_task(self._attach(conn, caller))

    async def _attach(self, conn: socket.socket, caller: Caller) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: _Conn(self.core, self, caller), conn)
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
        now = monotonic()
        count = self._refused[kind] = self._refused.get(kind, 0) + 1
        if now - self._logged.get(kind, -math.inf) >= _REFUSAL_LOG_S:
            self._logged[kind] = now
            self._refused[kind] = 0
            log.warning(msg + " (%d in this window; next report in %.0fs at the earliest)", *args, count,
                        _REFUSAL_LOG_S)
            if len(self._logged) > 4096:  # one entry per uid seen refusing: bounded anyway
                self._logged.clear()
                self._refused.clear()


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


# ---------------------------------------------------------------------------------------- requests

class Request(NamedTuple):
    method: str
    target: str
    accept: str | None
    token: str | None
    keep_alive: bool
    body_len: int


class BadRequest(Exception):
    """The head cannot be served; ``status`` and the message go back to the client, then close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HeadParser:
    """Reads one complete request head at a time with httptools (llhttp, Node.js's parser).

    llhttp is strict on syntax (header names and values, Content-Length, line endings); on top of
    it the endpoint wants HTTP/1.0 or 1.1, an origin-form ASCII target, at most one token header
    and no body. One instance per connection; a head that fails here ends the connection, so the
    parser is only ever reused from a message boundary.
    """

    __slots__ = ("_parser", "accept", "body_len", "chunked", "keep_alive", "method", "token", "tokens", "url",
                 "version")

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.accept: bytes | None = None
        self.token: bytes | None = None
        self.tokens = 0
        self.body_len = 0
        self.chunked = False
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
            self.chunked = True

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
            raise BadRequest(400, "the request target must be a path (origin-form, ASCII)")
        if self.tokens > 1:
            raise BadRequest(400, "more than one X-Vault-Edge-Token header")
        if self.chunked:
            raise BadRequest(400, "request bodies are not accepted (Transfer-Encoding)")
        return Request(
            self.method.decode("ascii"),
            self.url.decode("ascii"),
            None if self.accept is None else self.accept.decode("latin-1"),
            None if self.token is None else self.token.decode("latin-1"),
            self.keep_alive,
            self.body_len,
        )


def wants_raw(accept: str | None) -> bool:
    """True when Accept lists application/octet-stream before (or without) application/json."""
    if accept is None:
        return False
    for item in accept.split(","):
        media = item.split(";", 1)[0].strip().lower()
        if media == "application/octet-stream":
            return True
        if media == "application/json":
            return False
    return False


def parse_query(query: str, allowed: frozenset[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    if not query:
        return params
    for part in query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        key, value = unquote(key, errors="strict"), unquote(value, errors="strict")
        if key not in allowed:
            takes = f"allowed: {', '.join(sorted(allowed))}" if allowed else "this endpoint takes none"
            raise BadRequest(400, f"unknown query parameter {key!r} ({takes})")
        if key in params:
            raise BadRequest(400, f"query parameter {key!r} given twice")
        params[key] = value
    return params


def _int_param(params: dict[str, str], key: str, *, minimum: int = 0) -> int | None:
    raw = params.get(key)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18 or int(raw) < minimum:
        raise BadRequest(400, f"{key} must be an integer ≥ {minimum}")
    return int(raw)


def _stage_param(params: dict[str, str]) -> str | None:
    stage = params.get("stage")
    if stage is not None and stage not in STAGES:
        raise BadRequest(400, f"stage must be one of {', '.join(STAGES)}")
    return stage


def _name(raw: str) -> str:
    if not valid_name(raw):
        raise BadRequest(400, "invalid secret name")
    return raw


_READ_PARAMS: Final = frozenset({"version", "stage", "field"})
_LIST_PARAMS: Final = frozenset({"names", "stage"})
_WATCH_PARAMS: Final = frozenset({"since", "wait"})


# ----------------------------------------------------------------------------------------- answers

class _Answer(NamedTuple):
    data: bytes
    cacheable: bool


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class _Watch(NamedTuple):
    since: int | None
    wait: float


class _Server:
    """What all connections share: state, policy, the cache epoch and the headers every answer has."""

    def __init__(self, state: AgentState, policy: Policy) -> None:
        self.state, self.policy = state, policy
        self.conns: set[_Conn] = set()
        self.epoch = 0
        self.gen = -1
        self.contact: float | None = None
        self.until = -math.inf  # monotonic time at which cached answers must be dropped
        self.stale = False
        self.common = b""
        self._changed: asyncio.Future[None] | None = None
        self.refresh()

    def refresh(self) -> None:
        """Start a new cache epoch: recompute what depends on the view, contact and clock."""
        st, now = self.state, monotonic()
        self.gen, self.contact = st.generation, st.last_contact
        age = st.age(now)
        age_s = 0 if age is None else max(0, int(age))
        self.stale = st.too_stale(now)
        until = now + 1.0
        if age is not None:
            until = min(until, now + (age_s + 1 - age))  # when the integer Age ticks over
            if st.max_stale is not None and not self.stale:
                until = min(until, math.nextafter(now + (st.max_stale - age), math.inf))
        self.until = until
        self.common = (
            b"X-Vault-Edge-Revision: %d\r\nAge: %d\r\nCache-Control: no-store\r\n" % (st.view.revision, age_s)
        )
        self.epoch += 1

    # -- answers

    def build(self, status: int, body: bytes, ctype: bytes = _JSON, extra: bytes = b"",
              close: bool = False) -> bytes:
        return b"".join((
            _STATUS_LINE[status], b"Content-Type: ", ctype, b"\r\nContent-Length: %d\r\n" % len(body),
            self.common, extra, b"Connection: close\r\n" if close else b"", b"\r\n", body,
        ))

    def error(self, status: int, code: str, message: str, *, close: bool = False, extra: bytes = b"") -> bytes:
        body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
        return self.build(status, body, extra=extra, close=close)

    def answer(self, req: Request, caller: Caller) -> _Answer | _Watch:
        """Route one parsed request to its answer (errors included), or to a long-poll."""
        if req.method != "GET":
            return _Answer(self.error(405, "method_not_allowed", "only GET is served", extra=b"Allow: GET\r\n"),
                           True)
        path, _, query = req.target.partition("?")
        try:
            if path.startswith("/v1/secrets/"):
                return self._read(_name(unquote(path[12:], errors="strict")), parse_query(query, _READ_PARAMS),
                                  req, caller)
            if path == "/v1/secrets":
                params = parse_query(query, _LIST_PARAMS)
                if "names" in params:
                    return self._batch(params, req, caller)
                if "stage" in params:
                    raise BadRequest(400, "stage applies to a read, not to the list of names")
                return self._list(req, caller)
            if path == "/v1/health":
                parse_query(query, frozenset())
                return _Answer(self._health(), False)
            if path == "/v1/watch":
                params = parse_query(query, _WATCH_PARAMS)
                since = _int_param(params, "since")
                wait = params.get("wait", str(WATCH_DEFAULT_S))
                try:
                    seconds = float(wait)
                except ValueError:
                    seconds = math.nan
                if not 0 <= seconds <= math.inf:
                    raise BadRequest(400, "wait must be a number of seconds ≥ 0")
                return _Watch(since, min(seconds, WATCH_MAX_S))
        except UnicodeDecodeError:
            return _Answer(self.error(400, "bad_request", "invalid percent-encoding in the request target"), True)
        except BadRequest as bad:  # well framed, so the connection stays open
            return _Answer(self.error(bad.status, "bad_request", str(bad)), True)
        except _Refusal as r:
            return _Answer(self.error(r.status, r.code, str(r),
                                      extra=b"Retry-After: 1\r\n" if r.status == 503 else b""), True)
        return _Answer(self.error(404, "not_found", f"no such endpoint: {path[:100]}"), True)

    def _ready(self) -> None:
        if not self.state.loaded:
            raise _Refusal(503, "not_ready", "the agent has no secrets yet (first sync or cache load pending)")
        if self.stale:
            raise _Refusal(503, "too_stale", "the agent has not heard from the control plane within --max-stale")

    def _entry(self, name: str, version: int | None, stage: str | None, req: Request, caller: Caller) -> Entry:
        if not self.policy.allows(caller, req.token, name):
            raise _Refusal(403, "forbidden", f"the caller may not read {name!r}")
        self._ready()
        entry = self.state.view.lookup(name, version=version, stage=stage)
        if entry is None:
            what = f" version {version}" if version is not None else f" at stage {stage}" if stage else ""
            raise _Refusal(404, "not_found", f"no secret {name!r}{what}")
        return entry

    def _doc(self, e: Entry) -> dict[str, Any]:
        try:
            value, encoding = e.value.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            value, encoding = b64e(e.value), "base64"
        return {"name": e.name, "value": value, "encoding": encoding, "version": e.version, "stage": e.stage,
                "revision": self.state.view.revision}

    def _read(self, name: str, params: dict[str, str], req: Request, caller: Caller) -> _Answer:
        version, stage = _int_param(params, "version", minimum=1), _stage_param(params)
        if version is not None and stage is not None:
            raise BadRequest(400, "give version or stage, not both")
        e = self._entry(name, version, stage, req, caller)
        if "field" in params:  # a structured value's one field (agent/fields.py)
            try:
                e = with_field(e, params["field"])
            except FieldError as exc:
                raise _Refusal(exc.status, exc.code, str(exc)) from None
        cacheable = e.expires_at is None  # a grace period's end is wall-clock; re-check it every time
        if wants_raw(req.accept):
            extra = b"X-Vault-Edge-Version: %d\r\nX-Vault-Edge-Stage: %s\r\n" % (e.version, e.stage.encode())
            return _Answer(self.build(200, e.value, _OCTETS, extra), cacheable)
        return _Answer(self.build(200, _dumps(self._doc(e))), cacheable)

    def _batch(self, params: dict[str, str], req: Request, caller: Caller) -> _Answer:
        names = [_name(n) for n in params["names"].split(",")]
        if len(names) > MAX_BATCH:
            raise BadRequest(400, f"at most {MAX_BATCH} names in one read")
        stage = _stage_param(params)
        entries = [self._entry(n, None, stage, req, caller) for n in names]
        cacheable = all(e.expires_at is None for e in entries)
        return _Answer(self.build(200, _dumps({"secrets": [self._doc(e) for e in entries]})), cacheable)

    def _list(self, req: Request, caller: Caller) -> _Answer:
        if req.token is not None and not self.policy.knows_token(req.token):
            raise _Refusal(403, "forbidden", "the X-Vault-Edge-Token matches no policy rule")
        self._ready()
        names = [n for n in self.state.view.names if self.policy.allows(caller, req.token, n)]
        return _Answer(self.build(200, _dumps({"names": names})), True)

    def _health(self) -> bytes:
        st = self.state
        age = st.age()
        view = st.view
        return self.build(200, _dumps({
            "status": st.status(), "node": view.node or st.node, "region": view.region or st.region,
            "revision": view.revision, "last_sync_age_s": None if age is None else round(age, 3),
            "secrets": len(view.names),
        }))

    async def watch(self, w: _Watch) -> bytes:
        """Hold until the view's revision passes ``since`` (default: the current one) or ``wait`` ends."""
        st = self.state
        since = st.view.revision if w.since is None else w.since
        loop = asyncio.get_running_loop()
        deadline = loop.time() + w.wait
        while st.view.revision <= since:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # One shared future per install, so timed-out watches leave nothing behind in the state.
            if self._changed is None or self._changed.done():
                self._changed = st.changed()
            await asyncio.wait((self._changed,), timeout=remaining)
        self.refresh_if_needed()
        revision = st.view.revision
        return self.build(200, _dumps({"revision": revision, "changed": revision > since}))

    def refresh_if_needed(self) -> None:
        st = self.state
        if st.generation != self.gen or st.last_contact != self.contact or monotonic() >= self.until:
            self.refresh()

    # -- slow heads

    def start_sweeper(self, loop: asyncio.AbstractEventLoop, server: Listener, head_timeout: float,
                      idle_timeout: float = IDLE_TIMEOUT_S) -> None:
        """Every few seconds, close connections whose unfinished head is older than ``head_timeout`` and
        connections idle (nothing in flight, nothing pending) for ``idle_timeout``.

        One timer for the whole server rather than one per request: the hot path arms nothing. Each
        pass starts a new cache epoch; a request brings its connection's epoch up to date (the hot
        path already compares the two), so a connection still behind the previous pass's epoch has
        sent nothing since then.
        """
        every = min(_SWEEP_S, head_timeout / 2, idle_timeout / 2)
        mark = self.epoch

        def sweep() -> None:
            nonlocal mark
            if not server.is_serving():
                return
            now = monotonic()
            limit, idle_limit = now - head_timeout, now - idle_timeout
            for conn in list(self.conns):
                if conn.partial_since is not None:
                    if conn.partial_since < limit:
                        conn.refuse(408, "the request head was not finished in time")
                elif conn.epoch >= mark or conn.busy():
                    conn.active_at = now
                elif conn.active_at < idle_limit:
                    conn.close_idle()
            self.refresh()
            mark = self.epoch
            loop.call_later(every, sweep)

        loop.call_later(every, sweep)


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


# -------------------------------------------------------------------------------------- connection

class _Conn(asyncio.Protocol):
    """One client connection: frame heads, answer them in order, cache answers by head."""

    def __init__(self, core: _Server, listener: Listener | None = None, caller: Caller | None = None) -> None:
        self.core = core
        self.listener = listener  # told when the connection ends (per-uid count, accept budget)
        self.transport: asyncio.Transport | None = None
        self.caller = caller or Caller(0, -1, -1)
        self.known = caller is not None  # the listener read the kernel's credentials already
        self.active_at = monotonic()  # last sweep that saw it busy (or when it was accepted)
        self.buf = b""
        self.cache: dict[bytes, bytes] = {}
        self.cache_bytes = 0
        self.epoch = -1
        self.closing = False
        self.partial_since: float | None = None  # when an unfinished head started waiting (slow clients)
        self.watch: asyncio.Task[None] | None = None
        self.write_blocked = False  # the client is not reading its answers
        self.reading_paused = False
        self.heads: HeadParser | None = None  # made at the first cache miss
        self.eof = False  # the client has finished sending (half-close) while a watch was pending

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport = transport
        if not self.known:
            try:
                self.caller = peer_of(transport.get_extra_info("socket"), with_exe=self.core.policy.uses_exe)
            except OSError as exc:
                log.warning("refusing a connection without kernel credentials: %s", exc)
                self.closing = True
                transport.abort()
                return
        self.core.conns.add(self)

    def busy(self) -> bool:
        """A request in flight or an answer not yet taken by the client."""
        return (self.watch is not None or bool(self.buf) or self.write_blocked
                or (self.transport is not None and self.transport.get_write_buffer_size() > 0))

    def close_idle(self) -> None:
        """Close a keep-alive connection with nothing in flight (clients reconnect, as with any server)."""
        if not self.closing and self.transport is not None:
            self.closing = True
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.core.conns:
            self.core.conns.discard(self)
        if self.listener is not None:
            self.listener.release(self.caller.uid)
            self.listener = None
        self.closing = True
        if self.watch is not None:
            self.watch.cancel()
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
        self._flow()

    def _flow(self) -> None:
        if self.closing or self.transport is None:
            return
        pause = self.write_blocked or (self.watch is not None and len(self.buf) > MAX_HEAD)
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
        core = self.core
        st = core.state
        if st.generation != core.gen or st.last_contact != core.contact or monotonic() >= core.until:
            core.refresh()
        if self.epoch != core.epoch:
            self._drop_cache()
        if not self.buf and self.watch is None and len(data) <= MAX_HEAD:
            hit = self.cache.get(data)  # keys are whole bodiless heads, so data is exactly one request
            if hit is not None:
                self.transport.write(hit)  # type: ignore[union-attr]
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
        """Answer every complete request in the buffer, in order, until a watch or a close."""
        out: list[bytes] = []
        buf, pos = self.buf, 0
        core, caller, transport = self.core, self.caller, self.transport
        assert transport is not None
        while pos < len(buf) and not self.closing and self.watch is None:
            end = buf.find(b"\r\n\r\n", pos, pos + MAX_HEAD + 4)
            if end < 0:
                if len(buf) - pos > MAX_HEAD:
                    self._finish(out, core.error(431, "bad_request", f"request head over {MAX_HEAD} bytes",
                                                 close=True))
                elif buf.find(b"\n\n", pos) >= 0:
                    self._finish(out, core.error(400, "bad_request", "request lines must end in CRLF", close=True))
                break
            head, pos = buf[pos : end + 4], end + 4
            try:
                if self.heads is None:
                    self.heads = HeadParser()
                req = self.heads.parse(head)
                if req.body_len:
                    raise BadRequest(413, "requests to the agent carry no body")
                ans = core.answer(req, caller)
            except BadRequest as bad:
                self._finish(out, core.error(bad.status, "bad_request", str(bad), close=True))
                break
            if isinstance(ans, _Watch):
                self._start_watch(ans, req.keep_alive)
                break
            # only GET is served; a HEAD's 405 must still carry no body, or the client would desync
            data = ans.data if req.method != "HEAD" else ans.data[: ans.data.index(b"\r\n\r\n") + 4]
            if not req.keep_alive:
                self._finish(out, _with_close(data))
                break
            if ans.cacheable and len(data) <= _CACHE_ANSWER_MAX:
                self._remember(head, data)
            out.append(data)
        self.buf = b"" if self.closing else buf[pos:]
        if out:
            transport.write(b"".join(out))
        if self.buf and self.watch is None and not self.closing:
            if self.partial_since is None:
                self.partial_since = monotonic()
        else:
            self.partial_since = None
        self._flow()

    def _drop_cache(self) -> None:
        self.cache.clear()
        self.cache_bytes = 0
        self.epoch = self.core.epoch

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
        self._finish([], self.core.error(status, code, message, close=True))

    def _start_watch(self, w: _Watch, keep_alive: bool) -> None:
        async def hold() -> None:
            data = await self.core.watch(w)  # refreshes the shared epoch before building its answer
            self.watch = None
            if self.closing or self.transport is None:
                return
            if not keep_alive:
                self._finish([], _with_close(data))
                return
            self.transport.write(data)
            if self.epoch != self.core.epoch:
                self._drop_cache()
            if self.buf:
                self._process_safely()
            else:
                self._flow()
            if self.eof and self.watch is None and not self.closing:
                self.closing = True
                self.transport.close()  # everything owed is written; the client sends no more

        self.watch = asyncio.get_running_loop().create_task(hold())


def _with_close(response: bytes) -> bytes:
    """Add ``Connection: close`` to a built response (for HTTP/1.0 and ``Connection: close`` requests)."""
    head_end = response.index(b"\r\n\r\n")
    return response[:head_end] + b"\r\nConnection: close" + response[head_end:]
