"""/v1/sys: recovery-share operations, root key rotation, backup (ops/seal.py, ops/backup.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from vault_edge.crypto.shares import ShareScheme
from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.deps import get_ctx, principal
from vault_edge.server.errors import bad_request
from vault_edge.server.ops import backup
from vault_edge.server.ops import seal as seal_ops
from vault_edge.server.schemas import RekeyRequest, SealMigrateRequest, SharesRequest

router = APIRouter(prefix="/v1/sys", tags=["sys"])


@router.post("/generate-root")
def generate_root(body: SharesRequest, ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    return seal_ops.generate_root(ctx, body.shares, body.passphrase)


@router.post("/rekey")
def rekey(body: RekeyRequest, ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    try:
        if body.groups:
            scheme = ShareScheme(tuple((g.threshold, g.shares) for g in body.groups), body.group_threshold)
        else:
            scheme = ShareScheme.simple(body.new_threshold, body.new_shares)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    if any(not 32 <= ord(c) <= 126 for c in body.new_passphrase):
        raise bad_request("the passphrase must be printable ASCII")
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
