"""Redis: one ACL user with two passwords during the grace. ``create`` adds the new one
(``ACL SETUSER u on #<sha256>``), ``retire`` removes the old one (``!<sha256>``): callers holding
either log in until retire. The user and its rules are the operator's; passwords go as SHA-256
hashes, never as text (``MONITOR`` or the slow log would show them)."""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from vault_edge.crypto import verifiers
from vault_edge.server.rotators import Credential, Refused, RotatorError, common, need, new_password


def _client(config: dict[str, Any], user: str, password: str) -> redis.Redis:
    # No retries inside the client: the state machine retries with back-off, and redis-py's own retries
    # take a refused password (an AuthenticationError is a ConnectionError) for a transient failure.
    return redis.Redis(
        host=config["host"],
        port=config["port"],
        username=user or None,
        password=password or None,
        socket_timeout=5,
        socket_connect_timeout=5,
        retry=Retry(NoBackoff(), 0),
    )


class Redis:
    def validate(self, config: dict[str, Any]) -> dict[str, Any]:
        out = common(config, 6379)
        user = need(config, "username", str)
        if not user.replace("_", "").replace("-", "").isalnum() or user == "default":
            raise ValueError("config.username: letters, digits, '_' and '-' (not 'default')")
        out["username"] = user
        return out

    def overlaps(self, config: dict[str, Any]) -> bool:
        return True

    def plan(self, config: dict[str, Any], current: Credential | None) -> Credential:
        return {
            "username": config["username"],
            "password": new_password(config),
            "host": config["host"],
            "port": config["port"],
        }

    def _admin(
        self, config: dict[str, Any], admin: Credential, what: str, *args: str, unless_absent: str | None = None
    ) -> None:
        """``ACL SETUSER *args``; with ``unless_absent`` (a password hash), only if the user has it (a
        resumed retire runs twice: Redis refuses to remove a password the user no longer has)."""
        try:
            client = _client(config, str(admin.get("username", "")), str(admin.get("password", "")))
            try:
                if unless_absent is not None:
                    info = client.acl_getuser(args[0]) or {}
                    if unless_absent not in info.get("passwords", []):
                        return
                client.execute_command("ACL", "SETUSER", *args)
            finally:
                client.close()
        except redis.AuthenticationError:
            raise RotatorError(f"redis: {what}: the admin credential was refused") from None
        except redis.RedisError as exc:
            raise RotatorError(f"redis: {what}: {type(exc).__name__}") from None

    def create(self, config: dict[str, Any], admin: Credential, new: Credential | None, key: str) -> Credential:
        assert new is not None
        self._admin(
            config,
            admin,
            f"add a password to {new['username']}",
            new["username"],
            "on",
            "#" + verifiers.redis_acl(new["password"]),
        )
        return new

    def test(self, config: dict[str, Any], new: Credential) -> None:
        try:
            client = _client(config, new["username"], new["password"])
            try:
                client.ping()
            finally:
                client.close()
        except redis.AuthenticationError:
            raise Refused(f"redis: log in as {new['username']}: authentication refused") from None
        except redis.RedisError as exc:
            raise RotatorError(f"redis: log in as {new['username']}: {type(exc).__name__}") from None

    def retire(self, config: dict[str, Any], admin: Credential, old: Credential, current: Credential | None) -> None:
        if old.get("username") != config["username"] or not isinstance(old.get("password"), str):
            return
        if current is not None and current.get("password") == old["password"]:
            return
        digest = verifiers.redis_acl(old["password"])
        self._admin(
            config,
            admin,
            f"remove a password of {old['username']}",
            old["username"],
            "!" + digest,
            unless_absent=digest,
        )


DRIVER = Redis()
