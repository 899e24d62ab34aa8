"""Sync long-polls held while the control plane is sealed, released the moment it unseals.

Without this, a sealed control plane answers every agent's sync with a 503 at once, and each agent
backs off (jittered, exponential, up to 30 s): after the unseal, the fleet comes back over the next
half-minute, and a rotation made right after an unseal waits for it. Answering "come back in a
second" instead would make the fleet hammer a sealed server. So, as a long-poll waits for a change,
a sealed server holds an agent's poll until it unseals (then serves it as usual: authentication,
the hold for a change, the signed answer) or until the poll's wait ends (then a 503 ``sealed`` with
``Retry-After: 0``: the hold was the wait, and the agent polls again at once, to be held again).
A sealed fleet thus makes one request per agent per wait, as an unsealed idle one does, and an
agent learns of the unseal within one round trip.

Bounds, since nobody can be authenticated while sealed (node rows are checked with keys derived
from the root key): only a request carrying well-formed node-signature headers with a timestamp
inside the window is held; it is held at most until that timestamp is half the clock-skew window
old (so the signature is still good when it is checked after the unseal), at most its ``wait``,
at most ``sync_max_wait_s``; and at most ``sealed_hold_max`` polls are held at once. Past that, a
503 ``sealed`` with ``Retry-After: sealed_retry_after_s``, as a shed enrolment gets.

Replicas unseal one by one (each holds its root key in memory; see the README), so the event is this
process's own: a replica releases its held polls when it, itself, unseals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from vault_edge import wire
from vault_edge.server.barrier import Barrier


class SealHold:
    def __init__(self, barrier: Barrier, limit: int) -> None:
        self.barrier, self.limit = barrier, limit
        self.held = 0  # polls held now (a gauge)
        self.shed = 0  # polls refused at once for want of room (a counter)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._released: asyncio.Future[None] | None = None
        barrier.add_unseal_listener(self._notify_threadsafe)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def _notify_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:
        fut, self._released = self._released, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def budget(self, headers: Mapping[str, str], wait: float, now: float, max_wait: float) -> float:
        """How long a sealed server may hold this poll: 0 unless it carries a node's signature headers
        with a timestamp inside the window; never past half the window from that timestamp."""
        if not wire.valid_node_id(headers.get(wire.H_NODE, "")) or not headers.get(wire.H_SIGNATURE):
            return 0.0
        try:
            ts = wire.parse_timestamp(headers.get(wire.H_TIMESTAMP, ""))
        except (ValueError, wire.WireError):
            return 0.0
        if abs(now - ts) > wire.CLOCK_SKEW_S:
            return 0.0
        return max(0.0, min(wait, max_wait, ts + wire.CLOCK_SKEW_S / 2 - now))

    async def hold(self, timeout: float) -> bool | None:
        """Wait up to ``timeout`` seconds for the unseal: True once unsealed, False when the time is
        up and still sealed, None when ``limit`` polls are held already (nothing waited)."""
        if not self.barrier.sealed:
            return True
        if self.held >= self.limit or self._loop is None:
            self.shed += 1
            return None
        if self._released is None:
            self._released = self._loop.create_future()
        released = self._released  # taken before the check below: an unseal in between still resolves it
        if not self.barrier.sealed:
            return True
        self.held += 1
        try:
            await asyncio.wait_for(asyncio.shield(released), timeout)
        except TimeoutError:
            pass
        finally:
            self.held -= 1
        return not self.barrier.sealed
