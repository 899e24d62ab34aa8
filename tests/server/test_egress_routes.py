"""Egress routes on the control plane (SQLite and PostgreSQL): defined by an admin, checked at the
edge, stored MAC'd (a route sends a secret to its upstream: it grants authority), and synced to the
agents of its regions inside the signed sync answer: a full view lists the region's routes, a delta
carries them only when they changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, update

from tests.conftest import Api, enroll_node, signed_headers
from tests.server.test_delta_sync import Node
from vault_edge.server.storage import schema as t

ROUTE = {
    "name": "openai",
    "upstream": "https://api.openai.com",
    "secret": "openai/api-key",
    "inject": ["header:Authorization=Bearer {value}"],
    "methods": ["POST", "GET"],
    "paths": ["/v1/"],
}


def _db(api: Api) -> Engine:
    return api.client.app.state.ctx.store.engine  # type: ignore[no-any-return]


@pytest.fixture
def eu_api(api: Api) -> Api:
    assert api.call("PUT", "/v1/secrets/openai/api-key", json={"value": "sk-test-0001", "regions": ["eu"]})[0] == 200
    return api


def test_create_list_delete(eu_api: Api) -> None:
    st, doc = eu_api.call("POST", "/v1/egress", json=ROUTE)
    assert st == 200, doc
    assert doc["regions"] == ["eu"] and doc["methods"] == ["POST", "GET"]  # regions: the secret's by default
    st, doc = eu_api.call("GET", "/v1/egress")
    assert st == 200 and [r["name"] for r in doc["routes"]] == ["openai"] and doc["refused"] == []
    assert doc["routes"][0]["inject"] == ROUTE["inject"]
    assert eu_api.call("POST", "/v1/egress", json=ROUTE)[0] == 409
    assert eu_api.call("DELETE", "/v1/egress/openai")[0] == 200
    assert eu_api.call("DELETE", "/v1/egress/openai")[0] == 404
    assert eu_api.call("GET", "/v1/egress")[1]["routes"] == []


@pytest.mark.parametrize(
    "change",
    [
        {"name": "Bad Name"},
        {"upstream": "http://api.openai.com"},
        {"upstream": "https://u:p@x.com"},
        {"upstream": "https://x.com/?q=1"},
        {"upstream": "ftp://x.com"},
        {"inject": []},
        {"inject": ["header:Host={value}"]},
        {"inject": ["header:X-Key=fixed"]},
        {"inject": ["cookie:a={value}"]},
        {"inject": ["header:X={value", "query:k={value}"]},
        {"methods": ["TRACE"]},
        {"methods": ["CONNECT"]},
        {"paths": ["v1"]},
        {"paths": ["/v1/../admin"]},
        {"paths": ["/%2e%2e/"]},
        {"secret": "no/such"},
        {"secret": "../x"},
        {"regions": ["us"]},
        {"regions": ["*"]},
        {"regions": ["nowhere"]},
        {"extra": 1},
        {"upstream": "https://evil.example\rhttps://api.openai.com"},  # urlsplit drops the CR
        {"upstream": "\x00 https://api.openai.com"},  # ... and leading controls and spaces
        {"upstream": "https://api.openai.com:0"},
        {"upstream": "https://a..openai.com"},  # a label DNS cannot carry (IDNA raises at the agent)
    ],
)
def test_bad_routes_are_refused_with_400(eu_api: Api, change: dict[str, Any]) -> None:
    st, doc = eu_api.call("POST", "/v1/egress", json={**ROUTE, **change})
    assert st == 400, doc
    assert set(doc["error"]) == {"code", "message"}


def test_routes_need_an_admin_over_every_name(eu_api: Api) -> None:
    st, tok = eu_api.call(
        "POST",
        "/v1/tokens",
        json={"name": "narrow", "prefixes": ["openai/"], "verbs": ["read", "list", "write", "admin"]},
    )
    assert st == 200, tok
    narrow = Api(eu_api.client, tok["token"])
    assert narrow.call("POST", "/v1/egress", json=ROUTE)[0] == 403
    assert narrow.call("GET", "/v1/egress")[0] == 403
    assert eu_api.call("POST", "/v1/egress", json=ROUTE)[0] == 200
    assert narrow.call("DELETE", "/v1/egress/openai")[0] == 403


def test_routes_reach_the_region_in_the_signed_sync(eu_api: Api, tmp_path: Path) -> None:
    n = Node(eu_api, tmp_path)
    opened, _, body = n.sync()
    assert opened.kind == "full" and body is not None and body.egress is None and n.view.egress == ()
    assert eu_api.call("POST", "/v1/egress", json=ROUTE)[0] == 200
    opened, _, body = n.sync()
    assert opened.kind == "delta" and body is not None and body.names == ()  # no secret changed
    assert body.egress is not None and [r.name for r in body.egress] == ["openai"]
    assert [r.upstream for r in n.view.egress] == ["https://api.openai.com"]
    assert n.view.lookup("openai/api-key") is not None  # the secrets held stay
    # A rotation's delta says nothing of routes: the agent keeps them.
    assert eu_api.call("POST", "/v1/rotate/openai/api-key", json={"value": "sk-test-0002"})[0] == 200
    opened, _, body = n.sync()
    assert opened.kind == "delta" and body is not None and body.egress is None
    assert [r.name for r in n.view.egress] == ["openai"]
    # A full view lists them.
    opened, _, body = n.sync(full=True)
    assert opened.kind == "full" and body is not None and [r.name for r in body.egress or ()] == ["openai"]
    # Deleting the last route sends an empty list.
    assert eu_api.call("DELETE", "/v1/egress/openai")[0] == 200
    opened, _, body = n.sync()
    assert opened.kind == "delta" and body is not None and body.egress == () and n.view.egress == ()


def test_a_route_of_another_region_is_not_sent(eu_api: Api, tmp_path: Path) -> None:
    assert eu_api.call("PUT", "/v1/secrets/us/key", json={"value": "us-key-000", "regions": ["us"]})[0] == 200
    assert eu_api.call("POST", "/v1/egress", json={**ROUTE, "name": "us-only", "secret": "us/key"})[0] == 200
    n = Node(eu_api, tmp_path)
    n.sync()
    assert n.view.egress == ()


def test_a_route_row_edited_by_the_writer_is_refused(eu_api: Api, tmp_path: Path) -> None:
    assert eu_api.call("POST", "/v1/egress", json=ROUTE)[0] == 200
    with _db(eu_api).begin() as c:
        row = c.execute(select(t.egress_routes)).one()
        c.execute(update(t.egress_routes).values(route=row.route.replace("api.openai.com", "evil.example")))
    st, doc = eu_api.call("GET", "/v1/egress")
    assert st == 200 and doc["routes"] == [] and doc["refused"] == ["openai"]
    n = Node(eu_api, tmp_path)
    n.sync()
    assert n.view.egress == ()  # never served with the writer's upstream
    assert eu_api.call("DELETE", "/v1/egress/openai")[0] == 200  # removing a tampered route is allowed


def test_a_deleted_route_copied_back_is_refused(eu_api: Api, tmp_path: Path) -> None:
    assert eu_api.call("POST", "/v1/egress", json=ROUTE)[0] == 200
    with _db(eu_api).begin() as c:
        row = dict(c.execute(select(t.egress_routes)).one()._mapping)
    assert eu_api.call("DELETE", "/v1/egress/openai")[0] == 200
    with _db(eu_api).begin() as c:
        c.execute(insert(t.egress_routes).values(**row))  # the old row, MAC and all
    st, doc = eu_api.call("GET", "/v1/egress")
    assert st == 200 and doc["routes"] == [] and doc["refused"] == ["openai"]
    n = Node(eu_api, tmp_path)
    n.sync()
    assert n.view.egress == ()


def test_retry_previous_on_401_is_off_by_default_and_rides_in_the_macd_route_and_the_sync(
    eu_api: Api, tmp_path: Path
) -> None:
    st, doc = eu_api.call("POST", "/v1/egress", json=ROUTE)
    assert st == 200 and "retry_previous_on_401" not in doc  # off: the route's text is as before the flag
    st, doc = eu_api.call("POST", "/v1/egress", json={**ROUTE, "name": "retrying", "retry_previous_on_401": True})
    assert st == 200 and doc["retry_previous_on_401"] is True
    listed = {r["name"]: r for r in eu_api.call("GET", "/v1/egress")[1]["routes"]}
    assert listed["retrying"]["retry_previous_on_401"] is True and "retry_previous_on_401" not in listed["openai"]
    n = Node(eu_api, tmp_path)
    n.sync()
    assert {r.name: r.retry_previous_on_401 for r in n.view.egress} == {"openai": False, "retrying": True}
    assert eu_api.call("POST", "/v1/egress", json={**ROUTE, "name": "x", "retry_previous_on_401": "sometimes"})[0] in (
        400,
        422,
    )
    # the flag is inside the MAC'd text: a writer cannot switch it on
    with _db(eu_api).begin() as c:
        text = c.execute(select(t.egress_routes.c.route).where(t.egress_routes.c.name == "openai")).scalar_one()
        doc = {**json.loads(text), "retry_previous_on_401": True}
        c.execute(
            update(t.egress_routes)
            .where(t.egress_routes.c.name == "openai")
            .values(route=json.dumps(doc, separators=(",", ":"), sort_keys=True))
        )
    assert eu_api.call("GET", "/v1/egress")[1]["refused"] == ["openai"]


@pytest.mark.parametrize("regions", ["not json", "[1]", "5", '[["eu"]]'])
def test_a_route_row_with_a_malformed_regions_column_is_refused_and_the_rest_goes_on(eu_api: Api, regions: str) -> None:
    """The column is read before the row's MAC can be checked: what a writer puts there leaves the
    route out (it was a 500 on listing routes, and on every region's sync)."""
    assert eu_api.call("POST", "/v1/egress", json=ROUTE)[0] == 200
    with _db(eu_api).begin() as c:
        c.execute(update(t.egress_routes).values(regions=regions))
    st, doc = eu_api.call("GET", "/v1/egress")
    assert st == 200 and doc["routes"] == [] and doc["refused"] == ["openai"]
    node, keys = enroll_node(eu_api, "us")  # a node of another region syncs as before
    target = "/v1/agent/sync?since=0&wait=0&proto=2"
    assert eu_api.client.get(target, headers=signed_headers(keys, "GET", target, node, b"")).status_code == 200


def test_route_rows_moved_inserted_or_copied_over_a_new_one_are_refused(eu_api: Api, tmp_path: Path) -> None:
    assert eu_api.call("PUT", "/v1/secrets/both/key", json={"value": "k-0123456789", "regions": ["eu", "us"]})[0] == 200
    moved = {**ROUTE, "name": "moved", "secret": "both/key", "regions": ["us"]}
    assert eu_api.call("POST", "/v1/egress", json=moved)[0] == 200
    assert eu_api.call("POST", "/v1/egress", json={**ROUTE, "upstream": "https://old.example"})[0] == 200
    with _db(eu_api).begin() as c:
        old = dict(c.execute(select(t.egress_routes).where(t.egress_routes.c.name == "openai")).one()._mapping)
    assert eu_api.call("DELETE", "/v1/egress/openai")[0] == 200
    assert eu_api.call("POST", "/v1/egress", json=ROUTE)[0] == 200
    forged = json.dumps({**ROUTE, "name": "fake"})
    with _db(eu_api).begin() as c:
        c.execute(update(t.egress_routes).where(t.egress_routes.c.name == "moved").values(regions='["eu"]'))
        c.execute(update(t.egress_routes).where(t.egress_routes.c.name == "openai").values(**old))
        c.execute(
            insert(t.egress_routes).values(
                name="fake", route=forged, regions='["*"]', created_at=1.0, revision=1, mac=b"\x00" * 32
            )
        )
    st, doc = eu_api.call("GET", "/v1/egress")
    assert st == 200 and doc["routes"] == [] and sorted(doc["refused"]) == ["fake", "moved", "openai"]
    n = Node(eu_api, tmp_path)
    n.sync()
    assert n.view.egress == ()


def test_a_region_takes_no_more_routes_than_its_agents_accept(eu_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent refuses a region body with more than ``MAX_ROUTES`` routes (the whole answer: its
    secrets too), so the control plane never makes one: the route past it is refused."""
    from vault_edge.wire import sync as wsync

    monkeypatch.setattr(wsync, "MAX_ROUTES", 2)
    for name in ("a", "b"):
        assert eu_api.call("POST", "/v1/egress", json={**ROUTE, "name": name})[0] == 200
    st, doc = eu_api.call("POST", "/v1/egress", json={**ROUTE, "name": "c"})
    assert st == 409 and "'eu'" in doc["error"]["message"]
    assert [r["name"] for r in eu_api.call("GET", "/v1/egress")[1]["routes"]] == ["a", "b"]


def test_a_route_on_a_secret_in_no_region_is_refused(eu_api: Api) -> None:
    """A rotator's admin credential is in no region: no agent could ever inject it."""
    rotator = {"type": "redis", "admin_secret": "rotators/rd-admin", "admin_value": {"password": "p"}}
    assert eu_api.call("PUT", "/v1/rotators/rd", json={**rotator, "config": {"username": "app"}})[0] == 200
    st, doc = eu_api.call("POST", "/v1/egress", json={**ROUTE, "secret": "rotators/rd-admin"})
    assert st == 400 and "no region" in doc["error"]["message"]
