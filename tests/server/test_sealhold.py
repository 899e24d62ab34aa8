"""A sealed control plane holds agents' sync polls until it unseals (``server/sealhold.py``): released by
the unseal and then answered as usual, a 503 ``Retry-After: 0`` when the wait ends still sealed, a
503 with the configured Retry-After at once for what it cannot or will not hold. In process, with
real signed requests of an enrolled node; real processes in tests/e2e/test_unseal_reconnect.py."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.conftest import Api, enroll_node, init_and_unseal, signed_headers
from vault_edge import wire


def _sealed_with_a_node(make_app: Any, **settings: Any) -> tuple[Any, Any, list[str], str, Any]:
    client, app = make_app(**settings)
    shares, token = init_and_unseal(client)
    api = Api(client, token)
    assert api.call("POST", "/v1/regions", json={"name": "eu"})[0] == 200
    node, pair = enroll_node(api)
    assert api.call("POST", "/v1/sys/seal")[0] == 200
    return client, app, shares, node, pair


def _poll(client: Any, node: str, pair: Any, wait: float, ts: int | None = None) -> tuple[Any, float]:
    target = f"/v1/agent/sync?since=0&wait={wait:g}&proto=2&full=1"
    t0 = time.monotonic()
    resp = client.get(target, headers=signed_headers(pair, "GET", target, node, b"", timestamp=ts))
    return resp, time.monotonic() - t0


def test_a_held_poll_is_answered_once_the_control_plane_unseals(make_app: Any) -> None:
    client, app, shares, node, pair = _sealed_with_a_node(make_app)
    got: list[tuple[Any, float]] = []
    poller = threading.Thread(target=lambda: got.append(_poll(client, node, pair, wait=20)))
    poller.start()
    deadline = time.monotonic() + 10
    while app.state.sealhold.held == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert app.state.sealhold.held == 1  # held, not refused
    for share in shares[:2]:
        assert client.post("/v1/sys/unseal", json={"share": share}).status_code == 200
    poller.join(30)
    resp, took = got[0]
    assert resp.status_code == 200, resp.text  # authenticated and answered after the unseal: the full view
    assert wire.H_SERVER_SIGNATURE in resp.headers
    assert took < 15  # released by the unseal, not by its 20 s wait
    assert app.state.sealhold.held == 0


def test_a_hold_that_ends_sealed_says_poll_again_at_once(make_app: Any) -> None:
    client, app, _, node, pair = _sealed_with_a_node(make_app)
    resp, took = _poll(client, node, pair, wait=1)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "sealed"
    assert resp.headers["retry-after"] == "0"  # the hold was the wait
    assert took >= 0.9  # held its wait (no upper bound asserted: a loaded machine is slow)
    assert app.state.sealhold.held == 0


def test_what_cannot_be_held_is_refused_at_once_with_retry_after(make_app: Any) -> None:
    client, app, _, node, pair = _sealed_with_a_node(make_app, sealed_retry_after_s=7)
    unsigned = client.get("/v1/agent/sync?since=0&wait=30")  # no node headers: nothing to hold for
    stale = _poll(client, node, pair, wait=30, ts=int(time.time()) - 3600)[0]  # a signature outside the window
    no_wait = _poll(client, node, pair, wait=0)[0]
    late = _poll(client, node, pair, wait=30, ts=int(time.time()) - wire.CLOCK_SKEW_S // 2 - 1)[0]
    for resp in (unsigned, stale, no_wait, late):
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "sealed"
        assert resp.headers["retry-after"] == "7"
    assert app.state.sealhold.held == 0


def test_past_the_cap_polls_are_shed_not_held(make_app: Any) -> None:
    client, app, shares, node, pair = _sealed_with_a_node(make_app, sealed_hold_max=1, sealed_retry_after_s=3)
    held: list[tuple[Any, float]] = []
    first = threading.Thread(target=lambda: held.append(_poll(client, node, pair, wait=20)))
    first.start()
    deadline = time.monotonic() + 10
    while app.state.sealhold.held == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    shed, took = _poll(client, node, pair, wait=20)
    assert shed.status_code == 503 and shed.headers["retry-after"] == "3" and took < 10
    assert app.state.sealhold.shed == 1
    for share in shares[:2]:
        assert client.post("/v1/sys/unseal", json={"share": share}).status_code == 200
    first.join(30)
    assert held[0][0].status_code == 200


def test_an_uninitialized_server_does_not_hold(make_app: Any) -> None:
    client, app = make_app()
    resp = client.get("/v1/agent/sync?since=0&wait=30", headers={wire.H_NODE: "n-0000000000000000"})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "not_initialized"
    assert app.state.sealhold.held == 0
