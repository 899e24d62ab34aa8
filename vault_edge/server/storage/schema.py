"""The tables, as SQLAlchemy Core metadata. Migrations (``migrations/versions``) create them.

Times are float unix seconds. Binary columns hold ciphertext, wrapped keys, public keys and digests:
never a plaintext secret value, never a plaintext token.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# Key/value facts about the vault: the share scheme, the canary, the control plane's public key.
meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# Row 1: the global revision; row 2: the audit log's sequence; row 3: the revocation list's length.
# Taking one is UPDATE ... RETURNING, whose row lock is held until commit, so revisions become
# visible in the order they were taken.
counter = Table(
    "counter",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("revision", BigInteger, nullable=False),
)

regions = Table(
    "regions",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("key_version", Integer, nullable=False),
    Column("data_rev", BigInteger, nullable=False),  # last revision that changed what its nodes see
    Column("created_at", Float, nullable=False),
)

region_keys = Table(
    "region_keys",
    metadata,
    Column("region", String(63), ForeignKey("regions.name"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("wrapped", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    # the root key version whose region-wrap key wraps it (1: derived from the root key; migration 0005)
    Column("root_version", Integer, nullable=False, default=1, server_default="1"),
)

# Root key versions ≥ 2 (`operator rotate`), each AES-GCM-wrapped under a key derived from the root key,
# with its version as associated data (crypto/seal.py): authenticated like a row MAC. Version 1 is
# derived, never stored.
root_keys = Table(
    "root_keys",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("wrapped", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)

secrets = Table(
    "secrets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(256), nullable=False, unique=True),
    Column("regions", Text, nullable=False),  # JSON list of region names, or ["*"] for every region
    Column("latest_version", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("deleted_at", Float, nullable=True),
    Column("destroyed", Integer, nullable=False, default=0),
    Column("generate", String(64), nullable=True),  # SPEC for generated values
    Column("rotate_every_s", Integer, nullable=True),
    Column("next_rotation_at", Float, nullable=True),
    Column("grace_s", Integer, nullable=True),  # default grace of `previous` for this secret
    Column("stages_digest", LargeBinary, nullable=True),  # SHA-256 of its stage pointers: binds them here
    Column("mac", LargeBinary, nullable=True),  # row MAC (crypto/rowmac.py): name, regions, state, schedule
    Column("rotator", String(64), nullable=True),  # the rotator that changes it at its source (0005)
)

secret_versions = Table(
    "secret_versions",
    metadata,
    Column("secret_id", Integer, ForeignKey("secrets.id"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("ciphertext", LargeBinary, nullable=True),  # NULL once destroyed
    Column("created_at", Float, nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("origin", String(32), nullable=False),  # put | rotate | generated | scheduled | rollback:V
)

data_key_wraps = Table(
    "data_key_wraps",
    metadata,
    Column("secret_id", Integer, primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("region", String(63), primary_key=True),
    Column("key_version", Integer, nullable=False),
    Column("wrapped", LargeBinary, nullable=False),
)

stages = Table(
    "stages",
    metadata,
    Column("secret_id", Integer, ForeignKey("secrets.id"), primary_key=True),
    Column("stage", String(16), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("expires_at", Float, nullable=True),  # `previous` is readable until then
    Column("mac", LargeBinary, nullable=True),  # row MAC: secret name, stage, version, revision, expiry
)

# Every move of a stage, so "which version does a node at revision R serve" has an answer.
stage_log = Table(
    "stage_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("secret_id", Integer, nullable=False),
    Column("stage", String(16), nullable=False),
    Column("version", Integer, nullable=True),  # NULL: the stage was removed
    Column("revision", BigInteger, nullable=False),
    Column("at", Float, nullable=False),
    Index("ix_stage_log_secret", "secret_id", "stage", "revision"),
)

nodes = Table(
    "nodes",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("region", String(63), ForeignKey("regions.name"), nullable=False),
    Column("box_public", LargeBinary, nullable=False),
    Column("sign_public", LargeBinary, nullable=False),
    Column("hostname", String(255), nullable=False),
    Column("status", String(16), nullable=False),  # active | revoked
    Column("enrolled_at", Float, nullable=False),
    Column("last_seen", Float, nullable=True),
    Column("applied_revision", BigInteger, nullable=False),
    Column("node_rev", BigInteger, nullable=False),  # last revision that changed this node's grants/status
    Column("mac", LargeBinary, nullable=True),  # row MAC: id, region, keys, hostname, status, enrolment
    # The join token that enrolled it and the revision it was enrolled at (migration 0004; NULL for
    # nodes enrolled before): in the row's MAC, so a retry of that enrolment is answered with this
    # node, and a database writer cannot tie a token to another node. Unique: one node per token.
    Column("join_token_id", String(32), nullable=True),
    Column("enrolled_rev", BigInteger, nullable=True),
    # The node's last egress counters (migration 0008; wire.egress.Report, encoded): a report like
    # last_seen and applied_revision, not in the MAC.
    Column("egress", Text, nullable=True),
    Index("ix_nodes_region", "region"),
    Index("ix_nodes_join_token", "join_token_id", unique=True),
)

grants = Table(
    "grants",
    metadata,
    Column("node_id", String(32), ForeignKey("nodes.id"), primary_key=True),
    Column("region", String(63), primary_key=True),
    Column("key_version", Integer, primary_key=True),
    Column("sealed", LargeBinary, nullable=False),
    Column("revision", BigInteger, nullable=False),
)

join_tokens = Table(
    "join_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("digest", LargeBinary, nullable=False),
    Column("region", String(63), ForeignKey("regions.name"), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float, nullable=True),
    Column("used_by", String(32), nullable=True),
    Column("mac", LargeBinary, nullable=True),  # row MAC: id, digest, region, created, expiry
)

operator_tokens = Table(
    "operator_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("digest", LargeBinary, nullable=False, unique=True),
    Column("name", String(128), nullable=False),
    Column("prefixes", Text, nullable=False),  # JSON list of name prefixes ("" = every name)
    Column("verbs", Text, nullable=False),  # JSON list of verbs
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
    Column("parent_id", String(32), nullable=True, index=True),  # the token that made it (None: root)
    Column("mac", LargeBinary, nullable=True),  # row MAC: every column but revoked_at (see revocations)
    # 1: a plain SHA-256 digest, adopted from before keyed digests (migration 0003)
    Column("legacy_digest", Integer, nullable=False, default=0, server_default="0"),
)

# What was revoked or spent, for good: operator tokens, nodes, used join tokens. Append-only; each
# record's MAC covers its sequence number and the previous record's MAC, so the list is a MAC chain
# (counter row 3 holds its length): a record cannot be removed from the middle, nor a revoked row
# made valid again by copying back an older version of it.
revocations = Table(
    "revocations",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", String(8), nullable=False),  # token | node | join
    Column("target", String(32), nullable=False),
    Column("at", Float, nullable=False),
    Column("mac", LargeBinary, nullable=False),
)

# The change log: one row for each secret a revision changed (target: its name), or one row with
# target "" for a revision that changed no secret; the row with target "*base*" says from which
# revision on the log is whole (0 for a vault made with it; the revision of adoption otherwise).
# Each row carries a MAC. Dense by construction (every committed revision writes its row), so a
# secret whose record is older than its last change here was rolled back, and a revision missing
# from it is a removed row.
changes = Table(
    "changes",
    metadata,
    Column("revision", BigInteger, primary_key=True, autoincrement=False),
    Column("target", String(300), primary_key=True),
    Column("mac", LargeBinary, nullable=False),
    Index("ix_changes_target", "target", "revision"),
)

# Events while sealed (refused unseal attempts): kept out of the MAC'd audit chain, since nothing
# can MAC them then; `audit` lists them apart and `audit verify` never counts them as entries.
sealed_events = Table(
    "sealed_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("detail", Text, nullable=False),
)

# Nonces of signed node requests, kept for the clock-skew window, shared by every replica.
nonces = Table(
    "nonces",
    metadata,
    Column("node_id", String(32), primary_key=True),
    Column("nonce", String(32), primary_key=True),
    Column("expires_at", Float, nullable=False),
    Index("ix_nonces_expires", "expires_at"),
)

# Hash-chained audit log. `hash` = SHA-256(prev hash || entry); `mac` = HMAC(audit key, hash)
# when the vault was unsealed at the time (the audit key derives from the root key).
audit = Table(
    "audit",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("at", Float, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(300), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("detail", Text, nullable=False),
    Column("hash", LargeBinary, nullable=False),
    Column("mac", LargeBinary, nullable=True),
    UniqueConstraint("hash", name="uq_audit_hash"),
)


# Rotators (0005): how a credential is changed where it lives. ``config`` is JSON without any secret
# (host, port, strategy, user names, webhook calls); the credential the rotator logs in with is the
# secret ``admin_secret``, which belongs to no region (never synced to a node). Row MAC: every column.
rotators = Table(
    "rotators",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("type", String(16), nullable=False),  # postgres | mysql | redis | webhook
    Column("admin_secret", String(256), nullable=False),
    Column("config", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("mac", LargeBinary, nullable=False),
)

# One row per rotation at the source: a persisted state machine, create → test → publish → retire →
# done (or aborted). The MAC covers what sets order and authority (the secret, rotator, step, the
# versions, when publish happened, its revision and the end of its grace); the lease, the back-off
# and the reports (error, who retire waits for) are bookkeeping, outside it.
rotations = Table(
    "rotations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("secret", String(256), nullable=False),
    Column("rotator", String(64), nullable=False),
    Column("step", String(16), nullable=False),  # create | test | publish | retire | done | aborted
    Column("since", Float, nullable=False),  # when the step began
    Column("started_at", Float, nullable=False),
    Column("origin", String(16), nullable=False),  # operator | scheduled
    Column("version", Integer, nullable=True),  # the new credential's version (pending until publish)
    Column("previous_version", Integer, nullable=True),  # the version it replaces
    Column("published_rev", BigInteger, nullable=True),  # the revision that made it current
    Column("retire_after", Float, nullable=True),  # publish + grace: retire never before
    Column("mac", LargeBinary, nullable=False),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_try_at", Float, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("waiting_for", Text, nullable=True),  # JSON: nodes retire waits for, nodes counted down
    Index("ix_rotations_secret", "secret", "id"),
    Index("ix_rotations_step", "step"),
)
# Egress routes (issue 12): how agents call an upstream API for workers, injecting a secret. A route
# grants authority (it sends a secret's value to its upstream), so its row carries a MAC over name,
# route, regions and revision, and the revision is checked against the change log (target
# "*egress*NAME"): a deleted route copied back from an old copy is refused, not served.
egress_routes = Table(
    "egress_routes",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("route", Text, nullable=False),  # canonical JSON (wire/egress.py Route.canonical)
    Column("regions", Text, nullable=False),  # JSON list of region names, or ["*"]
    Column("created_at", Float, nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("mac", LargeBinary, nullable=False),
)
