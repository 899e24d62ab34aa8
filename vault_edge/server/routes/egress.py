"""/v1/egress: the operator's egress routes (``ops/egress.py``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import Field

from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.deps import get_ctx, principal
from vault_edge.server.ops import egress
from vault_edge.server.schemas import Strict

router = APIRouter(prefix="/v1", tags=["egress"])


class EgressCreate(Strict):
    name: str = Field(max_length=63)
    upstream: str = Field(max_length=2048, description="https://host[:port][/base]")
    secret: str = Field(max_length=256)
    inject: list[str] = Field(
        min_length=1, max_length=8, description="header:NAME=TEMPLATE, query:NAME=TEMPLATE or basic:USER:PASSWORD"
    )
    methods: list[str] | None = Field(None, max_length=16)
    paths: list[str] | None = Field(None, max_length=32)
    regions: list[str] | None = Field(None, max_length=256, description="default: the secret's regions")
    retry_previous_on_401: bool | None = Field(
        None, description="during a rotation's grace, retry an upstream 401 once with the previous value"
    )


@router.post("/egress")
def create(body: EgressCreate, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    doc = body.model_dump(exclude={"regions"}, exclude_none=True)
    return egress.create(ctx, who, doc, body.regions)


@router.get("/egress")
def list_routes(who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    return egress.list_routes(ctx, who)


@router.delete("/egress/{name}")
def delete(name: str, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    return egress.delete(ctx, who, name)
