"""Hostile sync answers and a hostile disk: refused, logged, and the good cached value still served."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import ControlPlane, wait_until
from tests.e2e.proxy import Proxy
from vault_edge import wire
from vault_edge.client import AgentError


@pytest.fixture
def proxy(control_plane: ControlPlane) -> Iterator[Proxy]:
    p = Proxy(control_plane.addr)
    yield p
    p.close()


@pytest.mark.parametrize(
    "mode,reason",
    [
        ("tamper", "bad control-plane signature"),
        ("other_node", "another node"),
        ("replay", "does not match this request"),
    ],
)
def test_hostile_sync_answers_are_refused(
    control_plane: ControlPlane, start_agent: Any, proxy: Proxy, mode: str, reason: str
) -> None:
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


def test_the_join_token_never_crosses_the_wire_in_clear(
    control_plane: ControlPlane, start_agent: Any, proxy: Proxy
) -> None:
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


def test_a_forged_revocation_does_not_wipe_the_agent(
    control_plane: ControlPlane, start_agent: Any, proxy: Proxy
) -> None:
    """Only the control plane's signed proof makes an agent wipe itself: a 403 from the path is transient."""
    op = control_plane.op
    op.put("eu/db", value="kept-v1", regions=["eu"])
    a = start_agent("eu1", "eu", server=proxy.addr)
    assert a.get("eu/db") == "kept-v1"
    proxy.mode = "forge_revoked"
    op.rotate("eu/db", value="kept-v2")
    wait_until(
        lambda: proxy.rewritten >= 3 and a.log().count("signed proof of revocation") >= 3,
        30,
        "the agent to see forged revocations (bare, badly signed, deeply nested)",
    )
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
    body = bytearray(wire.b64d(doc["base"]["body"]))
    body[len(body) // 2] ^= 0x01
    doc["base"]["body"] = wire.b64e(bytes(body))
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


def test_a_database_restored_from_an_old_copy_moves_no_secret_back(
    control_plane: ControlPlane, start_agent: Any
) -> None:
    """The whole database restored from a backup (the one rollback a database writer can still make):
    the agent refuses to move `eu/a` back to the version of the backup, keeps serving the one it holds,
    and still takes the changes made afterwards to `eu/b` (only the rolled-back secret is refused).

    The agent is down across the restore and comes back from its disk cache once the restored counter
    has passed its revision, so its first answer is the restored view (a full one: the restarted
    control plane has no history back to that revision). An agent connected throughout may instead be
    held until the counter passes its revision and then get only what changed after it (`eu/b`):
    `eu/a` is not in that answer at all, and it keeps `a-v4` as well."""
    import shutil

    op = control_plane.op
    op.put("eu/a", value="a-v1", regions=["eu"])
    op.put("eu/b", value="b-v1", regions=["eu"])
    a = start_agent("eu1", "eu")
    assert a.get("eu/a") == "a-v1"
    db = control_plane.db
    control_plane.server.stop()  # a consistent copy: the database file and its write-ahead log
    backup = db + ".backup"
    shutil.copyfile(db, backup)
    if os.path.exists(db + "-wal"):
        shutil.copyfile(db + "-wal", backup + "-wal")
    control_plane.restart()
    for i in range(2, 5):
        op.rotate("eu/a", value=f"a-v{i}")
    wait_until(lambda: a.get("eu/a") == "a-v4", 20, "a-v4 to reach the agent")
    held = a.health()["revision"]
    a.stop()
    control_plane.server.stop()
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(db + suffix)
    shutil.copyfile(backup, db)  # the restore: eu/a back at v1, the revision counter back too
    if os.path.exists(backup + "-wal"):
        shutil.copyfile(backup + "-wal", db + "-wal")
    control_plane.restart()
    while op.rotate("eu/b", value="b-next")["revision"] <= held:  # until the counter passes the agent's
        pass
    op.rotate("eu/b", value="b-last")
    a.start()  # from its disk cache: a-v4 at `held`
    wait_until(lambda: a.get("eu/b") == "b-last", 30, "the changes after the restore to reach the agent")
    assert a.get("eu/a") == "a-v4"  # never back to the backup's a-v1
    wait_until(lambda: "refused a rollback of 'eu/a'" in a.log(), 10, "the rollback to be logged")
    # Restarted, the agent's disk cache holds the last answer (with eu/a at v1): it serves eu/b, and
    # refuses to serve eu/a at all rather than serve a version below one it served (404, not a-v1).
    a.stop()
    a.start()
    assert a.get("eu/b") == "b-last"
    with pytest.raises(AgentError) as err:
        a.get("eu/a")
    assert err.value.status == 404
