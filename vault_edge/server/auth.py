"""Operator tokens: the root token from ``init``, and tokens scoped to name prefixes and verbs.

Tokens are 256-bit random strings (``vet_...``) stored only as keyed digests (HMAC-SHA256 under a key
derived from the root key), in rows whose MAC the repository checks on every read, and revoked
through the revocation chain: a database writer can neither add a token nor widen or revive one. Verbs:
``read`` (secret values), ``list`` (names, history, status), ``write`` (put, rotate, promote,
rollback), ``delete``, and ``admin``. A token's rights never grow through the tokens it makes: a new
token's prefixes must lie within its maker's, its verbs be a subset, and it expires no later;
revoking a token revokes every token made from it. ``admin`` over every name (the prefix ``""``, as
the root token has) also covers what belongs to no name: regions, nodes, seal and the audit log;
``admin`` over some prefixes manages tokens within them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from vault_edge import wire
from vault_edge.server.errors import bad_request, forbidden, unauthorized
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
    expires_at: float | None = None
    kind: str = "token"  # or "system" (the scheduler), which is no token

    @property
    def actor(self) -> str:
        if self.kind != "token":
            return self.name
        return f"token:{self.name[:80]}/{self.id}"  # names are not unique; ids are (never cut off)

    @property
    def unlimited(self) -> bool:
        return "" in self.prefixes

    def covers(self, name: str) -> bool:
        return any(name.startswith(p) for p in self.prefixes)

    def require(self, verb: str, name: str | None = None) -> None:
        if verb not in self.verbs:
            raise forbidden(f"this token may not {verb}")
        if name is not None and not self.covers(name):
            raise forbidden(f"this token may not {verb} {name!r}")

    def require_global(self, verb: str) -> None:
        """The fleet (nodes, their hostnames, regions) belongs to no name: listing it needs ``verb``
        over every name, as ``require_global_admin`` does for changing it."""
        self.require(verb)
        if not self.unlimited:
            raise forbidden(
                f"this token's {verb} rights cover only its prefixes; nodes and regions belong to "
                f'no name and need {verb} over every name (the prefix "")'
            )

    def require_global_admin(self) -> None:
        """Regions, nodes, seal and audit belong to no name: they need ``admin`` over every name."""
        self.require("admin")
        if not self.unlimited:
            raise forbidden(
                "this token's admin rights cover only its prefixes; regions, nodes, seal and "
                "the audit log need an admin token over every name"
            )

    def may_grant(self, prefixes: tuple[str, ...], verbs: tuple[str, ...]) -> bool:
        return all(self.covers(p) for p in prefixes) and set(verbs) <= set(self.verbs)

    def require_grant(self, prefixes: tuple[str, ...], verbs: tuple[str, ...]) -> None:
        """Making (or revoking) a token of this scope needs ``admin`` and every right it carries."""
        self.require("admin")
        outside = [p for p in prefixes if not self.covers(p)]
        if outside:
            raise forbidden(f"this token may not grant rights over {outside[0]!r}: outside its prefixes")
        extra = [v for v in verbs if v not in self.verbs]
        if extra:
            raise forbidden(f"this token may not grant {', '.join(extra)}: it does not hold it")


def new_token_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_token(
    tx: Tx,
    name: str,
    prefixes: tuple[str, ...],
    verbs: tuple[str, ...],
    now: float,
    ttl: int | None = None,
    secret: str | None = None,
    not_after: float | None = None,
    parent: str | None = None,
) -> tuple[str, OperatorToken]:
    """Store a new token; return its secret (shown once) and its record. ``not_after`` caps its expiry
    (the maker's own)."""
    if ttl is not None and ttl <= 0:
        raise bad_request("ttl: a positive duration (omit it for a token that does not expire)")
    secret = secret or new_token_secret()
    expires_at = now + ttl if ttl is not None else None
    if not_after is not None:
        expires_at = min(expires_at, not_after) if expires_at is not None else not_after
    token = OperatorToken(
        id=secrets.token_hex(8),
        name=name,
        prefixes=prefixes,
        verbs=verbs,
        created_at=now,
        expires_at=expires_at,
        revoked_at=None,
        parent_id=parent,
    )
    tx.insert_operator_token(token, tx.keys().token_digest(secret))
    return secret, token


def _live(token: OperatorToken | None, now: float) -> OperatorToken:
    if token is None or token.revoked_at is not None:
        raise unauthorized("invalid or revoked token")
    if token.expires_at is not None and token.expires_at <= now:
        raise unauthorized("token expired")
    return token


def still_valid(tx: Tx, who: Principal, now: float) -> None:
    """Check again, inside a write, that ``who``'s token is neither revoked nor expired: a token made
    by a token revoked meanwhile would escape the revocation's cascade."""
    if who.kind == "token":
        _live(tx.get_operator_token_by_id(who.id), now)


def authenticate(tx: Tx, secret: str | None, now: float) -> Principal:
    if not secret:
        raise unauthorized(
            "missing token: run `vault-edge login` or set VAULT_EDGE_TOKEN (API: Authorization: Bearer ...)"
        )
    token = _live(tx.find_operator_token(tx.keys().token_digest(secret), wire.token_digest(secret)), now)
    return Principal(token.id, token.name, token.prefixes, token.verbs, token.expires_at)


def principal_by_id(tx: Tx, token_id: str, now: float) -> Principal:
    """The principal of a live token, by id (a console session holds the id, never the token): its
    scope read afresh, so a revoked or expired token ends the session at its next request."""
    token = _live(tx.get_operator_token_by_id(token_id), now)
    return Principal(token.id, token.name, token.prefixes, token.verbs, token.expires_at)
