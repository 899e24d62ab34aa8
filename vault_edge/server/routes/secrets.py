"""/v1/secrets and the per-secret actions (history, rotate, promote, rollback, propagation)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from vault_edge import wire
from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.deps import get_ctx, principal
from vault_edge.server.errors import bad_request
from vault_edge.server.ops import rotation, secrets
from vault_edge.server.schemas import PromoteRequest, PutSecret, RollbackRequest, RotateRequest, ValueFields

router = APIRouter(prefix="/v1", tags=["secrets"])


def _value(body: ValueFields) -> bytes | None:
    try:
        return body.value_bytes()
    except ValueError as exc:
        raise bad_request(str(exc)) from None


@router.get("/secrets")
def list_secrets(
    prefix: str = Query("", max_length=256), who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)
) -> dict[str, Any]:
    if not wire.valid_prefix(prefix):
        raise bad_request("prefix: the start of a secret name (letters, digits, '_', '.', '-', '/')")
    return secrets.list_secrets(ctx, who, prefix)


@router.put("/secrets/{name:path}")
def put(
    name: str, body: PutSecret, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)
) -> dict[str, Any]:
    return secrets.put(
        ctx,
        who,
        name,
        _value(body),
        body.generate,
        body.regions,
        body.rotate_every,
        body.grace,
        body.rotator,
    )


@router.get("/secrets/{name:path}")
def get(
    name: str,
    version: int | None = Query(None, ge=1, le=2**31),
    stage: str | None = Query(None, max_length=16),
    who: Principal = Depends(principal),
    ctx: Context = Depends(get_ctx),
) -> dict[str, Any]:
    return secrets.get(ctx, who, name, version, stage)


@router.delete("/secrets/{name:path}")
def delete(
    name: str, destroy: bool = False, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)
) -> dict[str, Any]:
    return secrets.delete(ctx, who, name, destroy)


@router.get("/history/{name:path}")
def history(name: str, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    return secrets.history(ctx, who, name)


@router.post("/rotate/{name:path}")
def rotate(
    name: str, body: RotateRequest, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)
) -> dict[str, Any]:
    return rotation.rotate(ctx, who, name, _value(body), body.generate, body.grace, body.stage)


@router.post("/promote/{name:path}")
def promote(
    name: str, body: PromoteRequest, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)
) -> dict[str, Any]:
    return secrets.promote(ctx, who, name, body.grace)


@router.post("/rollback/{name:path}")
def rollback(
    name: str, body: RollbackRequest, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)
) -> dict[str, Any]:
    return secrets.rollback(ctx, who, name, body.to, body.grace)


@router.get("/propagation/{name:path}")
def propagation(
    name: str,
    revision: int | None = Query(None, ge=0, le=2**62),
    who: Principal = Depends(principal),
    ctx: Context = Depends(get_ctx),
) -> dict[str, Any]:
    return secrets.propagation(ctx, who, name, revision)
