"""Who may read which secret through the agent's socket: the policy file, checked on every request.

The file is TOML, a list of rules::

    [[rule]]
    uid = 1000                       # conditions, all optional: uid, gid, exe (absolute path)
    secrets = ["db/*", "openai"]     # fnmatch-style patterns, case-sensitive; "*" also matches "/"

    [[rule]]
    token_sha256 = "<hex>"           # workerd bindings send the token in X-Vault-Edge-Token
    secrets = ["tenant-a/*"]

    [[rule]]
    token_sha256 = "<hex>"
    egress = ["openai"]              # egress routes the caller may call through the agent (agent/egress.py)

A rule applies when every condition it gives matches the caller; a caller may read a name when an
applicable rule has a pattern matching it, and call an egress route when an applicable rule's
``egress`` patterns match the route's name. A rule gives ``secrets``, ``egress`` or both: calling a
route never lets a caller read its secret (that is the point: a keyless worker).

Identity comes from the kernel (see ``peercred``); ``gid``
is the caller's primary gid as SO_PEERCRED reports it (supplementary groups are not consulted).

Tokens: a request carrying ``X-Vault-Edge-Token`` is judged by the rules naming that token's SHA-256
only (their uid/gid/exe conditions, if any, must match too). A token that matches no rule is
refused, never silently judged by kernel identity instead: a tenant's binding gets its own patterns
and nothing the host process happens to hold. Rules without a token apply to requests without one.

No policy file: the agent's own uid and root may read everything and call every route, everyone else
nothing (a token is
then refused, since no rule names it).

``exe`` is advisory, not a security boundary. The executable is read once, when the connection is
accepted, and a connection outlives the process image that opened it: a process may connect, fork,
and have the connecting process (or a child holding the descriptor) exec the allowed binary, or
hand the descriptor to another program. Linux offers no sound way to bind a unix-socket connection
to the binary that uses it, so an ``exe`` condition only narrows rules already bounded by ``uid``,
``gid`` or a token; rely on those (the kernel's uid/gid, a token the process must hold). The agent
warns at start about any rule whose only condition is ``exe`` (:attr:`Policy.exe_only_rules`).

The memo of decisions is keyed by the token's SHA-256 (never the raw token) and bounded in
entries and in bytes, so its memory stays bounded whatever callers send.

A rule must give at least one condition; a file that would let every local user read everything
is more likely a mistake than an intent, and the socket's file mode is the place for "everyone".
Symlinks in ``exe`` are resolved when the file is loaded, since the kernel reports resolved paths.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
import re
import secrets
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from vault_edge import wire
from vault_edge.agent.peercred import Caller

TOKEN_HEADER: Final = wire.H_TOKEN
_MEMO_MAX: Final = 16_384  # decisions kept; the memo is dropped whole past this (hostile names)...
_MEMO_BYTES: Final = 4 << 20  # ...or past this many bytes of keys (exe paths and names are the variable part)
_MEMO_ENTRY: Final = 200  # bytes an entry costs besides its strings (tuple, dict slot, digest, ints)
_RULE_KEYS: Final = frozenset({"uid", "gid", "exe", "token_sha256", "secrets", "egress"})
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the problem."""


def new_token() -> tuple[str, str]:
    """A fresh capability token (256 bits, urlsafe) and the hex SHA-256 to put in the policy file."""
    token = secrets.token_urlsafe(32)
    return token, token_sha256(token)


def token_sha256(token: str) -> str:
    return _digest(token).hex()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True, slots=True)
class Rule:
    secrets: tuple[str, ...]
    uid: int | None = None
    gid: int | None = None
    exe: str | None = None
    token_digest: bytes | None = None  # raw SHA-256 of the token
    egress: tuple[str, ...] = ()  # patterns of the egress routes it may call
    _match: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _egress: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_match", _compile(self.secrets))
        object.__setattr__(self, "_egress", _compile(self.egress))

    def matches_identity(self, caller: Caller) -> bool:
        return (
            (self.uid is None or caller.uid == self.uid)
            and (self.gid is None or caller.gid == self.gid)
            and (self.exe is None or caller.exe == self.exe)
        )

    def covers(self, name: str) -> bool:
        return bool(self.secrets) and self._match.fullmatch(name) is not None

    def covers_route(self, route: str) -> bool:
        return bool(self.egress) and self._egress.fullmatch(route) is not None


def _compile(patterns: Iterable[str]) -> re.Pattern[str]:
    # fnmatch.translate gives "(?s:...)\Z"; one alternation per rule keeps a check to one regex call.
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class Policy:
    """Immutable rules plus a memo of decisions (``allows`` runs on every request)."""

    def __init__(self, rules: Iterable[Rule] | None, *, owner_uid: int | None = None, source: str = "") -> None:
        """``rules=None`` is the no-file default: the agent's own uid (``owner_uid``) and root only."""
        self.rules: tuple[Rule, ...] | None = tuple(rules) if rules is not None else None
        self.owner_uid = os.getuid() if owner_uid is None else owner_uid
        self.source = source
        self.uses_exe = any(r.exe is not None for r in self.rules or ())
        # 1-based indices of rules whose only condition is exe (advisory: see the module docstring)
        self.exe_only_rules: tuple[int, ...] = tuple(
            i
            for i, r in enumerate(self.rules or (), start=1)
            if r.exe is not None and r.uid is None and r.gid is None and r.token_digest is None
        )
        self._memo: dict[tuple[int, int, str | None, bytes | None, str], bool] = {}
        self.memo_bytes = 0
        self._egress_memo: dict[tuple[int, int, str | None, bytes | None, str], bool] = {}

    def __repr__(self) -> str:
        where = self.source or ("<default: owner and root>" if self.rules is None else "<rules>")
        return f"Policy({where}, rules={'default' if self.rules is None else len(self.rules)})"

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None) -> Policy:
        """Read and check a policy file; ``None`` gives the default policy. Raises PolicyError."""
        if path is None:
            return cls(None)
        where = str(path)
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise PolicyError(f"policy {where}: cannot read it: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"policy {where}: not valid TOML: {exc}") from exc
        return cls(parse_rules(doc, where), source=where)

    def allows(self, caller: Caller, token: str | None, name: str) -> bool:
        digest = None if token is None else _digest(token)
        key = (caller.uid, caller.gid, caller.exe, digest, name)
        hit = self._memo.get(key)
        if hit is None:
            size = _MEMO_ENTRY + len(name) + len(caller.exe or "")
            if len(self._memo) >= _MEMO_MAX or self.memo_bytes + size > _MEMO_BYTES:
                self._memo.clear()
                self.memo_bytes = 0
            hit = self._decide(caller, digest, name)
            if size <= _MEMO_BYTES:
                self._memo[key] = hit
                self.memo_bytes += size
        return hit

    def allows_egress(self, caller: Caller, token: str | None, route: str) -> bool:
        """Whether the caller may call the egress route ``route`` (judged as reads are, by its own
        patterns; memoized as reads are, in a memo of its own)."""
        digest = None if token is None else _digest(token)
        key = (caller.uid, caller.gid, caller.exe, digest, route)
        hit = self._egress_memo.get(key)
        if hit is None:
            if len(self._egress_memo) >= _MEMO_MAX:  # entries are small: route names are at most 63 bytes
                self._egress_memo.clear()
            if self.rules is None:
                hit = digest is None and caller.uid in (0, self.owner_uid)
            else:
                hit = any(r.matches_identity(caller) and r.covers_route(route) for r in self._candidates(digest))
            self._egress_memo[key] = hit
        return hit

    def _candidates(self, digest: bytes | None) -> list[Rule]:
        if self.rules is None:
            return []
        if digest is None:
            return [r for r in self.rules if r.token_digest is None]
        # Compare against every token rule, in constant time each; no early exit on a hit.
        return [r for r in self.rules if r.token_digest is not None and hmac.compare_digest(r.token_digest, digest)]

    def knows_token(self, token: str) -> bool:
        """True when some rule names this token (checked against every rule, in constant time each)."""
        digest = _digest(token)
        found = False
        for r in self.rules or ():
            if r.token_digest is not None:
                found |= hmac.compare_digest(r.token_digest, digest)
        return found

    def _decide(self, caller: Caller, digest: bytes | None, name: str) -> bool:
        """``digest``: the SHA-256 of the request's token, None without one."""
        if self.rules is None:
            return digest is None and caller.uid in (0, self.owner_uid)
        if digest is None:
            candidates = [r for r in self.rules if r.token_digest is None]
        else:
            # Compare against every token rule, in constant time each; no early exit on a hit.
            candidates = [
                r for r in self.rules if r.token_digest is not None and hmac.compare_digest(r.token_digest, digest)
            ]
            if not candidates:
                return False
        return any(r.matches_identity(caller) and r.covers(name) for r in candidates)


def parse_rules(doc: dict[str, Any], where: str = "<policy>") -> list[Rule]:
    """Check a parsed policy document; PolicyError names the file, the rule and the problem."""

    def fail(msg: str) -> PolicyError:
        return PolicyError(f"policy {where}: {msg}")

    unknown = set(doc) - {"rule"}
    if unknown:
        raise fail(f"unknown top-level key(s) {', '.join(sorted(unknown))} (expected [[rule]] tables)")
    raw = doc.get("rule", [])
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise fail("'rule' must be an array of tables, written [[rule]]")
    rules = []
    for i, r in enumerate(raw, start=1):
        at = f"rule {i}"
        extra = set(r) - _RULE_KEYS
        if extra:
            raise fail(f"{at}: unknown key(s) {', '.join(sorted(extra))} (allowed: {', '.join(sorted(_RULE_KEYS))})")
        pats = r.get("secrets", [] if "egress" in r else None)
        if not isinstance(pats, list) or not (pats or r.get("egress")):
            raise fail(f"{at}: 'secrets' must be a non-empty list of name patterns (or give 'egress')")
        if not all(isinstance(p, str) and p for p in pats):
            raise fail(f"{at}: every entry of 'secrets' must be a non-empty string")
        routes = r.get("egress", [])
        if not isinstance(routes, list) or not all(isinstance(p, str) and p for p in routes):
            raise fail(f"{at}: 'egress' must be a list of route name patterns")
        ids: dict[str, int] = {}
        for k in ("uid", "gid"):
            if k in r:
                v = r[k]
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**32:
                    raise fail(f"{at}: '{k}' must be an integer id (0 to 4294967295)")
                ids[k] = v
        exe = r.get("exe")
        if exe is not None:
            if not isinstance(exe, str) or not exe:
                raise fail(f"{at}: 'exe' must be a string")
            if not os.path.isabs(exe):
                raise fail(f"{at}: 'exe' must be an absolute path, got {exe!r}")
            # The kernel reports the resolved path (/proc/PID/exe), so resolve symlinks here, once.
            exe = os.path.realpath(exe)
        digest = None
        if "token_sha256" in r:
            t = r["token_sha256"]
            if not isinstance(t, str) or not _HEX64.fullmatch(t):
                raise fail(f"{at}: 'token_sha256' must be 64 hex digits (the SHA-256 of the token)")
            digest = bytes.fromhex(t)
        if not ids and exe is None and digest is None:
            raise fail(f"{at}: give at least one condition (uid, gid, exe or token_sha256)")
        rules.append(
            Rule(
                secrets=tuple(pats),
                uid=ids.get("uid"),
                gid=ids.get("gid"),
                exe=exe,
                token_digest=digest,
                egress=tuple(routes),
            )
        )
    return rules
