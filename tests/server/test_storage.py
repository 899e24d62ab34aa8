"""Storage on SQLite and PostgreSQL: revisions, atomicity, migrations, and ciphertext only at rest."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text, update

from tests.conftest import Api, run_concurrently
from vault_edge.crypto.rowmac import RowKeys
from vault_edge.server.storage import schema as t
from vault_edge.server.storage.engine import make_engine, migrate
from vault_edge.server.storage.repo import Store

VALUE = "plaintext-canary-7f3a9c-SHOULD-NEVER-BE-AT-REST"


@pytest.fixture
def store(db_url: str) -> Store:
    engine = make_engine(db_url)
    migrate(engine)
    s = Store(engine)
    s.bind_keys(lambda: RowKeys(bytes(32)))  # what the barrier gives once unsealed
    yield s
    s.dispose()


def test_revisions_are_taken_in_the_change_transaction(store: Store) -> None:
    with store.write() as tx:
        r1 = tx.next_revision()
        assert tx.next_revision() == r1  # one revision per transaction
        assert tx.insert_region("eu", r1, 0.0)
    with pytest.raises(RuntimeError), store.write() as tx:
        tx.next_revision()
        tx.insert_region("us", tx.revision, 0.0)
        raise RuntimeError("fail mid-change")
    with store.read() as tx:
        assert tx.current_revision() == r1  # the failed change took no revision...
        assert [r.name for r in tx.list_regions()] == ["eu"]  # ...and left no row


def test_concurrent_writers_get_gapless_increasing_revisions(store: Store) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        for j in range(5):
            with store.write() as tx:
                rev = tx.next_revision()
                tx.add_meta(f"w{i}-{j}", str(rev))
            with lock:
                seen.append(rev)

    run_concurrently(writer, 6)
    assert sorted(seen) == list(range(1, 31))
    with store.read() as tx:
        assert tx.current_revision() == 30


def test_migrations_are_idempotent(db_url: str) -> None:
    engine = make_engine(db_url)
    migrate(engine)
    migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0008"
        assert set(inspect(conn).get_table_names()) >= {tbl.name for tbl in t.metadata.sorted_tables}
        # The migrations build exactly the schema the code declares (columns, types, indexes).
        assert compare_metadata(MigrationContext.configure(conn), t.metadata) == []
    engine.dispose()


def _all_rows_as_bytes(db_url: str) -> bytes:
    engine = make_engine(db_url)
    out = []
    with engine.connect() as conn:
        for table in t.metadata.sorted_tables:
            for row in conn.execute(select(table)):
                for v in row:
                    out.append(v if isinstance(v, bytes) else str(v).encode())
    engine.dispose()
    return b"\n".join(out)


def test_database_copied_while_unsealed_holds_no_plaintext(api: Api, db_url: str, tmp_path: Path) -> None:
    assert api.call("PUT", "/v1/secrets/prod/key", json={"value": VALUE, "regions": ["eu", "us"]})[0] == 200
    assert api.call("POST", "/v1/rotate/prod/key", json={"value": VALUE + "-v2"})[0] == 200
    assert api.call("GET", "/v1/secrets/prod/key")[1]["value"] == VALUE + "-v2"  # unsealed, serving
    token = api.token
    assert token
    if "://" not in db_url:  # SQLite: copy the files as they are, WAL included, and grep them
        copied = b""
        for suffix in ("", "-wal", "-shm"):
            src = Path(db_url + suffix)
            if src.exists():
                shutil.copy(src, tmp_path / ("copy" + suffix))
                copied += (tmp_path / ("copy" + suffix)).read_bytes()
        assert len(copied) > 0
    else:  # PostgreSQL: every column of every row of every table
        copied = _all_rows_as_bytes(db_url)
    assert VALUE.encode() not in copied
    assert token.encode() not in copied  # tokens are stored as digests only


def test_a_moved_ciphertext_is_refused_and_the_others_still_read(api: Api, db_url: str) -> None:
    api.call("PUT", "/v1/secrets/a", json={"value": "value-of-a", "regions": ["eu"]})
    api.call("PUT", "/v1/secrets/b", json={"value": "value-of-b", "regions": ["eu"]})
    engine = make_engine(db_url)
    with engine.begin() as conn:
        ids = dict(conn.execute(select(t.secrets.c.name, t.secrets.c.id)).all())
        ct_b = conn.execute(
            select(t.secret_versions.c.ciphertext).where(t.secret_versions.c.secret_id == ids["b"])
        ).scalar_one()
        conn.execute(update(t.secret_versions).where(t.secret_versions.c.secret_id == ids["a"]).values(ciphertext=ct_b))
    engine.dispose()
    status, doc = api.call("GET", "/v1/secrets/a")
    assert status == 500 and doc["error"]["code"] == "integrity_error"
    assert "value-of-b" not in str(doc)
    assert api.call("GET", "/v1/secrets/b")[1]["value"] == "value-of-b"


def test_a_wrapped_key_moved_to_another_secret_is_refused(api: Api, db_url: str) -> None:
    api.call("PUT", "/v1/secrets/a", json={"value": "value-of-a", "regions": ["eu"]})
    api.call("PUT", "/v1/secrets/b", json={"value": "value-of-b", "regions": ["eu"]})
    engine = make_engine(db_url)
    with engine.begin() as conn:
        ids = dict(conn.execute(select(t.secrets.c.name, t.secrets.c.id)).all())
        w = t.data_key_wraps
        wrap_b = conn.execute(select(w.c.wrapped).where(w.c.secret_id == ids["b"])).scalar_one()
        conn.execute(update(w).where(w.c.secret_id == ids["a"]).values(wrapped=wrap_b))
    engine.dispose()
    status, doc = api.call("GET", "/v1/secrets/a")
    assert status == 500 and doc["error"]["code"] == "integrity_error"
    assert api.call("GET", "/v1/secrets/b")[1]["value"] == "value-of-b"
    # the refusal is in the audit log, and the log's chain is intact
    entries = api.call("GET", "/v1/audit", params={"limit": 1000})[1]["entries"]
    assert any(e["action"] == "integrity" and e["outcome"] == "refused" for e in entries)
    assert api.call("GET", "/v1/audit/verify")[1]["ok"] is True


def test_residency_no_wrap_outside_allowed_regions(api: Api, db_url: str) -> None:
    api.call("PUT", "/v1/secrets/eu-only", json={"value": "x", "regions": ["eu"]})
    api.call("PUT", "/v1/secrets/everywhere", json={"value": "y", "regions": ["*"]})
    api.call("POST", "/v1/regions", json={"name": "ap"})  # a region made later gets '*' secrets only
    engine = make_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(
            select(t.secrets.c.name, t.data_key_wraps.c.region).join(
                t.data_key_wraps, t.data_key_wraps.c.secret_id == t.secrets.c.id
            )
        ).all()
    engine.dispose()
    assert sorted(rows) == [("eu-only", "eu"), ("everywhere", "ap"), ("everywhere", "eu"), ("everywhere", "us")]
