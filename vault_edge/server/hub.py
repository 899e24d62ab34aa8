"""The sync hub: what each region's nodes see, cached, and the long-polls waiting for it to change.

A region's view (its staged secret versions as ciphertext, and its nodes with their grants) is loaded
in one read transaction, so a node never gets data keys wrapped under a region key it has no grant
for. Views are reloaded when a change notice names their region: from this process right after a
commit, from other replicas through PostgreSQL LISTEN/NOTIFY, and (a safety net for a notice lost
while the LISTEN connection was down) whenever the global revision moved without one.

A waiting sync wakes on every notice, re-reads its region's view (one reload per region however many
nodes wait) and answers once anything after its ``since`` is visible to its node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
from dataclasses import dataclass, field

from vault_edge import wire
from vault_edge.crypto import signing
from vault_edge.server.context import Context
from vault_edge.server.storage.records import Grant, Node
from vault_edge.server.storage.repo import NOTIFY_CHANNEL, Tx, decode_notice
from vault_edge.wire import egress as wegress
from vault_edge.wire import sync as wsync

log = logging.getLogger("vault_edge.hub")


MAX_HISTORY = 1024  # changes a region's view remembers, for deltas (see RegionView.history)
INCREMENTAL_MAX = 500  # past this many changed secrets, a region's view is read whole


@dataclass(frozen=True)
class Member:
    node_rev: int
    active: bool
    grants: tuple[wsync.Grant, ...]
    sign_public: bytes


@dataclass(frozen=True)
class Change:
    """The region's data went from revision ``base`` to ``revision``, changing ``names``."""

    base: int
    revision: int
    names: frozenset[str]
    egress: bool = False  # the region's egress routes changed too


@dataclass(frozen=True)
class RegionView:
    """A region as its nodes see it at ``data_rev``, with the answers made of it (encoded once, shared).

    ``history`` holds the view's last changes, contiguous (each ``base`` is the previous ``revision``),
    at most ``MAX_HISTORY`` of them and only since this process loaded the region: a node that holds
    any revision from ``history[0].base`` on gets a delta, one further behind a full view. The bound
    keeps the memory per region fixed; past it a full view costs no more than the deltas would, and
    the change log in the database stays the authority (this is a cache of it, rebuilt at start).
    """

    region: str
    data_rev: int
    entries: dict[str, tuple[wsync.SealedVersion, ...]]  # per secret, its staged versions
    members: dict[str, Member]
    history: tuple[Change, ...] = ()
    key_version: int = 0
    egress: tuple[wegress.Route, ...] = ()  # the region's egress routes, by name
    bodies: dict[object, tuple[bytes, bytes]] = field(default_factory=dict, compare=False)  # key -> (body, sha256)

    def full_body(self) -> tuple[bytes, bytes]:
        got = self.bodies.get("full")
        if got is None:
            body = wsync.RegionBody(
                wsync.FULL,
                self.region,
                0,
                self.data_rev,
                (),
                tuple(v for name in sorted(self.entries) for v in self.entries[name]),
                self.egress or None,
            ).encode()
            got = self.bodies["full"] = (body, wsync.digest(body))
        return got

    def delta_body(self, since: int) -> tuple[bytes, bytes] | None:
        """The body taking any node at ``since`` to ``data_rev``; None if the history does not reach
        back that far (then only a full view will do)."""
        if not self.history or since < self.history[0].base:
            return None
        start = next((i for i, c in enumerate(self.history) if c.revision > since), len(self.history))
        got = self.bodies.get(start)  # every node between two changes shares one body
        if got is None:
            changes = self.history[start:]
            names = sorted(set().union(*(c.names for c in changes)))
            base = changes[0].base if changes else self.data_rev
            body = wsync.RegionBody(
                wsync.DELTA,
                self.region,
                base,
                self.data_rev,
                tuple(names),
                tuple(v for n in names for v in self.entries.get(n, ())),
                self.egress if any(c.egress for c in changes) else None,
            ).encode()
            got = self.bodies[start] = (body, wsync.digest(body))
        return got

    def legacy_secrets_json(self) -> bytes:
        """Sync protocol 1's secrets list (agents from before deltas): the whole view, every answer."""
        got = self.bodies.get("v1")
        if got is None:
            body = wsync.v1_secrets(v for name in sorted(self.entries) for v in self.entries[name])
            got = self.bodies["v1"] = (body, b"")
        return got[0]


class Hub:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.loop: asyncio.AbstractEventLoop | None = None
        self._views: dict[str, tuple[int, RegionView]] = {}  # region -> (generation loaded at, view)
        self._gen: dict[str, int] = {}  # region -> generation, bumped by every change notice
        self._where: dict[str, str] = {}  # node -> its region, from the views loaded
        self._loading: dict[str, tuple[int, asyncio.Future[RegionView]]] = {}
        self._changed: dict[str, asyncio.Future[None]] = {}  # region -> resolved by the next notice naming it
        self._seen_revision = 0
        self._stop = threading.Event()
        self._closing = False
        self._threads: list[threading.Thread] = []
        self.waiting = 0
        self._reported: set[tuple[str, str]] = set()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ctx.store.add_listener(self.notify_threadsafe)
        if self.ctx.store.dialect == "postgresql":
            self._spawn(self._listen_postgres, "vault-edge-listen")
        self._spawn(self._poll_revision, "vault-edge-revision-poll")

    def release(self) -> None:
        """Shutting down: answer every held long-poll now (``unchanged``), so agents re-poll, perhaps
        another replica, instead of holding this process up until their hold ends."""
        self._closing = True
        for fut in self._changed.values():
            if not fut.done():
                fut.set_result(None)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)

    def _spawn(self, target: object, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    # -- change notices ------------------------------------------------------------------------
    def notify_threadsafe(self, revision: int, regions: frozenset[str]) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.on_change, revision, regions)

    def on_change(self, revision: int, regions: frozenset[str]) -> None:
        """A notice: the regions it names (all, for "*") are reloaded before their next use, and only
        their held long-polls wake (a change in one region costs nothing to the others' polls)."""
        self._seen_revision = max(self._seen_revision, revision)
        named = set(self._views) | set(self._loading) | set(self._changed) if "*" in regions else regions
        for region in named:
            self._gen[region] = self._gen.get(region, 0) + 1
            fut = self._changed.pop(region, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _changed_future(self, region: str) -> asyncio.Future[None]:
        """Resolved by the next notice naming ``region`` (or at once while closing)."""
        fut = self._changed.get(region)
        if fut is None or fut.done():
            assert self.loop is not None
            fut = self._changed[region] = self.loop.create_future()
            if self._closing:
                fut.set_result(None)
        return fut

    def _listen_postgres(self) -> None:
        import psycopg  # only with PostgreSQL

        url = self.ctx.store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    backoff = 0.5
                    # Anything committed while we were not listening: look again everywhere.
                    self.notify_threadsafe(0, frozenset({"*"}))
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=1.0):
                            rev, regions = decode_notice(n.payload)
                            self.notify_threadsafe(rev, regions)
            except Exception as exc:  # reconnect: the database may be restarting
                log.warning("LISTEN connection lost (%s); reconnecting", type(exc).__name__)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _poll_revision(self) -> None:
        while not self._stop.wait(2.0):
            try:
                with self.ctx.store.read() as tx:
                    current = tx.current_revision()
            except Exception as exc:
                log.warning("revision poll failed (%s)", type(exc).__name__)
                continue
            if current > self._seen_revision:
                self.notify_threadsafe(current, frozenset({"*"}))

    # -- views ---------------------------------------------------------------------------------
    def _load(self, region: str) -> RegionView:
        """The region's view as the database has it now. After a view of it was loaded, only the
        secrets the change log says changed since are read (the rest is the previous view's, made
        from rows that passed their checks): a change costs the rows it changed, not the region's
        size. A full read when the region's key changed (every data key re-wrapped), when many
        secrets changed, or when the change log as read does not cover the step.

        Members likewise: the rows read again are those whose ``node_rev`` differs from the previous
        view's, and new ones (``_members``)."""
        cached = self._views.get(region)
        previous = cached[1] if cached is not None else None
        with self.ctx.store.read() as tx:  # (one snapshot: its revision and its rows agree)
            r = tx.get_region(region)
            data_rev = r.data_rev if r else 0
            names: set[str] | None = None
            if (
                previous is not None
                and r is not None
                and r.key_version == previous.key_version
                and previous.data_rev <= data_rev
            ):
                names = tx.changed_since(previous.data_rev)
                if names is not None and (len(names) > INCREMENTAL_MAX or tx.changes_read_to() < data_rev):
                    names = None
            rows = tx.region_snapshot(region, self.ctx.clock(), names)
            same_key = previous is not None and r is not None and r.key_version == previous.key_version
            kept, nodes, grants = _members(tx, region, previous.members if same_key and previous else None)
            egress = tuple(r for r in tx.list_egress() if r.regions == ("*",) or region in r.regions)
            tampered = list(tx.tampered)
        for table, key in tampered:  # left out of the view; reported once per row per process
            if (table, key) not in self._reported:
                self._reported.add((table, key))
                log.error("integrity: %s row %r failed its check; left out of region %s's view", table, key, region)
                self.ctx.auditor.record_alone(
                    "system",
                    "integrity",
                    f"{table}:{key}",
                    "refused",
                    throttle=None,
                    region=region,
                    reason="failed its integrity check",
                )
        by_node: dict[str, list[wsync.Grant]] = {}
        for g in grants:
            by_node.setdefault(g.node_id, []).append(wsync.Grant(g.region, g.key_version, g.sealed))
        entries: dict[str, list[wsync.SealedVersion]] = {}
        for s in rows:
            entries.setdefault(s.name, []).append(
                wsync.SealedVersion(
                    s.name, s.version, s.stage, s.key_version, s.wrapped_dek, s.ciphertext, s.created_at, s.expires_at
                )
            )
        if names is None:
            view_entries = {name: tuple(vs) for name, vs in entries.items()}
        else:  # the previous view, with what changed read again
            assert previous is not None
            view_entries = {n: vs for n, vs in previous.entries.items() if n not in names}
            view_entries.update((name, tuple(vs)) for name, vs in entries.items())
        # A secret whose rows failed their checks keeps what this region's nodes were last given of it
        # (checked then), so a database writer cannot make the fleet drop it; until a restart.
        if previous is not None:
            for table, key in tampered:
                name = key.rsplit(":", 1)[0] if table == "stages" and ":" in key else key
                if table in ("secrets", "stages") and name in previous.entries and name not in view_entries:
                    view_entries[name] = previous.entries[name]
        members = kept | {
            n.id: Member(n.node_rev, n.status == "active", tuple(by_node.get(n.id, ())), n.sign_public) for n in nodes
        }
        routes = tuple(e.route for e in egress)
        return RegionView(
            region,
            data_rev,
            view_entries,
            members,
            _history(previous, data_rev, view_entries, names, routes),
            r.key_version if r else 0,
            routes,
        )

    async def view(self, region: str, refresh: bool = False) -> RegionView:
        """The region's view as of the latest change notice for it: loaded once however many callers.
        A cached view, or a load in flight, from before the latest notice is never handed out (a load
        that started before a commit may not see it)."""
        if refresh:
            self._gen[region] = self._gen.get(region, 0) + 1
        gen = self._gen.get(region, 0)
        cached = self._views.get(region)
        if cached is not None and cached[0] == gen:
            return cached[1]
        pending = self._loading.get(region)
        if pending is not None and pending[0] == gen:
            return await asyncio.shield(pending[1])
        assert self.loop is not None
        fut: asyncio.Future[RegionView] = self.loop.create_future()
        self._loading[region] = (gen, fut)
        try:
            loaded = await asyncio.to_thread(self._load, region)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it
            raise
        finally:
            if self._loading.get(region, (0, None))[1] is fut:
                del self._loading[region]
        if self._views.get(region, (-1, None))[0] <= gen:  # a slower, older load never overwrites a newer one
            self._views[region] = (gen, loaded)
            self._where.update(dict.fromkeys(loaded.members, region))
        fut.set_result(loaded)
        return loaded

    async def member(self, node_id: str) -> tuple[str, Member] | None:
        """A node's region and membership (signing key, status, revision) as of the latest notice,
        from the cached view; the database is asked only about a node no loaded view knows."""
        region = self._where.get(node_id) or await asyncio.to_thread(self._node_region, node_id)
        if region is None:
            return None
        view = await self.view(region)
        m = view.members.get(node_id)
        if m is None:  # enrolled a moment ago, perhaps through another replica
            view = await self.view(region, refresh=True)
            m = view.members.get(node_id)
        return (region, m) if m is not None else None

    def _node_region(self, node_id: str) -> str | None:
        with self.ctx.store.read() as tx:
            nodes = tx.list_nodes_by_id(node_id)
        return nodes[0].region if nodes else None  # a tampered row is no node

    # -- long-poll -----------------------------------------------------------------------------
    async def wait(
        self, node_id: str, region: str, node_rev: int, since: int, timeout: float
    ) -> tuple[RegionView, Member] | None:
        """Wait until something after ``since`` is visible to the node; None on timeout.
        ``node_rev`` is the node's revision as authentication read it: a view older than that is
        reloaded first (the node may have enrolled through another replica a moment ago)."""
        assert self.loop is not None
        deadline = self.loop.time() + timeout
        changed = self._changed_future(region)  # before reading the view: a notice during the read still wakes us
        view = await self.view(region)
        member = view.members.get(node_id)
        if member is None or member.node_rev < node_rev:
            view = await self.view(region, refresh=True)
            member = view.members.get(node_id)
        self.waiting += 1
        try:
            while True:
                if member is not None and (not member.active or max(view.data_rev, member.node_rev) > since):
                    return view, member
                remaining = deadline - self.loop.time()
                if remaining <= 0 or self._closing:
                    return None
                if not await _until(self.loop, changed, deadline):
                    return None
                changed = self._changed_future(region)
                view = await self.view(region)
                member = view.members.get(node_id)
        finally:
            self.waiting -= 1

    def answer(
        self, node_id: str, nonce: str, view: RegionView | None, member: Member | None, since: int, full: bool
    ) -> tuple[bytes, bytes]:
        """The signed answer (protocol 2): for the node, the region's shared body (a delta from
        ``since`` when the view's history reaches back to it and no full view was asked for, else the
        full view) under a small envelope signed for this node and request; ``unchanged`` (still
        signed, so that silence from an impostor is never mistaken for contact) when nothing is new."""
        keys = self.ctx.barrier.keys()
        issued = int(self.ctx.clock())
        if view is None or member is None:
            env = wsync.Envelope(wsync.UNCHANGED, node_id, nonce, issued, "", since, since)
            if view is not None:
                env = dataclasses.replace(env, region=view.region)
            raw = env.encode()
            return wsync.join(raw), signing.sign(keys.signer, wsync.signed_message(raw))
        revision = max(view.data_rev, member.node_rev)
        shared = None if full or since == 0 else view.delta_body(since)
        kind = wsync.DELTA if shared is not None else wsync.FULL
        body, digest = shared if shared is not None else view.full_body()
        raw = wsync.Envelope(kind, node_id, nonce, issued, view.region, since, revision, digest, member.grants).encode()
        return wsync.join(raw, body), signing.sign(keys.signer, wsync.signed_message(raw))

    def legacy_body(
        self, node_id: str, nonce: str, view: RegionView | None, member: Member | None, since: int
    ) -> tuple[bytes, bytes]:
        """Sync protocol 1, for agents from before deltas: the node's whole view on every change."""
        keys = self.ctx.barrier.keys()
        issued = int(self.ctx.clock())
        if view is None or member is None:
            body = wsync.v1_answer(node_id, nonce, issued, since)
        else:
            body = wsync.v1_answer(
                node_id,
                nonce,
                issued,
                max(view.data_rev, member.node_rev),
                view.region,
                member.grants,
                view.legacy_secrets_json(),
            )
        return body, signing.sign(keys.signer, wire.response_message(wsync.V1_KIND, body))


MEMBERS_REREAD_MAX = 0.25  # past this share of a region's nodes changed, its members are read whole


def _members(
    tx: Tx, region: str, previous: dict[str, Member] | None
) -> tuple[dict[str, Member], list[Node], list[Grant]]:
    """(members kept from ``previous``, nodes and grants read again) for a region's new view.

    Without ``previous`` (a first load, or the region's key changed: every grant re-wrapped), or when
    many changed, every row is read and checked. Else the rows read again are the new ones and those
    whose ``node_rev`` is not the kept member's; a node whose row is gone leaves. ``node_rev`` is
    outside the row's MAC, so a database writer can make a changed row look unchanged: the member
    kept is then the one checked before, never more than it was, and the revocation chain (verified,
    append-only) is applied to every kept member, so a revocation cannot be hidden that way. Every
    legitimate change to a node's status or grants sets its ``node_rev`` to the change's revision."""
    if previous is not None:
        revs = tx.region_member_revs(region)
        stale = [i for i, rev in revs.items() if (m := previous.get(i)) is None or m.node_rev != rev]
        if len(stale) <= max(8, MEMBERS_REREAD_MAX * len(revs)):
            revoked = tx.revoked()
            kept = {
                i: dataclasses.replace(m, active=False) if m.active and ("node", i) in revoked else m
                for i, m in previous.items()
                if i in revs and revs[i] == m.node_rev
            }
            nodes, grants = tx.region_members(region, stale) if stale else ([], [])
            return kept, nodes, grants
    nodes, grants = tx.region_members(region)
    return {}, nodes, grants


def _settle(fut: asyncio.Future[bool], value: bool, *_: object) -> None:
    if not fut.done():
        fut.set_result(value)


async def _until(loop: asyncio.AbstractEventLoop, shared: asyncio.Future[None], deadline: float) -> bool:
    """Wait for ``shared`` (a region's change future, awaited by every poll held on the region: never
    cancelled by one of them) until ``deadline`` (loop time); False if the deadline came first. A held
    poll costs one future, one timer and one callback here, where ``wait_for(shield(shared))`` made
    three futures and their callbacks: ten thousand of them are held between two changes."""
    if shared.done():
        return True
    mine: asyncio.Future[bool] = loop.create_future()
    wake = functools.partial(_settle, mine, True)
    shared.add_done_callback(wake)
    timer = loop.call_at(deadline, _settle, mine, False)
    try:
        return await mine
    finally:  # also when the caller went away (the task cancelled)
        timer.cancel()
        shared.remove_done_callback(wake)


def _history(
    previous: RegionView | None,
    data_rev: int,
    entries: dict[str, tuple[wsync.SealedVersion, ...]],
    candidates: set[str] | None = None,
    egress: tuple[wegress.Route, ...] = (),
) -> tuple[Change, ...]:
    """The new view's history: the previous view's, plus what changed between the two (by comparing
    them, so it is exact for this region whatever else the revision changed). Starts afresh when
    there is no previous view or the revision went backwards (a database restored from a copy)."""
    if previous is None or data_rev < previous.data_rev:
        return ()
    if data_rev == previous.data_rev:
        return previous.history
    old = previous.entries
    among = candidates if candidates is not None else old.keys() | entries.keys()
    names = frozenset(n for n in among if old.get(n) != entries.get(n))
    change = Change(previous.data_rev, data_rev, names, egress != previous.egress)
    return (*previous.history, change)[-MAX_HISTORY:]
