"""Hostile sync answers and a hostile disk: refused, logged, and the good cached value still served."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import ControlPlane, wait_until
from tests.e2e.proxy import Proxy
from vault_edge import wire


@pytest.fixture
def proxy(control_plane: ControlPlane) -> Iterator[Proxy]:
    p = Proxy(control_plane.addr)
    yield p
    p.close()


@pytest.mark.parametrize("mode,reason", [
    ("tamper", "bad control-plane signature"),
    ("other_node", "another node"),
    ("replay", "does not match this request"),
])
def test_hostile_sync_answers_are_refused(control_plane: ControlPlane, start_agent: Any, proxy: Proxy,
                                          mode: str, reason: str) -> None:
    op = control_plane.op
    op.put("eu/db", value="good-v1", regions=["eu"])
    a = start_agent("eu1", "eu", server=proxy.addr)
    start_agent("eu2", "eu", server=proxy.addr)  # its answers are what `other_node` hands to eu1
    assert a.get("eu/db") == "good-v1"
    held = a.health()["revision"]

    proxy.mode = mode
    op.rotate("eu/db", value="evil-or-new-v2")
    wait_until(lambda: reason in a.log(), 20, f"the agent to refuse a {mode} answer")
    assert proxy.rewritten >= 1
    # refused and logged; the good value (and revision) still served
    assert a.get("eu/db") == "good-v1"
    assert a.health()["revision"] == held
    assert "refused a sync answer" in a.log()
    assert "evil-or-new-v2" not in a.log()

    proxy.mode = "pass"  # the link heals: the agent catches up with the genuine answer
    wait_until(lambda: a.get("eu/db") == "evil-or-new-v2", 20, "catch-up after the attack stops")


def test_the_join_token_never_crosses_the_wire_in_clear(control_plane: ControlPlane, start_agent: Any,
                                                        proxy: Proxy) -> None:
    """Over plain HTTP, a relay between agent and control plane sees the enrolment, but sealed to the
    control plane's key: it cannot read the join token (to enrol itself) or swap the node's keys."""
    control_plane.op.put("eu/db", value="v1", regions=["eu"])
    a = start_agent("eu1", "eu", server=proxy.addr)
    assert a.get("eu/db") == "v1"
    assert a.join_token is not None
    _, token_id, secret, _ = a.join_token.split(".")
    seen = bytes(proxy.wire)
    assert b"/v1/agent/enroll" in seen  # the relay did carry the enrolment
    assert secret.encode() not in seen and token_id.encode() not in seen


def test_a_forged_revocation_does_not_wipe_the_agent(control_plane: ControlPlane, start_agent: Any,
                                                      proxy: Proxy) -> None:
    """Only the control plane's signed proof makes an agent wipe itself: a 403 from the path is transient."""
    op = control_plane.op
    op.put("eu/db", value="kept-v1", regions=["eu"])
    a = start_agent("eu1", "eu", server=proxy.addr)
    assert a.get("eu/db") == "kept-v1"
    proxy.mode = "forge_revoked"
    op.rotate("eu/db", value="kept-v2")
    wait_until(lambda: proxy.rewritten >= 3 and a.log().count("signed proof of revocation") >= 3, 30,
               "the agent to see forged revocations (bare, badly signed, deeply nested)")
    assert a.proc is not None and a.proc.poll() is None  # still running
    assert (a.state_dir / "cache.json").exists()
    assert a.get("eu/db") in ("kept-v1", "kept-v2")
    proxy.mode = "pass"
    wait_until(lambda: a.get("eu/db") == "kept-v2", 30, "catch-up once the path stops forging")
    assert a.proc.poll() is None


def test_a_tampered_disk_cache_is_refused_on_start(control_plane: ControlPlane, start_agent: Any) -> None:
    control_plane.op.put("eu/db", value="cached-v1", regions=["eu"])
    a = start_agent("eu1", "eu")
    assert a.get("eu/db") == "cached-v1"
    a.stop()
    cache = a.state_dir / "cache.json"
    doc = json.loads(cache.read_text())
    body = bytearray(wire.b64d(doc["body"]))
    body[len(body) // 2] ^= 0x01
    doc["body"] = wire.b64e(bytes(body))
    cache.write_text(json.dumps(doc))
    control_plane.kill()  # no control plane: the agent has only its (tampered) disk
    a.join_token = None
    a.start(wait_ready=False)
    wait_until(lambda: "refused the disk cache" in a.log(), 15, "the cache to be refused")
    assert a.health()["status"] == "starting"  # nothing trustworthy to serve
    with a.client() as c:
        from vault_edge.client import AgentError

        with pytest.raises(AgentError) as e:
            c.get("eu/db")
    assert e.value.status == 503 and e.value.code == "not_ready"


def test_a_secret_rolled_back_in_the_database_is_refused_alone(control_plane: ControlPlane, start_agent: Any) -> None:
    """A database writer copies back an old (validly MAC'd) stage pointer of one secret: the agent keeps
    serving the newer version it holds of that secret, and still takes every other secret's changes."""
    import sqlite3

    op = control_plane.op
    op.put("eu/a", value="a-v1", regions=["eu"])
    db = sqlite3.connect(control_plane.db)
    old = db.execute("SELECT s.* FROM stages s JOIN secrets x ON x.id = s.secret_id "
                     "WHERE x.name = 'eu/a' AND s.stage = 'current'").fetchone()
    op.rotate("eu/a", value="a-v2")
    op.put("eu/b", value="b-v1", regions=["eu"])
    a = start_agent("eu1", "eu")
    assert a.get("eu/a") == "a-v2"
    with db:  # the writer's replay: `current` back at v1, with the row's old, valid MAC
        db.execute("DELETE FROM stages WHERE secret_id = ? AND stage = 'current'", (old[0],))
        db.execute("INSERT INTO stages VALUES (?, ?, ?, ?, ?, ?)", old)
    db.close()
    op.rotate("eu/b", value="b-v2")  # a legitimate change elsewhere in the region
    wait_until(lambda: a.get("eu/b") == "b-v2", 20, "the other secret's change to arrive")
    assert a.get("eu/a") == "a-v2"  # never back to v1
    wait_until(lambda: "refused a rollback of 'eu/a'" in a.log(), 10, "the rollback to be logged")
