"""The group-committed contact log, on SQLite and PostgreSQL: many requests, few transactions, and
a nonce spent once however the requests are batched."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import Api
from vault_edge.server.contacts import ContactLog
from vault_edge.server.storage.records import Node


def test_batched_contacts_spend_each_nonce_once_and_record_applied(api: Api) -> None:
    ctx: Any = api.client.app.state.ctx
    with ctx.store.write() as tx:
        rev = tx.next_revision()
        for i in range(50):
            tx.insert_node(Node(f"n-{i:016x}", "eu", b"b" * 32, b"s" * 32, "h", "active", 0.0, None, 0, rev))
    log = ContactLog(ctx)

    async def burst() -> list[bool]:
        calls = [log.record(f"n-{i:016x}", f"nonce-{i}", i) for i in range(50)]
        calls += [log.record("n-0000000000000007", "nonce-7", 99)]  # the same nonce again, same burst
        return await asyncio.gather(*calls)

    results = asyncio.run(burst())
    assert results[:50] == [True] * 50 and results[50] is False
    assert log.batches < 51  # grouped: fewer transactions than requests
    assert asyncio.run(log.record("n-0000000000000003", "nonce-3", 5)) is False  # replay, later batch
    with ctx.store.read() as tx:
        nodes = {n.id: n for n in tx.list_nodes()}
    assert nodes["n-0000000000000007"].applied_revision == 7  # the replay recorded nothing
    assert nodes["n-0000000000000031"].applied_revision == 49 and nodes["n-0000000000000031"].last_seen
