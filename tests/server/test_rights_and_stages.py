"""Rights that cannot grow, stages that only move forward, changes that stay whole under concurrency,
and a revocation an agent can prove. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from tests.conftest import Api, enroll_node, run_concurrently, signed_headers
from vault_edge import wire
from vault_edge.crypto import signing


def _stages(api: Api, name: str) -> dict[str, int]:
    hist = api.call("GET", f"/v1/history/{name}")[1]
    return {s["stage"]: v["version"] for v in hist["versions"] for s in v["stages"] if not s["expired"]}


# -- stages only move forward ------------------------------------------------------------------
def test_promoting_a_pending_version_older_than_current_makes_it_a_new_version(api: Api) -> None:
    """Agents refuse to go back a version (anti-rollback), so promote never moves `current` backwards:
    a pending v2 promoted after v3 became current is issued as v4, holding v2's value."""
    api.call("PUT", "/v1/secrets/app/key", json={"value": "one", "regions": ["eu"]})
    assert api.call("POST", "/v1/rotate/app/key", json={"value": "staged", "stage": "pending"})[1]["version"] == 2
    assert api.call("POST", "/v1/rotate/app/key", json={"value": "three"})[1]["version"] == 3
    st, doc = api.call("POST", "/v1/promote/app/key", json={})
    assert (st, doc["version"]) == (200, 4), doc
    cur = api.call("GET", "/v1/secrets/app/key")[1]
    assert (cur["value"], cur["version"]) == ("staged", 4)
    assert _stages(api, "app/key") == {"current": 4, "previous": 3}
    origins = [v["origin"] for v in api.call("GET", "/v1/history/app/key")[1]["versions"]]
    assert origins == ["put", "rotate", "rotate", "promote:2"]
    assert api.call("POST", "/v1/promote/app/key", json={})[0] == 409  # nothing pending any more


def test_promoting_a_pending_version_newer_than_current_moves_the_stage(api: Api) -> None:
    api.call("PUT", "/v1/secrets/app/key", json={"value": "one", "regions": ["eu"]})
    api.call("POST", "/v1/rotate/app/key", json={"value": "two", "stage": "pending"})
    assert api.call("GET", "/v1/secrets/app/key")[1]["value"] == "one"  # staged, not served
    st, doc = api.call("POST", "/v1/promote/app/key", json={})
    assert (st, doc["version"]) == (200, 2)
    assert _stages(api, "app/key") == {"current": 2, "previous": 1}


def test_a_deleted_secret_created_again_starts_with_nothing_staged(api: Api) -> None:
    api.call("PUT", "/v1/secrets/app/key", json={"value": "old-one", "regions": ["eu"], "grace": "1h"})
    api.call("POST", "/v1/rotate/app/key", json={"value": "old-two"})
    api.call("POST", "/v1/rotate/app/key", json={"value": "old-pending", "stage": "pending"})
    assert api.call("DELETE", "/v1/secrets/app/key")[0] == 200
    st, doc = api.call("PUT", "/v1/secrets/app/key", json={"value": "new-life"})
    assert (st, doc["version"]) == (200, 4)
    assert _stages(api, "app/key") == {"current": 4}
    assert api.call("GET", "/v1/secrets/app/key", params={"stage": "previous"})[0] == 404
    assert api.call("GET", "/v1/secrets/app/key", params={"stage": "pending"})[0] == 404
    assert api.call("GET", "/v1/secrets/app/key")[1]["value"] == "new-life"


def test_a_deleted_secret_created_again_does_not_keep_its_old_schedule(api: Api) -> None:
    """Else the old schedule would replace the value the operator just put, one period later."""
    api.call("PUT", "/v1/secrets/db/pw", json={"generate": "32:hex", "rotate_every": "1h", "regions": ["eu"]})
    api.call("DELETE", "/v1/secrets/db/pw")
    assert api.call("PUT", "/v1/secrets/db/pw", json={"value": "operator-chosen"})[0] == 200
    hist = api.call("GET", "/v1/history/db/pw")[1]
    assert (hist["rotate_every_s"], hist["next_rotation_at"], hist["generate"]) == (None, None, None)
    assert hist["regions"] == ["eu"]  # never wider by surprise
    assert api.call("POST", "/v1/rotate/db/pw", json={})[0] == 400  # no spec left to generate from


def test_moving_a_secret_to_other_regions_only_keeps_every_version_readable(api: Api) -> None:
    api.call("PUT", "/v1/secrets/app/key", json={"value": "v1", "regions": ["eu"]})
    api.call("POST", "/v1/rotate/app/key", json={"value": "v2", "grace": "1h"})
    st, doc = api.call("PUT", "/v1/secrets/app/key", json={"value": "v3", "regions": ["us"]})
    assert (st, doc["regions"]) == (200, ["us"]), doc
    for version, value in ((1, "v1"), (2, "v2"), (3, "v3")):
        got = api.call("GET", "/v1/secrets/app/key", params={"version": version})[1]
        assert got["value"] == value
    assert api.call("GET", "/v1/history/app/key")[1]["regions"] == ["us"]


def test_concurrent_changes_to_one_secret_each_get_their_own_version(api: Api) -> None:
    """On PostgreSQL, writers are serialized like SQLite's: none reads a latest version that another
    is about to replace, so none fails on a duplicate version (a 500)."""
    api.call("PUT", "/v1/secrets/app/key", json={"value": "v0", "regions": ["eu"]})
    results: list[tuple[int, Any]] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        for j in range(3):
            out = api.call("POST", "/v1/rotate/app/key", json={"value": f"w{i}-{j}"})
            with lock:
                results.append(out)

    run_concurrently(writer, 8)
    assert [st for st, _ in results] == [200] * 24, [doc for st, doc in results if st != 200][:3]
    assert sorted(doc["version"] for _, doc in results) == list(range(2, 26))
    assert len({doc["revision"] for _, doc in results}) == 24
    assert api.call("GET", "/v1/secrets/app/key")[1]["version"] == 25


# -- rights never grow -------------------------------------------------------------------------
def _token(api: Api, **body: Any) -> tuple[int, Any]:
    return api.call("POST", "/v1/tokens", json={"name": "t", **body})  # name: overridable in body


def test_a_scoped_admin_cannot_mint_broader_tokens_or_touch_what_is_global(api: Api) -> None:
    st, doc = _token(api, prefixes=["team-a/"], verbs=["read", "write", "admin"], ttl="1h")
    assert st == 200
    scoped = Api(api.client, doc["token"])
    scoped_id, scoped_expiry = doc["id"], doc["expires_at"]

    for body, why in [
        ({"prefixes": [""], "verbs": ["read"]}, "outside its prefixes"),
        ({"prefixes": ["team-b/"], "verbs": ["read"]}, "outside its prefixes"),
        ({"prefixes": ["team-"], "verbs": ["read"]}, "outside its prefixes"),
        ({"prefixes": ["team-a/x/"], "verbs": ["delete"]}, "does not hold"),
    ]:
        st, err = _token(scoped, **body)
        assert st == 403 and why in err["error"]["message"], (body, err)

    st, child = _token(scoped, prefixes=["team-a/ci/"], verbs=["read"], ttl="30d")
    assert st == 200
    assert child["expires_at"] <= scoped_expiry  # never outlives its maker

    root_id = next(t["id"] for t in api.call("GET", "/v1/tokens")[1]["tokens"] if t["name"] == "root")
    assert scoped.call("DELETE", f"/v1/tokens/{root_id}")[0] == 403
    assert {t["id"] for t in scoped.call("GET", "/v1/tokens")[1]["tokens"]} == {scoped_id, child["id"]}
    assert scoped.call("DELETE", f"/v1/tokens/{child['id']}")[0] == 200

    for method, path, body in [
        ("POST", "/v1/regions", {"name": "ap"}),
        ("POST", "/v1/regions/eu/rekey", None),
        ("POST", "/v1/nodes/tokens", {"region": "eu"}),
        ("POST", "/v1/sys/seal", None),
        ("GET", "/v1/audit", None),
        ("GET", "/v1/audit/verify", None),
    ]:
        st, err = scoped.call(method, path, json=body)
        assert st == 403 and "every name" in err["error"]["message"], (path, err)
    assert api.call("GET", "/v1/sys/status")[1]["sealed"] is False
    assert [r["name"] for r in api.call("GET", "/v1/regions")[1]["regions"]] == ["eu", "us"]


def test_revoking_a_token_revokes_every_token_made_from_it(api: Api) -> None:
    st, parent = _token(api, prefixes=["team-a/"], verbs=["read", "admin"])
    assert st == 200
    st, child = _token(Api(api.client, parent["token"]), prefixes=["team-a/ci/"], verbs=["read", "admin"])
    assert st == 200
    st, grandchild = _token(Api(api.client, child["token"]), prefixes=["team-a/ci/x/"], verbs=["read"])
    assert st == 200
    _, sibling = _token(api, prefixes=["team-a/"], verbs=["list"])  # made by root: unaffected
    st, doc = api.call("DELETE", f"/v1/tokens/{parent['id']}")
    assert st == 200 and sorted(doc["descendants_revoked"]) == sorted([child["id"], grandchild["id"]])
    for tok in (parent, child, grandchild):
        assert Api(api.client, tok["token"]).call("GET", "/v1/secrets")[0] == 401
    assert Api(api.client, sibling["token"]).call("GET", "/v1/secrets")[0] == 200


def test_a_token_revoked_while_its_request_is_in_flight_makes_nothing(api: Api, monkeypatch: Any) -> None:
    """The maker is checked again inside the write: a child made by a token revoked between its
    authentication and the write would escape the cascade."""
    from vault_edge.server.auth import Principal

    _, parent = _token(api, prefixes=["team-a/"], verbs=["read", "admin"])
    real, done = Principal.require_grant, []

    def revoke_meanwhile(self: Principal, *args: Any) -> Any:  # after authentication, before the write
        if not done:
            done.append(True)
            assert api.call("DELETE", f"/v1/tokens/{parent['id']}")[0] == 200
        return real(self, *args)

    monkeypatch.setattr(Principal, "require_grant", revoke_meanwhile)
    st, err = _token(Api(api.client, parent["token"]), name="late", prefixes=["team-a/x/"], verbs=["read"])
    assert st == 401, err
    assert "late" not in [t["name"] for t in api.call("GET", "/v1/tokens")[1]["tokens"]]


def test_the_cascade_goes_through_tokens_revoked_before(api: Api) -> None:
    """A live token under a revoked one (made before lineage was kept, or by any path) is still reached
    by revoking an ancestor."""
    from vault_edge.server import auth

    _, top = _token(api, prefixes=["team-a/"], verbs=["read", "admin"])
    _, mid = _token(Api(api.client, top["token"]), prefixes=["team-a/"], verbs=["read", "admin"])
    assert api.call("DELETE", f"/v1/tokens/{mid['id']}")[0] == 200
    ctx = api.client.app.state.ctx
    with ctx.store.write() as tx:
        secret, orphan = auth.create_token(tx, "orphan", ("team-a/",), ("list",), ctx.clock(), parent=mid["id"])
    assert Api(api.client, secret).call("GET", "/v1/secrets")[0] == 200
    st, doc = api.call("DELETE", f"/v1/tokens/{top['id']}")
    assert st == 200 and doc["descendants_revoked"] == [orphan.id]
    assert Api(api.client, secret).call("GET", "/v1/secrets")[0] == 401


def test_no_token_but_the_init_one_is_named_root_and_the_audit_names_token_ids(api: Api) -> None:
    st, err = _token(api, name="root", prefixes=["x/"], verbs=["read"])
    assert st == 400 and "root" in str(err)
    _, made = _token(api, name="ci", prefixes=["x/"], verbs=["read"])
    entries = api.call("GET", "/v1/audit", params={"limit": 1000})[1]["entries"]
    made_entry = next(e for e in entries if e["action"] == "token.create" and e["target"] == "ci")
    root_id = next(t["id"] for t in api.call("GET", "/v1/tokens")[1]["tokens"] if t["name"] == "root")
    assert made_entry["actor"] == f"token:root/{root_id}"
    assert made["id"] in made_entry["detail"]
    long = "n" * 128  # the longest name: the actor keeps the id whole
    _, made = _token(api, name=long, prefixes=["x/"], verbs=["read", "admin"])
    assert _token(Api(api.client, made["token"]), name="c", prefixes=["x/"], verbs=["read"])[0] == 200
    entries = api.call("GET", "/v1/audit", params={"limit": 1000})[1]["entries"]
    assert next(e for e in entries if e["target"] == "c")["actor"].endswith("/" + made["id"])


def test_a_token_ttl_of_zero_is_refused_not_made_eternal(api: Api) -> None:
    for ttl in ("0s", 0):
        st, err = _token(api, prefixes=["x/"], verbs=["read"], ttl=ttl)
        assert st == 400 and "ttl" in err["error"]["message"]
    assert [t["name"] for t in api.call("GET", "/v1/tokens")[1]["tokens"]] == ["root"]


# -- revocation the agent can prove --------------------------------------------------------------
def _sync(api: Api, node: str, pair: Any) -> tuple[Any, str]:
    target = "/v1/agent/sync?since=0&wait=0"
    headers = signed_headers(pair, "GET", target, node, b"")
    return api.client.get(target, headers=headers), headers[wire.H_NONCE]


def test_a_revoked_node_gets_a_signed_refusal_naming_it_and_its_request(api: Api) -> None:
    node, pair = enroll_node(api)
    resp, _ = _sync(api, node, pair)
    assert resp.status_code == 200
    assert api.call("POST", f"/v1/nodes/{node}/revoke")[0] == 200
    seen = [n["last_seen"] for n in api.call("GET", "/v1/nodes")[1]["nodes"] if n["id"] == node]

    time.sleep(0.01)
    resp, nonce = _sync(api, node, pair)
    assert resp.status_code == 403
    assert [n["last_seen"] for n in api.call("GET", "/v1/nodes")[1]["nodes"] if n["id"] == node] == seen
    doc = json.loads(resp.content)
    assert doc["error"]["code"] == "revoked"
    assert (doc["kind"], doc["node"], doc["nonce"]) == ("revoked", node, nonce)
    server_key = wire.b64d(api.call("GET", "/v1/sys/status")[1]["server_key"])
    sig = wire.b64d(resp.headers[wire.H_SERVER_SIGNATURE])
    assert signing.verify(server_key, wire.response_message("revoked", resp.content), sig)
    assert not signing.verify(server_key, wire.response_message("sync", resp.content), sig)  # domain-separated

    replayed = api.client.get("/v1/agent/sync?since=0&wait=0", headers=resp.request.headers)
    assert replayed.status_code == 401 and "replayed" in replayed.text  # its nonce was spent
    # Without the node's own signature there is no proof to be had: whoever asks gets a plain 401.
    target = "/v1/agent/sync?since=0&wait=0"
    forged = signed_headers(signing.KeyPair.generate(), "GET", target, node, b"")
    resp = api.client.get(target, headers=forged)
    assert resp.status_code == 401 and wire.H_SERVER_SIGNATURE not in resp.headers


@pytest.mark.parametrize("flushed_first", [False, True])
def test_unauthenticated_refusals_cannot_flood_the_audit_log(api: Api, flushed_first: bool) -> None:
    """Anyone can send a bad sync request: each kind of refusal is audited at most 20 times a minute,
    the rest counted and the count recorded with the next entry of that kind (or by the scheduler's
    flush, when the window ended before another came: ``flushed_first`` makes it come first)."""
    from vault_edge.server.audit import REFUSAL_WINDOW_S, REFUSALS_PER_WINDOW

    target = "/v1/agent/sync?since=0&wait=0"
    pair = signing.KeyPair.generate()

    def flood(n: int) -> None:
        for i in range(n):
            node = f"n-{i:016x}"
            resp = api.client.get(target, headers=signed_headers(pair, "GET", target, node, b""))
            assert resp.status_code == 401

    def refusals() -> list[dict[str, Any]]:
        entries = api.call("GET", "/v1/audit", params={"limit": 1000})[1]["entries"]
        return [e for e in entries if e["action"] == "node.auth"]

    flood(REFUSALS_PER_WINDOW + 30)
    assert len(refusals()) == REFUSALS_PER_WINDOW
    auditor = api.client.app.state.ctx.auditor
    later = auditor.clock() + REFUSAL_WINDOW_S + 1
    auditor.clock = lambda: later
    if flushed_first:
        auditor.flush_suppressed()
    flood(1)
    last = refusals()
    assert len(last) == REFUSALS_PER_WINDOW + 1
    # The 30 are recorded once: with the next entry of their kind, or, when the scheduler's flush saw
    # the window end first (it runs every second, on the same clock), in an audit.suppressed entry.
    entries = api.call("GET", "/v1/audit", params={"limit": 1000})[1]["entries"]
    flushed = [json.loads(e["detail"]) for e in entries if e["action"] == "audit.suppressed"]
    carried = json.loads(last[-1]["detail"]).get("suppressed_before", 0)
    assert carried + sum(f["count"] for f in flushed if f["outcome_counted"] == "refused") == 30
    assert carried in (0, 30) and len(flushed) == (carried == 0)
    if flushed_first:  # without it, either may have come first
        assert carried == 0
    assert api.call("GET", "/v1/audit/verify")[1]["ok"] is True


def test_a_flood_against_one_node_hides_nothing_about_another_and_counts_are_flushed(api: Api) -> None:
    from vault_edge.server.audit import REFUSAL_WINDOW_S, REFUSALS_PER_WINDOW

    target = "/v1/agent/sync?since=0&wait=0"
    victims = [enroll_node(api)[0] for _ in range(2)]
    forger = signing.KeyPair.generate()  # not the nodes' key: every request is a bad signature

    def forge(node: str, n: int) -> None:
        for _ in range(n):
            resp = api.client.get(target, headers=signed_headers(forger, "GET", target, node, b""))
            assert resp.status_code == 401

    def refusals(node: str) -> list[dict[str, Any]]:
        entries = api.call("GET", "/v1/audit", params={"limit": 1000})[1]["entries"]
        return [e for e in entries if e["action"] == "node.auth" and e["target"] == node]

    forge(victims[0], REFUSALS_PER_WINDOW + 5)
    forge(victims[1], 1)
    assert len(refusals(victims[0])) == REFUSALS_PER_WINDOW
    assert len(refusals(victims[1])) == 1  # the flood against the first hid nothing about the second

    auditor = api.client.app.state.ctx.auditor
    later = auditor.clock() + REFUSAL_WINDOW_S + 1
    auditor.clock = lambda: later
    assert auditor.flush_suppressed() == 1  # no later refusal carried the count: the flush records it
    entries = api.call("GET", "/v1/audit", params={"limit": 1000})[1]["entries"]
    flushed = [json.loads(e["detail"]) | {"target": e["target"]} for e in entries if e["action"] == "audit.suppressed"]
    assert flushed == [
        {
            "target": "node.auth",
            "count": 5,
            "outcome_counted": "refused",
            "reason": "bad request signature",
            "scope": victims[0],
        }
    ]
    assert auditor.flush_suppressed() == 0


def test_the_refusal_throttle_table_is_bounded() -> None:
    """Per-target budgets cannot grow the table without bound: when full, new targets share one."""
    from vault_edge.server.audit import RefusalThrottle

    th = RefusalThrottle(per_window=1, window_s=60, max_kinds=2)
    assert th.admit("a", "refused", "r", "t1", 0.0) == 0
    assert th.admit("a", "refused", "r", "t2", 0.0) == 0
    assert th.admit("a", "refused", "r", "t3", 0.0) == 0  # table full: t3 takes the shared "*" budget...
    assert th.admit("a", "refused", "r", "t5", 0.0) is None  # ...which t5 then finds spent
    assert th.admit("a", "refused", "r", "t1", 0.0) is None  # t1 has spent its own
    assert th.ended(30.0) == []  # nothing has ended yet
    assert sorted(th.ended(61.0)) == [(("a", "refused", "r", "*"), 1), (("a", "refused", "r", "t1"), 1)]
    assert th.admit("a", "refused", "r", "t4", 61.0) == 0  # room again
    th2 = RefusalThrottle(per_window=1, window_s=60, max_kinds=1)
    assert th2.admit("a", "refused", "r", "t1", 0.0) == 0
    assert th2.admit("a", "refused", "r", "t2", 61.0) == 0  # t1's window ended with nothing to report:
    assert list(th2._windows) == [("a", "refused", "r", "t2")]  # pruned to make room, no flush needed


# -- the fleet belongs to no name ----------------------------------------------------------------
def test_a_token_scoped_to_a_prefix_cannot_list_the_fleet(api: Api) -> None:
    """Nodes (with their hostnames) and regions belong to no name: listing them needs `list` over every
    name. The propagation of a secret the token may list stays open to it, without hostnames."""
    node, pair = enroll_node(api)
    assert _sync(api, node, pair)[0].status_code == 200
    api.call("PUT", "/v1/secrets/team-a/key", json={"value": "v1", "regions": ["eu"]})
    _, doc = _token(api, name="team-a", prefixes=["team-a/"], verbs=["list"])
    scoped = Api(api.client, doc["token"])
    for path in ("/v1/nodes", "/v1/nodes?region=eu", "/v1/regions"):
        st, err = scoped.call("GET", path)
        assert st == 403 and "every name" in err["error"]["message"], (path, err)
        assert "pop-1" not in json.dumps(err)

    st, prop = scoped.call("GET", "/v1/propagation/team-a/key")
    assert st == 200 and [n["id"] for n in prop["nodes"]] == [node]
    assert "hostname" not in prop["nodes"][0] and "pop-1" not in json.dumps(prop)
    assert scoped.call("GET", "/v1/propagation/team-b/key")[0] == 403

    _, doc = _token(api, name="fleet", prefixes=[""], verbs=["list"])  # list over every name: the fleet too
    fleet = Api(api.client, doc["token"])
    assert [n["hostname"] for n in fleet.call("GET", "/v1/nodes")[1]["nodes"]] == ["pop-1"]
    assert [r["name"] for r in fleet.call("GET", "/v1/regions")[1]["regions"]] == ["eu", "us"]
    assert fleet.call("GET", "/v1/propagation/team-a/key")[1]["nodes"][0]["hostname"] == "pop-1"
