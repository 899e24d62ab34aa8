"""Reads whose rows must agree (SQLite and PostgreSQL): a change committed between two statements of
a read transaction is either wholly seen or not at all. On PostgreSQL each statement of a READ
COMMITTED transaction sees the commits made before it began, so a rotation landing between a secret's
record and its stage rows made them disagree: a false integrity alarm, a 500, audited. Reads are one
snapshot now (REPEATABLE READ). Each test commits a change from another thread at the exact point
(just before a given statement of the read under test), and failed on PostgreSQL before."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event

from tests.conftest import Api


@contextmanager
def _between(api: Api, before: Callable[[str], bool], change: Callable[[], Any]) -> Iterator[list[Any]]:
    """Within: ``change()`` runs once (a commit, from another thread) just before the first statement
    of a read transaction for which ``before(statement)`` holds; its result is in the list yielded."""
    store = api.client.app.state.ctx.store
    fired: list[Any] = []

    def hook(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if fired or conn.get_execution_options().get("vault_edge_write") or not before(statement):
            return
        fired.append(None)
        done: list[Any] = []
        t = threading.Thread(target=lambda: done.append(change()))
        t.start()
        t.join()
        fired[0] = done[0] if done else "failed"

    event.listen(store.engine, "before_cursor_execute", hook)
    try:
        yield fired
    finally:
        event.remove(store.engine, "before_cursor_execute", hook)


def _put(api: Api) -> None:
    assert api.call("PUT", "/v1/secrets/app/key", json={"value": "v1", "regions": ["eu"]})[0] == 200


def _rotate(api: Api) -> Callable[[], int]:
    return lambda: api.call("POST", "/v1/rotate/app/key", json={"value": "v2"})[0]


def test_a_rotation_between_a_secrets_record_and_its_stages_is_no_integrity_alarm(api: Api) -> None:
    _put(api)
    for target in ("/v1/secrets/app/key", "/v1/history/app/key"):
        with _between(api, lambda s: "FROM stages" in s, _rotate(api)) as fired:
            status, doc = api.call("GET", target)
        assert fired == [200] and status == 200, doc
    assert not [
        e for e in api.call("GET", "/v1/audit", params={"limit": 1000})[1]["entries"] if e["action"] == "integrity"
    ]


def test_a_rekey_between_a_versions_wraps_and_the_region_key_is_no_500(api: Api) -> None:
    _put(api)
    rekey = lambda: api.call("POST", "/v1/regions/eu/rekey")[0]  # noqa: E731 (the old key version goes)
    with _between(api, lambda s: "FROM region_keys" in s, rekey) as fired:
        status, doc = api.call("GET", "/v1/secrets/app/key")
    assert fired == [200] and status == 200 and doc["value"] == "v1", doc


def test_a_destroy_between_a_version_and_its_wraps_is_no_500(api: Api) -> None:
    _put(api)
    destroy = lambda: api.call("DELETE", "/v1/secrets/app/key", params={"destroy": "true"})[0]  # noqa: E731
    with _between(api, lambda s: "FROM data_key_wraps" in s, destroy) as fired:
        status, doc = api.call("GET", "/v1/secrets/app/key")
    assert fired == [200] and status == 200 and doc["value"] == "v1", doc  # as of the read's moment


def test_an_audit_entry_between_the_chains_last_batch_and_its_head_breaks_nothing(api: Api) -> None:
    auditor = api.client.app.state.ctx.auditor
    listed: list[bool] = []

    def before(statement: str) -> bool:  # the head counter, read after the entries
        if "FROM audit" in statement:
            listed.append(True)
            return False
        return bool(listed) and "FROM counter" in statement

    record = lambda: auditor.record_alone("test", "test.entry", outcome="ok", throttle=None)  # noqa: E731
    with _between(api, before, record) as fired:
        status, doc = api.call("GET", "/v1/audit/verify")
    assert fired == [None] and status == 200 and doc["ok"], doc


def test_moving_a_rotator_kept_secret_to_another_region_reaches_the_views(api: Api) -> None:
    """``put NAME --rotator R --regions us`` (no value) logged no change under the secret's name:
    a region's view, loaded from the previous one and the change log, kept serving it in eu."""
    hub = api.client.app.state.hub
    config = {
        "create": {"method": "POST", "url": "http://127.0.0.1:9/keys"},
        "test": {"method": "GET", "url": "http://127.0.0.1:9/whoami", "bearer_field": "key"},
        "revoke": {"method": "DELETE", "url": "http://127.0.0.1:9/keys/{id}"},
    }
    rotator = {"type": "webhook", "admin_secret": "rotators/ai-admin", "admin_value": {"token": "t"}, "config": config}
    assert api.call("PUT", "/v1/rotators/ai", json=rotator)[0] == 200
    body = {"rotator": "ai", "regions": ["eu"], "value": '{"key": "k1"}'}
    assert api.call("PUT", "/v1/secrets/ai/key", json=body)[0] == 200
    for r in ("eu", "us"):
        hub._views[r] = (hub._gen.get(r, 0), hub._load(r))
    assert "ai/key" in hub._views["eu"][1].entries and "ai/key" not in hub._views["us"][1].entries
    assert api.call("PUT", "/v1/secrets/ai/key", json={"rotator": "ai", "regions": ["us"]})[0] == 200
    assert "ai/key" not in hub._load("eu").entries and "ai/key" in hub._load("us").entries


def test_the_change_index_is_read_while_another_thread_adds_to_it(api: Api) -> None:
    """``changed_since`` walked the shared index outside its lock: another thread's refresh adding a
    name meanwhile raised (dictionary changed size during iteration), failing a region's view load.
    Under the lock, the other thread waits (a second here) and goes on after."""
    store = api.client.app.state.ctx.store
    for name in ("a/1", "a/2"):
        assert api.call("PUT", f"/v1/secrets/{name}", json={"value": "v", "regions": ["eu"]})[0] == 200
    with store.read() as tx:
        tx.refresh_changes()
    others: list[threading.Thread] = []

    def other() -> None:  # a new secret's first change, read into the index by another transaction
        assert api.call("PUT", "/v1/secrets/a/3", json={"value": "v", "regions": ["eu"]})[0] == 200
        with store.read() as tx2:
            tx2.refresh_changes()

    class Last(dict[str, int]):
        def items(self) -> Any:
            for i, kv in enumerate(super().items()):
                if i == 0 and not others:
                    others.append(threading.Thread(target=other))
                    others[0].start()
                    others[0].join(timeout=1.0)
                yield kv

    store.changes.last = Last(store.changes.last)
    with store.read() as tx:
        assert tx.changed_since(0) is not None
    others[0].join(timeout=10)
    assert "a/3" in store.changes.last
