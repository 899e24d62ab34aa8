"""Sync protocol 2 on the control plane's side (SQLite and PostgreSQL): a node behind by one change
gets only that change, in a body shared by the region's nodes under a small envelope of its own;
a node further behind than the region's history, or asking for it, gets the full view; agents from
before deltas still get protocol 1. Every answer is opened with the agent's own ``open_answer``."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import Api, enroll_node, server_key, signed_headers
from vault_edge import wire
from vault_edge.agent.bundle import Opened, open_answer
from vault_edge.agent.identity import Enrolment, Identity
from vault_edge.agent.view import EMPTY, View
from vault_edge.wire import sync as wsync

SECRETS = 200


class Node:
    def __init__(self, api: Api, tmp: Path) -> None:
        self.api = api
        self.id, pair = enroll_node(api)
        self.pair = pair
        self.identity = Identity(tmp, pair, Enrolment(self.id, "eu", "", server_key(api), time.time()))
        self.view: View = EMPTY
        self.sizes: list[int] = []

    def get(self, since: int | None = None, *, full: bool = False, proto: int | None = 2) -> tuple[Any, str]:
        target = f"/v1/agent/sync?since={self.view.revision if since is None else since}&wait=0"
        target += f"&proto={proto}" if proto else ""
        target += "&full=1" if full else ""
        headers = signed_headers(self.pair, "GET", target, self.id, b"")
        resp = self.api.client.get(target, headers=headers)
        assert resp.status_code == 200, resp.text
        return resp, headers[wire.H_NONCE]

    def sync(self, *, full: bool = False) -> tuple[Opened, wsync.Envelope, wsync.RegionBody | None]:
        resp, nonce = self.get(full=full)
        self.sizes.append(len(resp.content))
        opened = open_answer(
            self.identity, resp.content, resp.headers[wire.H_SERVER_SIGNATURE], nonce=nonce, held=self.view
        )
        if opened.view is not None:
            self.view = opened.view
        env_raw, body = wsync.split(resp.content)
        env = wsync.Envelope.decode(env_raw)
        return opened, env, wsync.RegionBody.decode(body, 1 << 26) if body else None


def _value(node: Node, name: str) -> bytes:
    e = node.view.lookup(name)
    assert e is not None
    return e.value


def test_one_rotation_sends_each_node_one_secret_in_a_shared_body(api: Api, tmp_path: Path) -> None:
    for i in range(SECRETS):
        assert api.call("PUT", f"/v1/secrets/eu/s{i:04d}", json={"value": "x" * 256, "regions": ["eu"]})[0] == 200
    a, b = Node(api, tmp_path / "a"), Node(api, tmp_path / "b")
    for n in (a, b):
        opened, env, body = n.sync()
        assert opened.kind == env.kind == "full" and body is not None and len(body.secrets) == SECRETS
    full_size = a.sizes[-1]
    assert api.call("POST", "/v1/rotate/eu/s0007", json={"value": "y" * 256})[0] == 200
    bodies = []
    for n in (a, b):
        opened, env, body = n.sync()
        assert opened.kind == "delta" and body is not None and body.names == ("eu/s0007",)
        assert {(s.version, s.stage) for s in body.secrets} == {(2, "current"), (1, "previous")}
        assert _value(n, "eu/s0007") == b"y" * 256 and _value(n, "eu/s0008") == b"x" * 256
        assert len(n.view.names) == SECRETS
        bodies.append(wsync.split(n.get(since=env.since)[0].content)[1])  # asked again: the same body
    assert bodies[0] == bodies[1]  # one body for the region, whatever the node
    print(f"\n[delta] full view {full_size} B; one rotation {a.sizes[-1]} B per node")
    assert a.sizes[-1] <= 2048 < full_size  # the goal: ≤ 2 KB per node per rotation, whatever the region holds


def test_a_node_two_changes_behind_gets_both_and_a_deletion_is_a_name_without_versions(
    api: Api, tmp_path: Path
) -> None:
    for name in ("eu/a", "eu/b", "eu/c"):
        api.call("PUT", f"/v1/secrets/{name}", json={"value": name + "-1", "regions": ["eu"]})
    n = Node(api, tmp_path)
    n.sync()
    api.call("POST", "/v1/rotate/eu/a", json={"value": "eu/a-2"})
    assert api.call("DELETE", "/v1/secrets/eu/c")[0] == 200
    opened, _, body = n.sync()
    assert opened.kind == "delta" and body is not None and set(body.names) == {"eu/a", "eu/c"}
    assert not [s for s in body.secrets if s.name == "eu/c"]
    assert n.view.names == ("eu/a", "eu/b") and _value(n, "eu/a") == b"eu/a-2"


def test_full_is_answered_at_once_and_nothing_new_is_a_signed_unchanged(api: Api, tmp_path: Path) -> None:
    api.call("PUT", "/v1/secrets/eu/a", json={"value": "v", "regions": ["eu"]})
    n = Node(api, tmp_path)
    n.sync()
    opened, env, body = n.sync()
    assert opened.kind == env.kind == "unchanged" and body is None and env.revision == env.since == n.view.revision
    opened, env, body = n.sync(full=True)
    assert opened.kind == "full" and body is not None and [s.name for s in body.secrets] == ["eu/a"]


def test_a_node_behind_the_history_gets_the_full_view(api: Api, tmp_path: Path) -> None:
    api.call("PUT", "/v1/secrets/eu/a", json={"value": "v1", "regions": ["eu"]})
    n = Node(api, tmp_path)
    n.sync()
    old = n.view.revision
    # The region's view now was loaded after `old`: its history starts at the first change it saw.
    api.call("PUT", "/v1/secrets/eu/b", json={"value": "b", "regions": ["eu"]})
    n.sync()
    resp, _ = n.get(since=1)  # a revision before anything this process saw of the region
    env = wsync.Envelope.decode(wsync.split(resp.content)[0])
    assert env.kind == "full" and env.since == 1
    resp, _ = n.get(since=old)
    assert wsync.Envelope.decode(wsync.split(resp.content)[0]).kind == "delta"


def test_agents_from_before_deltas_still_get_protocol_1(api: Api, tmp_path: Path) -> None:
    api.call("PUT", "/v1/secrets/eu/a", json={"value": "v1", "regions": ["eu"]})
    n = Node(api, tmp_path)
    resp, nonce = n.get(since=0, proto=None)
    doc = json.loads(resp.content)
    assert (doc["v"], doc["kind"], doc["node"], doc["nonce"]) == (1, "sync", n.id, nonce)
    assert [s["name"] for s in doc["secrets"]] == ["eu/a"] and doc["grants"][0]["region"] == "eu"


def _commit_during_the_next_view_load(api: Api, monkeypatch: Any, method: str, change: Any) -> None:
    """The next load of a region's view runs ``change()`` (a committed change, from another thread)
    when it calls ``Tx.method``: between its reading the region's revision and the rows."""
    from vault_edge.server.storage.repo import Tx

    original = getattr(Tx, method)
    pending = [True]

    def racing(self: Tx, *a: Any, **kw: Any) -> Any:
        if pending and not self.writing:
            pending.clear()
            done: list[Any] = []
            t = threading.Thread(target=lambda: done.append(change()))
            t.start()
            t.join()
            assert done and done[0][0] == 200, done
        return original(self, *a, **kw)

    monkeypatch.setattr(Tx, method, racing)
    hub = api.client.app.state.hub
    hub._views.clear()  # read whole (as after a restart), not from the previous view and the change log
    hub.notify_threadsafe(0, frozenset({"eu"}))  # the view is loaded again on next use
    time.sleep(0.2)


def test_a_rotation_committed_while_a_view_loads_still_reaches_the_nodes(
    api: Api, tmp_path: Path, monkeypatch: Any
) -> None:
    """A view is read in one snapshot: on PostgreSQL its rows were read after its revision, so a
    rotation committed between the two was in a view still at the old revision (nodes there were told
    "unchanged"), and the next view, the same rows, had no change to send: the rotation never came."""
    api.call("PUT", "/v1/secrets/app/key", json={"value": "v1", "regions": ["eu"]})
    node = Node(api, tmp_path)
    node.sync()
    rotate = lambda: api.call("POST", "/v1/rotate/app/key", json={"value": "v2"})  # noqa: E731
    _commit_during_the_next_view_load(api, monkeypatch, "region_snapshot", rotate)
    for _ in range(2):
        node.sync()
    entry = node.view.lookup("app/key")
    assert entry is not None and entry.value == b"v2"


def test_an_egress_route_deleted_while_a_view_loads_is_deleted_on_the_nodes(
    api: Api, tmp_path: Path, monkeypatch: Any
) -> None:
    api.call("PUT", "/v1/secrets/app/key", json={"value": "v1", "regions": ["eu"]})
    route = {"name": "api", "upstream": "https://api.example.com", "secret": "app/key", "inject": ["query:key={value}"]}
    assert api.call("POST", "/v1/egress", json=route)[0] == 200
    node = Node(api, tmp_path)
    node.sync()
    assert [r.name for r in node.view.egress] == ["api"]
    delete = lambda: api.call("DELETE", "/v1/egress/api")  # noqa: E731
    _commit_during_the_next_view_load(api, monkeypatch, "list_egress", delete)
    for _ in range(2):
        node.sync()
    assert node.view.egress == ()
