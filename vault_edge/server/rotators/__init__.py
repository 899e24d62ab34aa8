"""Rotators: how a credential is changed where it lives (a database role, a Redis ACL user, an API
provider's key). The state machine that runs them is ``server/ops/rotation.py``; a driver here only
talks to its service, in four calls the state machine makes outside any transaction:

- ``plan(config, current)``: the new credential, made here (None when the source makes it: webhook);
  it is stored, sealed, as the secret's ``pending`` version *before* the source is touched, so a crash
  after the source changed never loses it;
- ``create(config, admin, new, idempotency_key)``: make ``new`` valid at the source (idempotent: a
  resumed step runs it again), and return the credential (the source's, for webhook);
- ``test(config, new)``: log in with it; :class:`Refused` when the source refuses it (the rotation
  aborts), :class:`RotatorError` for anything transient (retried with back-off);
- ``retire(config, admin, old, current)``: revoke or disable ``old`` (a no-op for ``single``).

Credentials are JSON objects (``username``, ``password``, ``host``, ``port``, ``database``, ...).
Errors carry messages made here, never a driver's (a driver's message can quote the statement, and
so the password): no value reaches a log, an audit entry or an API answer.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

Credential = dict[str, Any]

TYPES = ("postgres", "mysql", "redis", "webhook")


class RotatorError(Exception):
    """A step failed for now (service unreachable, a statement refused): retried with back-off."""


class Refused(RotatorError):
    """The source refused the new credential: the rotation aborts, the current one is untouched."""


class Driver(Protocol):
    def validate(self, config: dict[str, Any]) -> dict[str, Any]: ...
    def overlaps(self, config: dict[str, Any]) -> bool: ...
    def plan(self, config: dict[str, Any], current: Credential | None) -> Credential | None: ...
    def create(self, config: dict[str, Any], admin: Credential, new: Credential | None, key: str) -> Credential: ...
    def test(self, config: dict[str, Any], new: Credential) -> None: ...
    def retire(
        self, config: dict[str, Any], admin: Credential, old: Credential, current: Credential | None
    ) -> None: ...


def driver(kind: str) -> Driver:
    """The driver of a rotator type, imported on first use (its client library is an optional extra)."""
    if kind not in TYPES:
        raise ValueError(f"type: one of {', '.join(TYPES)}")
    try:
        module = importlib.import_module(f"vault_edge.server.rotators.{kind}")
    except ImportError as exc:
        raise RotatorError(
            f"the {kind} rotator needs its client library: pip install 'vault-edge[rotators]' ({exc.name} is missing)"
        ) from None
    return module.DRIVER  # type: ignore[no-any-return]


def need(config: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = config.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"config.{key}: {'required' if value is None else 'wrong type'} ({kind.__name__})")
    return value


def new_password(config: dict[str, Any]) -> str:
    from vault_edge.server import generate

    return generate.generate(config.get("password_spec", "32:alnum")).decode()


def common(config: dict[str, Any], default_port: int) -> dict[str, Any]:
    """host, port and password_spec, checked."""
    from vault_edge.server import generate

    out = {"host": need(config, "host", str, "127.0.0.1"), "port": need(config, "port", int, default_port)}
    if not 0 < out["port"] < 65536:
        raise ValueError("config.port: 1 to 65535")
    spec = need(config, "password_spec", str, "32:alnum")
    _, alphabet = generate.parse_spec(spec)
    if alphabet not in ("alnum", "hex", "alpha", "digits", "base64url"):
        raise ValueError(
            "config.password_spec: a LENGTH:ALPHABET whose alphabet needs no quoting "
            "(alnum, hex, alpha, digits, base64url)"
        )
    out["password_spec"] = spec
    return out


class Roles:
    """What the database rotators (postgres, mysql) share: their strategy. ``alternate``: two roles
    with the same grants, made by the operator; each rotation gives the one not in use a new
    password and switches to it, and retire disables the other, so callers holding either log in
    until then. ``single``: one role whose password changes at create (no overlap; retire is a
    no-op). A driver gives its defaults and ``disable`` (retire's statement)."""

    default_port: int
    default_database: str

    def validate(self, config: dict[str, Any]) -> dict[str, Any]:
        out = common(config, self.default_port)
        strategy = need(config, "strategy", str, "alternate")
        if strategy not in ("alternate", "single"):
            raise ValueError("config.strategy: alternate (two roles, overlapping) or single (one role, no overlap)")
        names = need(config, "usernames", list)
        want = 2 if strategy == "alternate" else 1
        if (
            len(names) != want
            or not all(isinstance(n, str) and n.replace("_", "").isalnum() and len(n) <= 63 for n in names)
            or len(set(names)) != want
        ):
            raise ValueError(
                f"config.usernames: {want} distinct name(s) of letters, digits and '_' for strategy {strategy}"
            )
        out["strategy"], out["usernames"] = strategy, names
        out["database"] = need(config, "database", str, self.default_database)
        return out

    def overlaps(self, config: dict[str, Any]) -> bool:
        return bool(config["strategy"] == "alternate")

    def plan(self, config: dict[str, Any], current: Credential | None) -> Credential:
        return {
            "username": next_user(config, current),
            "password": new_password(config),
            "host": config["host"],
            "port": config["port"],
            "database": config["database"],
        }

    def retire(self, config: dict[str, Any], admin: Credential, old: Credential, current: Credential | None) -> None:
        user = retiring_user(config, old, current)
        if user is not None:
            self.disable(config, admin, user)

    def disable(self, config: dict[str, Any], admin: Credential, user: str) -> None:
        """Make ``user`` unable to log in (retire, ``alternate`` only)."""
        raise NotImplementedError


def next_user(config: dict[str, Any], current: Credential | None) -> str:
    """alternate: the role the current credential does not use; single: the one role."""
    names = config["usernames"]
    if config["strategy"] == "single" or not current or current.get("username") not in names:
        return str(names[0])
    return str(names[1] if current["username"] == names[0] else names[0])


def retiring_user(config: dict[str, Any], old: Credential, current: Credential | None) -> str | None:
    """alternate: the role to disable at retire: the old credential's, or, at a first rotation (no old
    credential), the other role, so exactly one role can log in afterwards. Never the role in use."""
    if config.get("strategy") != "alternate":
        return None
    names = config["usernames"]
    name = old.get("username")
    if name not in names:
        if current is None:
            return None
        name = next((n for n in names if n != current.get("username")), None)
    if name is None or (current is not None and current.get("username") == name):
        return None
    return str(name)
