"""Operator tokens: listing and revocation (the API's and the console's, one code path)."""

from __future__ import annotations

from typing import Any

from vault_edge import wire
from vault_edge.server import auth
from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.errors import not_found


def list_tokens(ctx: Context, who: Principal) -> dict[str, Any]:
    """The tokens this one could have made (every token, for an admin over every name)."""
    who.require("admin")
    with ctx.store.read() as tx:
        tokens = tx.list_operator_tokens()
    return {
        "tokens": [
            {
                "id": t.id,
                "name": t.name,
                "prefixes": list(t.prefixes),
                "verbs": list(t.verbs),
                "created_at": t.created_at,
                "expires_at": t.expires_at,
                "revoked": t.revoked_at is not None,
            }
            for t in tokens
            if who.may_grant(t.prefixes, t.verbs)
        ]
    }


def revoke(ctx: Context, who: Principal, token_id: str) -> dict[str, Any]:
    """Revoke a token and every token made from it; a scoped admin cannot revoke a broader token."""
    who.require("admin")
    if not wire.valid_token_id(token_id):
        raise not_found(f"no active token {token_id!r}")
    with ctx.store.write() as tx:
        auth.still_valid(tx, who, ctx.clock())
        target = tx.get_operator_token_by_id(token_id)
        if target is None or target.revoked_at is not None:
            raise not_found(f"no active token {token_id!r}")
        who.require_grant(target.prefixes, target.verbs)
        revoked = tx.revoke_operator_token(token_id, ctx.clock())
        ctx.auditor.record(tx, who.actor, "token.revoke", token_id, with_descendants=revoked[1:])
    return {"id": token_id, "revoked": True, "descendants_revoked": revoked[1:]}


def create(
    ctx: Context, who: Principal, name: str, asked_prefixes: list[str], asked_verbs: list[str], ttl: int | None
) -> dict[str, Any]:
    """A token made by ``who``, within its own rights and lifetime; its secret is shown once."""
    prefixes, verbs = tuple(dict.fromkeys(asked_prefixes)), tuple(dict.fromkeys(asked_verbs))
    who.require_grant(prefixes, verbs)
    with ctx.store.write() as tx:
        auth.still_valid(tx, who, ctx.clock())  # not revoked since it was authenticated (writers are serialized)
        secret, token = auth.create_token(
            tx, name, prefixes, verbs, ctx.clock(), ttl, not_after=who.expires_at, parent=who.id
        )
        ctx.auditor.record(
            tx,
            who.actor,
            "token.create",
            name,
            token_id=token.id,
            verbs=list(token.verbs),
            prefixes=list(token.prefixes),
        )
    return {"token": secret, "id": token.id, "name": token.name, "expires_at": token.expires_at}
