"""The agent's HTTP client for its exchanges with the control plane: whole answers, read defensively.

The agent makes one long-poll at a time (and an enrolment once): what it needs is a kept-alive
connection (plain or TLS, verified against the system's CAs or ``--tls-ca``), a request written in
one piece, and an answer read raw, whole and capped. The connections are the egress proxy's
(:mod:`vault_edge.agent.upstream`: asyncio protocols, httptools); this module adds what an answer
from the control plane's path needs. httpx did this at a price a PoP pays for its whole life: ~8 MiB
of resident imports (httpcore, anyio, h11, certifi) and ~1 ms of CPU per exchange, which a fleet
simulator multiplies by ten thousand.

Everything an answer holds may come from a hostile relay: the body is never decoded (identity is
asked for and any other ``Content-Encoding`` refused unread), never read past its limit (a declared
length over it refused before a byte of body; a stream over it cut and the connection dropped), the
head held to 64 KiB and 100 fields, and every failure of the exchange (transport, TLS, framing,
time) becomes one exception, :class:`PathFailure`, whose message names the failure, never the body.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from vault_edge.agent.upstream import Connection, Pool, UpstreamError


class PathFailure(Exception):
    """The exchange with the control plane failed on the path (transport, protocol, encoding, size), or
    was answered with an error: transient. The message names the exception class, the limit or the
    status, never the body. ``retry_after``: the wait a 503 asked for (capped), if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Headers(Mapping[str, str]):
    """An answer's header fields, case-insensitive; a repeated field's values joined with ", "."""

    __slots__ = ("_map",)

    def __init__(self, raw: list[tuple[str, str]]) -> None:
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
    head_size: int = 0  # bytes of the header fields, as received


class Client:
    """Requests to one control plane (``base_url``), over at most ``max_idle`` kept-alive connections."""

    def __init__(
        self,
        base_url: str,
        *,
        ca_file: str | None = None,
        connect_timeout: float = 10.0,
        timeout: float = 60.0,
        max_idle: int = 2,
        slack: float = 60.0,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url[:200]!r}")
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        port = url.port or (443 if url.scheme == "https" else 80)
        self.origin = (url.scheme, host, port)
        self.prefix = url.path.rstrip("/")
        self.authority = host if port == (443 if url.scheme == "https" else 80) else f"{host}:{port}"
        self.ca_file = ca_file
        self.connect_timeout, self.timeout, self.max_idle = connect_timeout, timeout, max_idle
        self.slack = slack  # an exchange takes at most connect_timeout + 2 x its timeout + this
        self._pool: Pool | None = None

    def _connections(self) -> Pool:
        if self._pool is None:  # made on the loop that uses it; the CAs are loaded only for https
            https = self.origin[0] == "https"
            ctx = ssl.create_default_context(cafile=self.ca_file) if https else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self._pool = Pool(ctx, max_idle=self.max_idle, peer="the control plane")
        return self._pool

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
        any status but 200); :class:`PathFailure` on anything else. A GET that a kept-alive connection
        lost before any answer (the control plane closed it while idle) is sent once more on a new one."""
        request = self._request(method, target, headers, content)
        wait = self.timeout if timeout is None else timeout
        # each wait has ``wait``; the whole exchange this (a relay sending a byte, or a 1xx, just
        # within each wait would hold it forever)
        deadline = self.connect_timeout + 2 * wait + self.slack
        pool = self._connections()
        for attempt in (1, 2):
            conn: Connection | None = None
            try:
                async with asyncio.timeout(deadline):
                    leg, reused = await pool.get(self.origin, self.connect_timeout)
                    assert isinstance(leg, Connection)  # this pool never offers HTTP/2
                    conn = leg
                    conn.begin(head_only=False)
                    await conn.send(request, wait)
                    answer = await _read(conn, limit, limit if error_limit is None else error_limit, wait)
            except TimeoutError:
                if conn is not None:
                    conn.close()
                raise PathFailure(f"the exchange with the control plane took over {deadline:g}s") from None
            except UpstreamError as exc:
                if conn is not None:
                    conn.close()
                if attempt == 1 and method == "GET" and conn is not None and reused and not conn.got_bytes:
                    continue
                hint = "; give its CA with --tls-ca" if "certificate" in str(exc) else ""
                raise PathFailure(f"{exc}{hint}") from None
            except PathFailure:
                if conn is not None:
                    conn.close()
                raise
            except BaseException:
                if conn is not None:
                    conn.close()  # cancelled mid-exchange: the connection is in an unknown state
                raise
            pool.release(conn)
            return answer
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()


async def _read(conn: Connection, limit: int, error_limit: int, wait: float) -> Answer:
    await conn.head(wait)
    headers = Headers([(n.decode("latin-1"), v.decode("latin-1")) for n, v in conn.headers])
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise PathFailure(f"an answer with Content-Encoding {encoding[:40]!r} (only identity is accepted)")
    cap = limit if conn.status == 200 else error_limit
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise PathFailure(f"an answer of {int(declared)} bytes, over the {cap} accepted")
    body: list[bytes] = []
    size = 0
    while chunk := await conn.read(wait):
        size += len(chunk)
        if size > cap:
            raise PathFailure(f"an answer over the {cap} bytes accepted (reading stopped)")
        body.append(chunk)
    return Answer(conn.status, headers, b"".join(body), conn.head_bytes)
