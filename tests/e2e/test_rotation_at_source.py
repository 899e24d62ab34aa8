"""Rotation at the source, end to end with real processes: a control plane (SIGKILLed mid-rotation),
node agents on real sockets, client loops that read the credential from an agent and log in to a
PostgreSQL and a Redis that check passwords; and a frozen agent that retire first waits for, then
counts as down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess
from tests.e2e.conftest import AgentProcess, ControlPlane, wait_until
from tests.services import ThrowawayPostgres, ThrowawayRedis
from vault_edge.client import AgentClient, AgentError
from vault_edge.operator import OperatorClient

pytestmark = pytest.mark.e2e

RUN_S = float(os.environ.get("VE_ROTATION_RUN_S", "62"))  # the Done-when asks for at least 60 s
LOOPS = 8
PERIOD_S = 0.05
ENV = {"VAULT_EDGE_SCHEDULER_INTERVAL_S": "0.25"}


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


def _cli(
    cp: ControlPlane, *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VAULT_EDGE_ADDR": cp.addr, "VAULT_EDGE_TOKEN": cp.token}
    return subprocess.run(
        [sys.executable, "-m", "vault_edge", *args],
        env=env,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=timeout,
        check=False,
    )


def _ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout


def _pg_rotator(cp: ControlPlane, pg: ThrowawayPostgres, tag: str, every: str, grace: str) -> tuple[str, str]:
    a, b = f"{tag}_a", f"{tag}_b"
    with pg.connect() as c:
        for role in (a, b):
            c.execute(f"DROP ROLE IF EXISTS {role}")
            c.execute(f"CREATE ROLE {role} NOLOGIN")
    _ok(
        _cli(
            cp,
            "rotator",
            "create",
            "pg",
            "--type",
            "postgres",
            "--admin-secret",
            "rotators/pg-admin",
            "--admin-value",
            "-",
            "--host",
            "127.0.0.1",
            "--port",
            str(pg.port),
            "--database",
            "postgres",
            "--strategy",
            "alternate",
            "--usernames",
            f"{a},{b}",
            stdin=json.dumps(pg.admin()),
        )
    )
    args = ["--rotate-every", every] if every else []
    _ok(_cli(cp, "put", "db/main", "--rotator", "pg", "--regions", "eu", "--grace", grace, *args))
    return a, b


def _start_cp(workdir: Path, **env: str) -> ControlPlane:
    cp = ControlPlane(workdir, str(workdir / "vault.db"), env={**ENV, **env})
    cp.op.create_region("eu")
    return cp


def _restart_after_kill(cp: ControlPlane) -> None:
    cp.kill()
    cp.server = ServerProcess(cp.db, cp.workdir / "server.log", port=cp.server.port, env=cp.env).start()
    cp.unseal()


class Loops:
    """``LOOPS`` threads per service, each reading the credential from an agent's socket and logging in
    to the service with it every ``PERIOD_S``."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.tried = {"postgres": 0, "redis": 0}
        self.failures: list[str] = []
        self.seen: dict[str, set[tuple[str, str]]] = {"postgres": set(), "redis": set()}
        self.threads: list[threading.Thread] = []

    def start(self, kind: str, name: str, sockets: list[Path], login: Any) -> None:
        for i in range(LOOPS):
            th = threading.Thread(target=self._run, args=(kind, name, sockets[i % len(sockets)], login), daemon=True)
            th.start()
            self.threads.append(th)

    def _run(self, kind: str, name: str, sock: Path, login: Any) -> None:
        with AgentClient(str(sock)) as agent:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    cred = json.loads(agent.get(name).value)
                except AgentError as exc:  # the agent itself failing is a failure too
                    with self.lock:
                        self.failures.append(f"{kind}: agent read: {exc}")
                    continue
                ok, why = login(cred)
                with self.lock:
                    self.tried[kind] += 1
                    self.seen[kind].add((cred["username"], cred["password"]))
                    if not ok:
                        self.failures.append(f"{kind}: {cred['username']}: {why}")
                self.stop.wait(max(0.0, PERIOD_S - (time.monotonic() - t0)))

    def join(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(timeout=30)


def _pg_login(pg: ThrowawayPostgres) -> Any:
    import psycopg

    def login(cred: dict[str, Any]) -> tuple[bool, str]:
        try:
            with psycopg.connect(
                host=cred["host"],
                port=cred["port"],
                dbname=cred["database"],
                user=cred["username"],
                password=cred["password"],
                connect_timeout=10,
            ) as conn:
                conn.execute("SELECT 1")
            return True, ""
        except psycopg.Error as exc:
            return False, type(exc).__name__ + ": " + str(exc).splitlines()[0][:200]

    return login


def _redis_login(cred: dict[str, Any]) -> tuple[bool, str]:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    c = redis.Redis(
        host=cred["host"],
        port=cred["port"],
        username=cred["username"],
        password=cred["password"],
        socket_timeout=10,
        retry=Retry(NoBackoff(), 0),
    )  # a refusal counts at once, never retried
    try:
        c.ping()
        return True, ""
    except redis.RedisError as exc:
        return False, type(exc).__name__
    finally:
        c.close()


def _rotations(op: OperatorClient, name: str) -> list[dict[str, Any]]:
    return list(op.rotation_status(name, 100)["rotations"])


def test_rotations_under_load_with_a_sigkill_no_login_fails(
    workdir: Path, pg: ThrowawayPostgres, rds: ThrowawayRedis
) -> None:
    t_setup = time.monotonic()
    cp = _start_cp(workdir)
    agents: list[AgentProcess] = []
    loops = Loops()
    try:
        a, b = _pg_rotator(cp, pg, "e2e", "", "2s")
        user = "e2eapp"
        admin = rds.client()
        admin.execute_command("ACL", "DELUSER", user)
        admin.execute_command("ACL", "SETUSER", user, "on", "~*", "+@all")
        _ok(
            _cli(
                cp,
                "rotator",
                "create",
                "rd",
                "--type",
                "redis",
                "--admin-secret",
                "rotators/rd-admin",
                "--admin-value",
                json.dumps(rds.admin()),
                "--port",
                str(rds.port),
                "--username",
                user,
            )
        )
        _ok(_cli(cp, "put", "cache/main", "--rotator", "rd", "--regions", "eu", "--grace", "2s"))
        for i in range(2):
            agents.append(AgentProcess(workdir, f"eu{i}", cp.addr, cp.join_token("eu")).start())
        # the first credentials, through `rotate --wait` (it returns once the retire is done)
        for name in ("db/main", "cache/main"):
            doc = json.loads(_ok(_cli(cp, "rotate", name, "--wait", "--timeout", "30s", "-o", "json")))
            assert doc["step"] == "done", doc
        for ag in agents:
            wait_until(lambda ag=ag: json.loads(ag.get("db/main"))["username"] == a, 10, "the first credential")
        # then every 4 s, on the control plane's schedule
        _ok(_cli(cp, "put", "db/main", "--rotator", "pg", "--rotate-every", "3s"))
        _ok(_cli(cp, "put", "cache/main", "--rotator", "rd", "--rotate-every", "3s"))
        sockets = [ag.socket for ag in agents]
        loops.start("postgres", "db/main", sockets, _pg_login(pg))
        loops.start("redis", "cache/main", sockets, _redis_login)
        t0 = time.monotonic()
        setup_s = t0 - t_setup
        kills: list[str] = []
        for at in (RUN_S / 3, 2 * RUN_S / 3):  # SIGKILL the control plane twice, each time mid-rotation
            while time.monotonic() - t0 < at:
                time.sleep(0.2)
            step = wait_until(
                lambda: next(
                    (r["step"] for r in _rotations(cp.op, "db/main") if r["step"] not in ("done", "aborted")), None
                ),
                15,
                "a rotation mid-way",
            )
            _restart_after_kill(cp)
            kills.append(step)
        while time.monotonic() - t0 < RUN_S:
            time.sleep(0.2)
        loops.join()
        # stop the schedule, let the last rotations finish
        _ok(_cli(cp, "put", "db/main", "--rotator", "pg", "--rotate-every", "0"))
        _ok(_cli(cp, "put", "cache/main", "--rotator", "rd", "--rotate-every", "0"))
        for name in ("db/main", "cache/main"):
            wait_until(
                lambda name=name: all(r["step"] in ("done", "aborted") for r in _rotations(cp.op, name)),
                60,
                f"{name}'s last rotation to finish",
            )
        names = ("db/main", "cache/main")
        figures = {
            "setup_s": round(setup_s, 1),
            "run_s": round(time.monotonic() - t0, 1),
            "sigkills": kills,
            "rotations": {n: sum(r["step"] == "done" for r in _rotations(cp.op, n)) for n in names},
            "aborted": {n: sum(r["step"] == "aborted" for r in _rotations(cp.op, n)) for n in names},
            "logins_tried": loops.tried,
            "failures": len(loops.failures),
            "credentials_seen": {k: len(v) for k, v in loops.seen.items()},
        }
        print("ROTATION-FIGURES " + json.dumps(figures))
        assert loops.failures == [], loops.failures[:10]
        assert len(kills) == 2
        assert min(figures["rotations"].values()) >= 6, figures  # every few seconds, even on a loaded CI
        assert loops.tried["postgres"] > 1000 and loops.tried["redis"] > 1000, figures

        # afterwards: every retired credential is refused, and exactly one is left at each source
        current = {n: json.loads(cp.op.get(n)["value"]) for n in ("db/main", "cache/main")}
        for n, kind in (("db/main", "postgres"), ("cache/main", "redis")):
            versions = [v["version"] for v in cp.op.history(n)["versions"] if not v["destroyed"]]
            creds = {
                (c["username"], c["password"]) for c in (json.loads(cp.op.get(n, version=v)["value"]) for v in versions)
            } | loops.seen[kind]
            cur = (current[n]["username"], current[n]["password"])
            for u, p in creds - {cur}:
                refused = not (pg.can_login(u, p) if kind == "postgres" else rds.can_login(u, p))
                assert refused, f"{kind}: a retired credential of {u} still logs in"
            assert pg.can_login(*cur) if kind == "postgres" else rds.can_login(*cur)
        with pg.connect() as c:
            live = c.execute(
                "SELECT count(*) FROM pg_authid WHERE rolname = ANY(%s) AND rolcanlogin AND rolpassword IS NOT NULL",
                ([a, b],),
            ).fetchone()
        assert live is not None and live[0] == 1, "one login role with a password left, not two"
        assert len(admin.acl_getuser(user)["passwords"]) == 1, "one Redis password left"
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()
        # the rotators' admin credentials never reached an agent
        for ag in agents:
            with ag.client() as c:
                names = c.names()
            assert "db/main" in names and not any(n.startswith("rotators/") for n in names)
            with pytest.raises(AgentError) as exc:
                ag.get("rotators/pg-admin")
            assert exc.value.status == 404
        assert cp.op.audit_verify()["ok"]
        print(
            f"ROTATION-TIMES setup {setup_s:.1f}s, run {figures['run_s']}s, "
            f"checks {time.monotonic() - t0 - figures['run_s']:.1f}s"
        )
    finally:
        loops.join()
        for ag in agents:
            ag.stop()
        cp.close()


def test_retire_waits_for_a_frozen_agent_then_counts_it_down(workdir: Path, pg: ThrowawayPostgres) -> None:
    cp = _start_cp(workdir, VAULT_EDGE_NODE_DOWN_AFTER_S="6")
    agents: list[AgentProcess] = []
    try:
        a, _ = _pg_rotator(cp, pg, "frz", "", "1s")
        for i in range(2):
            agents.append(AgentProcess(workdir, f"eu{i}", cp.addr, cp.join_token("eu")).start())
        live, frozen = agents
        _ok(_cli(cp, "rotate", "db/main", "--wait", "--timeout", "30s"))
        wait_until(lambda: json.loads(frozen.get("db/main"))["username"] == a, 10, "the first credential")
        old = json.loads(frozen.get("db/main"))
        # one field of the structured value, on the socket and through agent exec
        with live.client() as c:
            assert c.get("db/main", field="password").text == old["password"]
            with pytest.raises(AgentError) as exc:
                c.get("db/main", field="nope")
            assert exc.value.status == 404
        probe = (
            "import os, psycopg; psycopg.connect(host='127.0.0.1', port=int(os.environ['PGPORT']), "
            "dbname='postgres', user=os.environ['PGUSER'], password=os.environ['PGPASSWORD']).close()"
        )
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "vault_edge",
                "agent",
                "exec",
                "--socket",
                str(live.socket),
                "--env",
                "PGUSER=db/main#username",
                "--env",
                "PGPASSWORD=db/main#password",
                "--env",
                "PGPORT=db/main#port",
                "--",
                sys.executable,
                "-c",
                probe,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stderr

        frozen_id = frozen.node_id
        assert frozen.proc is not None
        frozen.proc.send_signal(signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            started = json.loads(_ok(_cli(cp, "rotate", "db/main", "-o", "json")))
            rid = started["rotation"]

            def current() -> dict[str, Any]:
                return next(r for r in _rotations(cp.op, "db/main") if r["rotation"] == rid)

            waiting = wait_until(
                lambda: (d := current())["step"] == "retire" and d["waiting_for"] == [frozen_id] and d,
                10,
                "retire to wait for the frozen agent",
            )
            assert waiting["down"] == []
            # meanwhile the old credential still logs in: nothing was retired
            assert pg.can_login(old["username"], old["password"])
            st = json.loads(_ok(_cli(cp, "rotation", "status", "db/main", "-o", "json")))
            assert st["rotations"][0]["waiting_for"] == [frozen_id]
            done = wait_until(lambda: (d := current())["step"] == "done" and d, 30, "retire once the node is down")
            assert not pg.can_login(old["username"], old["password"])
            entry = next(e for e in reversed(cp.op.audit(0, 1000)["entries"]) if e["action"] == "rotation.retire")
            assert json.loads(entry["detail"])["down"] == [frozen_id]
            last_seen = next(n["last_seen"] for n in cp.op.nodes()["nodes"] if n["id"] == frozen_id)
            assert entry["at"] - last_seen > 6, "retire ran before the frozen node counted as down"
            assert time.monotonic() - t_stop < 6 + 5, "retire waited much longer than the down threshold"
            assert done["version"] == cp.op.get("db/main")["version"]
        finally:
            frozen.proc.send_signal(signal.SIGCONT)
        new = json.loads(cp.op.get("db/main")["value"])
        wait_until(
            lambda: json.loads(frozen.get("db/main"))["username"] == new["username"], 20, "the thawed agent to catch up"
        )
    finally:
        for ag in agents:
            ag.stop()
        cp.close()
