"""The agent's opt-in Prometheus endpoint (``--metrics-addr``): what an SRE alerts on at each PoP.

Nothing is measured on the socket's hot path beyond plain integer increments the transport and the
API already make (``_Conn.hits`` on a cache hit, ``Api.statuses`` / ``Api.refusals`` on a miss);
everything else is read from the live objects when Prometheus scrapes. So the text exposition is
written here (a dozen series) rather than through ``prometheus_client``, whose registry, locks and
HTTP server the agent would carry for nothing.

    GET /metrics    text/plain; version=0.0.4 (with --metrics-token: Authorization: Bearer TOKEN)

The listener is TCP, loopback unless told otherwise (``--metrics-addr 0.0.0.0:9464``), serves one
small request per connection and closes it; heads over 8 KiB or slower than 5 s are dropped. Metric
labels carry only status codes, error codes, the node id and its region: never a secret's name or
value.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger("vault_edge.agent.metrics")

CONTENT_TYPE: Final = b"text/plain; version=0.0.4; charset=utf-8"
_MAX_HEAD: Final = 8192
_HEAD_TIMEOUT_S: Final = 5.0


def parse_addr(text: str) -> tuple[str, int]:
    """``PORT``, ``:PORT`` (both on 127.0.0.1), ``HOST:PORT`` or ``[V6]:PORT``. ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics-addr {text!r}: expected [HOST:]PORT, e.g. 127.0.0.1:9464")
    return host, int(port)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if v != v:  # NaN
        return "NaN"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Exposition:
    """Text exposition format 0.0.4 built line by line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        sample = f"{name}_total" if kind == "counter" else name  # text format 0.0.4 names counters x_total
        self.lines.append(f"# HELP {sample} {help_text}")
        self.lines.append(f"# TYPE {sample} {kind}")
        for labels, value in samples:
            lbl = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            self.lines.append(f"{sample}{{{lbl}}} {_num(value)}" if lbl else f"{sample} {_num(value)}")

    def render(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


def render(api: Any, syncer: Any, listener: Any) -> bytes:
    """The agent's metrics now: ``api`` (agent.api.Api: its state and counters), ``syncer``
    (agent.sync.Syncer, or None before it exists), ``listener`` (endpoint.Listener)."""
    st = api.state
    now = st.clock.monotonic()
    age = st.age(now)
    status = st.status(now)
    e = Exposition()
    node, region = st.view.node or st.node, st.view.region or st.region
    e.family(
        "vault_edge_agent_info",
        "gauge",
        "the node this agent is (value always 1)",
        [({"node": node, "region": region}, 1)],
    )
    e.family(
        "vault_edge_agent_status",
        "gauge",
        "1 for the agent's health status (ok, stale, starting)",
        [({"status": s}, float(s == status)) for s in ("ok", "stale", "starting")],
    )
    e.family("vault_edge_agent_revision", "gauge", "the revision the agent serves from", [({}, st.view.revision)])
    e.family("vault_edge_agent_secrets", "gauge", "names in the served view", [({}, len(st.view.names))])
    e.family(
        "vault_edge_agent_last_sync_age_seconds",
        "gauge",
        "seconds since the control plane was last heard from (NaN: never, in this process)",
        [({}, math.nan if age is None else round(age, 3))],
    )
    e.family(
        "vault_edge_agent_answers",
        "counter",
        "socket answers built by the API (cache misses), by HTTP status",
        [({"status": str(code)}, n) for code, n in sorted(api.statuses.items()) if n],
    )
    e.family(
        "vault_edge_agent_refusals",
        "counter",
        "socket error answers by error code (forbidden, not_found, ...)",
        [({"code": code}, n) for code, n in sorted(api.refusals.items())],
    )
    e.family(
        "vault_edge_agent_cache_hits",
        "counter",
        "socket answers replayed from a connection's cache (the API was not called)",
        [({}, listener.cache_hits())],
    )
    e.family("vault_edge_agent_connections", "gauge", "open socket connections", [({}, len(listener.conns))])
    _egress(e, getattr(api, "egress", None))
    if syncer is not None:
        e.family(
            "vault_edge_agent_sync_failures",
            "counter",
            "sync attempts that failed (unreachable, refused answer, error); the agent kept serving",
            [({}, syncer.failures)],
        )
        e.family(
            "vault_edge_agent_sync_applied",
            "counter",
            "sync answers applied (new views installed)",
            [({}, syncer.applied)],
        )
        e.family(
            "vault_edge_agent_sync_received_bytes",
            "counter",
            "bytes of sync answers received",
            [({}, syncer.received_bytes)],
        )
        e.family(
            "vault_edge_agent_disk_cache_behind",
            "gauge",
            "1 while the served view is not yet on disk (a failed write, retried every round)",
            [({}, float(bool(syncer.cache_behind)))],
        )
    return e.render()


def _egress(e: Exposition, egress: Any) -> None:
    """Per egress route (route names are the operator's, never a secret's): calls sent upstream, upstream
    answers by status class, failed calls by kind, and a histogram of the time to the answer's head."""
    stats = sorted(getattr(egress, "stats", {}).items())
    e.family(
        "vault_edge_agent_egress_requests",
        "counter",
        "egress calls sent upstream, by route",
        [({"route": r}, s.requests) for r, s in stats],
    )
    e.family(
        "vault_edge_agent_egress_upstream_answers",
        "counter",
        "upstream answers relayed, by route and status class",
        [({"route": r, "class": f"{i + 1}xx"}, n) for r, s in stats for i, n in enumerate(s.classes)],
    )
    e.family(
        "vault_edge_agent_egress_upstream_failures",
        "counter",
        "egress calls that got no upstream answer, by route and kind (connect, timeout, closed, protocol)",
        [({"route": r, "kind": k}, n) for r, s in stats for k, n in sorted(s.failures.items())],
    )
    from vault_edge.agent.egress import LATENCY_BUCKETS

    name = "vault_edge_agent_egress_upstream_seconds"
    e.lines.append(f"# HELP {name} time from an egress call reaching the agent to its upstream answer's head")
    e.lines.append(f"# TYPE {name} histogram")
    for r, s in stats:
        lbl = f'route="{_esc(r)}"'
        total = 0
        for bound, n in zip((*LATENCY_BUCKETS, math.inf), s.buckets, strict=True):
            total += n
            le = "+Inf" if bound == math.inf else repr(bound)
            e.lines.append(f'{name}_bucket{{{lbl},le="{le}"}} {total}')
        e.lines.append(f"{name}_sum{{{lbl}}} {_num(round(s.latency_sum, 6))}")
        e.lines.append(f"{name}_count{{{lbl}}} {total}")


async def serve_metrics(host: str, port: int, page: Callable[[], bytes], token: str | None = None) -> asyncio.Server:
    """Serve ``page()`` at ``GET /metrics`` on ``host:port``; with ``token``, only to
    ``Authorization: Bearer TOKEN`` (compared in constant time)."""
    want = f"Bearer {token}".encode() if token else None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_TIMEOUT_S)
            status, body, ctype = _answer(head, want, page)
            writer.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % (status, _REASONS[status], ctype, len(body))
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        except Exception as exc:  # a scrape must never take the agent down
            log.error("metrics: could not answer a scrape (%s)", type(exc).__name__)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, limit=_MAX_HEAD)


_REASONS: Final = {200: b"OK", 401: b"Unauthorized", 404: b"Not Found", 405: b"Method Not Allowed"}


def _answer(head: bytes, want: bytes | None, page: Callable[[], bytes]) -> tuple[int, bytes, bytes]:
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target = rest.partition(b" ")[0]
    if method != b"GET":
        return 405, b"only GET\n", b"text/plain"
    if target.partition(b"?")[0] != b"/metrics":
        return 404, b"only /metrics\n", b"text/plain"
    if want is not None:
        auth = next(
            (
                v.strip()
                for n, _, v in (ln.partition(b":") for ln in lines[1:])
                if n.strip().lower() == b"authorization"
            ),
            b"",
        )
        if not hmac.compare_digest(auth, want):
            return 401, b"give Authorization: Bearer <the --metrics-token>\n", b"text/plain"
    return 200, page(), CONTENT_TYPE
