"""The repository: the only module that issues SQL. Everything it returns is a plain record.

Storage is untrusted. Rows that grant authority or set order (operator and join tokens, nodes, stage
pointers, secrets' own records, revocations) carry a MAC under a key derived from the root key
(``crypto/rowmac.py``): this module computes it on every write and checks it on every read, so no
caller can forget. A row that fails its check raises :class:`TamperedRow` (the API answers
``integrity_error`` and audits it); list reads used to serve many (a region's nodes, its snapshot)
leave such rows out and name them in ``tx.tampered``. Revocations (tokens, nodes, used join tokens)
are an append-only MAC chain, cached per process and re-read incrementally: a revoked row copied
back from an old backup stays revoked, and a chain that shrinks while a process watches it is
refused.

Use ``with store.write() as tx:`` for a change (one transaction, committed at the end of the block,
rolled back on any exception, so a failed request never leaves half a change) and
``with store.read() as tx:`` for a consistent read. ``tx.changed(regions)`` announces, at commit,
which regions' nodes should look again: through PostgreSQL NOTIFY to every replica (delivered only
if the transaction commits), and to this process's listeners right after the commit.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from sqlalchemy import (
    Connection,
    CursorResult,
    Engine,
    Executable,
    Text,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from vault_edge.crypto import rowmac
from vault_edge.crypto.rowmac import RowKeys
from vault_edge.server.storage import schema as t
from vault_edge.server.storage.records import (
    AuditEntry,
    EgressRoute,
    Grant,
    JoinToken,
    Node,
    OperatorToken,
    Region,
    Rotation,
    Rotator,
    Secret,
    SnapshotRow,
    Stage,
    Version,
    Wrap,
)
from vault_edge.wire import egress as wegress

NOTIFY_CHANNEL = "vault_edge_changes"
_REVISION_ROW = 1
_AUDIT_ROW = 2
_REVOCATION_ROW = 3
BASE_TARGET = "*base*"  # the change log's base row (secret names cannot contain "*")
EGRESS_TARGET = "*egress*"  # the change log's target for an egress route: this, then the route's name

Listener = Callable[[int, frozenset[str]], None]
_SECRET_FIELDS = frozenset(c.name for c in t.secrets.columns)


# The contact group commit's two statements on PostgreSQL (``Tx.spend_nonces``, ``Tx.touch_nodes``):
# each batch is one fixed statement over arrays (``unnest``), so its text is parsed and planned once per
# connection. As parameter sets, SQLAlchemy's insertmanyvalues sends a new VALUES list per batch size,
# which psycopg converts anew each time (a tenth of the control plane's CPU in a rotation at 3,000 nodes).
_PG_SPEND = text(
    "INSERT INTO nonces (node_id, nonce, expires_at)"
    " SELECT * FROM unnest(CAST(:n AS text[]), CAST(:c AS text[]), CAST(:e AS double precision[]))"
    " ON CONFLICT DO NOTHING RETURNING node_id, nonce"
)
_PG_TOUCH = text(
    "UPDATE nodes SET last_seen = v.at, applied_revision = GREATEST(nodes.applied_revision, v.applied),"
    " egress = COALESCE(v.report, nodes.egress)"
    " FROM unnest(CAST(:nid AS text[]), CAST(:at AS double precision[]), CAST(:applied AS bigint[]),"
    " CAST(:report AS text[])) AS v(nid, at, applied, report)"
    " WHERE nodes.id = v.nid AND nodes.status = 'active'"  # a revoked node is not "seen"
)


class TamperedRow(Exception):
    """A row failed its MAC: written by someone without the root key. The message names the table and
    the row's key, never a value."""

    def __init__(
        self,
        table: str,
        key: str,
        what: str = "failed its integrity check (written without the root key)",
    ) -> None:
        super().__init__(f"{table} row {key!r} {what}")
        self.table, self.key = table, key


def _unavailable() -> RowKeys:
    raise RuntimeError("the store has no row keys: bind it to the barrier (Store.bind_keys)")


class Revocations:
    """The revocation chain as this process has verified it: (kind, target) pairs, its length and last
    MAC. Shared by every transaction of a store; extended, never rebuilt, as the chain grows."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.last_mac = b""
        self.revoked: frozenset[tuple[str, str]] = frozenset()


class ChangeIndex:
    """The change log as this process has read it (committed rows only, MACs verified): each secret's
    last change (and its few before), and how far the log has been read. It can lag the database,
    never lead it; it keeps a change whose row was later removed. It can lead a transaction that
    began before another one read a later change: such a transaction judges its rows by the changes
    read before it began (``Tx.last_change``), so a fresh change is never taken for a rollback."""

    KEEP = 4  # revisions kept per name

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.read_to = 0
        self.last: dict[str, int] = {}
        self.recent: dict[str, tuple[int, ...]] = {}  # per name, its last KEEP change revisions, ascending


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._listeners: list[Listener] = []
        self.row_keys: Callable[[], RowKeys] = _unavailable
        self.revocations = Revocations()
        self.changes = ChangeIndex()
        self.integrity_failure: str | None = None  # set when the change log has a gap: serve no secret

    def bind_keys(self, row_keys: Callable[[], RowKeys]) -> None:
        """``row_keys()`` gives the row-MAC keys (the barrier's; it raises while sealed)."""
        self.row_keys = row_keys

    def add_listener(self, listener: Listener) -> None:
        """``listener(revision, regions)`` runs after each local commit that called ``changed``."""
        self._listeners.append(listener)

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A read: every statement sees the database as of one moment, so that rows read one after
        the other agree (a secret's record and its stages, a region's revision and its rows, a version,
        its wraps and the region key, the audit chain and its head). REPEATABLE READ on PostgreSQL,
        whose READ COMMITTED gives each statement a moment of its own; a SQLite read transaction is one
        snapshot already. (Writers are serialized instead: see ``write``.)"""
        conn = self.engine.connect()
        if self.dialect == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn, conn.begin():
            yield Tx(conn, self.dialect, self)

    @contextmanager
    def write(self, serialize: bool = True) -> Iterator[Tx]:
        """A change. Writers run one at a time, as on SQLite (BEGIN IMMEDIATE): on PostgreSQL the
        first statement locks the revision counter, so what a writer reads (a secret's latest
        version, its stages) cannot change under it before it commits, on any replica.
        ``serialize=False`` is for writes that need no such reads (contacts, refusals' audit)."""
        with self.engine.connect().execution_options(vault_edge_write=True) as conn, conn.begin():
            tx = Tx(conn, self.dialect, self, writing=True)
            if serialize and self.dialect == "postgresql":
                tx.lock_writers()
            yield tx
            tx.close_revision()
            if tx.changed_regions is not None and self.dialect == "postgresql":
                conn.execute(
                    text("SELECT pg_notify(:ch, :payload)"),
                    {"ch": NOTIFY_CHANNEL, "payload": encode_notice(tx.revision, tx.changed_regions)},
                )
        for fn in tx.after_commit:
            fn()
        if tx.changed_regions is not None:
            for listener in self._listeners:
                listener(tx.revision, frozenset(tx.changed_regions))

    def dispose(self) -> None:
        self.engine.dispose()


def encode_notice(revision: int, regions: Iterable[str]) -> str:
    """NOTIFY payloads stay far below PostgreSQL's 8000-byte cap: past 100 regions, say "*" (all)."""
    names = sorted(set(regions))
    return f"{revision}|{'*' if len(names) > 100 else ','.join(names)}"


def decode_notice(payload: str) -> tuple[int, frozenset[str]]:
    rev, _, regions = payload.partition("|")
    return int(rev), frozenset(r for r in regions.split(",") if r)


def stages_digest(rows: Iterable[Any]) -> bytes:
    """SHA-256 over a secret's stage pointers (stage, version, revision, expiry), in stage order: the
    secret's MAC covers it, so a pointer copied back from an older copy no longer matches."""
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r.stage):
        h.update(rowmac.encode("stage-pointer", (r.stage, r.version, r.revision, r.expires_at)))
    return h.digest()


def _json_list(value: Any, table: str, key: object) -> tuple[str, ...]:
    """A column holding a JSON list of strings, as the control plane writes it. Anything else was
    written by someone else: TamperedRow, as for a failed MAC (not a 500 of its own)."""
    try:
        out = json.loads(value)
    except (TypeError, ValueError, RecursionError):
        out = None
    if not isinstance(out, list) or not all(isinstance(x, str) for x in out):
        raise TamperedRow(table, str(key), "holds a malformed list (written without the root key)")
    return tuple(out)


class Tx:
    """One transaction. Methods are grouped by table; each returns records or plain values."""

    def __init__(self, conn: Connection, dialect: str, store: Store, writing: bool = False) -> None:
        self.conn = conn
        self.dialect = dialect
        self.store = store
        self.writing = writing
        self.revision = 0
        self.changed_regions: set[str] | None = None
        self.tampered: list[tuple[str, str]] = []  # (table, key) of rows a list read left out
        self._names: dict[int, str] = {}
        self._digests: dict[int, bytes | None] = {}  # secret id → the stages digest its checked record holds
        self._keys: RowKeys | None = None
        self._appended: list[tuple[int, bytes, tuple[str, str]]] = []  # revocations this tx added
        self._recorded: set[tuple[int, str]] = set()  # change-log rows this tx wrote
        self._revoked: frozenset[tuple[str, str]] | None = None
        # The revocation chain's length this process had verified before this transaction began: its
        # snapshot shows at least that much. (A transaction that began earlier may see less than the
        # process has verified since, by other transactions: that is its snapshot, not a shortening.)
        self._revocations_floor = store.revocations.count
        self._changes_read = False
        # How far this process had read the change log when this transaction began: its snapshot shows
        # at least that much (see ChangeIndex).
        self._changes_floor = store.changes.read_to
        self.after_commit: list[Callable[[], None]] = []  # run once this transaction has committed

    def keys(self) -> RowKeys:
        return self._keys or self.store.row_keys()

    def use_keys(self, keys: RowKeys) -> None:
        """Use these row keys in this transaction (``init``, which holds the root key before any unseal)."""
        self._keys = keys

    # -- change notices ------------------------------------------------------------------------
    def changed(self, regions: Iterable[str]) -> None:
        if self.changed_regions is None:
            self.changed_regions = set()
        self.changed_regions.update(regions)

    def _insert_ignore(self, table: Any, values: dict[str, Any]) -> bool:
        """INSERT that does nothing on a key conflict; True when the row went in. (A plain INSERT
        failing would abort the whole PostgreSQL transaction.)"""
        ins = pg_insert(table) if self.dialect == "postgresql" else sqlite_insert(table)
        key = next(iter(table.primary_key.columns))
        stmt = ins.values(**values).on_conflict_do_nothing().returning(key)
        return self.conn.execute(stmt).first() is not None

    # -- meta and counters ---------------------------------------------------------------------
    def get_meta(self) -> dict[str, str]:
        return {r.key: r.value for r in self.conn.execute(select(t.meta))}

    def add_meta(self, key: str, value: str) -> bool:
        return self._insert_ignore(t.meta, {"key": key, "value": value})

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute(update(t.meta).where(t.meta.c.key == key).values(value=value))

    def put_meta(self, key: str, value: str) -> None:
        """Insert or replace."""
        if not self.add_meta(key, value):
            self.set_meta(key, value)

    def delete_meta(self, key: str) -> None:
        self.conn.execute(delete(t.meta).where(t.meta.c.key == key))

    def _bump(self, row: int) -> int:
        return int(
            self.conn.execute(
                update(t.counter)
                .where(t.counter.c.id == row)
                .values(revision=t.counter.c.revision + 1)
                .returning(t.counter.c.revision)
            ).scalar_one()
        )

    def lock_writers(self) -> None:
        self.conn.execute(select(t.counter.c.revision).where(t.counter.c.id == _REVISION_ROW).with_for_update())

    def next_revision(self) -> int:
        """Take the next global revision (once per transaction; later calls return the same)."""
        if not self.revision:
            self.revision = self._bump(_REVISION_ROW)
        return self.revision

    def current_revision(self) -> int:
        return int(self.conn.execute(select(t.counter.c.revision).where(t.counter.c.id == _REVISION_ROW)).scalar_one())

    # -- regions -------------------------------------------------------------------------------
    def insert_region(self, name: str, rev: int, at: float) -> bool:
        return self._insert_ignore(t.regions, {"name": name, "key_version": 1, "data_rev": rev, "created_at": at})

    def get_region(self, name: str) -> Region | None:
        row = self.conn.execute(select(t.regions).where(t.regions.c.name == name)).first()
        return Region(**row._mapping) if row else None

    def list_regions(self) -> list[Region]:
        return [Region(**r._mapping) for r in self.conn.execute(select(t.regions).order_by(t.regions.c.name))]

    def region_counts(self) -> dict[str, tuple[int, int]]:
        """region → (active nodes, secrets wrapped for it)."""
        nodes = dict(
            self.conn.execute(
                select(t.nodes.c.region, func.count()).where(t.nodes.c.status == "active").group_by(t.nodes.c.region)
            ).all()
        )
        secrets = dict(
            self.conn.execute(
                select(t.data_key_wraps.c.region, func.count(func.distinct(t.data_key_wraps.c.secret_id)))
                .join(t.secrets, t.secrets.c.id == t.data_key_wraps.c.secret_id)
                .where(t.secrets.c.deleted_at.is_(None))
                .group_by(t.data_key_wraps.c.region)
            ).all()
        )
        return {r: (int(nodes.get(r, 0)), int(secrets.get(r, 0))) for r in set(nodes) | set(secrets)}

    def set_region_key_version(self, name: str, key_version: int) -> None:
        self.conn.execute(update(t.regions).where(t.regions.c.name == name).values(key_version=key_version))

    def touch_regions(self, names: Iterable[str], rev: int) -> None:
        """What these regions' nodes see changed at ``rev``; wake them at commit."""
        names = set(names)
        if names:
            self.conn.execute(update(t.regions).where(t.regions.c.name.in_(names)).values(data_rev=rev))
            self.changed(names)

    def insert_region_key(self, region: str, version: int, wrapped: bytes, at: float, root_version: int = 1) -> None:
        self.conn.execute(
            insert(t.region_keys).values(
                region=region, version=version, wrapped=wrapped, created_at=at, root_version=root_version
            )
        )

    def get_region_key(self, region: str, version: int) -> bytes | None:
        row = self.get_region_key_row(region, version)
        return row[0] if row else None

    def get_region_key_row(self, region: str, version: int) -> tuple[bytes, int] | None:
        """(wrapped key, the root key version that wraps it)."""
        row = self.conn.execute(
            select(t.region_keys.c.wrapped, t.region_keys.c.root_version).where(
                t.region_keys.c.region == region, t.region_keys.c.version == version
            )
        ).first()
        return (bytes(row.wrapped), int(row.root_version)) if row else None

    def list_region_keys(self) -> list[tuple[str, int, bytes, int]]:
        """Every stored region key: (region, version, wrapped, root version)."""
        rk = t.region_keys
        q = select(rk.c.region, rk.c.version, rk.c.wrapped, rk.c.root_version).order_by(rk.c.region, rk.c.version)
        return [(r.region, int(r.version), bytes(r.wrapped), int(r.root_version)) for r in self.conn.execute(q)]

    def rewrap_region_key(self, region: str, version: int, wrapped: bytes, root_version: int) -> None:
        rk = t.region_keys
        self.conn.execute(
            update(rk)
            .where(rk.c.region == region, rk.c.version == version)
            .values(wrapped=wrapped, root_version=root_version)
        )

    # -- root key versions (crypto/seal.py) ------------------------------------------------------------
    def root_key_versions(self) -> dict[int, bytes]:
        """Stored root key versions (≥ 2), wrapped."""
        return {int(r.version): bytes(r.wrapped) for r in self.conn.execute(select(t.root_keys))}

    def current_root_version(self) -> int:
        v = self.conn.execute(select(func.max(t.root_keys.c.version))).scalar_one_or_none()
        return int(v) if v else 1

    def insert_root_version(self, version: int, wrapped: bytes, at: float) -> None:
        self.conn.execute(insert(t.root_keys).values(version=version, wrapped=wrapped, created_at=at))

    def delete_root_versions_before(self, version: int) -> None:
        self.conn.execute(delete(t.root_keys).where(t.root_keys.c.version < version))

    def delete_region_keys_before(self, region: str, version: int) -> None:
        self.conn.execute(
            delete(t.region_keys).where(t.region_keys.c.region == region, t.region_keys.c.version < version)
        )

    # -- secrets -------------------------------------------------------------------------------
    @staticmethod
    def _secret_fields(m: Any) -> tuple[Any, ...]:
        """What a secret's MAC covers: its identity, where it may be decrypted, how far its versions
        go, the revision of its last change (checked against the change log), whether it is deleted,
        and its schedule (not the scheduler's next due time)."""
        fields = (
            m["id"],
            m["name"],
            _json_list(m["regions"], "secrets", m["name"]) if isinstance(m["regions"], str) else m["regions"],
            m["latest_version"],
            m["revision"],
            m["deleted_at"],
            int(m["destroyed"]),
            m["generate"],
            m["rotate_every_s"],
            m["grace_s"],
            None if m["stages_digest"] is None else bytes(m["stages_digest"]),
        )
        # The rotator binding (0005) joins the MAC only when set: a record made before it keeps its MAC.
        return (*fields, m["rotator"]) if m.get("rotator") is not None else fields

    def _secret(self, row: Any) -> Secret:
        self.require_whole_change_log()
        m = {k: v for k, v in row._mapping.items() if k in _SECRET_FIELDS}
        digest = m.pop("stages_digest")
        self._digests[m["id"]] = None if digest is None else bytes(digest)
        if not self.keys().check("secret", m.pop("mac"), *self._secret_fields(row._mapping)):
            raise TamperedRow("secrets", str(m["name"]))
        if m["revision"] < self.last_change(m["name"]):
            raise TamperedRow(
                "secrets",
                str(m["name"]),
                "is older than its last change in the change log (rows copied back from an older copy)",
            )
        m["regions"] = _json_list(m["regions"], "secrets", m["name"])
        m["destroyed"] = bool(m["destroyed"])
        self._names[m["id"]] = m["name"]
        return Secret(**m)

    def _reseal_secret(self, secret_id: int) -> None:
        """Re-make a secret's MAC, binding its current stage pointers through their digest."""
        stages = self.conn.execute(select(t.stages).where(t.stages.c.secret_id == secret_id)).all()
        digest = stages_digest(stages)
        row = self.conn.execute(select(t.secrets).where(t.secrets.c.id == secret_id)).one()
        tag = self.keys().mac("secret", *self._secret_fields({**row._mapping, "stages_digest": digest}))
        self.conn.execute(update(t.secrets).where(t.secrets.c.id == secret_id).values(stages_digest=digest, mac=tag))

    def get_secret(self, name: str) -> Secret | None:
        row = self._judged(select(t.secrets).where(t.secrets.c.name == name)).first()
        return self._secret(row) if row else None

    def insert_secret(self, name: str, regions: Sequence[str], at: float, rev: int, **extra: Any) -> Secret:
        sid = self.conn.execute(
            insert(t.secrets)
            .values(
                name=name,
                regions=json.dumps(list(regions)),
                latest_version=0,
                created_at=at,
                updated_at=at,
                revision=rev,
                destroyed=0,
                **extra,
            )
            .returning(t.secrets.c.id)
        ).scalar_one()
        self.record_change(rev, name)
        self._reseal_secret(sid)
        row = self.conn.execute(select(t.secrets).where(t.secrets.c.id == sid)).one()
        return self._secret(row)

    def update_secret(self, secret_id: int, **values: Any) -> None:
        if "regions" in values:
            values["regions"] = json.dumps(list(values["regions"]))
        if "destroyed" in values:
            values["destroyed"] = int(values["destroyed"])
        self.conn.execute(update(t.secrets).where(t.secrets.c.id == secret_id).values(**values))
        if "revision" in values:
            self.record_change(values["revision"], self._name_of(secret_id))
        if not set(values) <= {"updated_at", "next_rotation_at"}:
            self._reseal_secret(secret_id)

    def list_secrets(self, prefix: str = "", include_deleted: bool = False) -> list[Secret]:
        q = select(t.secrets).order_by(t.secrets.c.name)
        if prefix:
            q = q.where(t.secrets.c.name.startswith(prefix, autoescape=True))
        if not include_deleted:
            q = q.where(t.secrets.c.deleted_at.is_(None))
        return [self._secret(r) for r in self._judged(q)]

    def every_region_secrets(self) -> list[Secret]:
        return [
            self._secret(r) for r in self._judged(select(t.secrets).where(t.secrets.c.regions == json.dumps(["*"])))
        ]

    def secrets_due(self, now: float, limit: int = 100) -> list[Secret]:
        q = (
            select(t.secrets)
            .where(t.secrets.c.next_rotation_at <= now, t.secrets.c.deleted_at.is_(None))
            .order_by(t.secrets.c.next_rotation_at)
            .limit(limit)
        )
        return [self._secret(r) for r in self._judged(q)]

    def claim_rotation(self, secret_id: int, expected_at: float, next_at: float) -> bool:
        """Compare-and-set on the schedule: of several replicas, exactly one wins a due rotation."""
        return (
            self.conn.execute(
                update(t.secrets)
                .where(t.secrets.c.id == secret_id, t.secrets.c.next_rotation_at == expected_at)
                .values(next_rotation_at=next_at)
            ).rowcount
            == 1
        )

    # -- versions and wrapped data keys ---------------------------------------------------------
    def insert_version(self, secret_id: int, version: int, ciphertext: bytes, at: float, rev: int, origin: str) -> None:
        self.conn.execute(
            insert(t.secret_versions).values(
                secret_id=secret_id,
                version=version,
                ciphertext=ciphertext,
                created_at=at,
                revision=rev,
                origin=origin,
            )
        )

    def get_version(self, secret_id: int, version: int) -> Version | None:
        row = self.conn.execute(
            select(t.secret_versions).where(
                t.secret_versions.c.secret_id == secret_id, t.secret_versions.c.version == version
            )
        ).first()
        return Version(**row._mapping) if row else None

    def list_versions(self, secret_id: int) -> list[Version]:
        q = select(t.secret_versions).where(t.secret_versions.c.secret_id == secret_id)
        return [Version(**r._mapping) for r in self.conn.execute(q.order_by(t.secret_versions.c.version))]

    def destroy_versions(self, secret_id: int) -> None:
        self.conn.execute(
            update(t.secret_versions).where(t.secret_versions.c.secret_id == secret_id).values(ciphertext=None)
        )
        self.conn.execute(delete(t.data_key_wraps).where(t.data_key_wraps.c.secret_id == secret_id))

    def put_wrap(self, secret_id: int, version: int, region: str, key_version: int, wrapped: bytes) -> None:
        """Insert or replace the wrap of one version's data key for one region."""
        self.conn.execute(
            delete(t.data_key_wraps).where(
                t.data_key_wraps.c.secret_id == secret_id,
                t.data_key_wraps.c.version == version,
                t.data_key_wraps.c.region == region,
            )
        )
        self.conn.execute(
            insert(t.data_key_wraps).values(
                secret_id=secret_id, version=version, region=region, key_version=key_version, wrapped=wrapped
            )
        )

    def get_wraps(self, secret_id: int, version: int) -> list[Wrap]:
        q = select(t.data_key_wraps).where(
            t.data_key_wraps.c.secret_id == secret_id, t.data_key_wraps.c.version == version
        )
        return [Wrap(**r._mapping) for r in self.conn.execute(q.order_by(t.data_key_wraps.c.region))]

    def wraps_in_region(self, region: str) -> list[tuple[str, Wrap]]:
        """(secret name, wrap) for every wrap made for ``region``."""
        q = (
            select(t.secrets.c.name, t.data_key_wraps)
            .join(t.secrets, t.secrets.c.id == t.data_key_wraps.c.secret_id)
            .where(t.data_key_wraps.c.region == region)
        )
        return [
            (r.name, Wrap(r.secret_id, r.version, r.region, r.key_version, r.wrapped)) for r in self.conn.execute(q)
        ]

    def delete_wraps(self, secret_id: int, regions: Iterable[str]) -> None:
        self.conn.execute(
            delete(t.data_key_wraps).where(
                t.data_key_wraps.c.secret_id == secret_id, t.data_key_wraps.c.region.in_(set(regions))
            )
        )

    def wrapped_regions(self, secret_id: int) -> set[str]:
        q = select(t.data_key_wraps.c.region).where(t.data_key_wraps.c.secret_id == secret_id).distinct()
        return set(self.conn.execute(q).scalars())

    # -- stages --------------------------------------------------------------------------------
    def _name_of(self, secret_id: int) -> str:
        name = self._names.get(secret_id)
        if name is None:
            name = self._names[secret_id] = self.conn.execute(
                select(t.secrets.c.name).where(t.secrets.c.id == secret_id)
            ).scalar_one()
        return name

    @staticmethod
    def _stage_fields(name: str, stage: str, version: int, revision: int, expires_at: float | None) -> tuple[Any, ...]:
        """A stage pointer's MAC binds the secret's name (not its row id), the stage, the version, the
        revision it was set at and the end of its grace: one UPDATE cannot point it elsewhere."""
        return (name, stage, version, revision, expires_at)

    def get_stages(self, secret_id: int) -> dict[str, Stage]:
        """A secret's stage pointers, each checked, and all of them together checked against the
        digest its (checked) record holds: a pointer edited, removed or copied back raises TamperedRow."""
        record = self._secret(self._judged(select(t.secrets).where(t.secrets.c.id == secret_id)).one())
        rows = self.conn.execute(select(t.stages).where(t.stages.c.secret_id == secret_id)).all()
        keys, out, name = self.keys(), {}, record.name
        for r in rows:
            if not keys.check("stage", r.mac, *self._stage_fields(name, r.stage, r.version, r.revision, r.expires_at)):
                raise TamperedRow("stages", f"{name}:{r.stage}")
            out[r.stage] = Stage(r.stage, r.version, r.revision, r.expires_at)
        if stages_digest(rows) != self._digests[secret_id]:
            raise TamperedRow("stages", name, "do not match the secret's record (edited, removed or copied back)")
        return out

    def set_stage(
        self, secret_id: int, stage: str, version: int | None, rev: int, at: float, expires_at: float | None = None
    ) -> None:
        """Point ``stage`` at ``version`` (None removes it), and log the move."""
        self.conn.execute(delete(t.stages).where(t.stages.c.secret_id == secret_id, t.stages.c.stage == stage))
        if version is not None:
            tag = self.keys().mac(
                "stage", *self._stage_fields(self._name_of(secret_id), stage, version, rev, expires_at)
            )
            self.conn.execute(
                insert(t.stages).values(
                    secret_id=secret_id, stage=stage, version=version, revision=rev, expires_at=expires_at, mac=tag
                )
            )
        self.conn.execute(
            insert(t.stage_log).values(secret_id=secret_id, stage=stage, version=version, revision=rev, at=at)
        )
        self.update_secret(secret_id, revision=rev)  # a change of the secret: logged, and its record re-MAC'd

    def clear_stages(self, secret_id: int, rev: int, at: float) -> None:
        """Remove every stage of a secret (tampered ones too: removing is never a gain)."""
        q = select(t.stages.c.stage).where(t.stages.c.secret_id == secret_id)
        for stage in list(self.conn.execute(q).scalars()):
            self.set_stage(secret_id, stage, None, rev, at)

    def expired_stages(self, now: float) -> list[tuple[Secret, str]]:
        q = (
            select(t.secrets, t.stages.c.stage)
            .join(t.stages, t.stages.c.secret_id == t.secrets.c.id)
            .where(t.stages.c.expires_at.is_not(None), t.stages.c.expires_at <= now)
        )
        rows = self._judged(q).all()
        return [(self._secret(r), r.stage) for r in rows]

    def stage_log(self, secret_id: int, stage: str = "current") -> list[tuple[int, int | None]]:
        """(revision, version) of every move of ``stage``, oldest first."""
        q = (
            select(t.stage_log.c.revision, t.stage_log.c.version)
            .where(t.stage_log.c.secret_id == secret_id, t.stage_log.c.stage == stage)
            .order_by(t.stage_log.c.revision, t.stage_log.c.id)
        )
        return [(int(r.revision), r.version) for r in self.conn.execute(q)]

    def region_snapshot(self, region: str, now: float, names: Collection[str] | None = None) -> list[SnapshotRow]:
        """Every staged, unexpired, undestroyed version a node of ``region`` may decrypt (of ``names``
        only, when given). Residency is by construction: a secret has a wrap for a region only if it is
        allowed there. A secret whose record, stage pointers or place in the change log fails its check
        is left out (named in ``self.tampered``): the rest still syncs."""
        s, st, v, w = t.secrets, t.stages, t.secret_versions, t.data_key_wraps
        q = (
            select(
                s.c.id,
                s.c.name,
                s.c.regions,
                s.c.latest_version,
                s.c.revision,
                s.c.deleted_at,
                s.c.destroyed,
                s.c.generate,
                s.c.rotate_every_s,
                s.c.grace_s,
                s.c.stages_digest,
                s.c.rotator,
                s.c.mac.label("secret_mac"),
                st.c.version,
                st.c.stage,
                st.c.revision.label("stage_revision"),
                st.c.expires_at,
                st.c.mac.label("stage_mac"),
                v.c.created_at,
                v.c.ciphertext,
                w.c.key_version,
                w.c.wrapped,
            )
            .join(st, st.c.secret_id == s.c.id)
            .join(v, and_(v.c.secret_id == s.c.id, v.c.version == st.c.version))
            .join(w, and_(w.c.secret_id == s.c.id, w.c.version == st.c.version, w.c.region == region))
            .where(
                s.c.deleted_at.is_(None),
                v.c.ciphertext.is_not(None),
                or_(st.c.expires_at.is_(None), st.c.expires_at > now),
                *([s.c.name.in_(sorted(names))] if names is not None else []),
            )
            .order_by(s.c.name, st.c.version)
        )
        self.require_whole_change_log()
        self.refresh_changes()  # before the rows: a change committed meanwhile is never taken for a rollback
        rows = self.conn.execute(q).all()
        keys, bad = self.keys(), set()
        for r in {r.id: r for r in rows}.values():  # each secret's record once
            if not (
                keys.check("secret", r.secret_mac, *self._secret_fields(r._mapping))
                and r.revision >= self.last_change(r.name)
            ):
                bad.add(r.id)
                self.tampered.append(("secrets", r.name))
        pointers: dict[int, list[Any]] = {}
        ids = sorted({r.id for r in rows} - bad)
        for i in range(0, len(ids), 500):  # every pointer, expired ones too: the digest covers them all
            for p in self.conn.execute(select(st).where(st.c.secret_id.in_(ids[i : i + 500]))):
                pointers.setdefault(p.secret_id, []).append(p)
        for r in {r.id: r for r in rows if r.id not in bad}.values():
            if stages_digest(pointers.get(r.id, [])) != bytes(r.stages_digest or b""):
                bad.add(r.id)
                self.tampered.append(("stages", r.name))
        out = []
        for r in rows:
            if r.id in bad:
                continue
            if not keys.check(
                "stage", r.stage_mac, *self._stage_fields(r.name, r.stage, r.version, r.stage_revision, r.expires_at)
            ):
                self.tampered.append(("stages", f"{r.name}:{r.stage}"))
                continue
            out.append(
                SnapshotRow(
                    r.name, r.version, r.stage, r.expires_at, r.created_at, r.ciphertext, r.key_version, r.wrapped
                )
            )
        return out

    # -- nodes and grants ----------------------------------------------------------------------
    @staticmethod
    def _node_fields(n: Any) -> tuple[Any, ...]:
        """A node's MAC binds who it is: id, region, both public keys, hostname, status, enrolment time,
        and (nodes enrolled since migration 0004) the join token that enrolled it with the revision of
        its enrolment, which a retry of that enrolment is answered from. A node from before has no such
        pair in its field list, so its MAC stays valid; a writer can neither add the pair nor strip it.
        (Its contact times and revisions are reports, not authority, and change on every poll.)"""
        fields = (n.id, n.region, bytes(n.box_public), bytes(n.sign_public), n.hostname, n.status, n.enrolled_at)
        return fields if n.join_token_id is None else (*fields, n.join_token_id, n.enrolled_rev)

    def _node(self, row: Any, revoked: frozenset[tuple[str, str]] | None = None) -> Node | None:
        """The node, with status ``revoked`` when the revocation chain says so; None if tampered.
        (On the hub's path: a region view checks every node of the region, so this stays lean.)"""
        fields = (row.id, row.region, row.box_public, row.sign_public, row.hostname, row.status, row.enrolled_at)
        if row.join_token_id is not None:
            fields = (*fields, row.join_token_id, row.enrolled_rev)
        if not self.keys().check("node", row.mac, *fields):
            self.tampered.append(("nodes", row.id))
            return None
        if revoked is None:
            revoked = self.revoked()
        status = "revoked" if ("node", row.id) in revoked else row.status
        return Node(
            row.id,
            row.region,
            bytes(row.box_public),
            bytes(row.sign_public),
            row.hostname,
            status,
            row.enrolled_at,
            row.last_seen,
            row.applied_revision,
            row.node_rev,
            row.join_token_id,
            row.enrolled_rev,
            row.egress,
        )

    def _nodes(self, q: Any) -> list[Node]:
        revoked = self.revoked()
        return [n for n in (self._node(r, revoked) for r in self.conn.execute(q)) if n is not None]

    def insert_node(self, node: Node) -> None:
        tag = self.keys().mac("node", *self._node_fields(node))
        self.conn.execute(insert(t.nodes).values(**node.__dict__, mac=tag))

    def get_node(self, node_id: str) -> Node | None:
        """The node, or None if absent; TamperedRow if its row fails its MAC."""
        row = self.conn.execute(select(t.nodes).where(t.nodes.c.id == node_id)).first()
        if row is None:
            return None
        node = self._node(row)
        if node is None:
            raise TamperedRow("nodes", node_id)
        return node

    def node_enrolled_by(self, token_id: str) -> Node | None:
        """The node the join token ``token_id`` enrolled, if its row is intact and says so (its MAC
        binds the token's id); None if there is none; TamperedRow if its row fails its MAC."""
        row = self.conn.execute(select(t.nodes).where(t.nodes.c.join_token_id == token_id)).first()
        if row is None:
            return None
        node = self._node(row)
        if node is None:
            raise TamperedRow("nodes", row.id)
        return node

    def list_nodes(self, region: str | None = None, status: str | None = None) -> list[Node]:
        """Intact nodes (tampered rows are left out and named in ``self.tampered``)."""
        q = select(t.nodes).order_by(t.nodes.c.region, t.nodes.c.id)
        if region is not None:
            q = q.where(t.nodes.c.region == region)
        nodes = self._nodes(q)
        return [n for n in nodes if n.status == status] if status is not None else nodes

    def list_nodes_by_id(self, node_id: str) -> list[Node]:
        """The node with this id if its row is intact (else [], the row named in ``self.tampered``)."""
        return self._nodes(select(t.nodes).where(t.nodes.c.id == node_id))

    def nodes_in_regions(self, regions: Iterable[str]) -> list[Node]:
        q = select(t.nodes).where(t.nodes.c.region.in_(set(regions))).order_by(t.nodes.c.region, t.nodes.c.id)
        return self._nodes(q)

    def set_node_status(self, node_id: str, status: str, rev: int) -> None:
        node = self.get_node(node_id)
        assert node is not None
        tag = self.keys().mac("node", *self._node_fields(replace(node, status=status)))
        self.conn.execute(update(t.nodes).where(t.nodes.c.id == node_id).values(status=status, node_rev=rev, mac=tag))

    def put_grant(self, node_id: str, region: str, key_version: int, sealed: bytes, rev: int) -> None:
        self.conn.execute(
            insert(t.grants).values(
                node_id=node_id, region=region, key_version=key_version, sealed=sealed, revision=rev
            )
        )
        self.conn.execute(update(t.nodes).where(t.nodes.c.id == node_id).values(node_rev=rev))

    def delete_grants(self, region: str, node_id: str | None = None, before_version: int | None = None) -> None:
        q = delete(t.grants).where(t.grants.c.region == region)
        if node_id is not None:
            q = q.where(t.grants.c.node_id == node_id)
        if before_version is not None:
            q = q.where(t.grants.c.key_version < before_version)
        self.conn.execute(q)

    def region_members(self, region: str, only: Collection[str] | None = None) -> tuple[list[Node], list[Grant]]:
        """Every intact node of ``region`` (or only those of ids ``only``) and their grants, for the
        sync hub's per-region view."""
        where = [t.nodes.c.region == region]
        if only is not None:
            where.append(t.nodes.c.id.in_(list(only)))
        nodes = self._nodes(select(t.nodes).where(*where))
        intact = {n.id for n in nodes}
        grants = [
            Grant(**r._mapping)
            for r in self.conn.execute(
                select(t.grants)
                .join(t.nodes, t.nodes.c.id == t.grants.c.node_id)
                .where(*where)
                .order_by(t.grants.c.node_id, t.grants.c.key_version)
            )
            if r.node_id in intact
        ]
        return nodes, grants

    def region_member_revs(self, region: str) -> dict[str, int]:
        """Each node row of ``region``: its id and ``node_rev``, unchecked (``node_rev`` is outside the
        row's MAC). A hint of which rows changed since the hub last read them, never authority."""
        q = select(t.nodes.c.id, t.nodes.c.node_rev).where(t.nodes.c.region == region)
        return {r.id: r.node_rev for r in self.conn.execute(q)}

    # -- join tokens ---------------------------------------------------------------------------
    @staticmethod
    def _join_fields(j: JoinToken) -> tuple[Any, ...]:
        return (j.id, bytes(j.digest), j.region, j.created_at, j.expires_at)

    def insert_join_token(self, token: JoinToken) -> None:
        tag = self.keys().mac("join-token", *self._join_fields(token))
        self.conn.execute(insert(t.join_tokens).values(**token.__dict__, mac=tag))

    def get_join_token(self, token_id: str) -> JoinToken | None:
        """The join token, its ``used_at`` set when the revocation chain records it used (whatever its
        row says); TamperedRow if its row fails its MAC."""
        row = self.conn.execute(select(t.join_tokens).where(t.join_tokens.c.id == token_id)).first()
        if row is None:
            return None
        m = dict(row._mapping)
        tag = m.pop("mac")
        token = JoinToken(**{**m, "digest": bytes(m["digest"])})
        if not self.keys().check("join-token", tag, *self._join_fields(token)):
            raise TamperedRow("join_tokens", token_id)
        if self.is_revoked("join", token_id) and token.used_at is None:
            token = replace(token, used_at=token.created_at)
        return token

    def use_join_token(self, token_id: str, at: float, node_id: str) -> bool:
        """Mark used, once: False if another enrolment used it first. The use is also appended to the
        revocation chain, so copying back the unused row does not make it usable again."""
        used = (
            self.conn.execute(
                update(t.join_tokens)
                .where(t.join_tokens.c.id == token_id, t.join_tokens.c.used_at.is_(None))
                .values(used_at=at, used_by=node_id)
            ).rowcount
            == 1
        )
        if used:
            self.append_revocation("join", token_id, at)
        return used

    # -- operator tokens -----------------------------------------------------------------------
    @staticmethod
    def _op_fields(tok: OperatorToken, digest: bytes, legacy: int) -> tuple[Any, ...]:
        """Everything but ``revoked_at``, which the revocation chain decides."""
        return (
            tok.id,
            bytes(digest),
            tok.name,
            tuple(tok.prefixes),
            tuple(tok.verbs),
            tok.created_at,
            tok.expires_at,
            tok.parent_id,
            legacy,
        )

    def insert_operator_token(self, token: OperatorToken, digest: bytes) -> None:
        values = dict(token.__dict__, digest=digest, legacy_digest=0)
        values["prefixes"] = json.dumps(list(token.prefixes))
        values["verbs"] = json.dumps(list(token.verbs))
        values["mac"] = self.keys().mac("operator-token", *self._op_fields(token, digest, 0))
        self.conn.execute(insert(t.operator_tokens).values(**values))

    def _op_token(self, row: Any) -> OperatorToken:
        m = dict(row._mapping)
        digest, tag, legacy = bytes(m.pop("digest")), m.pop("mac"), int(m.pop("legacy_digest"))
        m["prefixes"] = _json_list(m["prefixes"], "operator_tokens", m["id"])
        m["verbs"] = _json_list(m["verbs"], "operator_tokens", m["id"])
        token = OperatorToken(**m)
        if not self.keys().check("operator-token", tag, *self._op_fields(token, digest, legacy)):
            raise TamperedRow("operator_tokens", token.id)
        if self.is_revoked("token", token.id) and token.revoked_at is None:
            token = replace(token, revoked_at=token.created_at)
        return token

    def find_operator_token(self, digest: bytes, legacy_digest: bytes) -> OperatorToken | None:
        """The token whose keyed digest is ``digest`` (or, for a token adopted from before keyed digests,
        whose plain SHA-256 is ``legacy_digest``: its MAC says which it is)."""
        tok = t.operator_tokens
        row = self.conn.execute(
            select(tok).where(
                or_(
                    and_(tok.c.digest == digest, tok.c.legacy_digest == 0),
                    and_(tok.c.digest == legacy_digest, tok.c.legacy_digest == 1),
                )
            )
        ).first()
        return self._op_token(row) if row else None

    def get_operator_token_by_id(self, token_id: str) -> OperatorToken | None:
        row = self.conn.execute(select(t.operator_tokens).where(t.operator_tokens.c.id == token_id)).first()
        return self._op_token(row) if row else None

    def list_operator_tokens(self) -> list[OperatorToken]:
        q = select(t.operator_tokens).order_by(t.operator_tokens.c.created_at)
        return [self._op_token(r) for r in self.conn.execute(q)]

    def revoke_operator_token(self, token_id: str, at: float) -> list[str]:
        """Revoke the token and every token made from it, at any depth (through tokens revoked before,
        too); the ids newly revoked, ``token_id`` first. Each goes into the revocation chain."""
        tok = t.operator_tokens
        seen, revoked, layer = {token_id}, [], [token_id]
        while layer:
            active = {
                i
                for i in self.conn.execute(
                    select(tok.c.id).where(tok.c.id.in_(layer), tok.c.revoked_at.is_(None))
                ).scalars()
                if not self.is_revoked("token", i)
            }
            if active:
                self.conn.execute(update(tok).where(tok.c.id.in_(active)).values(revoked_at=at))
            revoked += [i for i in layer if i in active]
            children = self.conn.execute(select(tok.c.id).where(tok.c.parent_id.in_(layer))).scalars()
            layer = [c for c in children if c not in seen]
            seen.update(layer)
        for i in revoked:
            self.append_revocation("token", i, at)
        return revoked

    # -- rotators and rotations (0005) ---------------------------------------------------------------
    @staticmethod
    def _rotator_fields(r: Rotator) -> tuple[Any, ...]:
        return (
            r.name,
            r.type,
            r.admin_secret,
            json.dumps(r.config, sort_keys=True, separators=(",", ":")),
            r.created_at,
        )

    def put_rotator(self, r: Rotator) -> None:
        """Insert or replace a rotator (MAC'd: where it connects and which secret it logs in with)."""
        tag = self.keys().mac("rotator", *self._rotator_fields(r))
        self.conn.execute(delete(t.rotators).where(t.rotators.c.name == r.name))
        self.conn.execute(
            insert(t.rotators).values(
                name=r.name,
                type=r.type,
                admin_secret=r.admin_secret,
                created_at=r.created_at,
                mac=tag,
                config=json.dumps(r.config, sort_keys=True, separators=(",", ":")),
            )
        )

    def _rotator(self, row: Any) -> Rotator:
        r = Rotator(row.name, row.type, row.admin_secret, json.loads(row.config), row.created_at)
        if not self.keys().check("rotator", row.mac, r.name, r.type, r.admin_secret, row.config, r.created_at):
            raise TamperedRow("rotators", r.name)
        return r

    def get_rotator(self, name: str) -> Rotator | None:
        row = self.conn.execute(select(t.rotators).where(t.rotators.c.name == name)).first()
        return self._rotator(row) if row else None

    def list_rotators(self) -> list[Rotator]:
        return [self._rotator(r) for r in self.conn.execute(select(t.rotators).order_by(t.rotators.c.name))]

    def delete_rotator(self, name: str) -> bool:
        return self.conn.execute(delete(t.rotators).where(t.rotators.c.name == name)).rowcount == 1

    def secret_names_with_rotator(self, rotator: str) -> list[str]:
        """Names of live secrets bound to ``rotator`` (a refusal check: a tampered row only refuses more)."""
        q = select(t.secrets.c.name).where(t.secrets.c.rotator == rotator, t.secrets.c.deleted_at.is_(None))
        return list(self.conn.execute(q).scalars())

    def rotators_using_admin(self, secret: str) -> list[str]:
        q = select(t.rotators.c.name).where(t.rotators.c.admin_secret == secret)
        return list(self.conn.execute(q).scalars())

    @staticmethod
    def _rotation_fields(r: Any) -> tuple[Any, ...]:
        """What a rotation's MAC covers: which secret and rotator, the step and since when, the versions
        it moves between, the revision that published it and the end of its grace."""
        return (
            r.id,
            r.secret,
            r.rotator,
            r.step,
            r.since,
            r.started_at,
            r.origin,
            r.version,
            r.previous_version,
            r.published_rev,
            r.retire_after,
        )

    _ROTATION_MACD = (
        "secret",
        "rotator",
        "step",
        "since",
        "started_at",
        "origin",
        "version",
        "previous_version",
        "published_rev",
        "retire_after",
    )

    def _rotation(self, row: Any) -> Rotation:
        if not self.keys().check("rotation", row.mac, *self._rotation_fields(row)):
            raise TamperedRow("rotations", str(row.id))
        m = {k: v for k, v in row._mapping.items() if k != "mac"}
        m["waiting_for"] = json.loads(m["waiting_for"]) if m["waiting_for"] else None
        m["attempts"] = int(m["attempts"] or 0)
        return Rotation(**m)

    def insert_rotation(self, secret: str, rotator: str, at: float, origin: str) -> Rotation:
        rid = self.conn.execute(
            insert(t.rotations)
            .values(
                secret=secret,
                rotator=rotator,
                step="create",
                since=at,
                started_at=at,
                origin=origin,
                attempts=0,
                mac=b"",
            )
            .returning(t.rotations.c.id)
        ).scalar_one()
        row = self.conn.execute(select(t.rotations).where(t.rotations.c.id == rid)).one()
        tag = self.keys().mac("rotation", *self._rotation_fields(row))
        self.conn.execute(update(t.rotations).where(t.rotations.c.id == rid).values(mac=tag))
        got = self.get_rotation(rid)
        assert got is not None
        return got

    def get_rotation(self, rotation_id: int) -> Rotation | None:
        row = self.conn.execute(select(t.rotations).where(t.rotations.c.id == rotation_id)).first()
        return self._rotation(row) if row else None

    def rotations_of(self, secret: str, limit: int = 20) -> list[Rotation]:
        q = select(t.rotations).where(t.rotations.c.secret == secret).order_by(t.rotations.c.id.desc()).limit(limit)
        return [self._rotation(r) for r in self.conn.execute(q)]

    def active_rotations(self) -> list[Rotation]:
        q = select(t.rotations).where(t.rotations.c.step.not_in(("done", "aborted"))).order_by(t.rotations.c.id)
        return [self._rotation(r) for r in self.conn.execute(q)]

    def update_rotation(self, rotation: Rotation, expect_step: str, **values: Any) -> Rotation | None:
        """Move a rotation on (a compare-and-set on its step: of several replicas, one moves it) and
        re-MAC it; clears the lease and the back-off. None when its step was no longer ``expect_step``."""
        new = replace(rotation, **values)
        macd = {k: getattr(new, k) for k in self._ROTATION_MACD}
        tag = self.keys().mac("rotation", *self._rotation_fields(new))
        res = self.conn.execute(
            update(t.rotations)
            .where(t.rotations.c.id == rotation.id, t.rotations.c.step == expect_step)
            .values(**macd, mac=tag, lease_owner=None, lease_until=None, attempts=0, next_try_at=None, last_error=None)
        )
        return new if res.rowcount == 1 else None

    def lease_rotation(self, rotation_id: int, step: str, owner: str, now: float, until: float) -> bool:
        """Claim a rotation's step for ``owner`` until ``until`` (a compare-and-set: a step whose lease
        is held by another replica, or whose back-off has not passed, is not claimed)."""
        r = t.rotations.c
        return (
            self.conn.execute(
                update(t.rotations)
                .where(
                    r.id == rotation_id,
                    r.step == step,
                    or_(r.lease_until.is_(None), r.lease_until < now),
                    or_(r.next_try_at.is_(None), r.next_try_at <= now),
                )
                .values(lease_owner=owner, lease_until=until)
            ).rowcount
            == 1
        )

    def release_leases(self, prefix: str, keep: str) -> int:
        """End the leases held under ``prefix`` (this replica) by anyone but ``keep`` (this process)."""
        r = t.rotations.c
        return self.conn.execute(
            update(t.rotations)
            .where(r.lease_owner.startswith(prefix, autoescape=True), r.lease_owner != keep)
            .values(lease_owner=None, lease_until=None)
        ).rowcount

    def note_rotation(self, rotation_id: int, **values: Any) -> None:
        """Bookkeeping outside the MAC: back-off, the last error (never a value), who retire waits for."""
        if "waiting_for" in values and values["waiting_for"] is not None:
            values["waiting_for"] = json.dumps(values["waiting_for"], sort_keys=True)
        self.conn.execute(update(t.rotations).where(t.rotations.c.id == rotation_id).values(**values))

    # -- the change log --------------------------------------------------------------------------
    def record_change(self, revision: int, target: str) -> None:
        """Write (once) the change-log row saying ``revision`` changed ``target`` (a secret's name, "" for
        none, BASE_TARGET for the base)."""
        if (revision, target) in self._recorded:
            return
        tag = self.keys().mac("change", revision, target)
        self.conn.execute(insert(t.changes).values(revision=revision, target=target, mac=tag))
        self._recorded.add((revision, target))

    def close_revision(self) -> None:
        """At commit: a revision taken that changed no secret still gets its row, so the log stays dense."""
        if self.revision and not any(r == self.revision for r, _ in self._recorded):
            self.record_change(self.revision, "")

    def refresh_changes(self) -> None:
        """Read the change-log rows committed since this process last looked (read transactions only:
        they see committed rows alone). A row that fails its MAC raises TamperedRow."""
        if self.writing or self._changes_read:
            return
        self._changes_read = True
        cache = self.store.changes
        with cache.lock:
            rows = self.conn.execute(
                select(t.changes).where(t.changes.c.revision > cache.read_to).order_by(t.changes.c.revision)
            ).all()
            keys = self.keys()
            for r in rows:
                if not keys.check("change", r.mac, r.revision, r.target):
                    raise TamperedRow("changes", str(r.revision))
                if r.target and cache.last.get(r.target, 0) < r.revision:
                    cache.last[r.target] = r.revision
                    cache.recent[r.target] = (*cache.recent.get(r.target, ()), r.revision)[-ChangeIndex.KEEP :]
                cache.read_to = max(cache.read_to, r.revision)
            if rows:  # this snapshot holds rows past what the process had read: so it holds all it has read
                self._changes_floor = max(self._changes_floor, cache.read_to)

    def changed_since(self, revision: int) -> set[str] | None:
        """The secrets the change log says changed after ``revision``; None when the log as this
        process has read it does not reach back that far (then only a full read will do)."""
        self.refresh_changes()
        cache = self.store.changes
        with cache.lock:  # (another thread's refresh adds names to it)
            if cache.read_to < revision:
                return None
            return {n for n, rev in cache.last.items() if rev > revision and n != BASE_TARGET}

    def changes_read_to(self) -> int:
        """How far this process has read the change log."""
        self.refresh_changes()
        return self.store.changes.read_to

    def _judged(self, q: Executable) -> CursorResult[Any]:
        """Run ``q``, which reads rows judged against the change log (secrets, egress routes), after
        reading the log: on PostgreSQL each statement sees what was committed when it began, so a log
        read after the rows could hold a change committed since, and take the rows for a rollback."""
        self.refresh_changes()
        return self.conn.execute(q)

    def last_change(self, name: str) -> int:
        """The revision of ``name``'s last change as the change log says (0 if it says nothing), among
        the changes this transaction is sure to see: in a read transaction, those this process had read
        before it began (a later one may be past its snapshot). Writers see every commit."""
        self.refresh_changes()
        cache = self.store.changes
        last = cache.last.get(name, 0)
        if self.writing or last <= self._changes_floor:
            return last
        recent = cache.recent.get(name, ())
        seen = [rev for rev in recent if rev <= self._changes_floor]
        if seen or len(recent) < ChangeIndex.KEEP:
            return max(seen, default=0)
        row = self.conn.execute(  # more changes since this transaction began than kept: ask the log
            select(t.changes)
            .where(t.changes.c.target == name, t.changes.c.revision <= self._changes_floor)
            .order_by(t.changes.c.revision.desc())
            .limit(1)
        ).first()
        if row is None:
            return 0
        if not self.keys().check("change", row.mac, row.revision, row.target):
            raise TamperedRow("changes", str(row.revision))
        return int(row.revision)

    def change_log_gap(self) -> str | None:
        """None when the log is whole from its base to the current revision; else what is wrong."""
        current = self.current_revision()
        base = self.conn.execute(select(t.changes).where(t.changes.c.target == BASE_TARGET)).first()
        if base is None or not self.keys().check("change", base.mac, base.revision, BASE_TARGET):
            return "the change log has no valid base"
        have = int(
            self.conn.execute(
                select(func.count(func.distinct(t.changes.c.revision))).where(
                    t.changes.c.revision > base.revision, t.changes.c.revision <= current
                )
            ).scalar_one()
        )
        missing = current - base.revision - have
        return f"{missing} revision(s) missing from the change log" if missing > 0 else None

    def restart_revisions(self, to: int) -> None:
        """After a restore: revisions go on from ``to`` (far past any the lost control plane reached),
        and the change log is whole from there (its base moves to ``to``; the rows below stay, each
        secret's last change with them)."""
        self.conn.execute(update(t.counter).where(t.counter.c.id == _REVISION_ROW).values(revision=to))
        self.conn.execute(delete(t.changes).where(t.changes.c.target == BASE_TARGET))
        self.record_change(to, BASE_TARGET)

    def require_whole_change_log(self) -> None:
        failure = self.store.integrity_failure
        if failure is not None:
            raise TamperedRow("changes", "log", failure)

    # -- revocations ---------------------------------------------------------------------------
    def revoked(self) -> frozenset[tuple[str, str]]:
        """Every (kind, target) in the revocation chain, verified. The chain is read once per process
        and then only its new records; a chain shorter than one this process has verified, a gap or
        a record that fails its MAC raises TamperedRow."""
        cache = self.store.revocations
        if self._appended:  # this transaction's own, uncommitted records: not for the shared cache
            return cache.revoked | {a for _, _, a in self._appended}
        if self._revoked is not None:  # read once per transaction (a view load checks a thousand nodes)
            return self._revoked
        self._revoked = self._read_revocations(cache)
        return self._revoked

    def _read_revocations(self, cache: Revocations) -> frozenset[tuple[str, str]]:
        head = int(
            self.conn.execute(select(t.counter.c.revision).where(t.counter.c.id == _REVOCATION_ROW)).scalar_one()
        )
        if head == cache.count:
            return cache.revoked
        with cache.lock:
            if head < self._revocations_floor:
                raise TamperedRow(
                    "revocations",
                    f"shorter ({head}) than this process had seen "
                    f"({self._revocations_floor}) when the transaction began",
                )
            if head <= cache.count:  # an older snapshot than the chain verified since: take the newer
                return cache.revoked  # (what was revoked meanwhile counts as revoked here too)
            rows = self.conn.execute(
                select(t.revocations)
                .where(t.revocations.c.seq > cache.count, t.revocations.c.seq <= head)
                .order_by(t.revocations.c.seq)
            ).all()
            keys, count, last, added = self.keys(), cache.count, cache.last_mac, set()
            for r in rows:
                if r.seq != count + 1 or not keys.check("revocation", r.mac, r.seq, r.kind, r.target, r.at, last):
                    raise TamperedRow("revocations", str(count + 1))
                count, last = r.seq, bytes(r.mac)
                added.add((r.kind, r.target))
            if count != head:
                raise TamperedRow("revocations", str(count + 1))
            # the set before the count: a reader that sees the new count without the lock
            # (``head == cache.count``) gets the set that goes with it
            cache.revoked = cache.revoked | added
            cache.last_mac, cache.count = last, count
            return cache.revoked

    def is_revoked(self, kind: str, target: str) -> bool:
        return (kind, target) in self.revoked()

    def append_revocation(self, kind: str, target: str, at: float) -> int:
        """Append to the chain (verified first: nothing is chained onto a forged tail). The process's
        cache learns of it only by reading it back once committed, so a rolled-back append is never
        taken for a shortened chain."""
        self.revoked()
        cache = self.store.revocations
        seq = self._bump(_REVOCATION_ROW)
        prev = self._appended[-1][1] if self._appended else cache.last_mac
        if seq != (self._appended[-1][0] if self._appended else cache.count) + 1:
            raise TamperedRow("revocations", str(seq))
        tag = self.keys().mac("revocation", seq, kind, target, at, prev)
        self.conn.execute(insert(t.revocations).values(seq=seq, kind=kind, target=target, at=at, mac=tag))
        self._appended.append((seq, tag, (kind, target)))
        return seq

    # -- adoption of a database made before row MACs (migration 0003) ------------------------------
    def adopt_legacy_rows(self, audit_mac: Callable[[bytes], bytes], at: float) -> dict[str, int]:
        """MAC every row that has no MAC yet: run once, at the first unseal of a vault whose canary is
        in the old format (only the root key can make a canary, so a database writer cannot ask for
        this). Operator tokens keep their plain SHA-256 digests, marked legacy in their MAC; join
        tokens made before are spent (they are short-lived: make new ones). Returns counts."""
        keys, counts = self.keys(), {}
        s, st, n, j, o, a = t.secrets, t.stages, t.nodes, t.join_tokens, t.operator_tokens, t.audit
        rows = self.conn.execute(select(s).where(s.c.mac.is_(None))).all()
        for r in rows:
            tag = keys.mac("secret", *self._secret_fields(r._mapping))
            self.conn.execute(update(s).where(s.c.id == r.id).values(mac=tag))
        counts["secrets"] = len(rows)
        rows = self.conn.execute(select(st).where(st.c.mac.is_(None))).all()
        for r in rows:
            tag = keys.mac(
                "stage", *self._stage_fields(self._name_of(r.secret_id), r.stage, r.version, r.revision, r.expires_at)
            )
            self.conn.execute(update(st).where(st.c.secret_id == r.secret_id, st.c.stage == r.stage).values(mac=tag))
        counts["stages"] = len(rows)
        rows = self.conn.execute(select(n).where(n.c.mac.is_(None))).all()
        for r in rows:
            self.conn.execute(update(n).where(n.c.id == r.id).values(mac=keys.mac("node", *self._node_fields(r))))
            if r.status != "active":
                self.append_revocation("node", r.id, at)
        counts["nodes"] = len(rows)
        rows = self.conn.execute(select(j).where(j.c.mac.is_(None))).all()
        for r in rows:
            tok = JoinToken(**{k: v for k, v in r._mapping.items() if k != "mac"})
            tag = keys.mac("join-token", *self._join_fields(tok))
            self.conn.execute(update(j).where(j.c.id == r.id).values(mac=tag))
            self.append_revocation("join", r.id, at)
        counts["join_tokens"] = len(rows)
        rows = self.conn.execute(select(o).where(o.c.mac.is_(None))).all()
        for r in rows:
            m = {k: v for k, v in r._mapping.items() if k not in ("mac", "digest", "legacy_digest")}
            m["prefixes"] = _json_list(m["prefixes"], "operator_tokens", m["id"])
            m["verbs"] = _json_list(m["verbs"], "operator_tokens", m["id"])
            tok = OperatorToken(**m)
            tag = keys.mac("operator-token", *self._op_fields(tok, bytes(r.digest), 1))
            self.conn.execute(update(o).where(o.c.id == r.id).values(mac=tag, legacy_digest=1))
            if r.revoked_at is not None:
                self.append_revocation("token", r.id, at)
        counts["operator_tokens"] = len(rows)
        rows = self.conn.execute(select(a.c.seq, a.c.hash).where(a.c.mac.is_(None))).all()
        for r in rows:
            self.conn.execute(update(a).where(a.c.seq == r.seq).values(mac=audit_mac(bytes(r.hash))))
        counts["audit"] = len(rows)
        # The change log starts here: whole from this revision on; each secret's last change as it is.
        self.record_change(self.current_revision(), BASE_TARGET)
        for r in self.conn.execute(select(s.c.name, s.c.revision)).all():
            self.record_change(r.revision, r.name)
        return counts

    # -- nonces --------------------------------------------------------------------------------
    def spend_nonces(self, rows: Sequence[tuple[str, str, float]]) -> set[tuple[str, str]]:
        """Spend many (node, nonce, expires_at) at once; the (node, nonce) pairs that were fresh."""
        if not rows:
            return set()
        if self.dialect == "postgresql":  # one fixed statement over arrays (see _PG_SPEND)
            n, c, e = (list(col) for col in zip(*rows, strict=True))  # lists: psycopg sends them as arrays
            return {(r.node_id, r.nonce) for r in self.conn.execute(_PG_SPEND, {"n": n, "c": c, "e": e})}
        # One statement with parameter sets (SQLAlchemy's "insertmanyvalues": batched VALUES with
        # RETURNING), compiled once and cached; a VALUES list built per call was compiled every time.
        stmt = sqlite_insert(t.nonces).on_conflict_do_nothing().returning(t.nonces.c.node_id, t.nonces.c.nonce)
        params = [{"node_id": n, "nonce": c, "expires_at": e} for n, c, e in rows]
        return {(r.node_id, r.nonce) for r in self.conn.execute(stmt, params)}

    def touch_nodes(self, rows: Sequence[tuple[str, float, int, str | None]]) -> None:
        """Record contact for many (node, at, applied, egress report) in one statement (applied only
        moves forward; a report replaces the one before, no report keeps it)."""
        if not rows:
            return
        if self.dialect == "postgresql":
            nid, at, applied, report = (list(col) for col in zip(*rows, strict=True))
            self.conn.execute(_PG_TOUCH, {"nid": nid, "at": at, "applied": applied, "report": report})
            return
        stmt = (
            update(t.nodes)
            .where(t.nodes.c.id == bindparam("nid"), t.nodes.c.status == "active")  # a revoked node is not "seen"
            .values(
                last_seen=bindparam("at"),
                applied_revision=func.max(t.nodes.c.applied_revision, bindparam("applied")),
                egress=func.coalesce(bindparam("report", type_=Text), t.nodes.c.egress),
            )
        )
        self.conn.execute(stmt, [{"nid": n, "at": at, "applied": a, "report": r} for n, at, a, r in rows])

    def purge_nonces(self, now: float) -> int:
        return self.conn.execute(delete(t.nonces).where(t.nonces.c.expires_at < now)).rowcount

    # -- audit ---------------------------------------------------------------------------------
    def next_audit_seq(self) -> tuple[int, AuditEntry | None]:
        """Take the next audit sequence number (locking the log's head) and the previous entry."""
        seq = self._bump(_AUDIT_ROW)
        prev = self.conn.execute(select(t.audit).where(t.audit.c.seq == seq - 1)).first()
        return seq, AuditEntry(**prev._mapping) if prev else None

    def insert_audit(self, entry: AuditEntry) -> None:
        self.conn.execute(insert(t.audit).values(**entry.__dict__))

    def list_audit(self, after: int = 0, limit: int = 1000) -> list[AuditEntry]:
        q = select(t.audit).where(t.audit.c.seq > after).order_by(t.audit.c.seq).limit(limit)
        return [AuditEntry(**r._mapping) for r in self.conn.execute(q)]

    def insert_sealed_event(self, at: float, actor: str, action: str, outcome: str, detail: str) -> None:
        self.conn.execute(
            insert(t.sealed_events).values(at=at, actor=actor, action=action, outcome=outcome, detail=detail)
        )

    def count_sealed_events(self) -> int:
        return int(self.conn.execute(select(func.count()).select_from(t.sealed_events)).scalar_one())

    def list_sealed_events(self, limit: int = 100) -> list[dict[str, Any]]:
        q = select(t.sealed_events).order_by(t.sealed_events.c.id.desc()).limit(limit)
        return [dict(r._mapping) for r in self.conn.execute(q)][::-1]

    def last_audit_seq(self) -> int:
        return int(self.conn.execute(select(t.counter.c.revision).where(t.counter.c.id == _AUDIT_ROW)).scalar_one())

    # -- egress routes -------------------------------------------------------------------------
    def _egress(self, row: Any) -> EgressRoute | None:
        """The route if its MAC holds and it is not older than its last change (else None)."""
        try:
            regions = _json_list(row.regions, "egress_routes", row.name)
        except TamperedRow:
            return None
        ok = self.keys().check("egress", row.mac, row.name, row.route, regions, row.created_at, row.revision)
        if not ok or row.revision < self.last_change(EGRESS_TARGET + row.name):
            return None
        try:
            parsed = wegress.route_from_json(json.loads(row.route))
        except (ValueError, RecursionError):  # a MAC'd row this version cannot parse
            return None
        return EgressRoute(row.name, parsed.route, regions, row.created_at, row.revision)

    def list_egress(self) -> list[EgressRoute]:
        """Intact routes by name (tampered rows are left out and named in ``self.tampered``)."""
        self.require_whole_change_log()
        out = []
        for row in self._judged(select(t.egress_routes).order_by(t.egress_routes.c.name)):
            route = self._egress(row)
            if route is None:
                self.tampered.append(("egress_routes", row.name))
            else:
                out.append(route)
        return out

    def get_egress(self, name: str) -> EgressRoute | None:
        """The route named ``name``, None if there is none; TamperedRow if its row fails its checks."""
        self.require_whole_change_log()
        row = self._judged(select(t.egress_routes).where(t.egress_routes.c.name == name)).first()
        if row is None:
            return None
        route = self._egress(row)
        if route is None:
            raise TamperedRow("egress_routes", name)
        return route

    def insert_egress(self, route: wegress.Route, regions: Sequence[str], at: float, rev: int) -> None:
        text_, regs = route.canonical(), tuple(regions)
        tag = self.keys().mac("egress", route.name, text_, regs, at, rev)
        self.conn.execute(
            insert(t.egress_routes).values(
                name=route.name, route=text_, regions=json.dumps(list(regs)), created_at=at, revision=rev, mac=tag
            )
        )
        self.record_change(rev, EGRESS_TARGET + route.name)

    def delete_egress(self, name: str, rev: int) -> None:
        self.conn.execute(delete(t.egress_routes).where(t.egress_routes.c.name == name))
        self.record_change(rev, EGRESS_TARGET + name)
