"""Every 401 and 403 of the operator API is audited (throttled like other refusals), naming who asked
from where and for what, never the token presented. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from tests.conftest import Api

BOGUS = "vet_" + "B0gusTokenNeverToBeAudited" * 2


def _entries(api: Api) -> list[dict[str, Any]]:
    return api.call("GET", "/v1/audit", params={"limit": 1000})[1]["entries"]  # type: ignore[no-any-return]


def _refusals(api: Api) -> list[dict[str, Any]]:
    return [
        e | {"detail": json.loads(e["detail"])}
        for e in _entries(api)
        if e["outcome"] == "refused" and e["actor"] != "node"
    ]


def test_401_and_403_of_the_operator_api_are_audited_without_the_token(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    st, made = api.call("POST", "/v1/tokens", json={"name": "ci", "prefixes": ["team-a/"], "verbs": ["read"]})
    assert st == 200
    scoped = Api(api.client, made["token"])

    anonymous = Api(api.client)
    assert anonymous.call("GET", "/v1/secrets", params={"prefix": "team-a/"})[0] == 401
    assert Api(api.client, BOGUS).call("GET", "/v1/secrets/team-a/x", params={"version": 1})[0] == 401
    assert Api(api.client).call("GET", "/v1/nodes", headers={"X-Vault-Edge-Token": BOGUS})[0] == 401
    st, err = scoped.call("GET", "/v1/secrets/team-b/db", params={"stage": "previous"})
    assert st == 403 and err["error"]["code"] == "forbidden"
    assert scoped.call("POST", "/v1/sys/seal")[0] == 403

    got = _refusals(api)
    assert [(e["actor"], e["action"], e["detail"]["method"], e["detail"]["path"]) for e in got] == [
        ("anonymous", "api.auth", "GET", "/v1/secrets"),
        ("anonymous", "api.auth", "GET", "/v1/secrets/team-a/x"),
        ("anonymous", "api.auth", "GET", "/v1/nodes"),
        (f"token:ci/{made['id']}", "secrets.get", "GET", "/v1/secrets/team-b/db"),
        (f"token:ci/{made['id']}", "sys.seal", "POST", "/v1/sys/seal"),
    ]
    for e in got:
        assert e["detail"]["remote"] == "testclient"  # request.client.host, as the TestClient names itself
        assert e["detail"]["status"] in (401, 403) and e["detail"]["reason"] in ("unauthorized", "forbidden")
        assert "?" not in e["detail"]["path"] and "prefix" not in json.dumps(e["detail"])  # no query string
    assert "team-b/db" in got[3]["detail"]["message"]  # the refusal says what was refused
    rows = json.dumps(_entries(api))
    for secret in (BOGUS, made["token"], api.token):
        assert secret not in rows
        assert secret not in caplog.text
    assert api.call("GET", "/v1/audit/verify")[1]["ok"] is True


def test_operator_refusals_are_throttled_per_kind(api: Api) -> None:
    """Anyone can send a request without a token: the audit log takes at most 20 a minute of them,
    counts the rest, and records the count with the next one after the window."""
    from vault_edge.server.audit import REFUSAL_WINDOW_S, REFUSALS_PER_WINDOW

    anonymous = Api(api.client)
    for _ in range(REFUSALS_PER_WINDOW + 7):
        assert anonymous.call("GET", "/v1/regions")[0] == 401
    assert len([e for e in _refusals(api) if e["action"] == "api.auth"]) == REFUSALS_PER_WINDOW
    _, made = api.call("POST", "/v1/tokens", json={"name": "r", "prefixes": ["a/"], "verbs": ["read"]})
    assert Api(api.client, made["token"]).call("DELETE", "/v1/secrets/a/x")[0] == 403  # another kind: audited
    assert [e["action"] for e in _refusals(api)][-1] == "secrets.delete"

    auditor = api.client.app.state.ctx.auditor
    later = auditor.clock() + REFUSAL_WINDOW_S + 1
    auditor.clock = lambda: later
    assert anonymous.call("GET", "/v1/regions")[0] == 401
    last = [e for e in _refusals(api) if e["action"] == "api.auth"][-1]
    assert last["detail"]["suppressed_before"] == 7


def test_node_refusals_are_not_audited_twice(api: Api) -> None:
    """The agent routes audit their own refusals (node.auth, node.enroll); the operator handler
    leaves them alone."""
    resp = api.client.get("/v1/agent/sync?since=0&wait=0", headers={"X-Vault-Edge-Node": "n-0000000000000000"})
    assert resp.status_code == 401
    assert not [e for e in _entries(api) if e["action"] == "api.auth"]
