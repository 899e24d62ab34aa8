"""/v1/sys: recovery-share operations, root key rotation, backup (ops/seal.py, ops/backup.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.deps import get_ctx, principal, share_scheme
from vault_edge.server.ops import backup
from vault_edge.server.ops import seal as seal_ops
from vault_edge.server.schemas import RekeyRequest, SealMigrateRequest, SharesRequest

router = APIRouter(prefix="/v1/sys", tags=["sys"])


@router.post("/generate-root")
def generate_root(body: SharesRequest, ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    return seal_ops.generate_root(ctx, body.shares, body.passphrase)


@router.post("/rekey")
def rekey(body: RekeyRequest, ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    scheme = share_scheme(body.groups, body.group_threshold, body.new_threshold, body.new_shares, body.new_passphrase)
    return seal_ops.rekey(ctx, body.shares, body.passphrase, scheme, body.new_passphrase)


@router.post("/seal-migrate")
def seal_migrate(body: SealMigrateRequest, ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    return seal_ops.seal_migrate(ctx, body.shares, body.passphrase, body.to)


@router.post("/rotate")
def rotate(who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    return seal_ops.rotate(ctx, who)


@router.get("/backup")
def make_backup(who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> Response:
    return Response(backup.make_backup(ctx, who), media_type="application/octet-stream")
