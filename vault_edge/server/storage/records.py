"""Plain values the repository returns: no sessions, no lazy loading, nothing bound to a connection."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vault_edge.wire.egress import Route


@dataclass(frozen=True)
class Region:
    name: str
    key_version: int
    data_rev: int
    created_at: float


@dataclass(frozen=True)
class Secret:
    id: int
    name: str
    regions: tuple[str, ...]  # ("*",) means every region, present and future
    latest_version: int
    created_at: float
    updated_at: float
    revision: int
    deleted_at: float | None
    destroyed: bool
    generate: str | None
    rotate_every_s: int | None
    next_rotation_at: float | None
    grace_s: int | None
    rotator: str | None = None  # the rotator that changes it at its source

    @property
    def every_region(self) -> bool:
        return self.regions == ("*",)


@dataclass(frozen=True)
class Version:
    secret_id: int
    version: int
    ciphertext: bytes | None = field(repr=False)
    created_at: float
    revision: int
    origin: str


@dataclass(frozen=True)
class Wrap:
    secret_id: int
    version: int
    region: str
    key_version: int
    wrapped: bytes = field(repr=False)


@dataclass(frozen=True)
class Stage:
    stage: str
    version: int
    revision: int
    expires_at: float | None


@dataclass(frozen=True)
class SnapshotRow:
    """One staged, live version of a secret as a region's nodes receive it."""

    name: str
    version: int
    stage: str
    expires_at: float | None
    created_at: float
    ciphertext: bytes = field(repr=False)
    key_version: int
    wrapped_dek: bytes = field(repr=False)


@dataclass(frozen=True)
class Node:
    id: str
    region: str
    box_public: bytes
    sign_public: bytes
    hostname: str
    status: str
    enrolled_at: float
    last_seen: float | None
    applied_revision: int
    node_rev: int
    join_token_id: str | None = None  # the join token that enrolled it (None: enrolled before 0004)
    enrolled_rev: int | None = None  # the revision its enrolment took
    egress: str | None = None  # its last egress report (wire.egress.Report, encoded), not MAC'd


@dataclass(frozen=True)
class Grant:
    node_id: str
    region: str
    key_version: int
    sealed: bytes = field(repr=False)
    revision: int


@dataclass(frozen=True)
class JoinToken:
    id: str
    digest: bytes = field(repr=False)
    region: str
    created_at: float
    expires_at: float
    used_at: float | None
    used_by: str | None


@dataclass(frozen=True)
class OperatorToken:
    id: str
    name: str
    prefixes: tuple[str, ...]
    verbs: tuple[str, ...]
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    parent_id: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: float
    actor: str
    action: str
    target: str
    outcome: str
    detail: str
    hash: bytes
    mac: bytes | None


@dataclass(frozen=True)
class Rotator:
    name: str
    type: str
    admin_secret: str
    config: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class Rotation:
    id: int
    secret: str
    rotator: str
    step: str  # create | test | publish | retire | done | aborted
    since: float
    started_at: float
    origin: str
    version: int | None
    previous_version: int | None
    published_rev: int | None
    retire_after: float | None
    # bookkeeping, outside the row MAC
    lease_owner: str | None = None
    lease_until: float | None = None
    attempts: int = 0
    next_try_at: float | None = None
    last_error: str | None = None
    waiting_for: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self.step not in ("done", "aborted")


@dataclass(frozen=True)
class EgressRoute:
    """An egress route as stored (its MAC checked): ``route`` is the wire route (``wire/egress.py``)."""

    name: str
    route: Route
    regions: tuple[str, ...]  # ("*",) means every region, present and future
    created_at: float
    revision: int
