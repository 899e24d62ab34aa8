"""Operator tokens: the root token from ``init``, and tokens scoped to name prefixes and verbs.

Tokens are 256-bit random strings (``vet_...``) stored only as SHA-256 digests. Verbs:
``read`` (secret values), ``list`` (names, history, status), ``write`` (put, rotate, promote,
rollback), ``delete``, and ``admin`` (regions, nodes, tokens, seal, audit).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from vault_edge import wire
from vault_edge.server.errors import forbidden, unauthorized
from vault_edge.server.storage.records import OperatorToken
from vault_edge.server.storage.repo import Tx

VERBS = ("read", "list", "write", "delete", "admin")
TOKEN_PREFIX = "vet_"


@dataclass(frozen=True)
class Principal:
    id: str
    name: str
    prefixes: tuple[str, ...]
    verbs: tuple[str, ...]

    @property
    def actor(self) -> str:
        return f"token:{self.name}"

    def covers(self, name: str) -> bool:
        return any(name.startswith(p) for p in self.prefixes)

    def require(self, verb: str, name: str | None = None) -> None:
        if verb not in self.verbs:
            raise forbidden(f"this token may not {verb}")
        if name is not None and not self.covers(name):
            raise forbidden(f"this token may not {verb} {name!r}")


def new_token_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_token(
    tx: Tx, name: str, prefixes: tuple[str, ...], verbs: tuple[str, ...], now: float,
    ttl: int | None = None, secret: str | None = None,
) -> tuple[str, OperatorToken]:
    """Store a new token; return its secret (shown once) and its record."""
    secret = secret or new_token_secret()
    token = OperatorToken(
        id=secrets.token_hex(8), name=name, prefixes=prefixes, verbs=verbs, created_at=now,
        expires_at=now + ttl if ttl else None, revoked_at=None,
    )
    tx.insert_operator_token(token, wire.token_digest(secret))
    return secret, token


def authenticate(tx: Tx, secret: str | None, now: float) -> Principal:
    if not secret:
        raise unauthorized("missing token: set VAULT_EDGE_TOKEN (Authorization: Bearer ...)")
    token = tx.get_operator_token(wire.token_digest(secret))
    if token is None or token.revoked_at is not None:
        raise unauthorized("invalid or revoked token")
    if token.expires_at is not None and token.expires_at <= now:
        raise unauthorized("token expired")
    return Principal(token.id, token.name, token.prefixes, token.verbs)
