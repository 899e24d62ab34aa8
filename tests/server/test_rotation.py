"""Rotation at the source, in process, against real services whose passwords are checked: the four
steps, each driver, resuming after a crash at every step, an aborted test, tampered rows, and the
rotator's admin credential staying on the control plane."""

from __future__ import annotations

import dataclasses
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from tests.conftest import Api, free_port, init_and_unseal
from tests.services import ThrowawayPostgres, ThrowawayRedis, mysql_can_login, mysql_root
from vault_edge.server.ops import rotation
from vault_edge.server.rotators import driver

# The drivers' own tests run on SQLite only: the storage (rows, MACs, steps) is the same on both
# databases and is tested on both by the tests without this mark.
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def pg() -> Iterator[ThrowawayPostgres]:
    p = ThrowawayPostgres()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def rds() -> Iterator[ThrowawayRedis]:
    r = ThrowawayRedis()
    yield r
    r.stop()


class Vault:
    """An unsealed in-process control plane (scheduler idle: the tests drive the steps) and a clock
    the tests can move."""

    def __init__(self, api: Api, app: Any) -> None:
        self.api, self.ctx, self.offset = api, app.state.ctx, 0.0
        self.ctx.clock = lambda: time.time() + self.offset

    def call(self, method: str, path: str, **kw: Any) -> Any:
        status, doc = self.api.call(method, path, **kw)
        assert status == 200, (status, doc)
        return doc

    def rotate(self, name: str) -> int:
        return int(self.call("POST", f"/v1/rotate/{name}", json={})["rotation"])

    def value(self, name: str) -> dict[str, Any]:
        return json.loads(self.call("GET", f"/v1/secrets/{name}")["value"])

    def status(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/rotations/{name}")["rotations"][0]

    def actions(self, name: str) -> list[str]:
        return [
            e["action"]
            for e in self.call("GET", "/v1/audit", params={"limit": 1000})["entries"]
            if e["target"] == name and e["action"].startswith("rotation.")
        ]


@pytest.fixture
def vault(make_app: Any) -> Vault:
    client, app = make_app(scheduler_interval_s=3600, default_grace_s=0)
    _, token = init_and_unseal(client)
    api = Api(client, token)
    for region in ("eu", "us"):
        assert api.call("POST", "/v1/regions", json={"name": region})[0] == 200
    return Vault(api, app)


def _pg_roles(pg: ThrowawayPostgres) -> tuple[str, str]:
    prefix = "r" + secrets.token_hex(3)
    a, b = f"{prefix}_a", f"{prefix}_b"
    with pg.connect() as c:
        for role in (a, b):
            c.execute(f"CREATE ROLE {role} NOLOGIN")
    return a, b


def _pg_can_login_roles(pg: ThrowawayPostgres, roles: tuple[str, ...]) -> list[str]:
    with pg.connect() as c:
        return [
            r[0]
            for r in c.execute(
                "SELECT rolname FROM pg_authid WHERE rolname = ANY(%s) AND rolcanlogin AND rolpassword IS NOT NULL",
                (list(roles),),
            )
        ]


def _pg_setup(vault: Vault, pg: ThrowawayPostgres, strategy: str = "alternate", **config: Any) -> tuple[str, str]:
    a, b = _pg_roles(pg)
    vault.call(
        "PUT",
        "/v1/rotators/pg",
        json={
            "type": "postgres",
            "admin_secret": "rotators/pg-admin",
            "admin_value": pg.admin(),
            "config": {
                "host": "127.0.0.1",
                "port": pg.port,
                "strategy": strategy,
                "usernames": [a, b] if strategy == "alternate" else [a],
                **config,
            },
        },
    )
    vault.call("PUT", "/v1/secrets/db/main", json={"rotator": "pg", "regions": ["eu"]})
    return a, b


def test_postgres_alternate_four_steps_each_audited(vault: Vault, pg: ThrowawayPostgres) -> None:
    a, b = _pg_setup(vault, pg)
    rid = vault.rotate("db/main")
    assert vault.status("db/main")["step"] == "create"
    assert rotation.advance(vault.ctx, rid) == "done"
    first = vault.value("db/main")
    assert first["username"] == a and pg.can_login(a, first["password"])
    assert _pg_can_login_roles(pg, (a, b)) == [a]  # the first rotation disabled the other role
    assert vault.actions("db/main") == [
        "rotation.start",
        "rotation.create",
        "rotation.test",
        "rotation.publish",
        "rotation.retire",
    ]
    rid2 = vault.rotate("db/main")
    assert rotation.advance(vault.ctx, rid2) == "done"
    second = vault.value("db/main")
    assert second["username"] == b and pg.can_login(b, second["password"])
    assert not pg.can_login(a, first["password"]), "the retired credential still logs in"
    assert _pg_can_login_roles(pg, (a, b)) == [b]
    doc = vault.status("db/main")
    assert (doc["step"], doc["version"], doc["previous_version"]) == ("done", 2, 1)
    # the audit entries name versions, never a value
    audit = json.dumps(vault.call("GET", "/v1/audit", params={"limit": 1000}))
    assert first["password"] not in audit and second["password"] not in audit and pg.admin_password not in audit
    assert vault.call("GET", "/v1/audit/verify")["ok"]


def test_admin_credential_stays_on_the_control_plane(vault: Vault, pg: ThrowawayPostgres) -> None:
    _pg_setup(vault, pg)
    assert vault.call("GET", "/v1/history/rotators/pg-admin")["regions"] == []
    with vault.ctx.store.read() as tx:
        for region in ("eu", "us"):
            names = {row.name for row in tx.region_snapshot(region, time.time())}
            assert "rotators/pg-admin" not in names
        wraps = vault.ctx.store.engine  # every wrap of the admin credential is the control plane's
    with wraps.connect() as conn:
        regions = (
            conn.execute(
                text(
                    "SELECT DISTINCT w.region FROM data_key_wraps w JOIN secrets s ON s.id = w.secret_id "
                    "WHERE s.name = 'rotators/pg-admin'"
                )
            )
            .scalars()
            .all()
        )
    assert regions == [""]
    st, doc = vault.api.call("PUT", "/v1/secrets/rotators/pg-admin", json={"value": "{}", "regions": ["eu"]})
    assert st == 409 and "stays on the control plane" in doc["error"]["message"]
    # a rotator refuses an admin secret that has regions
    vault.call("PUT", "/v1/secrets/plain/one", json={"value": "x", "regions": ["eu"]})
    st, doc = vault.api.call(
        "PUT",
        "/v1/rotators/bad",
        json={"type": "postgres", "admin_secret": "plain/one", "config": {"usernames": ["x", "y"]}},
    )
    assert st == 409 and "regions" in doc["error"]["message"]


@pytest.mark.parametrize("crash_at", ["create", "test", "publish", "retire"])
def test_a_crash_at_any_step_resumes_there(vault: Vault, pg: ThrowawayPostgres, crash_at: str) -> None:
    """A process that took a step's lease (and, for create and retire, made its call at the source)
    and died: nothing moves until the lease ends, then the step runs again (idempotent) and on."""
    a, b = _pg_setup(vault, pg)
    assert rotation.advance(vault.ctx, vault.rotate("db/main")) == "done"
    old = vault.value("db/main")
    rid = vault.rotate("db/main")
    while vault.status("db/main")["step"] != crash_at:
        moved, _ = rotation._step(vault.ctx, rid)
        assert moved
    with vault.ctx.store.write() as tx:
        r = tx.get_rotation(rid)
        assert r is not None
        assert tx.lease_rotation(rid, crash_at, "a-replica-that-died", time.time(), time.time() + rotation.LEASE_S)
        inputs = rotation._inputs(vault.ctx, tx, r)
    if crash_at in ("create", "retire"):
        rotation._act(r, inputs)  # its call reached the source; its transaction never came
    assert rotation.advance(vault.ctx, rid) == crash_at  # the dead process's lease holds
    vault.offset = rotation.LEASE_S + 1
    assert rotation.advance(vault.ctx, rid) == "done"
    new = vault.value("db/main")
    assert new["username"] == b and pg.can_login(b, new["password"])
    assert not pg.can_login(a, old["password"])
    assert _pg_can_login_roles(pg, (a, b)) == [b]
    steps = [s for s in vault.actions("db/main") if s != "rotation.start"]
    assert steps[-4:] == ["rotation.create", "rotation.test", "rotation.publish", "rotation.retire"]


@sqlite_only
def test_a_refused_test_aborts_and_leaves_the_current_credential(vault: Vault, pg: ThrowawayPostgres) -> None:
    db = "d" + secrets.token_hex(3)
    a, b = _pg_roles(pg)
    with pg.connect() as c:
        c.execute(f"CREATE DATABASE {db}")
        c.execute(f"REVOKE CONNECT ON DATABASE {db} FROM PUBLIC")
        c.execute(f"GRANT CONNECT ON DATABASE {db} TO {a}")  # b may not connect: its test is refused
    vault.call(
        "PUT",
        "/v1/rotators/pg",
        json={
            "type": "postgres",
            "admin_secret": "rotators/pg-admin",
            "admin_value": pg.admin(),
            "config": {"port": pg.port, "database": db, "usernames": [a, b]},
        },
    )
    vault.call("PUT", "/v1/secrets/db/main", json={"rotator": "pg", "regions": ["eu"]})
    assert rotation.advance(vault.ctx, vault.rotate("db/main")) == "done"
    current = vault.value("db/main")
    assert rotation.advance(vault.ctx, vault.rotate("db/main")) == "aborted"
    assert vault.value("db/main") == current
    history = vault.call("GET", "/v1/history/db/main")["versions"]
    assert [s["stage"] for v in history for s in v["stages"]] == ["current"]  # pending dropped
    assert _pg_can_login_roles(pg, (a, b)) == [a]  # b's new password undone at the source
    assert (
        vault.actions("db/main")[-2:] == ["rotation.test", "rotation.abort"]
        or vault.actions("db/main")[-1] == "rotation.abort"
    )


@sqlite_only
def test_postgres_single_says_it_cannot_overlap(vault: Vault, pg: ThrowawayPostgres) -> None:
    a, _ = _pg_setup(vault, pg, strategy="single")
    assert rotation.advance(vault.ctx, vault.rotate("db/main")) == "done"
    first = vault.value("db/main")
    assert rotation.advance(vault.ctx, vault.rotate("db/main")) == "done"
    second = vault.value("db/main")
    assert first["username"] == second["username"] == a
    assert pg.can_login(a, second["password"]) and not pg.can_login(a, first["password"])
    assert not driver("postgres").overlaps({"strategy": "single"})
    retire = [
        e for e in vault.call("GET", "/v1/audit", params={"limit": 1000})["entries"] if e["action"] == "rotation.retire"
    ]
    assert json.loads(retire[-1]["detail"])["retired"] is False  # retire is a no-op, and says so


@sqlite_only
def test_retire_waits_for_the_grace_redis_keeps_two_passwords(vault: Vault, rds: ThrowawayRedis) -> None:
    user = "app" + secrets.token_hex(3)
    admin = rds.client()
    admin.execute_command("ACL", "SETUSER", user, "on", "~*", "+@all")
    vault.call(
        "PUT",
        "/v1/rotators/rd",
        json={
            "type": "redis",
            "admin_secret": "rotators/rd-admin",
            "admin_value": rds.admin(),
            "config": {"port": rds.port, "username": user},
        },
    )
    vault.call("PUT", "/v1/secrets/cache/main", json={"rotator": "rd", "regions": ["eu"], "grace": "30s"})
    assert rotation.advance(vault.ctx, vault.rotate("cache/main")) == "retire"  # the grace holds it
    vault.offset += 31
    assert rotation.advance(vault.ctx, vault.status("cache/main")["rotation"]) == "done"
    first = vault.value("cache/main")
    rid = vault.rotate("cache/main")
    assert rotation.advance(vault.ctx, rid) == "retire"
    second = vault.value("cache/main")
    doc = vault.status("cache/main")
    assert doc["waiting_for"] == [] and doc["step"] == "retire"
    assert rds.can_login(user, first["password"]) and rds.can_login(user, second["password"])
    assert len(admin.acl_getuser(user)["passwords"]) == 2  # two passwords during the grace
    vault.offset += 31
    assert rotation.advance(vault.ctx, rid) == "done"
    assert rds.can_login(user, second["password"]) and not rds.can_login(user, first["password"])
    assert len(admin.acl_getuser(user)["passwords"]) == 1
    admin.execute_command("ACL", "DELUSER", user)
    admin.close()


@sqlite_only
def test_mysql_alternate(vault: Vault) -> None:
    root = mysql_root()
    a, b = "m" + secrets.token_hex(3) + "_a", "m" + secrets.token_hex(3) + "_b"
    with root.cursor() as cur:
        for u in (a, b):
            cur.execute(f"CREATE USER '{u}'@'%' ACCOUNT LOCK")
    try:
        vault.call(
            "PUT",
            "/v1/rotators/my",
            json={
                "type": "mysql",
                "admin_secret": "rotators/my-admin",
                "admin_value": {"username": "root", "password": ""},
                "config": {"usernames": [a, b]},
            },
        )
        vault.call("PUT", "/v1/secrets/db/my", json={"rotator": "my", "regions": ["eu"]})
        assert rotation.advance(vault.ctx, vault.rotate("db/my")) == "done"
        first = vault.value("db/my")
        assert rotation.advance(vault.ctx, vault.rotate("db/my")) == "done"
        second = vault.value("db/my")
        assert (first["username"], second["username"]) == (a, b)
        assert mysql_can_login(b, second["password"]) and not mysql_can_login(a, first["password"])
        with root.cursor() as cur:
            cur.execute(
                "SELECT User FROM mysql.global_priv WHERE User IN (%s, %s) "
                "AND JSON_VALUE(Priv, '$.account_locked') IS NOT TRUE",
                (a, b),
            )
            assert [r[0] for r in cur.fetchall()] == [b]  # one account open
    finally:
        with root.cursor() as cur:
            for u in (a, b):
                cur.execute(f"DROP USER IF EXISTS '{u}'@'%'")
        root.close()


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[tuple[str, str]]:
    port, token = free_port(), secrets.token_urlsafe(12)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("webhook_provider.py")), str(port), token])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get(url + "/whoami", timeout=1)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    yield url, token
    proc.kill()
    proc.wait()


@sqlite_only
def test_webhook_create_test_revoke(vault: Vault, provider: tuple[str, str]) -> None:
    url, token = provider
    vault.call(
        "PUT",
        "/v1/rotators/ai",
        json={
            "type": "webhook",
            "admin_secret": "rotators/ai-admin",
            "admin_value": {"token": token},
            "config": {
                "create": {"method": "POST", "url": url + "/keys"},
                "test": {"method": "GET", "url": url + "/whoami", "bearer_field": "key"},
                "revoke": {"method": "DELETE", "url": url + "/keys/{id}"},
            },
        },
    )
    vault.call("PUT", "/v1/secrets/ai/key", json={"rotator": "ai", "regions": ["eu"]})

    def live() -> list[str]:
        return list(httpx.get(url + "/keys", headers={"Authorization": f"Bearer {token}"}).json()["live"])

    assert rotation.advance(vault.ctx, vault.rotate("ai/key")) == "done"
    first = vault.value("ai/key")
    rid = vault.rotate("ai/key")
    with vault.ctx.store.write() as tx:  # a create whose process died after the provider answered
        r = tx.get_rotation(rid)
        assert r is not None and tx.lease_rotation(rid, "create", "dead", time.time(), time.time() + 1)
        orphan = rotation._act(r, rotation._inputs(vault.ctx, tx, r))
    vault.offset = 5
    assert rotation.advance(vault.ctx, rid) == "done"
    second = vault.value("ai/key")
    assert second == orphan, "the resumed create got the same key back (Idempotency-Key)"
    assert live() == [second["id"]]  # the first key revoked, no orphan
    assert httpx.get(url + "/whoami", headers={"Authorization": f"Bearer {first['key']}"}).status_code == 401


def test_rotation_rows_carry_macs(vault: Vault, pg: ThrowawayPostgres) -> None:
    _pg_setup(vault, pg)
    rid = vault.rotate("db/main")
    with vault.ctx.store.engine.begin() as conn:  # a database writer moves the step on
        conn.execute(text("UPDATE rotations SET step = 'retire' WHERE id = :id"), {"id": rid})
    st, doc = vault.api.call("GET", "/v1/rotations/db/main")
    assert st == 500 and doc["error"]["code"] == "integrity_error"
    with vault.ctx.store.engine.begin() as conn:
        conn.execute(text("UPDATE rotations SET step = 'create' WHERE id = :id"), {"id": rid})
        conn.execute(text("UPDATE rotators SET config = REPLACE(config, '127.0.0.1', '10.9.9.9')"))
    st, doc = vault.api.call("GET", "/v1/rotators")
    assert st == 500 and doc["error"]["code"] == "integrity_error"


@sqlite_only
def test_bad_input(vault: Vault, pg: ThrowawayPostgres) -> None:
    for body in [
        {"type": "oracle", "admin_secret": "a/b", "admin_value": {"x": 1}},
        {"type": "postgres", "admin_secret": "a/b", "admin_value": {"x": 1}, "config": {"usernames": ["only"]}},
        {"type": "postgres", "admin_secret": "a/b", "admin_value": {"x": 1}, "config": {"usernames": ["a", "b;"]}},
        {
            "type": "postgres",
            "admin_secret": "a/b",
            "admin_value": {"x": 1},
            "config": {"usernames": ["a", "b"], "port": 0},
        },
        {"type": "postgres", "admin_secret": "../x", "config": {"usernames": ["a", "b"]}},
        {"type": "webhook", "admin_secret": "a/b", "admin_value": {"token": "t"}, "config": {"create": {}}},
        {"type": "redis", "admin_secret": "a/b", "admin_value": {"x": 1}, "config": {"username": "default"}},
    ]:
        st, doc = vault.api.call("PUT", "/v1/rotators/x", json=body)
        assert 400 <= st < 500 and "error" in doc, (body, st, doc)
    st, _ = vault.api.call("PUT", "/v1/rotators/Bad Name", json={"type": "redis", "admin_secret": "a/b"})
    assert st == 400
    _pg_setup(vault, pg)
    st, doc = vault.api.call("POST", "/v1/rotate/db/main", json={"value": "x"})
    assert st == 409 and "kept by rotator" in doc["error"]["message"]
    st, doc = vault.api.call("PUT", "/v1/secrets/db/other", json={"rotator": "pg"})
    assert st == 409 and "one secret per rotator" in doc["error"]["message"]
    st, doc = vault.api.call("PUT", "/v1/secrets/db/x", json={"rotator": "nope"})
    assert st == 404
    st, doc = vault.api.call("PUT", "/v1/secrets/db/main", json={"rotator": "pg", "value": "not json"})
    assert st == 400
    vault.rotate("db/main")
    st, doc = vault.api.call("POST", "/v1/rotate/db/main", json={})
    assert st == 409 and "rotation status" in doc["error"]["message"]
    st, doc = vault.api.call("DELETE", "/v1/rotators/pg")
    assert st == 409


@sqlite_only
def test_a_deleted_secret_bound_to_a_rotator_starts_a_new_life(vault: Vault, pg: ThrowawayPostgres) -> None:
    """``put NAME --rotator R`` on a deleted secret revives it as ``put`` does: none of its old stages
    serves its old value, none of its old schedule (a generate spec) stays; its first value comes from
    the rotator."""
    vault.call("PUT", "/v1/secrets/db/main", json={"generate": "16:hex", "rotate_every": "1h", "regions": ["eu"]})
    vault.call("DELETE", "/v1/secrets/db/main")
    _pg_setup(vault, pg)  # binds db/main to the rotator
    st, doc = vault.api.call("GET", "/v1/secrets/db/main")
    assert st == 404, doc
    history = vault.call("GET", "/v1/history/db/main")
    assert history["generate"] is None and history["rotate_every_s"] is None
    assert all(not v["stages"] for v in history["versions"])
    assert rotation.advance(vault.ctx, vault.rotate("db/main")) == "done"
    assert set(vault.value("db/main")) >= {"username", "password"}


def test_two_replicas_run_each_step_once(make_app: Any, pg: ThrowawayPostgres) -> None:
    """Two control planes on one database, both driving the same rotation at once: the leases and the
    compare-and-set on the step let each step run (and be audited) once."""
    import threading

    client, app = make_app(scheduler_interval_s=3600, default_grace_s=0, port=18421)
    shares, token = init_and_unseal(client)
    api = Api(client, token)
    assert api.call("POST", "/v1/regions", json={"name": "eu"})[0] == 200
    one = Vault(api, app)
    client2, app2 = make_app(scheduler_interval_s=3600, default_grace_s=0, port=18422)
    for share in shares[:2]:  # each replica is unsealed on its own
        assert client2.post("/v1/sys/unseal", json={"share": share}).status_code == 200
    a, b = _pg_setup(one, pg)
    for _ in range(3):
        rid = one.rotate("db/main")
        threads = [
            threading.Thread(target=rotation.advance, args=(ctx, rid))
            for ctx in (app.state.ctx, app2.state.ctx, app.state.ctx, app2.state.ctx)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert one.status("db/main")["step"] == "done"
    steps = one.actions("db/main")
    assert steps == ["rotation.start", "rotation.create", "rotation.test", "rotation.publish", "rotation.retire"] * 3
    assert _pg_can_login_roles(pg, (a, b)) == [a]
    assert pg.can_login(a, one.value("db/main")["password"])


# -- a review's findings: each failed before its fix ----------------------------------------------
@sqlite_only
def test_single_a_refused_test_puts_the_current_password_back_at_the_source(
    vault: Vault, pg: ThrowawayPostgres
) -> None:
    """``single``: create changed the only role's password already; an abort that only dropped
    ``pending`` left every node serving a password the database refused."""
    db = "d" + secrets.token_hex(3)
    a, _ = _pg_roles(pg)
    with pg.connect() as c:
        c.execute(f"CREATE DATABASE {db}")
        c.execute(f"REVOKE CONNECT ON DATABASE {db} FROM PUBLIC")
        c.execute(f"GRANT CONNECT ON DATABASE {db} TO {a}")
    config = {"host": "127.0.0.1", "port": pg.port, "database": db, "strategy": "single", "usernames": [a]}
    body = {"type": "postgres", "admin_secret": "rotators/pg-admin", "admin_value": pg.admin(), "config": config}
    vault.call("PUT", "/v1/rotators/pg", json=body)
    vault.call("PUT", "/v1/secrets/db/main", json={"rotator": "pg", "regions": ["eu"]})
    assert rotation.advance(vault.ctx, vault.rotate("db/main")) == "done"
    current = vault.value("db/main")
    with pg.connect() as c:  # the control plane's test login refused from now on
        c.execute(f"REVOKE CONNECT ON DATABASE {db} FROM {a}")
    assert rotation.advance(vault.ctx, vault.rotate("db/main")) == "aborted"
    assert vault.value("db/main") == current
    with pg.connect() as c:
        c.execute(f"GRANT CONNECT ON DATABASE {db} TO {a}")
    assert pg.can_login(a, current["password"])


@sqlite_only
def test_no_promote_or_rollback_while_a_rotation_at_the_source_runs(vault: Vault, pg: ThrowawayPostgres) -> None:
    """A rollback during retire's wait made the old role current again, and retire then disabled it;
    a promote during create made a credential not set at the source yet current."""
    _pg_setup(vault, pg)
    assert rotation.advance(vault.ctx, vault.rotate("db/main")) == "done"
    rid = vault.rotate("db/main")
    assert rotation.advance(vault.ctx, rid, max_steps=3) == "retire"
    st, doc = vault.api.call("POST", "/v1/rollback/db/main", json={"to": 1})
    assert st == 409 and "rotation" in doc["error"]["message"]
    st, _ = vault.api.call("POST", "/v1/promote/db/main", json={})
    assert st == 409
    vault.offset += 3600
    assert rotation.advance(vault.ctx, rid) == "done"
    cur = vault.value("db/main")
    assert pg.can_login(cur["username"], cur["password"])
    assert vault.api.call("POST", "/v1/rollback/db/main", json={"to": 1})[0] == 200  # once it has ended


@sqlite_only
def test_retire_never_disables_the_credential_current_now(vault: Vault, pg: ThrowawayPostgres) -> None:
    """Retire took the credential to keep from when the rotation began: a late retire (a replica whose
    lease ended meanwhile) disabled the role current by then."""
    _pg_setup(vault, pg)
    assert rotation.advance(vault.ctx, vault.rotate("db/main")) == "done"  # a
    rid = vault.rotate("db/main")
    assert rotation.advance(vault.ctx, rid, max_steps=3) == "retire"  # b published; a to retire
    with vault.ctx.store.read() as tx:
        r = tx.get_rotation(rid)
        assert r is not None
        inp = rotation._inputs(vault.ctx, tx, r)
    # as if the old credential were current again by the time the late call lands
    inp = dataclasses.replace(inp, current=inp.old)
    rotation._act(r, inp)
    assert pg.can_login(inp.old["username"], inp.old["password"])  # type: ignore[index]


@sqlite_only
def test_a_rotation_whose_secret_is_deleted_ends(vault: Vault, pg: ThrowawayPostgres) -> None:
    """It was retried for ever (every minute, a warning each time), and status could not show it."""
    _pg_setup(vault, pg)
    assert rotation.advance(vault.ctx, vault.rotate("db/main")) == "done"
    rid = vault.rotate("db/main")
    assert rotation.advance(vault.ctx, rid, max_steps=3) == "retire"
    vault.call("DELETE", "/v1/secrets/db/main")
    vault.offset += 3600
    rotation.run_active(vault.ctx)
    with vault.ctx.store.read() as tx:
        r = tx.get_rotation(rid)
    assert r is not None and not r.active and r.step == "aborted"


@pytest.mark.parametrize("url", ["http://x/{id", "http://x/{id.nope}", "http://x/{0}", "http://x/{id!r}"])
def test_webhook_url_templates_are_checked_when_the_rotator_is_made(vault: Vault, url: str) -> None:
    config = {
        "create": {"method": "POST", "url": "http://127.0.0.1:9/keys"},
        "test": {"method": "GET", "url": "http://127.0.0.1:9/whoami"},
        "revoke": {"method": "DELETE", "url": url},
    }
    body = {"type": "webhook", "admin_secret": "rotators/w-admin", "admin_value": {"token": "t"}, "config": config}
    st, doc = vault.api.call("PUT", "/v1/rotators/w", json=body)
    assert st == 400 and set(doc["error"]) == {"code", "message"}


@sqlite_only
def test_a_call_to_the_source_ends_well_within_the_steps_lease(vault: Vault, pg: ThrowawayPostgres) -> None:
    """An ALTER ROLE behind another session's lock on the role waited 17 s, past the 15 s lease:
    another replica could take the step over while the late call was still to land. Each statement is
    bounded now: the step fails (and is retried) in time."""
    a, b = _pg_setup(vault, pg)
    rid = vault.rotate("db/main")
    with pg.connect() as blocker:
        blocker.execute("BEGIN")
        for role in (a, b):  # an open transaction holding both roles' locks
            blocker.execute(f"ALTER ROLE {role} CONNECTION LIMIT 50")
        started = time.monotonic()
        step = rotation.advance(vault.ctx, rid, max_steps=1)
        took = time.monotonic() - started
        blocker.execute("ROLLBACK")
    assert step == "create" and took < rotation.LEASE_S - 5, took
    vault.offset += 61  # past its back-off
    assert rotation.advance(vault.ctx, rid, max_steps=1) == "test"  # and goes on once the lock is gone


@sqlite_only
def test_a_stale_replicas_failure_does_not_touch_the_step_another_replica_took(
    vault: Vault, pg: ThrowawayPostgres
) -> None:
    """A replica whose lease ended fails its late call: its note cleared the lease of the replica now
    running the step, and counted toward the test's five tries."""
    _pg_setup(vault, pg)
    rid = vault.rotate("db/main")
    with vault.ctx.store.read() as tx:
        r = tx.get_rotation(rid)
    assert r is not None
    now = vault.ctx.clock()
    with vault.ctx.store.write() as tx:  # another replica holds the step now
        assert tx.lease_rotation(rid, r.step, "other-replica:1", now, now + rotation.LEASE_S)
    rotation._failed(vault.ctx, r, "late: refused")
    with vault.ctx.store.read() as tx:
        after = tx.get_rotation(rid)
    assert after is not None and after.lease_owner == "other-replica:1" and after.attempts == r.attempts
