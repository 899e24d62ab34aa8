"""The scheduler's duties, with two replicas on one database (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.conftest import two_replicas as _two_replicas


def test_a_due_rotation_runs_exactly_once_across_replicas(make_app: Any) -> None:
    api, app1, app2 = _two_replicas(make_app)
    st, doc = api.call("PUT", "/v1/secrets/gen", json={"generate": "32:base64url", "rotate_every": "60s"})
    assert st == 200 and doc["version"] == 1
    later = time.time() + 61
    for app in (app1, app2):
        app.state.ctx.clock = lambda: later
    results: list[int] = []
    barrier = threading.Barrier(2)

    def tick(app: Any) -> None:
        barrier.wait()
        results.append(app.state.scheduler.rotate_due())

    threads = [threading.Thread(target=tick, args=(a,)) for a in (app1, app2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(results) == [0, 1]  # one replica won the compare-and-set, the other did nothing
    hist = api.call("GET", "/v1/history/gen")[1]
    assert [v["origin"] for v in hist["versions"]] == ["generated", "scheduled"]
    assert hist["next_rotation_at"] > later  # re-armed from the rotation's time
    # not due again until the next period
    assert app1.state.scheduler.rotate_due() == 0 and app2.state.scheduler.rotate_due() == 0


def test_a_failed_scheduled_rotation_is_retried_and_spares_the_others(make_app: Any, monkeypatch: Any) -> None:
    """The claim commits with the rotation: a rotation that fails is not silently skipped for a whole
    period but retried after a back-off (so it cannot hog every tick); the other due secrets rotate."""
    from vault_edge.server import generate
    from vault_edge.server.scheduler import RETRY_AFTER_S

    api, app1, _ = _two_replicas(make_app)
    for name in ("a", "b"):
        api.call("PUT", f"/v1/secrets/{name}", json={"generate": "32:hex", "rotate_every": "1h"})
    later = time.time() + 3601
    app1.state.ctx.clock = lambda: later
    real, calls = generate.generate, []

    def failing_once(spec: str) -> bytes:
        calls.append(spec)
        if len(calls) == 1:
            raise RuntimeError("entropy source hiccup")
        return real(spec)

    monkeypatch.setattr(generate, "generate", failing_once)
    assert app1.state.scheduler.rotate_due() == 1  # one failed, the other rotated
    history = {n: api.call("GET", f"/v1/history/{n}")[1] for n in ("a", "b")}
    failed = next(n for n, h in history.items() if len(h["versions"]) == 1)
    assert history[failed]["next_rotation_at"] == later + RETRY_AFTER_S  # backed off, not a period lost
    assert app1.state.scheduler.rotate_due() == 0  # not before the back-off
    app1.state.ctx.clock = lambda: later + RETRY_AFTER_S + 1
    assert app1.state.scheduler.rotate_due() == 1  # retried
    assert [v["origin"] for v in api.call("GET", f"/v1/history/{failed}")[1]["versions"]] == ["generated", "scheduled"]
    assert app1.state.scheduler.rotate_due() == 0  # and re-armed for a full period


def test_grace_ends_with_a_new_revision(make_app: Any) -> None:
    api, app1, _ = _two_replicas(make_app)
    api.call("PUT", "/v1/secrets/k", json={"value": "one"})
    api.call("POST", "/v1/rotate/k", json={"value": "two", "grace": "10s"})
    assert api.call("GET", "/v1/secrets/k", params={"stage": "previous"})[1]["value"] == "one"
    rev_before = api.call("GET", "/v1/sys/status")[1]["revision"]
    assert app1.state.scheduler.expire_stages() == 0  # not yet
    app1.state.ctx.clock = lambda: time.time() + 11
    assert app1.state.scheduler.expire_stages() == 1
    assert api.call("GET", "/v1/sys/status")[1]["revision"] == rev_before + 1
    app1.state.ctx.clock = time.time
    status, doc = api.call("GET", "/v1/secrets/k", params={"stage": "previous"})
    assert status == 404 and doc["error"]["code"] == "not_found"
    assert api.call("GET", "/v1/secrets/k", params={"version": 1})[1]["value"] == "one"  # still in history
