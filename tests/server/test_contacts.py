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


def test_a_lone_contact_lingers_for_company_and_a_full_batch_does_not(api: Api) -> None:
    """Contacts arriving one by one within the linger share a commit; a lingering batch that fills up
    is written at once, without waiting the linger out."""
    ctx: Any = api.client.app.state.ctx
    with ctx.store.write() as tx:
        rev = tx.next_revision()
        for i in range(ContactLog.FULL):
            tx.insert_node(Node(f"m-{i:016x}", "eu", b"b" * 32, b"s" * 32, "h", "active", 0.0, None, 0, rev))

    async def trickle(log: ContactLog) -> list[bool]:
        calls = []
        for i in range(5):  # five requests 2 ms apart, inside one linger
            calls.append(asyncio.create_task(log.record(f"m-{i:016x}", f"t-{i}", 1)))
            await asyncio.sleep(0.002)
        return await asyncio.gather(*calls)

    log = ContactLog(ctx, linger=0.5)
    assert asyncio.run(trickle(log)) == [True] * 5
    assert log.batches == 1  # the five shared one commit

    async def fills_up(log: ContactLog) -> bool:
        first = asyncio.create_task(log.record("m-0000000000000000", "f-0", 2))
        await asyncio.sleep(0.05)  # the writer is lingering for company
        assert not first.done()
        rest = [log.record(f"m-{i:016x}", f"f-{i}", 2) for i in range(1, ContactLog.FULL)]
        got = await asyncio.wait_for(asyncio.gather(first, *rest), 20)  # not the 600 s linger
        return got == [True] * ContactLog.FULL

    log = ContactLog(ctx, linger=600.0)
    assert asyncio.run(fills_up(log)) and log.batches == 1
    with ctx.store.read() as tx:
        assert {n.id: n.applied_revision for n in tx.list_nodes()}["m-0000000000000003"] == 2
