"""The agent's HTTP/1.1 client for its exchanges with the control plane: asyncio, httptools, nothing else.

The agent makes one long-poll at a time (and an enrolment once), so what it needs of a client is
small: a keep-alive connection per control plane (plain or TLS, verified against the system's CAs or
``--tls-ca``), a request written in one piece, and an answer read raw, whole and capped. httpx did
this at a price a PoP pays for its whole life: ~8 MiB of resident imports (httpcore, anyio, h11,
certifi) and ~1 ms of CPU per exchange, which a fleet simulator multiplies by ten thousand.

Everything an answer holds may come from a hostile relay, so the reading is defensive: the body is
never decoded (identity is asked for and any other ``Content-Encoding`` refused unread), never read
past its limit (a declared length over it refused before a byte of body; a stream over it cut and
the connection dropped), the head held to ``MAX_HEAD`` bytes and ``MAX_HEADERS`` fields, and every
failure of the exchange (transport, TLS, framing, time) becomes one exception, :class:`PathFailure`,
whose message names the failure and never the body.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

MAX_HEAD = 64 * 1024
MAX_HEADERS = 100


class PathFailure(Exception):
    """The exchange with the control plane failed on the path (transport, protocol, encoding, size), or
    was answered with an error: transient. The message names the exception class, the limit or the
    status, never the body. ``retry_after``: the wait a 503 asked for (capped), if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Headers(Mapping[str, str]):
    """An answer's header fields, case-insensitive; a repeated field's values joined with ", "."""

    __slots__ = ("_map", "raw")

    def __init__(self, raw: list[tuple[str, str]]) -> None:
        self.raw = raw
        joined: dict[str, str] = {}
        for name, value in raw:
            key = name.lower()
            joined[key] = f"{joined[key]}, {value}" if key in joined else value
        self._map = joined

    def __getitem__(self, name: str) -> str:
        return self._map[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)


@dataclass(frozen=True)
class Answer:
    status_code: int
    headers: Mapping[str, str]
    content: bytes = field(repr=False)
    head_size: int = 0  # bytes of the status line and header fields, as received


def tls_context(verify: bool | str | ssl.SSLContext) -> ssl.SSLContext:
    """The context an https control plane is checked with: ``True`` the system's CAs, a path a CA
    bundle (``--tls-ca``), or a context made by the caller."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)


def describe(exc: BaseException) -> str:
    """One line naming what failed, for logs: the class, and for a certificate the reason and the option."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the control plane's certificate was refused ({exc.verify_message}); give its CA with --tls-ca"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


class _Connection(asyncio.Protocol):
    """One connection: one exchange at a time; reusable when the last answer left it clean."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._done: asyncio.Future[Answer] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._raw: list[tuple[str, str]] = []
        self._head = 0
        self._body: list[bytes] = []
        self._size = 0
        self._limit = 0
        self._framed = False  # Content-Length or chunked: the end is not the connection's end
        self._status = 0
        self._headers: Headers | None = None
        self.reusable = False

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        if self._parser is None or self._done is None or self._done.done():
            self._fail(PathFailure("bytes outside any answer"))  # nothing may arrive between exchanges
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            ctx = exc.__context__
            self._fail(ctx if isinstance(ctx, PathFailure) else PathFailure(type(ctx).__name__))
        except httptools.HttpParserUpgrade:
            self._fail(PathFailure("an answer switching protocols"))
        except httptools.HttpParserError as exc:
            self._fail(PathFailure(f"a malformed answer ({type(exc).__name__})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost, self.reusable = True, False
        done = self._done
        if done is None or done.done():
            return
        if self._headers is not None and not self._framed:
            self._finish()  # an answer delimited by the connection's end (HTTP/1.0 style)
        else:
            self._fail(PathFailure("the connection closed mid-answer" if exc is None else describe(exc)))

    # -- httptools callbacks -------------------------------------------------------------------
    def on_status(self, reason: bytes) -> None:
        self._head += 15 + len(reason) + 2  # "HTTP/1.1 200 " reason CRLF, and the head's closing CRLF

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head += len(name) + len(value) + 4
        if self._head > MAX_HEAD or len(self._raw) >= MAX_HEADERS:
            raise PathFailure(f"an answer head over {MAX_HEAD} bytes or {MAX_HEADERS} fields")
        self._raw.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._status = self._parser.get_status_code()
        if self._status < 200:  # nothing the agent asks for is answered with 1xx (no Expect, no Upgrade)
            raise PathFailure(f"an interim answer {self._status} (switching protocols or continue)")
        headers = self._headers = Headers(self._raw)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise PathFailure(f"an answer with Content-Encoding {encoding[:40]!r} (only identity is accepted)")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._limit:
            raise PathFailure(f"an answer of {int(declared)} bytes, over the {self._limit} accepted")
        self._framed = bool(declared) or "transfer-encoding" in headers

    def on_body(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._limit:
            raise PathFailure(f"an answer over the {self._limit} bytes accepted (reading stopped)")
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        assert self._parser is not None
        self.reusable = self._parser.should_keep_alive() and not self.lost
        self._finish()

    # -- the exchange --------------------------------------------------------------------------
    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            assert self._headers is not None
            body, self._body = self._body, []
            self._done.set_result(Answer(self._status, self._headers, b"".join(body), self._head))

    def _fail(self, exc: PathFailure) -> None:
        self.reusable = False
        self._body, self._parser = [], None  # what was read is dropped now, not when a cycle is collected
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc.with_traceback(None))  # no frame (holding this) in the future
        self.close()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    async def exchange(self, request: bytes, limit: int, error_limit: int) -> Answer:
        assert self.transport is not None
        self._done = asyncio.get_running_loop().create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._raw, self._head, self._body, self._size, self._headers = [], 0, [], 0, None
        self._limit, self.reusable = limit, False
        self.transport.write(request)
        answer = await self._done
        if answer.status_code != 200 and len(answer.content) > error_limit:
            self.close()
            raise PathFailure(f"an answer over the {error_limit} bytes accepted")
        return answer


class Client:
    """Requests to one control plane (``base_url``), over at most ``max_idle`` kept-alive connections."""

    def __init__(
        self,
        base_url: str,
        *,
        verify: bool | str | ssl.SSLContext = True,
        connect_timeout: float = 10.0,
        timeout: float = 60.0,
        max_idle: int = 2,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url[:200]!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        default = (url.scheme == "https" and self.port == 443) or (url.scheme == "http" and self.port == 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if default else f"{host}:{self.port}"
        self.ssl = tls_context(verify) if url.scheme == "https" else None
        self.connect_timeout, self.timeout, self.max_idle = connect_timeout, timeout, max_idle
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.lost and conn.transport is not None and not conn.transport.is_closing():
                return conn
        loop = asyncio.get_running_loop()
        _transport, conn = await asyncio.wait_for(
            loop.create_connection(
                _Connection, self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.ssl else None
            ),
            self.connect_timeout,
        )
        return conn

    def _request(self, method: str, target: str, headers: Mapping[str, str], content: bytes | None) -> bytes:
        lines = [f"{method} {self.prefix}{target} HTTP/1.1", f"Host: {self.authority}", "Accept-Encoding: identity"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError("a header field with a line break")
            lines.append(f"{name}: {value}")
        if content is not None or method == "POST":
            lines.append(f"Content-Length: {len(content or b'')}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (content or b"")

    async def request(
        self,
        method: str,
        target: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        limit: int,
        error_limit: int | None = None,
        timeout: float | None = None,
    ) -> Answer:
        """One exchange, the answer's body read whole and at most ``limit`` bytes (``error_limit`` for
        any status but 200); :class:`PathFailure` on anything else."""
        request = self._request(method, target, headers, content)
        conn: _Connection | None = None
        try:
            conn = await self._connect()
            answer = await asyncio.wait_for(
                conn.exchange(request, limit, limit if error_limit is None else error_limit),
                self.timeout if timeout is None else timeout,
            )
        except PathFailure:
            raise
        except Exception as exc:
            # OSError: refused, reset, unreachable, TLS (ssl.SSLError); TimeoutError: connect or answer
            # too slow; ValueError, UnicodeError: a name or address that cannot be used; anything else
            # is a bug here, and still only a failed exchange: the agent keeps serving and retries.
            if conn is not None:
                conn.close()
            raise PathFailure(describe(exc)) from None
        except BaseException:
            if conn is not None:
                conn.close()  # cancelled mid-exchange: the connection is in an unknown state
            raise
        if conn.reusable and len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.close()
        return answer

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()
