"""/v1/sys: status, init, unseal, seal, health."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.deps import get_ctx, principal, share_scheme
from vault_edge.server.ops import system
from vault_edge.server.schemas import InitRequest, UnsealRequest

router = APIRouter(prefix="/v1/sys", tags=["sys"])


@router.get("/status")
def status(ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    return system.status(ctx)


@router.get("/health")
def health(ctx: Context = Depends(get_ctx)) -> JSONResponse:
    """200 when unsealed and serving, 503 otherwise (for load balancers)."""
    sealed = ctx.barrier.sealed
    return JSONResponse({"status": "sealed" if sealed else "ok"}, status_code=503 if sealed else 200)


@router.post("/init")
def init(body: InitRequest, ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    scheme = share_scheme(body.groups, body.group_threshold, body.threshold, body.shares, body.passphrase)
    return system.initialize(ctx, scheme, body.passphrase)


@router.post("/unseal")
def unseal(body: UnsealRequest, ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    return system.unseal(ctx, body.share, body.passphrase, body.reset)


@router.post("/seal")
def seal(who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    return system.seal(ctx, who)
