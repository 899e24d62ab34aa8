"""The control plane's hot path as plain ASGI: ``GET /v1/agent/sync``, off FastAPI's stack.

Every node holds a long-poll, and after each change every node of a region re-polls at once: at
10,000 nodes this one route is nearly all the control plane's work, and most of a request's cost
was FastAPI's and Starlette's machinery around it (request objects, dependency resolution, query
validation by pydantic, the middleware stack, the response class). This front answers it straight
from the ASGI scope: the query is checked here (the same bounds as the documented route, the same
400 shape), the body read up to the app's limit, and :func:`routes.agent.sync_answer` does the work
(authentication, the hold, the signed answer), so both ways give the same answers. Everything else
goes on to the FastAPI app unchanged. Long-polls are thereby also kept out of the request-latency
histogram, which they would swamp; ``vault_edge_sync_answers`` counts them by status instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from urllib.parse import parse_qsl

from prometheus_client import Counter
from starlette.types import Receive, Scope, Send

from vault_edge import wire
from vault_edge.crypto.errors import DecryptionError
from vault_edge.server.barrier import Sealed
from vault_edge.server.contacts import ContactLog
from vault_edge.server.context import Context
from vault_edge.server.errors import ApiError, answer_of
from vault_edge.server.hub import Hub
from vault_edge.server.routes.agent import SYNC_PATH, SyncQuery, parse_report, sync_answer
from vault_edge.server.sealhold import SealHold
from vault_edge.server.storage.repo import TamperedRow
from vault_edge.wire import egress as wegress

log = logging.getLogger("vault_edge.server")

_TRUE, _FALSE = {"1", "true", "on", "yes"}, {"0", "false", "off", "no"}


class BadQuery(ValueError):
    pass


def parse_query(raw: bytes) -> SyncQuery:
    """The sync query, with the documented route's bounds; BadQuery (message safe to show) otherwise."""
    got: dict[str, str] = {}
    try:
        pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, strict_parsing=False, max_num_fields=16)
    except ValueError:
        raise BadQuery("invalid request: too many query fields") from None
    for k, v in pairs:
        got[k] = v  # the last one wins, as in the documented route
    q = SyncQuery()
    try:
        since = int(got["since"]) if "since" in got else q.since
        wait = float(got["wait"]) if "wait" in got else q.wait
        proto = int(got["proto"]) if "proto" in got else q.proto
    except ValueError:
        raise BadQuery("invalid request: query.since, query.wait and query.proto are numbers") from None
    if not 0 <= since <= 2**62:
        raise BadQuery("invalid request: query.since: from 0 to 2^62")
    if not 0 <= wait <= 300:  # NaN fails this too
        raise BadQuery("invalid request: query.wait: from 0 to 300 seconds")
    if not 1 <= proto <= 2:
        raise BadQuery("invalid request: query.proto: 1 or 2")
    full = got.get("full", "false").lower()
    if full not in _TRUE | _FALSE:
        raise BadQuery("invalid request: query.full: a boolean")
    try:
        report = parse_report(got.get(wegress.REPORT_PARAM))
    except ApiError as exc:
        raise BadQuery(exc.message) from None
    return SyncQuery(since, wait, proto, full in _TRUE, report)


class SyncFastPath:
    """``GET /v1/agent/sync`` as plain ASGI: the app (:class:`vault_edge.server.app.ControlPlane`)
    hands it the sync requests (``wants``) before any middleware (``serve``)."""

    def __init__(
        self, ctx: Context, hub: Hub, contacts: ContactLog, limit: int, answers: Counter, sealhold: SealHold
    ) -> None:
        self.ctx, self.hub, self.contacts, self.limit, self.answers = ctx, hub, contacts, limit, answers
        self.sealhold = sealhold

    @staticmethod
    def wants(scope: Scope) -> bool:
        return scope["type"] == "http" and scope["path"] == SYNC_PATH and scope["method"] == "GET"

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one sync request (the caller checked ``wants``; the app named its caller for the audit)."""
        status, body, extra = await self._answer(scope, receive)
        self.answers.labels(str(status)).inc()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope: Scope, receive: Receive) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        try:
            for k, v in scope["headers"]:  # a declared length over the limit: refused before anything else
                if k == b"content-length" and (not v.isdigit() or len(v) > 18 or int(v) > self.limit):
                    raise ApiError(413, "too_large", f"request body over {self.limit} bytes")
            q = parse_query(scope.get("query_string", b""))
            body = await self._body(receive)
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            qs = scope.get("query_string", b"").decode("latin-1")
            target = scope["path"] + ("?" + qs if qs else "")
            status, out, sig = await sync_answer(
                self.ctx, self.hub, self.contacts, target, headers, body, q, self.sealhold
            )
            return status, out, [(wire.H_SERVER_SIGNATURE.encode(), wire.b64e(sig).encode())]
        except BadQuery as exc:
            return _error(400, "bad_request", str(exc))
        except ApiError as exc:  # node refusals are audited where they are judged (ops.nodes.refuse)
            return _error(exc.status, exc.code, exc.message, exc.headers)
        except Sealed as exc:
            api = answer_of(exc)
            return _error(api.status, api.code, api.message, api.headers)
        except (TamperedRow, DecryptionError) as exc:
            log.error("integrity check failed on GET %s: %s", SYNC_PATH, exc)
            what = f"{exc.table}:{exc.key}" if isinstance(exc, TamperedRow) else SYNC_PATH
            self.ctx.auditor.record_alone("system", "integrity", what[:300], "refused", throttle=None, path=SYNC_PATH)
            return _error(500, "integrity_error", "a stored row failed its integrity check; it was not used")
        except Exception as exc:
            log.error("internal error: %s", type(exc).__name__, exc_info=exc)
            return _error(500, "internal", "internal error (see the server log)")

    async def _body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise ApiError(413, "too_large", f"request body over {self.limit} bytes")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return b"".join(chunks)


def _error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps({"error": {"code": code, "message": message}}, ensure_ascii=True, separators=(",", ":"))
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return status, body.encode(), extra
