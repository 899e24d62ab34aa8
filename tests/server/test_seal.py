"""Recovery-share operations (generate-root, rekey), root key rotation, backup, restore and migration,
in process on SQLite and PostgreSQL. The PKCS#11 seal runs in real processes: tests/e2e/test_seal.py."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import Api, init_and_unseal
from vault_edge.crypto import aead
from vault_edge.server.ops import backup
from vault_edge.server.storage.engine import make_engine


def _unseal(client: Any, shares: list[str]) -> tuple[int, Any]:
    r = None
    for s in shares:
        r = client.post("/v1/sys/unseal", json={"share": s})
        if r.status_code != 200:
            return r.status_code, r.json()
    assert r is not None
    return r.status_code, r.json()


def _fill(api: Api, n: int = 3) -> dict[str, str]:
    values = {}
    for i in range(n):
        name = f"app/s{i}"
        for v in range(2):
            value = f"value-{i}-{v}"
            assert api.call("PUT", f"/v1/secrets/{name}", json={"value": value, "regions": ["eu"]})[0] == 200
        values[name] = value
    return values


def _reads(api: Api, names: list[str]) -> dict[str, Any]:
    out = {}
    for n in names:
        st, doc = api.call("GET", f"/v1/secrets/{n}")
        assert st == 200, doc
        out[n] = (doc["value"], doc["version"])
        st, doc = api.call("GET", f"/v1/secrets/{n}", params={"version": 1})
        out[n + "@1"] = doc["value"]
    return out


def test_generate_root_from_shares_and_refusals_change_nothing(make_app: Any) -> None:
    client, _ = make_app()
    shares, _ = init_and_unseal(client)
    st, doc = Api(client).call("POST", "/v1/sys/generate-root", json={"shares": shares[:1]})
    assert st == 400 and "not enough shares" in doc["error"]["message"] and shares[0] not in str(doc)
    st, doc = Api(client).call("POST", "/v1/sys/generate-root", json={"shares": shares[:2]})
    assert st == 200, doc
    new = Api(client, doc["root_token"])
    assert new.call("POST", "/v1/regions", json={"name": "eu"})[0] == 200
    assert new.call("GET", "/v1/audit/verify")[1]["ok"] is True


def test_rekey_makes_old_shares_useless(make_app: Any) -> None:
    client, _ = make_app()
    old, token = init_and_unseal(client)
    api = Api(client, token)
    assert api.call("POST", "/v1/regions", json={"name": "eu"})[0] == 200
    values = _fill(api, 1)
    st, doc = api.call("POST", "/v1/sys/rekey", json={"shares": old[:2], "new_shares": 4, "new_threshold": 3})
    assert st == 200, doc
    new = doc["shares"]
    assert len(new) == 4 and not set(new) & set(old)
    assert api.call("POST", "/v1/sys/generate-root", json={"shares": old[:2]})[0] == 400
    assert api.call("POST", "/v1/sys/seal")[0] == 200
    st, doc = _unseal(client, old[:2])
    assert st == 400  # another set identifier: refused at once
    client2, _ = make_app()  # a restart onto the same database
    assert _unseal(client2, old[:2])[0] == 400
    st, doc = _unseal(client2, new[:3])
    assert st == 200 and doc["sealed"] is False and doc["threshold"] == 3
    api2 = Api(client2, token)
    assert api2.call("GET", "/v1/secrets/app/s0")[1]["value"] == values["app/s0"]
    assert api2.call("GET", "/v1/audit/verify")[1]["ok"] is True


def test_rotate_rewraps_region_keys_with_work_growing_with_regions_not_secrets(
    make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = make_app()
    shares, token = init_and_unseal(client)
    api = Api(client, token)
    counts = {"ops": 0}
    for fn in ("encrypt", "decrypt"):
        real = getattr(aead, fn)

        def counted(*a: Any, _real: Any = real, **kw: Any) -> Any:
            counts["ops"] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(aead, fn, counted)

    def rotate_cost() -> int:
        client.app.state.ctx.barrier._region_keys.clear()  # no cache: count every unwrap
        counts["ops"] = 0
        st, doc = api.call("POST", "/v1/sys/rotate")
        assert st == 200, doc
        return counts["ops"]

    for r in ("eu", "us"):
        api.call("POST", "/v1/regions", json={"name": r})
    few = rotate_cost()
    values = _fill(api, 30)  # 30 secrets, 60 versions
    assert rotate_cost() == few  # secrets cost nothing
    for r in ("r1", "r2"):
        api.call("POST", "/v1/regions", json={"name": r})
    api.call("POST", "/v1/regions/eu/rekey")  # region keys: eu v2 (v1 deleted)
    more = rotate_cost()
    assert more == few + 2 * 2  # one unwrap and one wrap per region key
    before = _reads(api, list(values))
    assert api.call("POST", "/v1/sys/seal")[0] == 200
    assert _unseal(client, shares[:2])[1]["sealed"] is False
    assert _reads(api, list(values)) == before
    assert api.call("GET", "/v1/audit/verify")[1]["ok"] is True
    assert api.call("PUT", "/v1/secrets/app/new", json={"value": "x", "regions": ["r1"]})[0] == 200
    assert api.call("GET", "/v1/secrets/app/new")[1]["value"] == "x"


def _root(shares: list[str], db: str) -> bytes:
    from vault_edge.server.ops import seal as seal_ops
    from vault_edge.server.storage import schema as t

    engine = make_engine(db)
    from sqlalchemy import select

    with engine.connect() as c:
        meta = {r.key: r.value for r in c.execute(select(t.meta))}
    engine.dispose()
    return seal_ops.root_from_shares(meta, shares, None)


@pytest.fixture
def backed_up(make_app: Any, db_url: str) -> Any:
    client, _ = make_app()
    shares, token = init_and_unseal(client)
    api = Api(client, token)
    for r in ("eu", "us"):
        api.call("POST", "/v1/regions", json={"name": r})
    values = _fill(api, 3)
    api.call("POST", "/v1/sys/rotate")
    api.call("POST", "/v1/nodes/tokens", json={"region": "eu"})
    api.call("POST", "/v1/tokens", json={"name": "ci", "prefixes": ["app/"], "verbs": ["read"]})
    resp = client.get("/v1/sys/backup", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/octet-stream"
    assert b"value-0-1" not in resp.content
    return shares, token, values, _reads(api, list(values)), resp.content, db_url


@pytest.mark.parametrize("target", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_backup_restores_into_an_empty_database(
    backed_up: Any, target: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    shares, token, values, reads, raw, source = backed_up
    db = str(tmp_path / "restored.db") if target == "sqlite" else request.getfixturevalue("fresh_pg")()
    root = _root(shares[:2], source)
    res = backup.restore(raw, db, lambda meta: root, time.time())
    assert res.revision > res.from_revision + backup.REVISION_JUMP
    with pytest.raises(backup.BackupError, match="not empty"):
        backup.restore(raw, db, lambda meta: root, time.time())
    from fastapi.testclient import TestClient

    from vault_edge.server.app import create_app
    from vault_edge.server.settings import Settings

    with TestClient(create_app(Settings(db=db))) as client:
        assert _unseal(client, shares[:2])[1]["sealed"] is False
        api = Api(client, token)
        assert _reads(api, list(values)) == reads
        assert api.call("GET", "/v1/audit/verify")[1]["ok"] is True
        assert [t["name"] for t in api.call("GET", "/v1/tokens")[1]["tokens"]] == ["root", "ci"]
        st, doc = api.call("PUT", "/v1/secrets/app/s0", json={"value": "after"})
        assert st == 200 and doc["revision"] > res.revision and doc["version"] == 3
        client.app.state.ctx.store.dispose()


def _edit_header(line: bytes) -> bytes:
    import json

    header = json.loads(line)
    header["rows"]["secrets"] += 1
    return json.dumps(header, separators=(",", ":"), sort_keys=True).encode()


def test_a_damaged_or_truncated_backup_is_refused_whole(backed_up: Any, tmp_path: Any) -> None:
    shares, _, _, _, raw, source = backed_up
    root = _root(shares[:2], source)
    header_end = raw.index(b"\n", len(b"VEBACKUP1\n")) + 1
    damaged = {
        "truncated": raw[:-10],
        "a chunk byte": raw[:-40] + bytes([raw[-40] ^ 1]) + raw[-39:],
        "the header": raw.replace(b'"format":1', b'"format":1 ', 1),
        "a row count": raw[:10] + _edit_header(raw[10 : header_end - 1]) + raw[header_end - 1 :],
        "trailing bytes": raw + b"x",
        "not a backup": b"hello",
    }
    for what, data in damaged.items():
        db = tmp_path / f"{what.replace(' ', '-')}.db"
        with pytest.raises(backup.BackupError):
            backup.restore(data, str(db), lambda meta: root, time.time())
        engine = make_engine(str(db))
        from vault_edge.server.storage import snapshot

        with engine.connect() as c:
            assert not c.dialect.has_table(c, "meta") or snapshot.is_empty(c), what
        engine.dispose()
    with pytest.raises(backup.BackupError, match="does not open"):
        backup.restore(raw, str(tmp_path / "wrong.db"), lambda meta: aead.new_key(), time.time())


@pytest.mark.postgres
def test_migrate_sqlite_to_postgres_and_back(backed_up: Any, request: pytest.FixtureRequest, tmp_path: Any) -> None:
    shares, token, values, reads, _, source = backed_up
    if "postgresql" in source:
        pytest.skip("the source of this test is SQLite")
    pg = request.getfixturevalue("fresh_pg")()
    res = backup.migrate_db(source, pg)
    assert res.rows["audit"] == res.audit_entries > 0
    with pytest.raises(backup.BackupError, match="not empty"):
        backup.migrate_db(source, pg)
    back = str(tmp_path / "back.db")
    assert backup.migrate_db(pg, back).rows == res.rows
    from fastapi.testclient import TestClient

    from vault_edge.server.app import create_app
    from vault_edge.server.settings import Settings

    for db in (pg, back):
        with TestClient(create_app(Settings(db=db))) as client:
            assert _unseal(client, shares[:2])[1]["sealed"] is False
            api = Api(client, token)
            assert _reads(api, list(values)) == reads
            assert api.call("GET", "/v1/audit/verify")[1]["ok"] is True
            assert api.call("PUT", "/v1/secrets/app/new", json={"value": "x"})[0] == 200
            client.app.state.ctx.store.dispose()
