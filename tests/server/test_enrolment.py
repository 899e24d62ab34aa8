"""Enrolment that survives a storm (SQLite and PostgreSQL): a retry of the same enrolment (same join
token, same node keys) is answered again with the same node, freshly signed for its nonce; any other
use of a used token is refused; a node is enrolled once; past the in-flight limit, enrolments are shed
at once with 503 and Retry-After instead of queued."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
from sqlalchemy import select

from tests.conftest import Api, init_and_unseal, run_concurrently, server_key, signed_headers
from vault_edge import wire
from vault_edge.agent.sync import enrolment_body
from vault_edge.crypto import signing
from vault_edge.server.storage import schema as t

TARGET = "/v1/agent/enroll"


def _token(api: Api, region: str = "eu", **extra: Any) -> str:
    st, doc = api.call("POST", "/v1/nodes/tokens", json={"region": region, **extra})
    assert st == 200, doc
    return str(doc["token"])


def _enrol(
    api: Api, token: str, sign: signing.KeyPair, box: signing.KeyPair | None = None, at: float | None = None
) -> tuple[httpx.Response, str]:
    """One enrolment request as the agent makes it (sealed body, signed headers with a fresh nonce),
    signed by ``sign`` and naming ``box``'s box key (default: the same pair). (response, nonce)."""
    box = box or sign
    body = enrolment_body(server_key(api), token, box.box_public, sign.sign_public, "pop-1")
    headers = signed_headers(sign, "POST", TARGET, wire.ENROLL_NODE, body, timestamp=None if at is None else int(at))
    return api.client.post(TARGET, content=body, headers=headers), headers[wire.H_NONCE]


def _answer(api: Api, resp: httpx.Response, nonce: str, pair: signing.KeyPair) -> dict[str, Any]:
    """The enrolment answer, checked as the agent checks it: signed by the control plane, for this request."""
    assert resp.status_code == 200, resp.text
    sig = wire.b64d(resp.headers[wire.H_SERVER_SIGNATURE])
    assert signing.verify(server_key(api), wire.response_message("enroll", resp.content), sig)
    doc: dict[str, Any] = resp.json()
    assert doc["nonce"] == nonce and doc["sign_public"] == wire.b64e(pair.sign_public)
    return doc


def _node_rows(api: Api) -> list[dict[str, Any]]:
    with api.client.app.state.ctx.store.engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(select(t.nodes))]


def _grants(api: Api) -> list[dict[str, Any]]:
    with api.client.app.state.ctx.store.engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(select(t.grants))]


def _audit(api: Api, action: str) -> list[dict[str, Any]]:
    st, doc = api.call("GET", "/v1/audit", params={"limit": 1000})
    assert st == 200, doc
    return [e for e in doc["entries"] if e["action"] == action]


def _refused_as_used(resp: httpx.Response) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["code"] == "unauthorized"
    assert "already used" in resp.json()["error"]["message"]


def test_a_retried_enrolment_gets_the_same_node_freshly_signed(api: Api) -> None:
    token, pair = _token(api), signing.KeyPair.generate()
    first_resp, first_nonce = _enrol(api, token, pair)
    first = _answer(api, first_resp, first_nonce, pair)
    revision_after = api.call("GET", "/v1/sys/status")[1]["revision"]
    for _ in range(3):  # the answer was lost: the agent asks again, same token, same keys, new nonce
        resp, nonce = _enrol(api, token, pair)
        again = _answer(api, resp, nonce, pair)
        assert nonce != first_nonce
        assert {k: again[k] for k in ("node", "region", "revision", "server_key")} == {
            k: first[k] for k in ("node", "region", "revision", "server_key")
        }
    # Enrolled once: one row, one grant, no revision taken by the retries, one enrolment audited.
    rows = _node_rows(api)
    assert [(r["id"], r["region"], r["status"]) for r in rows] == [(first["node"], "eu", "active")]
    assert rows[0]["join_token_id"] == wire.parse_join_token(token)[0]
    assert rows[0]["enrolled_rev"] == first["revision"]
    assert [g["node_id"] for g in _grants(api)] == [first["node"]]
    assert api.call("GET", "/v1/sys/status")[1]["revision"] == revision_after
    enrols = _audit(api, "node.enroll")
    assert [e["outcome"] for e in enrols].count("ok") == 1
    assert any(e["outcome"] == "repeated" and e["target"] == first["node"] for e in enrols)
    # The node it names is the agent's own: it syncs with that id and those keys.
    target = "/v1/agent/sync?since=0&wait=0"
    sync = api.client.get(target, headers=signed_headers(pair, "GET", target, first["node"], b""))
    assert sync.status_code == 200, sync.text


def test_a_used_token_with_other_keys_is_refused(api: Api) -> None:
    token, pair = _token(api), signing.KeyPair.generate()
    node = _answer(api, *_enrol(api, token, pair), pair)["node"]
    other = signing.KeyPair.generate()
    _refused_as_used(_enrol(api, token, other)[0])  # another key pair altogether
    _refused_as_used(_enrol(api, token, other, box=pair)[0])  # the node's box key, another signing key
    _refused_as_used(_enrol(api, token, pair, box=other)[0])  # the node's signing key, another box key
    assert [r["id"] for r in _node_rows(api)] == [node]
    # ...and the node's own retry is still answered after those refusals.
    assert _answer(api, *_enrol(api, token, pair), pair)["node"] == node


def test_concurrent_enrolments_with_one_token_enrol_one_node(api: Api) -> None:
    """A storm on one token: the agent's own retries racing each other and rivals with other keys.
    One node is made; every 200 names it and went to a request carrying its keys."""
    token = _token(api)
    mine, rivals = signing.KeyPair.generate(), [signing.KeyPair.generate() for _ in range(3)]
    results: list[tuple[signing.KeyPair, httpx.Response, str]] = []
    lock = threading.Lock()

    def go(i: int) -> None:
        pair = mine if i % 2 == 0 else rivals[i // 2]
        resp, nonce = _enrol(api, token, pair)
        with lock:
            results.append((pair, resp, nonce))

    run_concurrently(go, 6)
    rows = _node_rows(api)
    assert len(rows) == 1
    winner = next(p for p in (mine, *rivals) if p.sign_public == bytes(rows[0]["sign_public"]))
    assert all(resp.status_code in (200, 401) for _, resp, _ in results), [r.text for _, r, _ in results]
    ok = [(p, resp, nonce) for p, resp, nonce in results if resp.status_code == 200]
    assert ok and all(p is winner for p, _, _ in ok)
    assert {_answer(api, resp, nonce, p)["node"] for p, resp, nonce in ok} == {rows[0]["id"]}
    for p, resp, _ in results:
        if p is not winner:
            _refused_as_used(resp)


def test_a_retry_after_the_token_expired_still_gets_its_node(api: Api) -> None:
    """The answer was lost and the control plane then stayed away past the token's lifetime: the
    retry grants nothing new, so it is answered; a first use of an expired token is not."""
    token, pair = _token(api, ttl="1m"), signing.KeyPair.generate()
    node = _answer(api, *_enrol(api, token, pair), pair)["node"]
    unused = _token(api, ttl="1m")
    ctx = api.client.app.state.ctx
    later = time.time() + 120
    ctx.clock = lambda: later
    try:
        assert _answer(api, *_enrol(api, token, pair, at=later), pair)["node"] == node
        resp, _ = _enrol(api, unused, signing.KeyPair.generate(), at=later)
        assert resp.status_code == 401 and "expired" in resp.json()["error"]["message"]
    finally:
        ctx.clock = time.time
    assert [r["id"] for r in _node_rows(api)] == [node]


def test_a_revoked_node_is_not_answered_again(api: Api) -> None:
    token, pair = _token(api), signing.KeyPair.generate()
    node = _answer(api, *_enrol(api, token, pair), pair)["node"]
    assert api.call("POST", f"/v1/nodes/{node}/revoke")[0] == 200
    _refused_as_used(_enrol(api, token, pair)[0])
    assert [(r["id"], r["status"]) for r in _node_rows(api)] == [(node, "revoked")]


def test_a_refusal_of_a_retry_is_signed_for_that_request(api: Api) -> None:
    """Refusals stay provable to the agent (it gives up only on a signed one)."""
    token = _token(api)
    _answer(api, *_enrol(api, token, pair := signing.KeyPair.generate()), pair)
    other = signing.KeyPair.generate()
    body = enrolment_body(server_key(api), token, other.box_public, other.sign_public, "pop-2")
    headers = signed_headers(other, "POST", TARGET, wire.ENROLL_NODE, body)
    resp = api.client.post(TARGET, content=body, headers=headers)
    _refused_as_used(resp)
    sig = wire.b64d(resp.headers[wire.H_SERVER_SIGNATURE])
    assert signing.verify(server_key(api), wire.refusal_message(headers[wire.H_NONCE], body, resp.content), sig)


# -- shedding ----------------------------------------------------------------------------------
def test_enrolments_past_the_limit_are_shed_at_once_with_503_and_retry_after(make_app: Any) -> None:
    client, app = make_app(enroll_max_in_flight=1, enroll_retry_after_s=7)
    _, root = init_and_unseal(client)
    api = Api(client, root)
    assert api.call("POST", "/v1/regions", json={"name": "eu"})[0] == 200
    first_token, second_token = _token(api), _token(api)
    pair = signing.KeyPair.generate()
    gate = app.state.enrolments
    held: list[tuple[httpx.Response, str]] = []
    # A writer holds the database's write lock: the first enrolment is admitted and waits on it.
    with app.state.ctx.store.write():
        worker = threading.Thread(target=lambda: held.append(_enrol(api, first_token, pair)))
        worker.start()
        deadline = time.monotonic() + 10
        while gate.active < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gate.active == 1
        t0 = time.monotonic()
        shed, _ = _enrol(api, second_token, signing.KeyPair.generate())
        took = time.monotonic() - t0
        assert shed.status_code == 503, shed.text
        assert shed.headers["retry-after"] == "7"
        assert shed.json() == {
            "error": {"code": "overloaded", "message": "too many enrolments in progress (1); retry after 7s"}
        }
        assert took < 2.0  # answered at once, not queued behind the one in flight
        assert worker.is_alive()  # the admitted one is still waiting
    worker.join(30)
    assert not worker.is_alive()
    _answer(api, held[0][0], held[0][1], pair)
    assert gate.active == 0 and gate.shed == 1
    # The shed request left nothing behind: its token is unused, and enrols once the slot is free.
    assert len(_node_rows(api)) == 1
    other = signing.KeyPair.generate()
    _answer(api, *_enrol(api, second_token, other), other)
    assert len(_node_rows(api)) == 2
    metrics = client.get("/metrics").text
    assert "vault_edge_enrolments_shed 1.0" in metrics
