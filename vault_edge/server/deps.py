"""FastAPI dependencies: the context, the seal check, the calling operator."""

from __future__ import annotations

from fastapi import Depends, Request

from vault_edge import wire
from vault_edge.crypto.shares import ShareError, ShareScheme, check_passphrase
from vault_edge.server import auth
from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.errors import bad_request, not_initialized
from vault_edge.server.schemas import ShareGroup


async def get_ctx(request: Request) -> Context:
    return request.app.state.ctx  # type: ignore[no-any-return]


async def unsealed(ctx: Context = Depends(get_ctx)) -> Context:
    """503 unless unsealed (and initialized): a sealed server serves status and unseal only.
    Async: on the hot sync path it costs no thread hop (the database is read only while sealed)."""
    if ctx.barrier.sealed:
        with ctx.store.read() as tx:
            if "canary" not in tx.get_meta():
                raise not_initialized()
    ctx.barrier.require_unsealed()
    return ctx


def token_of(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get(wire.H_TOKEN)


def principal(request: Request, ctx: Context = Depends(unsealed)) -> Principal:
    with ctx.store.read() as tx:
        who = auth.authenticate(tx, token_of(request), ctx.clock())
    request.state.principal = who  # names the actor if the request is refused later (a 403)
    return who


def share_scheme(
    groups: list[ShareGroup] | None, group_threshold: int, threshold: int, shares: int, passphrase: str
) -> ShareScheme:
    """The share set asked for (``init``, ``rekey``), checked once: groups or a plain threshold of
    shares, and a passphrase the shares can carry; a 400 otherwise."""
    try:
        check_passphrase(passphrase)
        if groups:
            return ShareScheme(tuple((g.threshold, g.shares) for g in groups), group_threshold)
        return ShareScheme.simple(threshold, shares)
    except (ValueError, ShareError) as exc:
        raise bad_request(str(exc)) from None
