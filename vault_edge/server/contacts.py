"""Group commit for node contacts: every signed node request spends its nonce and records the node's
contact and applied revision, and many requests share one transaction.

A request waits for the commit of the batch it joined, so the semantics are those of one transaction
per request (a replayed nonce is refused before anything is served, on every replica, since nonces
live in the shared database), at a fraction of the cost: after a rotation a thousand agents re-poll
at once, and they cost a handful of commits instead of a thousand. A batch of ``FULL`` or more is
written as soon as the previous one is done, with whatever arrived meanwhile; a smaller one first
waits up to ``linger`` seconds (``VAULT_EDGE_CONTACT_LINGER_MS``, default 20 ms) for more, or until it is
full. Between changes a fleet's polls come back one by one as their holds end (10,000 nodes holding
30 s: ~330 a second), and a commit of one costs about as much CPU as a commit of sixty: the linger
makes them a few commits a second. It delays only a request that arrives alone, by at most that.

A request may carry the node's egress counters (``wire.egress.Report``, cumulative since the agent
started): the last one of a node in a batch is stored with its contact, in the same statement. Like
the contact time and the applied revision, it is a report, not authority, so it is not in the node
row's MAC (a database writer could alter it as it could alter ``last_seen``; it grants nothing).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from vault_edge import wire
from vault_edge.server.context import Context
from vault_edge.wire import egress as wegress

log = logging.getLogger("vault_edge.contacts")

Pending = tuple[str, str, int, "wegress.Report | None", "asyncio.Future[bool]"]
Contact = tuple[str, str, int, "wegress.Report | None"]  # node, nonce, applied revision, egress counters


class ContactLog:
    FULL = 64  # a batch this big is written at once

    def __init__(self, ctx: Context, linger: float = 0.0) -> None:
        self.ctx, self.linger = ctx, linger
        self._pending: list[Pending] = []
        self._writer: asyncio.Task[None] | None = None
        self._full: asyncio.Future[None] | None = None  # set while lingering: resolved once FULL arrived
        self.batches = 0
        self.on_applied: Callable[[dict[str, int]], None] | None = None  # after commit: node → applied revision

    async def record(self, node_id: str, nonce: str, applied: int, report: wegress.Report | None = None) -> bool:
        """Spend ``nonce`` and record contact (and ``report``, if any); False if the nonce was already
        spent (a replay)."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((node_id, nonce, applied, report, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        elif self._full is not None and len(self._pending) >= self.FULL and not self._full.done():
            self._full.set_result(None)
        return await fut

    async def _gather(self) -> None:
        """Linger (at most ``linger`` seconds) while the pending batch is smaller than FULL."""
        if self.linger <= 0 or len(self._pending) >= self.FULL:
            return
        self._full = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._full, self.linger)  # once per batch: the plain way will do
        except TimeoutError:
            pass
        finally:
            self._full = None

    async def _drain(self) -> None:
        while self._pending:
            await self._gather()
            batch, self._pending = self._pending, []
            try:
                fresh = await asyncio.to_thread(self._write, [(n, c, a, r) for n, c, a, r, _ in batch])
            except Exception as exc:
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            seen: set[tuple[str, str]] = set()
            for node_id, nonce, _, _, fut in batch:
                ok = (node_id, nonce) in fresh and (node_id, nonce) not in seen
                seen.add((node_id, nonce))
                if not fut.done():
                    fut.set_result(ok)

    def _write(self, batch: list[Contact]) -> set[tuple[str, str]]:
        now = self.ctx.clock()
        expires = now + 2 * wire.CLOCK_SKEW_S
        unique = list(dict.fromkeys((n, c) for n, c, _, _ in batch))
        with self.ctx.store.write(serialize=False) as tx:
            fresh = tx.spend_nonces([(n, c, expires) for n, c in unique])
            applied: dict[str, int] = {}
            reports: dict[str, str] = {}
            first: set[tuple[str, str]] = set()
            for n, c, a, r in batch:  # a nonce twice in one batch: only its first request counts
                if (n, c) in fresh and (n, c) not in first:
                    first.add((n, c))
                    applied[n] = max(applied.get(n, 0), a)
                    if r is not None:  # the latest of the batch (counters only grow, or restart)
                        reports[n] = r.encode()
            tx.touch_nodes([(n, now, a, reports.get(n)) for n, a in applied.items()])
        self.batches += 1
        if self.on_applied is not None and applied:
            self.on_applied(applied)
        return fresh
