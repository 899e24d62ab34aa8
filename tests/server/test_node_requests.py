"""Node requests against two replicas on one database (SQLite and PostgreSQL): join tokens expire and are
single use; signed sync requests that are replayed, badly signed or out of the clock window are refused
and audited."""

from __future__ import annotations

import time
from typing import Any

from tests.conftest import Api, enroll_body, server_key, signed_headers
from tests.conftest import two_replicas as _two_replicas


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
