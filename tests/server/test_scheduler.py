"""The scheduler's duties, with two replicas on one database (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.conftest import Api, enroll_body, init_and_unseal, server_key, signed_headers


def _two_replicas(make_app: Any) -> tuple[Api, Any, Any]:
    c1, app1 = make_app(min_rotate_every_s=1, scheduler_interval_s=3600)
    shares, token = init_and_unseal(c1)
    c2, app2 = make_app(min_rotate_every_s=1, scheduler_interval_s=3600)
    for share in shares[:2]:
        assert c2.post("/v1/sys/unseal", json={"share": share}).status_code == 200
    api = Api(c1, token)
    api.call("POST", "/v1/regions", json={"name": "eu"})
    return api, app1, app2


def test_a_due_rotation_runs_exactly_once_across_replicas(make_app: Any) -> None:
    api, app1, app2 = _two_replicas(make_app)
    st, doc = api.call("PUT", "/v1/secrets/gen", json={"generate": "32:base64url", "rotate_every": "60s"})
    assert st == 200 and doc["version"] == 1
    later = time.time() + 61
    for app in (app1, app2):
        app.state.ctx.clock = lambda: later
    results: list[int] = []
    barrier = threading.Barrier(2)

    def tick(app: Any) -> None:
        barrier.wait()
        results.append(app.state.scheduler.rotate_due())

    threads = [threading.Thread(target=tick, args=(a,)) for a in (app1, app2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(results) == [0, 1]  # one replica won the compare-and-set, the other did nothing
    hist = api.call("GET", "/v1/history/gen")[1]
    assert [v["origin"] for v in hist["versions"]] == ["generated", "scheduled"]
    assert hist["next_rotation_at"] > later  # re-armed from the rotation's time
    # not due again until the next period
    assert app1.state.scheduler.rotate_due() == 0 and app2.state.scheduler.rotate_due() == 0


def test_a_failed_scheduled_rotation_is_retried_and_spares_the_others(make_app: Any, monkeypatch: Any) -> None:
    """The claim commits with the rotation: a rotation that fails is not silently skipped for a whole
    period but retried after a back-off (so it cannot hog every tick); the other due secrets rotate."""
    from vault_edge.server import generate
    from vault_edge.server.scheduler import RETRY_AFTER_S

    api, app1, _ = _two_replicas(make_app)
    for name in ("a", "b"):
        api.call("PUT", f"/v1/secrets/{name}", json={"generate": "32:hex", "rotate_every": "1h"})
    later = time.time() + 3601
    app1.state.ctx.clock = lambda: later
    real, calls = generate.generate, []

    def failing_once(spec: str) -> bytes:
        calls.append(spec)
        if len(calls) == 1:
            raise RuntimeError("entropy source hiccup")
        return real(spec)

    monkeypatch.setattr(generate, "generate", failing_once)
    assert app1.state.scheduler.rotate_due() == 1  # one failed, the other rotated
    history = {n: api.call("GET", f"/v1/history/{n}")[1] for n in ("a", "b")}
    failed = next(n for n, h in history.items() if len(h["versions"]) == 1)
    assert history[failed]["next_rotation_at"] == later + RETRY_AFTER_S  # backed off, not a period lost
    assert app1.state.scheduler.rotate_due() == 0  # not before the back-off
    app1.state.ctx.clock = lambda: later + RETRY_AFTER_S + 1
    assert app1.state.scheduler.rotate_due() == 1  # retried
    assert [v["origin"] for v in api.call("GET", f"/v1/history/{failed}")[1]["versions"]] == ["generated", "scheduled"]
    assert app1.state.scheduler.rotate_due() == 0  # and re-armed for a full period


def test_grace_ends_with_a_new_revision(make_app: Any) -> None:
    api, app1, _ = _two_replicas(make_app)
    api.call("PUT", "/v1/secrets/k", json={"value": "one"})
    api.call("POST", "/v1/rotate/k", json={"value": "two", "grace": "10s"})
    assert api.call("GET", "/v1/secrets/k", params={"stage": "previous"})[1]["value"] == "one"
    rev_before = api.call("GET", "/v1/sys/status")[1]["revision"]
    assert app1.state.scheduler.expire_stages() == 0  # not yet
    app1.state.ctx.clock = lambda: time.time() + 11
    assert app1.state.scheduler.expire_stages() == 1
    assert api.call("GET", "/v1/sys/status")[1]["revision"] == rev_before + 1
    app1.state.ctx.clock = time.time
    status, doc = api.call("GET", "/v1/secrets/k", params={"stage": "previous"})
    assert status == 404 and doc["error"]["code"] == "not_found"
    assert api.call("GET", "/v1/secrets/k", params={"version": 1})[1]["value"] == "one"  # still in history


def _enroll_request(api: Api, token: str, at: float, keys: Any = None) -> tuple[bytes, dict[str, str]]:
    """A genuine enrolment request, signed by a fresh node key with timestamp ``at``."""
    from vault_edge import wire
    from vault_edge.crypto.signing import KeyPair

    keys = keys or KeyPair.generate()
    body = enroll_body(server_key(api), keys, token)
    return body, signed_headers(keys, "POST", "/v1/agent/enroll", wire.ENROLL_NODE, body, timestamp=int(at))


def test_join_tokens_expire_and_are_single_use(make_app: Any) -> None:
    api, app1, _ = _two_replicas(make_app)
    expiring = api.call("POST", "/v1/nodes/tokens", json={"region": "eu", "ttl": "5m"})[1]["token"]
    later = time.time() + 301
    app1.state.ctx.clock = lambda: later
    body, headers = _enroll_request(api, expiring, later)
    r = api.client.post("/v1/agent/enroll", content=body, headers=headers)
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    app1.state.ctx.clock = time.time

    once = api.call("POST", "/v1/nodes/tokens", json={"region": "eu"})[1]["token"]
    body, headers = _enroll_request(api, once, time.time())
    assert api.client.post("/v1/agent/enroll", content=body, headers=headers).status_code == 200
    body, headers = _enroll_request(api, once, time.time())
    r = api.client.post("/v1/agent/enroll", content=body, headers=headers)
    assert r.status_code == 401 and "already used" in r.json()["error"]["message"]
    nodes = api.call("GET", "/v1/nodes")[1]["nodes"]
    assert len(nodes) == 1  # the refused enrolments left nothing behind


def test_node_requests_replayed_or_badly_signed_are_refused(make_app: Any) -> None:
    import secrets

    from vault_edge import wire
    from vault_edge.crypto import signing

    api, _, _ = _two_replicas(make_app)
    api.call("PUT", "/v1/secrets/k", json={"value": "v"})
    token = api.call("POST", "/v1/nodes/tokens", json={"region": "eu"})[1]["token"]
    keys = signing.KeyPair.generate()
    body, headers = _enroll_request(api, token, time.time(), keys)
    node = api.client.post("/v1/agent/enroll", content=body, headers=headers).json()["node"]

    def sync_headers(signer: Any, ts: int) -> dict[str, str]:
        nonce = wire.b64e(secrets.token_bytes(wire.NONCE_BYTES))
        msg = wire.request_message("GET", target, node, ts, nonce, b"")
        return {
            wire.H_NODE: node,
            wire.H_TIMESTAMP: str(ts),
            wire.H_NONCE: nonce,
            wire.H_SIGNATURE: wire.b64e(signing.sign(signer, msg)),
        }

    target = "/v1/agent/sync?since=0&wait=0"
    good = sync_headers(keys.signer(), int(time.time()))
    assert api.client.get(target, headers=good).status_code == 200
    r = api.client.get(target, headers=good)  # the very same signed request again
    assert r.status_code == 401 and "replayed" in r.json()["error"]["message"]
    r = api.client.get(target, headers=sync_headers(signing.KeyPair.generate().signer(), int(time.time())))
    assert r.status_code == 401 and "signature" in r.json()["error"]["message"]
    r = api.client.get(target, headers=sync_headers(keys.signer(), int(time.time()) - 600))
    assert r.status_code == 401 and "clock-skew" in r.json()["error"]["message"]
    refusals = [
        e
        for e in api.call("GET", "/v1/audit", params={"limit": 1000})[1]["entries"]
        if e["action"] == "node.auth" and e["outcome"] == "refused"
    ]
    assert len(refusals) == 3
