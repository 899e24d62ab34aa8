"""Sealing and unsealing with SLIP-39 shares: every refusal leaves the server sealed with a clear message."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import init_and_unseal


def _init(client: Any, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/sys/init", json={"shares": 5, "threshold": 3, **body})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _unseal(client: Any, share: str | None = None, passphrase: str | None = None) -> tuple[int, dict[str, Any]]:
    r = client.post("/v1/sys/unseal", json={"share": share, "passphrase": passphrase})
    return r.status_code, r.json()


def _sealed(client: Any) -> bool:
    return client.get("/v1/sys/status").json()["sealed"] is True


def test_below_threshold_stays_sealed_and_refuses_everything(make_app: Any) -> None:
    client, _ = make_app()
    doc = _init(client)
    assert doc["threshold"] == 3 and len(doc["shares"]) == 5
    for i, share in enumerate(doc["shares"][:2], 1):
        status, res = _unseal(client, share)
        assert status == 200 and res["sealed"] is True and res["progress"] == i
    headers = {"Authorization": f"Bearer {doc['root_token']}"}
    r = client.get("/v1/secrets", headers=headers)
    assert r.status_code == 503 and r.json()["error"]["code"] == "sealed"
    assert "unseal" in r.json()["error"]["message"]
    status, res = _unseal(client, doc["shares"][4])
    assert status == 200 and res["sealed"] is False
    assert client.get("/v1/secrets", headers=headers).status_code == 200


def test_share_of_another_vault_is_refused_and_changes_nothing(make_app: Any, tmp_path: Any) -> None:
    client, _ = make_app()
    doc = _init(client)
    from fastapi.testclient import TestClient

    from vault_edge.server.app import create_app
    from vault_edge.server.settings import Settings

    with TestClient(create_app(Settings(db=str(tmp_path / "other.db")))) as other:
        foreign = other.post("/v1/sys/init", json={"shares": 5, "threshold": 3}).json()["shares"][0]
    assert _unseal(client, doc["shares"][0])[1]["progress"] == 1
    status, res = _unseal(client, foreign)
    assert status == 400 and res["error"]["code"] == "bad_request"
    assert "another vault" in res["error"]["message"]
    assert client.get("/v1/sys/status").json()["progress"] == 1 and _sealed(client)
    # the remaining good shares still complete the unseal: nothing was lost
    _unseal(client, doc["shares"][1])
    assert _unseal(client, doc["shares"][2])[1]["sealed"] is False


def test_mistyped_share_is_refused_without_quoting_it(make_app: Any) -> None:
    client, _ = make_app()
    doc = _init(client)
    words = doc["shares"][0].split()
    words[5] = "academic" if words[5] != "academic" else "acid"
    status, res = _unseal(client, " ".join(words))
    assert status == 400 and "not a valid share" in res["error"]["message"]
    assert not any(w in res["error"]["message"].split() for w in words[:4])
    assert client.get("/v1/sys/status").json()["progress"] == 0 and _sealed(client)


def test_duplicate_share_is_refused_and_progress_kept(make_app: Any) -> None:
    client, _ = make_app()
    doc = _init(client)
    _unseal(client, doc["shares"][0])
    status, res = _unseal(client, doc["shares"][0])
    assert status == 400 and "duplicate" in res["error"]["message"]
    assert client.get("/v1/sys/status").json()["progress"] == 1 and _sealed(client)


def test_wrong_passphrase_leaves_it_sealed_and_the_right_one_unseals(make_app: Any) -> None:
    client, _ = make_app()
    doc = _init(client, passphrase="correct horse")
    assert client.get("/v1/sys/status").json()["passphrase"] is True
    for share in doc["shares"][:2]:
        assert _unseal(client, share)[0] == 200
    status, res = _unseal(client, doc["shares"][2], "wrong horse")  # the passphrase comes with the last share
    assert status == 400 and res["error"]["code"] == "unseal_failed"
    assert "passphrase" in res["error"]["message"] and "reset" in res["error"]["message"]
    assert _sealed(client) and client.get("/v1/sys/status").json()["progress"] == 0
    for share in doc["shares"][2:4]:
        _unseal(client, share)
    assert _unseal(client, doc["shares"][4], "correct horse")[1]["sealed"] is False


def test_a_passphrase_alone_does_not_disturb_an_unseal_in_progress(make_app: Any) -> None:
    """Anyone can call unseal. A passphrase sent alone while the operators are mid-way is refused
    and changes nothing: their shares still unseal with their passphrase."""
    client, _ = make_app()
    doc = _init(client, passphrase="correct horse")
    for share in doc["shares"][:2]:
        assert _unseal(client, share)[0] == 200
    for attempt in ("evil horse", "correct horse"):
        status, res = _unseal(client, None, attempt)
        assert status == 400 and res["error"]["code"] == "passphrase_not_final"
        assert "only with the share that completes" in res["error"]["message"]
        assert attempt not in res["error"]["message"]
        assert client.get("/v1/sys/status").json()["progress"] == 2 and _sealed(client)
    status, res = _unseal(client, doc["shares"][2], "correct horse")
    assert status == 200 and res["sealed"] is False


def test_a_passphrase_comes_only_with_the_share_that_completes_the_unseal(make_app: Any) -> None:
    client, _ = make_app()
    doc = _init(client, passphrase="correct horse")
    status, res = _unseal(client, doc["shares"][0], "correct horse")  # too early: not the last share
    assert status == 400 and res["error"]["code"] == "passphrase_not_final"
    assert client.get("/v1/sys/status").json()["progress"] == 0  # the share was not taken either
    for share in doc["shares"][:2]:
        assert _unseal(client, share)[0] == 200
    status, res = _unseal(client, doc["shares"][2])  # the last share without the passphrase
    assert status == 400 and res["error"]["code"] == "passphrase_required"
    assert client.get("/v1/sys/status").json()["progress"] == 2 and _sealed(client)
    status, res = _unseal(client, doc["shares"][2], "non-ascii-\u00e9")
    assert status == 400 and client.get("/v1/sys/status").json()["progress"] == 2
    status, res = _unseal(client, doc["shares"][0], "correct horse")  # a duplicate: refused, nothing reset
    assert status == 400 and "duplicate" in res["error"]["message"]
    assert client.get("/v1/sys/status").json()["progress"] == 2
    assert _unseal(client, doc["shares"][2], "correct horse")[1]["sealed"] is False


def test_a_passphrase_for_a_vault_without_one_is_refused_and_changes_nothing(make_app: Any) -> None:
    client, _ = make_app()
    doc = _init(client)
    for share in doc["shares"][:2]:
        assert _unseal(client, share)[0] == 200
    status, res = _unseal(client, doc["shares"][2], "some horse")
    assert status == 400 and "no passphrase" in res["error"]["message"]
    assert client.get("/v1/sys/status").json()["progress"] == 2
    assert _unseal(client, doc["shares"][2])[1]["sealed"] is False


def test_grouped_shares_take_the_passphrase_with_the_share_that_completes_the_groups(make_app: Any) -> None:
    """With groups, the share count alone does not tell the last share: the server does."""
    client, _ = make_app()
    r = client.post(
        "/v1/sys/init",
        json={
            "groups": [{"threshold": 2, "shares": 3}, {"threshold": 2, "shares": 3}],
            "group_threshold": 2,
            "passphrase": "correct horse",
        },
    )
    shares = r.json()["shares"]  # flat: group 1 (3), group 2 (3); the threshold is 4 shares
    for share in shares[:3]:  # all of group 1: three shares in, only one group complete
        assert _unseal(client, share)[0] == 200
    status, res = _unseal(client, shares[3], "correct horse")
    assert status == 400 and res["error"]["code"] == "passphrase_not_final"
    assert _unseal(client, shares[3])[0] == 200
    status, res = _unseal(client, shares[4])
    assert status == 400 and res["error"]["code"] == "passphrase_required"
    assert _unseal(client, shares[4], "correct horse")[1]["sealed"] is False


def test_grouped_shares_need_the_group_threshold(make_app: Any) -> None:
    client, _ = make_app()
    r = client.post(
        "/v1/sys/init",
        json={
            "groups": [{"threshold": 2, "shares": 3}, {"threshold": 2, "shares": 3}, {"threshold": 1, "shares": 1}],
            "group_threshold": 2,
        },
    )
    assert r.status_code == 200, r.text
    shares = r.json()["shares"]  # flat: group 1 (3), group 2 (3), group 3 (1)
    _unseal(client, shares[0])
    _unseal(client, shares[1])  # group 1 complete: one group is not enough
    assert _sealed(client)
    assert _unseal(client, shares[6])[1]["sealed"] is False  # group 3 (1 of 1) completes the set


def test_seal_forgets_the_key_and_restart_starts_sealed(make_app: Any) -> None:
    client, _ = make_app()
    shares, token = init_and_unseal(client)
    h = {"Authorization": f"Bearer {token}"}
    client.post("/v1/regions", json={"name": "eu"}, headers=h)
    client.put("/v1/secrets/k", json={"value": "v1"}, headers=h)
    assert client.post("/v1/sys/seal", headers=h).json()["sealed"] is True
    assert client.get("/v1/secrets/k", headers=h).status_code == 503
    restarted, _ = make_app()
    assert restarted.get("/v1/sys/status").json() | {} and _sealed(restarted)
    for share in shares[:2]:
        _unseal(restarted, share)
    assert restarted.get("/v1/secrets/k", headers=h).json()["value"] == "v1"


@pytest.mark.parametrize(
    "body",
    [
        {"shares": 3, "threshold": 4},
        {"shares": 5, "threshold": 1},
        {"shares": 17, "threshold": 3},
        {"groups": [{"threshold": 2, "shares": 3}], "group_threshold": 2},
        {"passphrase": "non-ascii-é"},
    ],
)
def test_bad_init_is_refused_and_leaves_it_uninitialized(make_app: Any, body: dict[str, Any]) -> None:
    client, _ = make_app()
    r = client.post("/v1/sys/init", json=body)
    assert r.status_code == 400 and set(r.json()["error"]) == {"code", "message"}
    assert client.get("/v1/sys/status").json()["initialized"] is False


def test_init_twice_is_a_conflict(make_app: Any) -> None:
    client, _ = make_app()
    _init(client)
    r = client.post("/v1/sys/init", json={})
    assert r.status_code == 409 and "already initialized" in r.json()["error"]["message"]
