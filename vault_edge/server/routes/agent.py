"""/v1/agent: enrolment and the signed long-poll sync of node agents."""

from __future__ import annotations

import asyncio
import random

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from vault_edge import wire
from vault_edge.server import nodeauth
from vault_edge.server.context import Context
from vault_edge.server.deps import unsealed
from vault_edge.server.errors import ApiError
from vault_edge.server.ops import nodes

router = APIRouter(prefix="/v1/agent", tags=["agent"])


def _target(request: Request) -> str:
    q = request.url.query
    return request.url.path + ("?" + q if q else "")


def _signed(body: bytes, signature: bytes, status: int = 200) -> Response:
    return Response(body, status, media_type="application/json",
                    headers={wire.H_SERVER_SIGNATURE: wire.b64e(signature)})


def _revoked(ctx: Context, node_id: str, nonce: str) -> Response:
    return _signed(*nodeauth.revocation(ctx, node_id, nonce), status=403)


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


@router.get("/sync")
async def sync(
    request: Request,
    since: int = Query(0, ge=0, le=2**62),
    wait: float = Query(30.0, ge=0, le=300),
    ctx: Context = Depends(unsealed),
) -> Response:
    """Signed long-poll: answers at once when anything after ``since`` is visible to the node, else
    holds up to ``wait`` seconds and answers ``unchanged``. ``since`` is the node's applied revision."""
    body = await request.body()
    hub = request.app.state.hub
    try:
        node_id, region, member = await nodeauth.authenticate(
            ctx, hub, request.app.state.contacts, "GET", _target(request), request.headers, body, since
        )
    except nodeauth.Revoked as exc:
        return _revoked(ctx, exc.node, exc.nonce)
    hold = min(wait, ctx.settings.sync_max_wait_s)
    hold += random.uniform(0, hold / 16)  # noqa: S311 - not crypto: spreads the fleet's re-polls, as Consul does
    got = await hub.wait(node_id, region, member.node_rev, since, hold)
    nonce = request.headers.get(wire.H_NONCE, "")
    if got is not None and not got[1].active:
        return _revoked(ctx, node_id, nonce)
    view, current = got if got is not None else (None, None)
    out, sig = hub.sync_body(node_id, nonce, view, current, since)
    return _signed(out, sig)
