"""/v1/rotators and /v1/rotations: rotation at the source (``ops/rotation.py``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.deps import get_ctx, principal
from vault_edge.server.ops import rotation
from vault_edge.server.schemas import RotatorCreate

router = APIRouter(prefix="/v1", tags=["rotation"])


@router.get("/rotators")
def list_rotators(who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    return rotation.list_rotators(ctx, who)


@router.put("/rotators/{name}")
def create_rotator(
    name: str, body: RotatorCreate, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)
) -> dict[str, Any]:
    return rotation.create_rotator(ctx, who, name, body.type, body.admin_secret, body.config, body.admin_value)


@router.delete("/rotators/{name}")
def delete_rotator(name: str, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    return rotation.delete_rotator(ctx, who, rotation.check_rotator_name(name))


@router.get("/rotations/{name:path}")
def rotation_status(
    name: str,
    limit: int = Query(10, ge=1, le=100),
    who: Principal = Depends(principal),
    ctx: Context = Depends(get_ctx),
) -> dict[str, Any]:
    return rotation.status(ctx, who, name, limit)
