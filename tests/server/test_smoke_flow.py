"""The operator's first steps through the API, on SQLite and PostgreSQL."""

from __future__ import annotations

from tests.conftest import Api


def test_put_get_rotate_rollback_delete(api: Api) -> None:
    st, doc = api.call("PUT", "/v1/secrets/db/password", json={"value": "pw-one", "regions": ["eu"]})
    assert st == 200 and doc["version"] == 1 and doc["regions"] == ["eu"]
    st, doc = api.call("GET", "/v1/secrets/db/password")
    assert (st, doc["value"], doc["version"], doc["stage"]) == (200, "pw-one", 1, "current")

    st, doc = api.call("POST", "/v1/rotate/db/password", json={"value": "pw-two"})
    assert st == 200 and doc["version"] == 2
    assert api.call("GET", "/v1/secrets/db/password")[1]["value"] == "pw-two"
    prev = api.call("GET", "/v1/secrets/db/password", params={"stage": "previous"})[1]
    assert (prev["value"], prev["version"], prev["stage"]) == ("pw-one", 1, "previous")

    st, doc = api.call("POST", "/v1/rollback/db/password", json={"to": 1})
    assert st == 200 and doc["version"] == 3
    cur = api.call("GET", "/v1/secrets/db/password")[1]
    assert (cur["value"], cur["version"]) == ("pw-one", 3)
    hist = api.call("GET", "/v1/history/db/password")[1]
    assert [v["origin"] for v in hist["versions"]] == ["put", "rotate", "rollback:1"]

    assert api.call("DELETE", "/v1/secrets/db/password")[0] == 200
    assert api.call("GET", "/v1/secrets/db/password")[0] == 404
    assert api.call("GET", "/v1/secrets")[1]["secrets"] == []
