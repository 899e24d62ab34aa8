"""The sync route's plain-ASGI front (``server/fastpath.py``): the same bounds and error shapes as the
documented route, and everything else passed on to the FastAPI app."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Api, enroll_node, signed_headers
from vault_edge import wire
from vault_edge.server.fastpath import BadQuery, parse_query
from vault_edge.server.routes.agent import SyncQuery


def test_the_query_is_read_with_the_documented_bounds() -> None:
    assert parse_query(b"") == SyncQuery()
    assert parse_query(b"since=7&wait=2.5&proto=2&full=1") == SyncQuery(7, 2.5, 2, True)
    assert parse_query(b"since=1&since=9&other=x&full=false") == SyncQuery(9, 30.0, 1, False)  # the last one wins
    for bad in (
        b"since=-1",
        b"since=x",
        b"since=" + str(2**62 + 1).encode(),
        b"wait=301",
        b"wait=nan",
        b"wait=-0.5",
        b"proto=3",
        b"proto=0",
        b"full=maybe",
        b"&".join([b"a=1"] * 20),
    ):
        with pytest.raises(BadQuery):
            parse_query(bad)


@pytest.mark.parametrize("query", ["since=-1", "wait=1e9", "proto=9", "full=perhaps"])
def test_a_bad_query_is_a_400_in_the_json_error_shape(api: Api, query: str) -> None:
    node, pair = enroll_node(api)
    target = f"/v1/agent/sync?{query}"
    resp = api.client.get(target, headers=signed_headers(pair, "GET", target, node, b""))
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "bad_request" and resp.json()["error"]["message"].startswith("invalid")


def test_a_body_over_the_limit_is_a_413(api: Api) -> None:
    node, pair = enroll_node(api)
    target = "/v1/agent/sync?wait=0"
    body = b"x" * (2 << 20)
    resp = api.client.request("GET", target, content=body, headers=signed_headers(pair, "GET", target, node, body))
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "too_large"


def test_answers_are_signed_and_counted_apart_from_the_request_metrics(api: Api) -> None:
    node, pair = enroll_node(api)
    target = "/v1/agent/sync?wait=0&proto=2"
    resp = api.client.get(target, headers=signed_headers(pair, "GET", target, node, b""))
    assert resp.status_code == 200 and wire.H_SERVER_SIGNATURE in resp.headers
    metrics = api.client.get("/metrics").text
    assert 'vault_edge_sync_answers_total{status="200"} 1.0' in metrics
    assert "/v1/agent/sync" not in metrics  # long-polls stay out of the latency histogram
    # the rest of the API is the FastAPI app's, as before
    assert api.call("GET", "/v1/sys/status")[0] == 200 and api.client.get("/v1/nope").status_code == 404


def test_a_sync_request_meets_no_middleware_and_names_its_caller(api: Api, monkeypatch: Any) -> None:
    """The app hands a sync request to the fast path before Starlette's stack: a middleware that
    would see it sees only the other requests."""
    from vault_edge.server import app as app_module

    seen: list[str] = []
    stack = app_module.ControlPlane.build_middleware_stack

    def spying(self: Any) -> Any:
        inner = stack(self)

        async def asgi(scope: Any, receive: Any, send: Any) -> None:
            seen.append(scope.get("path", ""))
            await inner(scope, receive, send)

        return asgi

    api.client.app.middleware_stack = None  # type: ignore[attr-defined]
    monkeypatch.setattr(app_module.ControlPlane, "build_middleware_stack", spying)
    node, pair = enroll_node(api)
    target = "/v1/agent/sync?wait=0&proto=2"
    resp = api.client.get(target, headers=signed_headers(pair, "GET", target, node, b""))
    assert resp.status_code == 200
    assert api.call("GET", "/v1/sys/status")[0] == 200
    assert "/v1/sys/status" in seen and "/v1/agent/sync" not in seen


def test_a_scrape_can_ask_for_some_families_only(api: Api) -> None:
    enroll_node(api)
    whole = api.client.get("/metrics").text
    assert "vault_edge_nodes{" in whole and "vault_edge_sync_waiting " in whole
    some = api.client.get("/metrics", params={"name[]": "vault_edge_sync_waiting"}).text
    assert "vault_edge_sync_waiting " in some and "vault_edge_nodes" not in some and "vault_edge_audit" not in some
