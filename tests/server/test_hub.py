"""The sync hub in-process, over a fake store: one load per region however many callers, no view from
before a change notice handed out, the region's change history and its shared delta bodies, and a
held long-poll woken by a notice."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from vault_edge.server.hub import Hub
from vault_edge.server.storage.records import Node, Region, SnapshotRow
from vault_edge.wire import sync as wsync

NODE = "n-0123456789abcdef"


class FakeStore:
    """A region 'eu' whose rows the test sets; counts loads; can hold a load until released."""

    dialect = "sqlite"

    def __init__(self) -> None:
        self.data_rev, self.rows = 5, {"a": 1, "b": 1}  # name -> current version
        self.last = {"a": 5, "b": 5}  # the change log: name -> revision of its last change
        self.loads = 0
        self.rows_read: list[str] = []
        self.nodes = {NODE: 1}  # the region's node rows: id -> node_rev
        self.revoked_ids: set[str] = set()  # the revocation chain
        self.nodes_read: list[str] = []
        self.gate: threading.Event | None = None

    def set(self, rows: dict[str, int], rev: int) -> None:
        """A change at ``rev``, logged as the repository logs it (every secret it touched)."""
        for n in rows.keys() | self.rows.keys():
            if rows.get(n) != self.rows.get(n):
                self.last[n] = rev
        self.rows, self.data_rev = rows, rev

    def add_listener(self, listener: Any) -> None:
        pass

    @contextmanager
    def read(self) -> Iterator[Any]:
        if self.gate is not None:
            self.gate.wait(5)
        yield self

    # what the hub reads, as the repository's read transaction offers it
    tampered: list[tuple[str, str]] = []

    def current_revision(self) -> int:
        return self.data_rev

    def get_region(self, region: str) -> Region:
        self.loads += 1
        return Region(region, 1, self.data_rev, 0.0)

    def region_snapshot(self, region: str, now: float, names: Any = None) -> list[SnapshotRow]:
        out = [
            SnapshotRow(n, v, "current", None, 0.0, f"ct-{n}-{v}".encode(), 1, b"dek")
            for n, v in self.rows.items()
            if names is None or n in names
        ]
        self.rows_read += [r.name for r in out]
        return out

    def changed_since(self, revision: int) -> set[str]:
        return {n for n, rev in self.last.items() if rev > revision}

    def changes_read_to(self) -> int:
        return self.data_rev

    def region_members(self, region: str, only: Any = None) -> tuple[list[Node], list[Any]]:
        ids = [i for i in self.nodes if only is None or i in only]
        self.nodes_read += ids
        status = {i: "revoked" if i in self.revoked_ids else "active" for i in ids}
        return [Node(i, region, b"x" * 32, b"y" * 32, "pop", status[i], 0.0, None, 0, self.nodes[i]) for i in ids], []

    def region_member_revs(self, region: str) -> dict[str, int]:
        return dict(self.nodes)

    def revoked(self) -> frozenset[tuple[str, str]]:
        return frozenset(("node", i) for i in self.revoked_ids)

    def list_egress(self) -> list[Any]:
        return []


def _hub(store: FakeStore) -> Hub:
    auditor = SimpleNamespace(record_alone=lambda *a, **k: None)
    return Hub(SimpleNamespace(store=store, auditor=auditor, clock=lambda: 0.0))  # type: ignore[arg-type]


def run(coro_fn: Any) -> Any:
    async def main() -> Any:
        store = FakeStore()
        hub = _hub(store)
        hub.start(asyncio.get_running_loop())
        try:
            return await coro_fn(hub, store)
        finally:
            hub.stop()

    return asyncio.run(main())


def test_many_callers_share_one_load() -> None:
    async def go(hub: Hub, store: FakeStore) -> None:
        views = await asyncio.gather(*(hub.view("eu") for _ in range(50)))
        assert store.loads == 1 and all(v is views[0] for v in views)
        assert (await hub.view("eu")) is views[0] and store.loads == 1  # cached until a notice

    run(go)


def test_a_load_that_started_before_a_notice_is_not_handed_out_after_it() -> None:
    async def go(hub: Hub, store: FakeStore) -> None:
        store.gate = threading.Event()
        first = asyncio.create_task(hub.view("eu"))
        await asyncio.sleep(0.05)  # the load is in flight, reading the old rows
        store.set({"a": 2, "b": 1}, 6)
        hub.on_change(6, frozenset({"eu"}))  # committed while it was reading
        second = asyncio.create_task(hub.view("eu"))
        store.gate.set()
        old, new = await first, await second
        assert old.data_rev in (5, 6) and new.data_rev == 6 and store.loads == 2
        assert (await hub.view("eu")).data_rev == 6  # the older load never overwrote the newer

    run(go)


def test_the_history_gives_shared_deltas_back_to_the_first_change_it_saw() -> None:
    async def go(hub: Hub, store: FakeStore) -> None:
        await hub.view("eu")
        store.set({"a": 2, "b": 1}, 7)
        hub.on_change(7, frozenset({"eu"}))
        store.set({"a": 2, "b": 1, "c": 1}, 9)
        hub.on_change(9, frozenset({"eu"}))
        view = await hub.view("eu")
        # two changes between two loads are one step of the history: from the view before to the view after
        assert [(c.base, c.revision, set(c.names)) for c in view.history] == [(5, 9, {"a", "c"})]
        store.set({"b": 1, "c": 1}, 12)
        hub.on_change(12, frozenset({"eu"}))
        view = await hub.view("eu")
        assert [(c.base, c.revision, set(c.names)) for c in view.history] == [(5, 9, {"a", "c"}), (9, 12, {"a"})]
        assert view.delta_body(4) is None  # before the history: a full view
        d5, d8 = view.delta_body(5), view.delta_body(8)
        assert d5 is not None and d5 is d8  # every node between two changes shares one body
        body = wsync.RegionBody.decode(d5[0], 1 << 20)
        assert body.names == ("a", "c") and [s.name for s in body.secrets] == ["c"] and body.base == 5
        d9 = view.delta_body(9)
        assert d9 is not None and wsync.RegionBody.decode(d9[0], 1 << 20).names == ("a",)
        store.data_rev = 3  # the database went back in time (restored from a copy)
        hub.on_change(3, frozenset({"eu"}))
        assert (await hub.view("eu")).history == ()

    run(go)


def test_a_notice_wakes_only_the_polls_of_the_regions_it_names() -> None:
    async def go(hub: Hub, store: FakeStore) -> None:
        looks, real_view = [], hub.view

        async def view(region: str, refresh: bool = False) -> Any:
            looks.append(region)  # every wake-up of a held poll looks at its region's view again
            return await real_view(region, refresh)

        hub.view = view  # type: ignore[method-assign]
        waiter = asyncio.create_task(hub.wait(NODE, "eu", 1, 5, timeout=10))
        await asyncio.sleep(0.05)
        assert looks == ["eu"]
        for _ in range(50):  # changes elsewhere (say, enrolments in other regions)
            hub.on_change(6, frozenset({"us"}))
        await asyncio.sleep(0.05)
        assert not waiter.done() and looks == ["eu"]  # never woken by them
        store.set({"a": 4, "b": 1}, 9)
        hub.on_change(9, frozenset({"*"}))  # "everything" (a LISTEN reconnect) wakes it
        got = await asyncio.wait_for(waiter, 5)
        assert got is not None and got[0].data_rev == 9

    run(go)


def test_after_the_first_load_only_what_changed_is_read() -> None:
    async def go(hub: Hub, store: FakeStore) -> None:
        store.set({f"s{i:03d}": 1 for i in range(300)}, 6)
        await hub.view("eu")
        assert len(store.rows_read) == 300
        store.rows_read.clear()
        store.set({**store.rows, "s007": 2}, 7)
        hub.on_change(7, frozenset({"eu"}))
        view = await hub.view("eu")
        assert store.rows_read == ["s007"]  # one secret read, not the region's 300
        assert len(view.entries) == 300 and view.entries["s007"][0].version == 2
        assert view.entries["s008"] is not None and view.history[-1].names == frozenset({"s007"})

    run(go)


def test_a_held_long_poll_is_answered_by_a_notice() -> None:
    async def go(hub: Hub, store: FakeStore) -> None:
        waiter = asyncio.create_task(hub.wait(NODE, "eu", 1, 5, timeout=10))
        await asyncio.sleep(0.05)
        assert not waiter.done() and hub.waiting == 1
        store.set({"a": 3, "b": 1}, 8)
        hub.on_change(8, frozenset({"eu"}))
        got = await asyncio.wait_for(waiter, 5)
        assert got is not None and got[0].data_rev == 8 and hub.waiting == 0
        assert await hub.wait(NODE, "eu", 1, 8, timeout=0.05) is None  # nothing new: times out

    run(go)


def test_a_held_poll_that_ends_leaves_the_regions_change_future_to_the_others() -> None:
    """A poll whose caller went away (its task cancelled) or whose hold ran out neither cancels nor
    keeps a callback on the region's shared change future: the other polls held there still wake."""

    async def go(hub: Hub, store: FakeStore) -> None:
        stays = asyncio.create_task(hub.wait(NODE, "eu", 1, 5, timeout=10))
        leaves = asyncio.create_task(hub.wait(NODE, "eu", 1, 5, timeout=10))
        short = asyncio.create_task(hub.wait(NODE, "eu", 1, 5, timeout=0.05))
        await asyncio.sleep(0.02)
        changed = hub._changed["eu"]
        callbacks = len(changed._callbacks)  # type: ignore[attr-defined]
        assert callbacks == 3
        leaves.cancel()
        assert await short is None  # its hold ran out
        await asyncio.gather(leaves, return_exceptions=True)
        assert not changed.cancelled() and not changed.done() and hub.waiting == 1
        assert len(changed._callbacks) == 1  # type: ignore[attr-defined]
        store.set({"a": 2, "b": 1}, 7)
        hub.on_change(7, frozenset({"eu"}))
        got = await asyncio.wait_for(stays, 5)
        assert got is not None and got[0].data_rev == 7 and hub.waiting == 0

    run(go)


def test_a_change_rereads_only_the_members_whose_rows_changed() -> None:
    """After the first load, a change reads again only new nodes and those whose node_rev moved; a
    node whose row is gone leaves; and a revocation in the (verified) chain applies to a kept member
    even when its row's node_rev was put back, as a database writer could."""

    async def go(hub: Hub, store: FakeStore) -> None:
        store.nodes = {f"n-{i:016x}": 1 for i in range(100)}
        view = await hub.view("eu")
        assert len(view.members) == 100 and len(store.nodes_read) == 100
        store.nodes_read.clear()
        store.nodes["n-new0000000000000"] = 6  # an enrolment
        store.nodes["n-0000000000000001"] = 6  # a grant or status change
        del store.nodes["n-0000000000000002"]  # a row gone
        store.data_rev = 6
        hub.on_change(6, frozenset({"eu"}))
        view = await hub.view("eu")
        assert sorted(store.nodes_read) == ["n-0000000000000001", "n-new0000000000000"]
        assert len(view.members) == 100 and "n-0000000000000002" not in view.members
        assert view.members["n-0000000000000001"].node_rev == 6
        store.nodes_read.clear()
        store.revoked_ids.add("n-0000000000000003")  # revoked, its node_rev left as it was
        store.data_rev = 7
        hub.on_change(7, frozenset({"eu"}))
        view = await hub.view("eu")
        assert store.nodes_read == [] and not view.members["n-0000000000000003"].active
        assert view.members["n-0000000000000004"].active
        for i in range(10, 50):  # many changed at once: the region's members are read whole
            store.nodes[f"n-{i:016x}"] = 8
        store.data_rev = 8
        hub.on_change(8, frozenset({"eu"}))
        view = await hub.view("eu")
        assert len(store.nodes_read) == 100 and not view.members["n-0000000000000003"].active

    run(go)
