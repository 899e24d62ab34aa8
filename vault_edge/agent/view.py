"""What the agent serves: an immutable view of decrypted secret versions, swapped whole.

A sync response is verified and decrypted into a new :class:`View` off to the side; only then is it
installed in one assignment (:meth:`AgentState.install`), so a reader sees the old view or the new
one, never a mix. Readers never lock.

Time comes from the state's :class:`~vault_edge.agent.clock.Clock` (real by default): the age of
the last contact on its monotonic clock, grace periods on its wall clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vault_edge.agent.clock import SYSTEM, Clock
from vault_edge.wire.egress import Route


@dataclass(frozen=True, slots=True)
class Entry:
    """One servable version of a secret. ``value`` is plaintext: never logged, never in a repr."""

    name: str
    version: int
    stage: str  # "current", "previous" or "pending"
    value: bytes = field(repr=False)
    expires_at: float | None = None  # wall-clock end of a `previous` grace period

    def live(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at


class View:
    """Immutable once built. Lookups are dict hits."""

    __slots__ = ("by_stage", "by_version", "egress", "names", "node", "region", "revision")

    def __init__(
        self, node: str, region: str, revision: int, entries: Iterable[Entry], egress: tuple[Route, ...] = ()
    ) -> None:
        self.node, self.region, self.revision = node, region, revision
        self.egress = egress  # the region's egress routes (agent/egress.py serves them)
        self.by_stage: dict[tuple[str, str], Entry] = {}
        self.by_version: dict[tuple[str, int], Entry] = {}
        for e in entries:
            self.by_stage[(e.name, e.stage)] = e
            self.by_version[(e.name, e.version)] = e
        self.names: tuple[str, ...] = tuple(sorted({n for n, _ in self.by_stage if (n, "current") in self.by_stage}))

    def __repr__(self) -> str:
        return f"View(node={self.node!r}, region={self.region!r}, revision={self.revision}, secrets={len(self.names)})"

    def lookup(
        self, name: str, version: int | None = None, stage: str | None = None, now: float | None = None
    ) -> Entry | None:
        """The entry for ``name`` (current by default), or None if absent or past its grace at wall-clock
        time ``now`` (default: the real clock)."""
        if version is not None:
            e = self.by_version.get((name, version))
        else:
            e = self.by_stage.get((name, stage or "current"))
        if e is None or (e.expires_at is not None and not e.live(SYSTEM.wall() if now is None else now)):
            return None
        return e

    def current_versions(self) -> dict[str, int]:
        return {n: self.by_stage[(n, "current")].version for n in self.names}


EMPTY = View("", "", 0, ())


class AgentState:
    """The agent's live state, shared by the sync loop and the socket server (one event loop).

    ``last_contact`` is the time, on ``clock``'s monotonic clock, of the last verified answer from the
    control plane (a sync or a signed ``unchanged``); ``reachable`` is False once a sync attempt has
    failed, until one succeeds. Methods taking ``now`` default to ``clock.monotonic()``.

    Change it through :meth:`install`, :meth:`contact` and :meth:`lost_contact` only: the socket API
    (:meth:`subscribe`) is told of every install and contact, and drops the answers it cached then.
    """

    def __init__(
        self,
        node: str = "",
        region: str = "",
        max_stale: float | None = None,
        stale_after: float = 75.0,
        *,
        clock: Clock = SYSTEM,
    ) -> None:
        self.view: View = View(node, region, 0, ())
        self.node, self.region = node, region
        self.loaded = False  # a view came from a sync or the disk cache
        self.last_contact: float | None = None
        self.reachable = False
        self.max_stale = max_stale
        self.stale_after = stale_after
        self.generation = 0  # bumped on every install; lets the socket server drop cached responses
        self.floor: dict[str, int] = {}  # each name's highest current version ever installed (anti-rollback)
        self.clock = clock
        self._watchers: list[asyncio.Future[None]] = []
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every install and every contact (what an answer depends on)."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def install(self, view: View) -> None:
        self.view = view
        self.loaded = True
        self.generation += 1
        self._changed()
        watchers, self._watchers = self._watchers, []
        for w in watchers:
            if not w.done():
                w.set_result(None)

    def contact(self, now: float | None = None) -> None:
        """Record an answer from the control plane at monotonic time ``now`` (default: the clock's now)."""
        self.last_contact = self.clock.monotonic() if now is None else now
        self.reachable = True
        self._changed()

    def lost_contact(self) -> None:
        self.reachable = False

    def age(self, now: float | None = None) -> float | None:
        """Seconds since the control plane was last heard from (None: never, in this process)."""
        if self.last_contact is None:
            return None
        return (self.clock.monotonic() if now is None else now) - self.last_contact

    def status(self, now: float | None = None) -> str:
        if not self.loaded:
            return "starting"
        age = self.age(now)
        if not self.reachable or age is None or age > self.stale_after:
            return "stale"
        return "ok"

    def too_stale(self, now: float | None = None) -> bool:
        """True when an operator-set ``--max-stale`` has passed: reads answer 503 ``too_stale``."""
        if self.max_stale is None:
            return False
        age = self.age(now)
        return age is None or age > self.max_stale

    def changed(self) -> asyncio.Future[None]:
        """A future resolved at the next install (for /v1/watch)."""
        fut = asyncio.get_running_loop().create_future()
        self._watchers.append(fut)
        return fut
