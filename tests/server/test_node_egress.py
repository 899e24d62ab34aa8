"""A node's egress counters reach its status (SQLite and PostgreSQL): carried in the signed sync
query, stored with its contact through the group-committed contact log, shown by ``GET /v1/nodes``
and ``GET /v1/nodes/{id}``. Malformed reports are refused with a 400, a report altered on the way
breaks the request's signature, and what a database writer puts in the column is not trusted."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import update

from tests.conftest import Api, enroll_node, signed_headers
from vault_edge.server.contacts import ContactLog
from vault_edge.server.storage import schema as t
from vault_edge.server.storage.records import Node
from vault_edge.wire.egress import REPORT_FIELDS, Report

OPENAI = (5, 0, 3, 0, 2, 0, 0, 40)  # requests, 1xx..5xx, failed, ms


def _sync(api: Api, node: str, keys: Any, extra: str = "") -> Any:
    target = f"/v1/agent/sync?since=0&wait=0&proto=2{extra}"
    return api.client.get(target, headers=signed_headers(keys, "GET", target, node, b""))


def _node(api: Api, node: str) -> dict[str, Any]:
    st, doc = api.call("GET", f"/v1/nodes/{node}")
    assert st == 200, doc
    return doc  # type: ignore[no-any-return]


def test_a_signed_sync_carries_the_nodes_egress_counts_to_its_status(api: Api) -> None:
    node, keys = enroll_node(api)
    assert _node(api, node)["egress"] is None  # nothing reported yet
    report = Report(1_700_000_000, (("openai", OPENAI), ("stripe", (1, 0, 0, 0, 0, 1, 0, 9))))
    r = _sync(api, node, keys, f"&egress={report.encode()}")
    assert r.status_code == 200, r.text
    listed = {n["id"]: n for n in api.call("GET", "/v1/nodes")[1]["nodes"]}[node]
    assert listed["egress"] == _node(api, node)["egress"]
    eg = listed["egress"]
    assert eg["since"] == 1_700_000_000 and eg["requests"] == 6
    assert eg["routes"]["openai"] == dict(zip(REPORT_FIELDS, OPENAI, strict=True))
    assert eg["routes"]["stripe"]["5xx"] == 1

    assert _sync(api, node, keys).status_code == 200  # a poll without a report keeps the last one
    assert _node(api, node)["egress"]["requests"] == 6
    later = Report(1_700_000_500, (("openai", (1, 0, 1, 0, 0, 0, 0, 2)),))  # the agent restarted
    assert _sync(api, node, keys, f"&egress={later.encode()}").status_code == 200
    assert _node(api, node)["egress"] == {**later.to_json(), "requests": 1}


def test_malformed_or_altered_reports_are_refused_and_change_nothing(api: Api) -> None:
    node, keys = enroll_node(api)
    good = Report(1, (("openai", OPENAI),)).encode()
    assert _sync(api, node, keys, f"&egress={good}").status_code == 200
    for bad in ("junk", "1/OpenAI:1:1:1:1:1:1:1:1", "1/a:1:2", "1/a:-1:0:0:0:0:0:0:0", "1/" + "x" * 5000):
        r = _sync(api, node, keys, f"&egress={bad}")
        assert r.status_code == 400, bad
        err = r.json()["error"]
        assert err["code"] == "bad_request" and "egress" in err["message"] and "Traceback" not in r.text
    # a report swapped on the way: the node signed another target
    target = f"/v1/agent/sync?since=0&wait=0&proto=2&egress={good}"
    headers = signed_headers(keys, "GET", target, node, b"")
    forged = target.replace(":5:0:3:", ":9:0:7:")
    r = api.client.get(forged, headers=headers)
    assert r.status_code == 401 and "signature" in r.json()["error"]["message"]
    assert _node(api, node)["egress"]["routes"]["openai"]["requests"] == 5


def test_a_database_writers_report_is_not_shown_and_unknown_nodes_are_404(api: Api) -> None:
    node, _ = enroll_node(api)
    ctx: Any = api.client.app.state.ctx
    with ctx.store.write() as tx:
        tx.conn.execute(update(t.nodes).where(t.nodes.c.id == node).values(egress="<script>not a report"))
    assert _node(api, node)["egress"] is None
    assert api.call("GET", "/v1/nodes/n-0000000000000000")[0] == 404
    st, doc = api.call("GET", "/v1/nodes/not-a-node")
    assert st == 404 and doc["error"]["code"] == "not_found"


def test_batched_contacts_keep_each_nodes_latest_report(api: Api) -> None:
    ctx: Any = api.client.app.state.ctx
    with ctx.store.write() as tx:
        rev = tx.next_revision()
        for i in range(3):
            tx.insert_node(Node(f"n-{i:016x}", "eu", b"b" * 32, b"s" * 32, "h", "active", 0.0, None, 0, rev))
    log = ContactLog(ctx)

    def rep(n: int) -> Report:
        return Report(7, (("r", (n, 0, n, 0, 0, 0, 0, n)),))

    async def burst() -> list[bool]:
        calls = [log.record("n-0000000000000000", f"a{i}", 1, rep(i)) for i in range(1, 6)]
        calls.append(log.record("n-0000000000000001", "b", 1, rep(9)))
        calls.append(log.record("n-0000000000000001", "b", 1, rep(99)))  # a replay: not recorded
        calls.append(log.record("n-0000000000000002", "c", 1, None))
        return await asyncio.gather(*calls)

    assert asyncio.run(burst()) == [True] * 6 + [False, True]
    with ctx.store.read() as tx:
        got = {n.id: n.egress for n in tx.list_nodes()}
    assert got == {
        "n-0000000000000000": rep(5).encode(),
        "n-0000000000000001": rep(9).encode(),
        "n-0000000000000002": None,
    }
