"""MariaDB / MySQL: ``alternate`` (two accounts with the same grants; the one not in use gets the new
password and ``ACCOUNT UNLOCK``, retire locks the other and gives it a random password no one keeps)
or ``single`` (one account; no overlap, retire a no-op). Accounts are ``'name'@'<config.user_host>'``
(default ``%``), made by the operator with their grants. Passwords are sent as
``mysql_native_password`` hashes (``IDENTIFIED BY PASSWORD '*...'``), never as text."""

from __future__ import annotations

import secrets
from typing import Any

import pymysql

from vault_edge.crypto import verifiers
from vault_edge.server.rotators import (
    Credential,
    Refused,
    Roles,
    RotatorError,
    need,
)

_REFUSED = (1045, 4151, 1044)  # access denied, account locked, no access to the database


def _error(what: str, exc: Exception) -> RotatorError:
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    if code in _REFUSED:
        return Refused(f"mysql: {what}: authentication refused (error {code})")
    return RotatorError(f"mysql: {what}: {type(exc).__name__} (error {code})")


def _literal(text: str) -> str:
    if not all(c.isalnum() or c in "_*%.-" for c in text):
        raise RotatorError("mysql: a name or hash with characters that would need quoting")
    return f"'{text}'"


class MySQL(Roles):
    default_port, default_database = 3306, ""

    def validate(self, config: dict[str, Any]) -> dict[str, Any]:
        out = super().validate(config)
        out["user_host"] = need(config, "user_host", str, "%")
        if not out["user_host"] or not all(c.isalnum() or c in "_%.-" for c in out["user_host"]):
            raise ValueError("config.user_host: a host pattern of letters, digits, '_', '%', '.' and '-'")
        return out

    def _account(self, config: dict[str, Any], name: str) -> str:
        return f"{_literal(name)}@{_literal(config['user_host'])}"

    def _admin(self, config: dict[str, Any], admin: Credential, what: str, stmt: str) -> None:
        try:
            conn = pymysql.connect(
                host=config["host"],
                port=config["port"],
                user=str(admin.get("username", "")),
                password=str(admin.get("password", "")),
                connect_timeout=5,
                read_timeout=5,  # well within the step's lease (see postgres.py)
                write_timeout=5,
                autocommit=True,
            )
            try:
                with conn.cursor() as cur:
                    cur.execute(stmt)
            finally:
                conn.close()
        except pymysql.MySQLError as exc:
            raise _error(what, exc) from None

    def create(self, config: dict[str, Any], admin: Credential, new: Credential | None, key: str) -> Credential:
        assert new is not None
        stmt = (
            f"ALTER USER {self._account(config, new['username'])} IDENTIFIED BY PASSWORD "
            f"{_literal(verifiers.mysql_native(new['password']))} ACCOUNT UNLOCK"
        )
        self._admin(config, admin, f"set the password of {new['username']}", stmt)
        return new

    def test(self, config: dict[str, Any], new: Credential) -> None:
        try:
            conn = pymysql.connect(
                host=config["host"],
                port=config["port"],
                user=new["username"],
                password=new["password"],
                database=config["database"] or None,
                connect_timeout=5,
                read_timeout=5,  # well within the step's lease (see postgres.py)
                write_timeout=5,
            )
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
            finally:
                conn.close()
        except pymysql.MySQLError as exc:
            raise _error(f"log in as {new['username']}", exc) from None

    def disable(self, config: dict[str, Any], admin: Credential, user: str) -> None:
        unknown = verifiers.mysql_native(secrets.token_urlsafe(32))  # a password no one holds
        stmt = f"ALTER USER {self._account(config, user)} IDENTIFIED BY PASSWORD {_literal(unknown)} ACCOUNT LOCK"
        self._admin(config, admin, f"disable {user}", stmt)


DRIVER = MySQL()
