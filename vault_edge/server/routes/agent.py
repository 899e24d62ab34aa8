"""/v1/agent: enrolment and the signed long-poll sync of node agents.

The long-poll is the control plane's hot path (every node holds one, and re-polls after each
change): :func:`sync_answer` does its work, and ``server/fastpath.py`` calls it straight from ASGI,
off FastAPI's per-request machinery. The FastAPI route below is the same answer for anything the
fast path lets through (it documents the route in the OpenAPI schema).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from vault_edge import wire
from vault_edge.server import nodeauth
from vault_edge.server.barrier import Sealed
from vault_edge.server.contacts import ContactLog
from vault_edge.server.context import Context
from vault_edge.server.deps import get_ctx, unsealed
from vault_edge.server.errors import ApiError, sealed
from vault_edge.server.hub import Hub
from vault_edge.server.ops import nodes
from vault_edge.server.sealhold import SealHold
from vault_edge.wire import egress as wegress

router = APIRouter(prefix="/v1/agent", tags=["agent"])
SYNC_PATH = "/v1/agent/sync"


@dataclass(frozen=True)
class SyncQuery:
    since: int = 0
    wait: float = 30.0
    proto: int = 1
    full: bool = False
    egress: wegress.Report | None = None  # the node's egress counters (its signed query's ``egress``)


def parse_report(text: str | None) -> wegress.Report | None:
    """The sync query's ``egress`` report (``wire.egress.Report``), or a 400."""
    if text is None:
        return None
    try:
        return wegress.Report.decode(text)
    except wire.WireError as exc:
        raise ApiError(400, "bad_request", f"invalid request: query.{wegress.REPORT_PARAM}: {exc}") from None


def _target(request: Request) -> str:
    q = request.url.query
    return request.url.path + ("?" + q if q else "")


def _signed(body: bytes, signature: bytes, status: int = 200) -> Response:
    return Response(
        body, status, media_type="application/json", headers={wire.H_SERVER_SIGNATURE: wire.b64e(signature)}
    )


@router.post("/enroll")
async def enroll(request: Request, ctx: Context = Depends(unsealed)) -> Response:
    # Bounded: past the limit, a 503 with Retry-After at once (the app's error shape), not a queue.
    with request.app.state.enrolments.admit():
        body = await request.body()
        try:
            out, sig = await asyncio.to_thread(nodes.enroll, ctx, _target(request), request.headers, body)
        except ApiError as exc:
            if not 400 <= exc.status < 500:
                raise
            # Signed, for this very request: the agent gives up only on this proof; any other refusal (from
            # a relay on the path) it takes as a transient failure.
            refusal, sig = nodes.enrolment_refusal(ctx, exc, request.headers.get(wire.H_NONCE, ""), body)
            return _signed(refusal, sig, status=exc.status)
    return _signed(out, sig)


async def _until_unsealed(ctx: Context, held: SealHold, headers: Mapping[str, str], q: SyncQuery) -> float:
    """Return once unsealed (the seconds spent held), or raise the 503: ``not_initialized``; ``sealed``
    with ``Retry-After: 0`` after a hold that ended still sealed (the hold was the wait); ``sealed`` with
    the configured Retry-After when the poll cannot be held (see ``server/sealhold.py``)."""
    try:
        await unsealed(ctx)  # a database read while sealed only: not initialized, or sealed
        return 0.0
    except Sealed:
        pass
    budget = held.budget(headers, q.wait, ctx.clock(), ctx.settings.sync_max_wait_s)
    if budget > 0:
        budget += random.uniform(0, budget / 16)  # noqa: S311 - not crypto: spreads the fleet's re-polls
        t0 = asyncio.get_running_loop().time()
        got = await held.hold(budget)
        if got:
            return asyncio.get_running_loop().time() - t0
        if got is False:
            raise ApiError(503, "sealed", sealed().message, headers={"Retry-After": "0"})
    retry = str(ctx.settings.sealed_retry_after_s)
    raise ApiError(503, "sealed", sealed().message, headers={"Retry-After": retry})


async def sync_answer(
    ctx: Context,
    hub: Hub,
    contacts: ContactLog,
    target: str,
    headers: Mapping[str, str],
    body: bytes,
    q: SyncQuery,
    held: SealHold,
) -> tuple[int, bytes, bytes]:
    """(status, body, control-plane signature) of a sync request, or an ApiError (401, 503...).

    Answers at once when anything after ``since`` is visible to the node, else holds up to ``wait``
    seconds and answers ``unchanged``. ``since`` is the node's applied revision. With ``proto=2``
    (``wire/sync.py``): a delta from ``since`` when the region's history reaches back to it, else the
    full view; ``full`` asks for the full view at once (an agent whose cache it cannot trust, or
    whose chain of deltas grew long). Protocol 1 (no ``proto``: agents from before deltas): the whole
    view on every change.

    While sealed, the poll is held until the unseal (``_until_unsealed``), and its hold for a change is
    shortened by the time that took."""
    spent = await _until_unsealed(ctx, held, headers, q) if ctx.barrier.sealed else 0.0
    try:
        node_id, region, member = await nodeauth.authenticate(
            ctx, hub, contacts, "GET", target, headers, body, q.since, q.egress
        )
    except nodeauth.Revoked as exc:
        return (403, *nodeauth.revocation(ctx, exc.node, exc.nonce))
    hold = max(0.0, min(q.wait, ctx.settings.sync_max_wait_s) - spent)
    hold += random.uniform(0, hold / 16)  # noqa: S311 - not crypto: spreads the fleet's re-polls, as Consul does
    full = q.full and q.proto >= 2
    got = await hub.wait(node_id, region, member.node_rev, -1 if full else q.since, hold)
    nonce = headers.get(wire.H_NONCE, "")
    if got is not None and not got[1].active:
        return (403, *nodeauth.revocation(ctx, node_id, nonce))
    view, current = got if got is not None else (None, None)
    if q.proto >= 2:
        return (200, *hub.answer(node_id, nonce, view, current, q.since, full))
    return (200, *hub.legacy_body(node_id, nonce, view, current, q.since))


@router.get("/sync")
async def sync(
    request: Request,
    since: int = Query(0, ge=0, le=2**62),
    wait: float = Query(30.0, ge=0, le=300),
    proto: int = Query(1, ge=1, le=2),
    full: bool = Query(False),
    egress: str | None = Query(None, max_length=wegress.REPORT_MAX, description="the node's egress counters"),
    ctx: Context = Depends(get_ctx),  # the seal is checked (and waited for) by sync_answer
) -> Response:
    """Signed long-poll (see :func:`sync_answer`); served by ``server/fastpath.py`` in practice."""
    status, body, sig = await sync_answer(
        ctx,
        request.app.state.hub,
        request.app.state.contacts,
        _target(request),
        request.headers,
        await request.body(),
        SyncQuery(since, wait, proto, full, parse_report(egress)),
        request.app.state.sealhold,
    )
    return _signed(body, sig, status)
