"""The repository: the only module that issues SQL. Everything it returns is a plain record.

Use ``with store.write() as tx:`` for a change (one transaction, committed at the end of the block,
rolled back on any exception, so a failed request never leaves half a change) and
``with store.read() as tx:`` for a consistent read. ``tx.changed(regions)`` announces, at commit,
which regions' nodes should look again: through PostgreSQL NOTIFY to every replica (delivered only
if the transaction commits), and to this process's listeners right after the commit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, delete, func, insert, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from vault_edge.server.storage import schema as t
from vault_edge.server.storage.records import (
    AuditEntry,
    Grant,
    JoinToken,
    Node,
    OperatorToken,
    Region,
    Secret,
    SnapshotRow,
    Stage,
    Version,
    Wrap,
)

NOTIFY_CHANNEL = "vault_edge_changes"
_REVISION_ROW = 1
_AUDIT_ROW = 2

Listener = Callable[[int, frozenset[str]], None]
_SECRET_FIELDS = frozenset(c.name for c in t.secrets.columns)


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        """``listener(revision, regions)`` runs after each local commit that called ``changed``."""
        self._listeners.append(listener)

    @contextmanager
    def read(self) -> Iterator[Tx]:
        with self.engine.connect() as conn, conn.begin():
            yield Tx(conn, self.dialect)

    @contextmanager
    def write(self, serialize: bool = True) -> Iterator[Tx]:
        """A change. Writers run one at a time, as on SQLite (BEGIN IMMEDIATE): on PostgreSQL the
        first statement locks the revision counter, so what a writer reads (a secret's latest
        version, its stages) cannot change under it before it commits, on any replica.
        ``serialize=False`` is for writes that need no such reads (contacts, refusals' audit)."""
        with self.engine.connect().execution_options(vault_edge_write=True) as conn, conn.begin():
            tx = Tx(conn, self.dialect)
            if serialize and self.dialect == "postgresql":
                tx.lock_writers()
            yield tx
            if tx.changed_regions is not None and self.dialect == "postgresql":
                conn.execute(
                    text("SELECT pg_notify(:ch, :payload)"),
                    {"ch": NOTIFY_CHANNEL, "payload": encode_notice(tx.revision, tx.changed_regions)},
                )
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


def _json_list(value: str) -> tuple[str, ...]:
    return tuple(json.loads(value))


class Tx:
    """One transaction. Methods are grouped by table; each returns records or plain values."""

    def __init__(self, conn: Connection, dialect: str) -> None:
        self.conn = conn
        self.dialect = dialect
        self.revision = 0
        self.changed_regions: set[str] | None = None

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
        return int(
            self.conn.execute(select(t.counter.c.revision).where(t.counter.c.id == _REVISION_ROW)).scalar_one()
        )

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
                select(t.nodes.c.region, func.count())
                .where(t.nodes.c.status == "active")
                .group_by(t.nodes.c.region)
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

    def insert_region_key(self, region: str, version: int, wrapped: bytes, at: float) -> None:
        self.conn.execute(
            insert(t.region_keys).values(region=region, version=version, wrapped=wrapped, created_at=at)
        )

    def get_region_key(self, region: str, version: int) -> bytes | None:
        return self.conn.execute(
            select(t.region_keys.c.wrapped).where(
                t.region_keys.c.region == region, t.region_keys.c.version == version
            )
        ).scalar_one_or_none()

    def delete_region_keys_before(self, region: str, version: int) -> None:
        self.conn.execute(
            delete(t.region_keys).where(t.region_keys.c.region == region, t.region_keys.c.version < version)
        )

    # -- secrets -------------------------------------------------------------------------------
    @staticmethod
    def _secret(row: Any) -> Secret:
        m = {k: v for k, v in row._mapping.items() if k in _SECRET_FIELDS}
        m["regions"] = _json_list(m["regions"])
        m["destroyed"] = bool(m["destroyed"])
        return Secret(**m)

    def get_secret(self, name: str) -> Secret | None:
        row = self.conn.execute(select(t.secrets).where(t.secrets.c.name == name)).first()
        return self._secret(row) if row else None

    def insert_secret(self, name: str, regions: Sequence[str], at: float, rev: int, **extra: Any) -> Secret:
        sid = self.conn.execute(
            insert(t.secrets)
            .values(
                name=name, regions=json.dumps(list(regions)), latest_version=0, created_at=at, updated_at=at,
                revision=rev, destroyed=0, **extra,
            )
            .returning(t.secrets.c.id)
        ).scalar_one()
        row = self.conn.execute(select(t.secrets).where(t.secrets.c.id == sid)).one()
        return self._secret(row)

    def update_secret(self, secret_id: int, **values: Any) -> None:
        if "regions" in values:
            values["regions"] = json.dumps(list(values["regions"]))
        if "destroyed" in values:
            values["destroyed"] = int(values["destroyed"])
        self.conn.execute(update(t.secrets).where(t.secrets.c.id == secret_id).values(**values))

    def list_secrets(self, prefix: str = "", include_deleted: bool = False) -> list[Secret]:
        q = select(t.secrets).order_by(t.secrets.c.name)
        if prefix:
            q = q.where(t.secrets.c.name.startswith(prefix, autoescape=True))
        if not include_deleted:
            q = q.where(t.secrets.c.deleted_at.is_(None))
        return [self._secret(r) for r in self.conn.execute(q)]

    def every_region_secrets(self) -> list[Secret]:
        return [
            self._secret(r)
            for r in self.conn.execute(select(t.secrets).where(t.secrets.c.regions == json.dumps(["*"])))
        ]

    def secrets_due(self, now: float, limit: int = 100) -> list[Secret]:
        q = (
            select(t.secrets)
            .where(t.secrets.c.next_rotation_at <= now, t.secrets.c.deleted_at.is_(None))
            .order_by(t.secrets.c.next_rotation_at)
            .limit(limit)
        )
        return [self._secret(r) for r in self.conn.execute(q)]

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
    def insert_version(
        self, secret_id: int, version: int, ciphertext: bytes, at: float, rev: int, origin: str
    ) -> None:
        self.conn.execute(
            insert(t.secret_versions).values(
                secret_id=secret_id, version=version, ciphertext=ciphertext, created_at=at, revision=rev,
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
            (r.name, Wrap(r.secret_id, r.version, r.region, r.key_version, r.wrapped))
            for r in self.conn.execute(q)
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
    def get_stages(self, secret_id: int) -> dict[str, Stage]:
        q = select(t.stages).where(t.stages.c.secret_id == secret_id)
        return {
            r.stage: Stage(r.stage, r.version, r.revision, r.expires_at) for r in self.conn.execute(q)
        }

    def set_stage(
        self, secret_id: int, stage: str, version: int | None, rev: int, at: float, expires_at: float | None = None
    ) -> None:
        """Point ``stage`` at ``version`` (None removes it), and log the move."""
        self.conn.execute(delete(t.stages).where(t.stages.c.secret_id == secret_id, t.stages.c.stage == stage))
        if version is not None:
            self.conn.execute(
                insert(t.stages).values(
                    secret_id=secret_id, stage=stage, version=version, revision=rev, expires_at=expires_at
                )
            )
        self.conn.execute(
            insert(t.stage_log).values(secret_id=secret_id, stage=stage, version=version, revision=rev, at=at)
        )

    def clear_stages(self, secret_id: int, rev: int, at: float) -> None:
        for stage in self.get_stages(secret_id):
            self.set_stage(secret_id, stage, None, rev, at)

    def expired_stages(self, now: float) -> list[tuple[Secret, str]]:
        q = (
            select(t.secrets, t.stages.c.stage)
            .join(t.stages, t.stages.c.secret_id == t.secrets.c.id)
            .where(t.stages.c.expires_at.is_not(None), t.stages.c.expires_at <= now)
        )
        rows = self.conn.execute(q).all()
        return [(self._secret(r), r.stage) for r in rows]

    def stage_log(self, secret_id: int, stage: str = "current") -> list[tuple[int, int | None]]:
        """(revision, version) of every move of ``stage``, oldest first."""
        q = (
            select(t.stage_log.c.revision, t.stage_log.c.version)
            .where(t.stage_log.c.secret_id == secret_id, t.stage_log.c.stage == stage)
            .order_by(t.stage_log.c.revision, t.stage_log.c.id)
        )
        return [(int(r.revision), r.version) for r in self.conn.execute(q)]

    def region_snapshot(self, region: str, now: float) -> list[SnapshotRow]:
        """Every staged, unexpired, undestroyed version a node of ``region`` may decrypt. Residency is
        by construction: a secret has a wrap for a region only if it is allowed there."""
        s, st, v, w = t.secrets, t.stages, t.secret_versions, t.data_key_wraps
        q = (
            select(s.c.name, st.c.version, st.c.stage, st.c.expires_at, v.c.created_at, v.c.ciphertext,
                   w.c.key_version, w.c.wrapped)
            .join(st, st.c.secret_id == s.c.id)
            .join(v, and_(v.c.secret_id == s.c.id, v.c.version == st.c.version))
            .join(w, and_(w.c.secret_id == s.c.id, w.c.version == st.c.version, w.c.region == region))
            .where(
                s.c.deleted_at.is_(None),
                v.c.ciphertext.is_not(None),
                or_(st.c.expires_at.is_(None), st.c.expires_at > now),
            )
            .order_by(s.c.name, st.c.version)
        )
        return [
            SnapshotRow(r.name, r.version, r.stage, r.expires_at, r.created_at, r.ciphertext, r.key_version,
                        r.wrapped)
            for r in self.conn.execute(q)
        ]

    # -- nodes and grants ----------------------------------------------------------------------
    def insert_node(self, node: Node) -> None:
        self.conn.execute(insert(t.nodes).values(**node.__dict__))

    def get_node(self, node_id: str) -> Node | None:
        row = self.conn.execute(select(t.nodes).where(t.nodes.c.id == node_id)).first()
        return Node(**row._mapping) if row else None

    def list_nodes(self, region: str | None = None, status: str | None = None) -> list[Node]:
        q = select(t.nodes).order_by(t.nodes.c.region, t.nodes.c.id)
        if region is not None:
            q = q.where(t.nodes.c.region == region)
        if status is not None:
            q = q.where(t.nodes.c.status == status)
        return [Node(**r._mapping) for r in self.conn.execute(q)]

    def nodes_in_regions(self, regions: Iterable[str]) -> list[Node]:
        q = select(t.nodes).where(t.nodes.c.region.in_(set(regions))).order_by(t.nodes.c.region, t.nodes.c.id)
        return [Node(**r._mapping) for r in self.conn.execute(q)]

    def set_node_status(self, node_id: str, status: str, rev: int) -> None:
        self.conn.execute(update(t.nodes).where(t.nodes.c.id == node_id).values(status=status, node_rev=rev))

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

    def region_members(self, region: str) -> tuple[list[Node], list[Grant]]:
        """Every node of ``region`` and their grants, for the sync hub's per-region view."""
        nodes = [Node(**r._mapping) for r in self.conn.execute(select(t.nodes).where(t.nodes.c.region == region))]
        grants = [
            Grant(**r._mapping)
            for r in self.conn.execute(
                select(t.grants)
                .join(t.nodes, t.nodes.c.id == t.grants.c.node_id)
                .where(t.nodes.c.region == region)
                .order_by(t.grants.c.node_id, t.grants.c.key_version)
            )
        ]
        return nodes, grants

    # -- join tokens ---------------------------------------------------------------------------
    def insert_join_token(self, token: JoinToken) -> None:
        self.conn.execute(insert(t.join_tokens).values(**token.__dict__))

    def get_join_token(self, token_id: str) -> JoinToken | None:
        row = self.conn.execute(select(t.join_tokens).where(t.join_tokens.c.id == token_id)).first()
        return JoinToken(**row._mapping) if row else None

    def use_join_token(self, token_id: str, at: float, node_id: str) -> bool:
        """Mark used, once: False if another enrolment used it first."""
        return (
            self.conn.execute(
                update(t.join_tokens)
                .where(t.join_tokens.c.id == token_id, t.join_tokens.c.used_at.is_(None))
                .values(used_at=at, used_by=node_id)
            ).rowcount
            == 1
        )

    # -- operator tokens -----------------------------------------------------------------------
    def insert_operator_token(self, token: OperatorToken, digest: bytes) -> None:
        values = dict(token.__dict__, digest=digest)
        values["prefixes"] = json.dumps(list(token.prefixes))
        values["verbs"] = json.dumps(list(token.verbs))
        self.conn.execute(insert(t.operator_tokens).values(**values))

    @staticmethod
    def _op_token(row: Any) -> OperatorToken:
        m = dict(row._mapping)
        m.pop("digest", None)
        m["prefixes"], m["verbs"] = _json_list(m["prefixes"]), _json_list(m["verbs"])
        return OperatorToken(**m)

    def get_operator_token(self, digest: bytes) -> OperatorToken | None:
        row = self.conn.execute(select(t.operator_tokens).where(t.operator_tokens.c.digest == digest)).first()
        return self._op_token(row) if row else None

    def get_operator_token_by_id(self, token_id: str) -> OperatorToken | None:
        row = self.conn.execute(select(t.operator_tokens).where(t.operator_tokens.c.id == token_id)).first()
        return self._op_token(row) if row else None

    def list_operator_tokens(self) -> list[OperatorToken]:
        q = select(t.operator_tokens).order_by(t.operator_tokens.c.created_at)
        return [self._op_token(r) for r in self.conn.execute(q)]

    def revoke_operator_token(self, token_id: str, at: float) -> list[str]:
        """Revoke the token and every token made from it, at any depth (through tokens revoked before,
        too); the ids newly revoked, ``token_id`` first."""
        tok = t.operator_tokens
        seen, revoked, layer = {token_id}, [], [token_id]
        while layer:
            active = set(self.conn.execute(
                select(tok.c.id).where(tok.c.id.in_(layer), tok.c.revoked_at.is_(None))
            ).scalars())
            if active:
                self.conn.execute(update(tok).where(tok.c.id.in_(active)).values(revoked_at=at))
            revoked += [i for i in layer if i in active]
            children = self.conn.execute(select(tok.c.id).where(tok.c.parent_id.in_(layer))).scalars()
            layer = [c for c in children if c not in seen]
            seen.update(layer)
        return revoked

    # -- nonces --------------------------------------------------------------------------------
    def spend_nonces(self, rows: Sequence[tuple[str, str, float]]) -> set[tuple[str, str]]:
        """Spend many (node, nonce, expires_at) at once; the (node, nonce) pairs that were fresh."""
        fresh: set[tuple[str, str]] = set()
        ins = pg_insert if self.dialect == "postgresql" else sqlite_insert
        for i in range(0, len(rows), 500):
            chunk = [{"node_id": n, "nonce": c, "expires_at": e} for n, c, e in rows[i:i + 500]]
            stmt = ins(t.nonces).values(chunk).on_conflict_do_nothing().returning(t.nonces.c.node_id, t.nonces.c.nonce)
            fresh.update((r.node_id, r.nonce) for r in self.conn.execute(stmt))
        return fresh

    def touch_nodes(self, rows: Sequence[tuple[str, float, int]]) -> None:
        """Record contact for many (node, at, applied) in one statement (applied only moves forward)."""
        if not rows:
            return
        biggest = func.max if self.dialect == "sqlite" else func.greatest
        stmt = (
            update(t.nodes)
            .where(t.nodes.c.id == bindparam("nid"), t.nodes.c.status == "active")  # a revoked node is not "seen"
            .values(last_seen=bindparam("at"),
                    applied_revision=biggest(t.nodes.c.applied_revision, bindparam("applied")))
        )
        self.conn.execute(stmt, [{"nid": n, "at": at, "applied": a} for n, at, a in rows])

    def purge_nonces(self, now: float) -> int:
        return self.conn.execute(delete(t.nonces).where(t.nonces.c.expires_at < now)).rowcount

    # -- audit ---------------------------------------------------------------------------------
    def next_audit_seq(self) -> tuple[int, bytes | None]:
        """Take the next audit sequence number (locking the log's head) and the previous hash."""
        seq = self._bump(_AUDIT_ROW)
        prev = self.conn.execute(select(t.audit.c.hash).where(t.audit.c.seq == seq - 1)).scalar_one_or_none()
        return seq, prev

    def insert_audit(self, entry: AuditEntry) -> None:
        self.conn.execute(insert(t.audit).values(**entry.__dict__))

    def list_audit(self, after: int = 0, limit: int = 1000) -> list[AuditEntry]:
        q = select(t.audit).where(t.audit.c.seq > after).order_by(t.audit.c.seq).limit(limit)
        return [AuditEntry(**r._mapping) for r in self.conn.execute(q)]

    def last_audit_seq(self) -> int:
        return int(
            self.conn.execute(select(t.counter.c.revision).where(t.counter.c.id == _AUDIT_ROW)).scalar_one()
        )
