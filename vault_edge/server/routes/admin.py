"""/v1/regions, /v1/nodes, /v1/tokens, /v1/audit: the operator's administration."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from vault_edge import wire
from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.deps import get_ctx, principal
from vault_edge.server.errors import bad_request, not_found
from vault_edge.server.ops import nodes, regions, tokens
from vault_edge.server.schemas import JoinTokenRequest, RegionCreate, TokenCreate

router = APIRouter(prefix="/v1", tags=["admin"])


@router.get("/regions")
def list_regions(who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    return regions.list_regions(ctx, who)


@router.post("/regions")
def create_region(
    body: RegionCreate, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)
) -> dict[str, Any]:
    return regions.create(ctx, who, body.name)


@router.post("/regions/{name}/rekey")
def rekey_region(name: str, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    if not wire.valid_region(name):
        raise not_found(f"no region {name!r}")
    return regions.rekey(ctx, who, name)


@router.post("/nodes/tokens")
def join_token(
    body: JoinTokenRequest, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)
) -> dict[str, Any]:
    if not wire.valid_region(body.region):
        raise not_found(f"no region {body.region!r}")
    return nodes.create_join_token(ctx, who, body.region, body.ttl)


@router.get("/nodes")
def list_nodes(
    region: str | None = Query(None, max_length=63),
    who: Principal = Depends(principal),
    ctx: Context = Depends(get_ctx),
) -> dict[str, Any]:
    if region is not None and not wire.valid_region(region):
        raise bad_request("region: lowercase letters, digits and '-'")
    return nodes.list_nodes(ctx, who, region)


@router.get("/nodes/{node_id}")
def get_node(node_id: str, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    """One node: status, applied revision, last contact, and its egress counters per route."""
    return nodes.get_node(ctx, who, node_id)


@router.post("/nodes/{node_id}/revoke")
def revoke_node(node_id: str, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    return nodes.revoke(ctx, who, node_id)


@router.post("/tokens")
def create_token(
    body: TokenCreate, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)
) -> dict[str, Any]:
    return tokens.create(ctx, who, body.name, body.prefixes, body.verbs, body.ttl)


@router.get("/tokens")
def list_tokens(who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    """The tokens this one could have made (every token, for an admin over every name)."""
    return tokens.list_tokens(ctx, who)


@router.get("/tokens/self")
def lookup_self(who: Principal = Depends(principal)) -> dict[str, Any]:
    """The token this request carries (`vault-edge token lookup`, `login`): any valid token may ask."""
    return {
        "id": who.id,
        "name": who.name,
        "actor": who.actor,
        "prefixes": list(who.prefixes),
        "verbs": list(who.verbs),
        "expires_at": who.expires_at,
    }


@router.delete("/tokens/{token_id}")
def revoke_token(token_id: str, who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    return tokens.revoke(ctx, who, token_id)


@router.get("/audit")
def audit_log(
    after: int = Query(0, ge=0, le=2**62),
    limit: int = Query(100, ge=1, le=1000),
    who: Principal = Depends(principal),
    ctx: Context = Depends(get_ctx),
) -> dict[str, Any]:
    who.require_global_admin()
    with ctx.store.read() as tx:
        entries = tx.list_audit(after, limit)
    return {
        "entries": [
            {
                "seq": e.seq,
                "at": e.at,
                "actor": e.actor,
                "action": e.action,
                "target": e.target,
                "outcome": e.outcome,
                "detail": e.detail,
                "hash": e.hash.hex(),
                "mac": e.mac is not None,
            }
            for e in entries
        ]
    }


@router.get("/audit/verify")
def audit_verify(who: Principal = Depends(principal), ctx: Context = Depends(get_ctx)) -> dict[str, Any]:
    who.require_global_admin()
    v = ctx.auditor.verify()
    return {
        "ok": v.ok,
        "entries": v.entries,
        "sealed_events": v.sealed_events,
        "first_bad": v.first_bad,
        "reason": v.reason,
    }
