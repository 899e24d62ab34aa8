"""The agent's view and state with a fake clock: lookups, grace periods, age, staleness, change
notices. (The age carried over a restart from the disk cache: ``test_staleness``.)"""

from __future__ import annotations

import asyncio

from tests.agent.inproc import NODE, REGION, FakeClock
from vault_edge.agent.clock import SYSTEM, SystemClock
from vault_edge.agent.view import AgentState, Entry, View

WALL = 1_800_000_000.0


def view(revision: int = 1) -> View:
    return View(
        NODE,
        REGION,
        revision,
        [
            Entry("k", 3, "current", b"v3"),
            Entry("k", 2, "previous", b"v2", expires_at=WALL + 10),
            Entry("staged-only", 1, "pending", b"p1"),
        ],
    )


def test_the_real_clock_is_the_default() -> None:
    assert isinstance(SYSTEM, SystemClock) and AgentState().clock is SYSTEM
    before = SYSTEM.monotonic()
    assert SYSTEM.monotonic() >= before and SYSTEM.wall() > 1.7e9


def test_lookups_by_stage_and_version_with_the_grace_period_on_the_wall_clock() -> None:
    v = view()
    assert v.names == ("k",)  # a name without a current version is not listed
    assert v.current_versions() == {"k": 3}
    assert v.lookup("k").value == b"v3"  # type: ignore[union-attr]
    assert v.lookup("k", version=3) is v.lookup("k", stage="current")
    assert v.lookup("k", stage="previous", now=WALL + 9.999).value == b"v2"  # type: ignore[union-attr]
    assert v.lookup("k", stage="previous", now=WALL + 10) is None
    assert v.lookup("k", version=2, now=WALL + 10) is None
    assert v.lookup("k", stage="pending") is None and v.lookup("nope") is None
    assert v.lookup("staged-only", stage="pending").version == 1  # type: ignore[union-attr]
    assert "v3" not in repr(v) and "v3" not in repr(v.lookup("k"))


def test_age_status_and_staleness_follow_the_clock() -> None:
    clock = FakeClock()
    st = AgentState(NODE, REGION, max_stale=30, stale_after=10, clock=clock)
    assert (st.status(), st.age(), st.too_stale()) == ("starting", None, True)
    st.install(view())
    assert st.status() == "stale"  # never heard from the control plane
    st.contact()
    assert (st.status(), st.age(), st.too_stale()) == ("ok", 0.0, False)
    clock.advance(10)
    assert st.status() == "ok"
    clock.advance(0.5)
    assert (st.status(), st.age(), st.too_stale()) == ("stale", 10.5, False)
    clock.advance(19.5)
    assert not st.too_stale()
    clock.advance(0.5)
    assert st.too_stale()
    st.contact(clock.now - 1)  # an explicit time (as from the disk cache)
    assert (st.status(), st.age(), st.too_stale()) == ("ok", 1.0, False)
    st.lost_contact()
    assert st.status() == "stale" and not st.too_stale()
    assert not AgentState(clock=clock).too_stale()  # no --max-stale: never too stale, even never contacted


def test_subscribers_hear_of_installs_and_contacts_only() -> None:
    st = AgentState(clock=FakeClock())
    heard: list[int] = []

    def listener() -> None:
        heard.append(st.generation)

    st.subscribe(listener)
    st.install(view())
    st.contact()
    st.lost_contact()
    assert heard == [1, 1]
    st.unsubscribe(listener)
    st.unsubscribe(listener)  # twice is harmless
    st.install(view(2))
    assert heard == [1, 1]


def test_watchers_are_woken_by_the_next_install() -> None:
    async def go() -> int:
        st = AgentState(clock=FakeClock())
        fut = st.changed()
        asyncio.get_running_loop().call_soon(st.install, view(5))
        await asyncio.wait_for(fut, 1)
        return st.view.revision

    assert asyncio.run(go()) == 5
