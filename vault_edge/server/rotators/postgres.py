"""PostgreSQL: ``alternate`` (two login roles with the same grants; each rotation sets a new password
on the one not in use and switches to it, and retire disables the other: ``NOLOGIN PASSWORD NULL``),
or ``single`` (one role: its password changes at ``create``, so callers holding the old one fail
until the new one reaches them: it cannot overlap, and retire is a no-op). The roles and their
grants are the operator's; the rotator changes passwords and LOGIN only. Passwords go to the server
as SCRAM verifiers (``crypto/verifiers.py``), never as text a statement log would keep."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from vault_edge.crypto import verifiers
from vault_edge.server.rotators import (
    Credential,
    Refused,
    Roles,
    RotatorError,
)

_AUTH_FAILED = ("28P01", "28000", "42501")
# What the server answers a refused login with (psycopg gives connection failures no SQLSTATE): read
# only to classify, never repeated (a driver's text can quote a statement).
_REFUSALS = (
    "password authentication failed",
    "not permitted to log in",
    "permission denied for database",
    "no pg_hba.conf entry",
)


def _error(what: str, exc: Exception) -> RotatorError:
    state = getattr(exc, "sqlstate", None)
    text = str(exc)
    if state in _AUTH_FAILED or any(r in text for r in _REFUSALS):
        return Refused(f"postgres: {what}: authentication refused")
    if isinstance(exc, psycopg.OperationalError) and state is None:
        return RotatorError(f"postgres: {what}: cannot connect ({type(exc).__name__})")
    return RotatorError(f"postgres: {what}: {type(exc).__name__} (SQLSTATE {state})")


def _connect(config: dict[str, Any], user: str, password: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=config["host"],
        port=config["port"],
        dbname=config["database"],
        user=user,
        password=password,
        connect_timeout=5,
        autocommit=True,
        # every statement well within the step's 15 s lease: a call that outlived it could land after
        # another replica took the step over (a role's lock held elsewhere blocked an ALTER ROLE 17 s)
        options="-c statement_timeout=5000 -c lock_timeout=4000",
    )


class Postgres(Roles):
    default_port, default_database = 5432, "postgres"

    def _admin(self, config: dict[str, Any], admin: Credential, what: str, stmt: sql.Composed) -> None:
        try:
            with _connect(config, str(admin.get("username", "")), str(admin.get("password", ""))) as conn:
                conn.execute(stmt)
        except psycopg.Error as exc:
            raise _error(what, exc) from None

    def create(self, config: dict[str, Any], admin: Credential, new: Credential | None, key: str) -> Credential:
        assert new is not None
        stmt = sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
            sql.Identifier(new["username"]), sql.Literal(verifiers.scram_sha256(new["password"]))
        )
        self._admin(config, admin, f"set the password of {new['username']}", stmt)
        return new

    def test(self, config: dict[str, Any], new: Credential) -> None:
        what = f"log in as {new['username']}"
        try:
            with _connect(config, new["username"], new["password"]) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            err = _error(what, exc)
            if getattr(exc, "sqlstate", None) is not None and not isinstance(err, Refused):
                # the server answered and said no (no CONNECT on the database, say): definitive
                raise Refused(f"postgres: {what}: refused (SQLSTATE {exc.sqlstate})") from None
            raise err from None

    def disable(self, config: dict[str, Any], admin: Credential, user: str) -> None:
        stmt = sql.SQL("ALTER ROLE {} WITH NOLOGIN PASSWORD NULL").format(sql.Identifier(user))
        self._admin(config, admin, f"disable {user}", stmt)


DRIVER = Postgres()
