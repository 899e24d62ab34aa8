"""The node agent, for real: a control plane process, agent processes, unix sockets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import AgentProcess, ControlPlane, wait_until
from vault_edge.client import AgentError


def test_two_regions_each_agent_reads_exactly_its_regions_secrets(
    control_plane: ControlPlane, start_agent: Any
) -> None:
    op = control_plane.op
    op.put("eu/db", value="eu-db-pass", regions=["eu"])
    op.put("us/db", value="us-db-pass", regions=["us"])
    op.put("global/key", value="everywhere", regions=["*"])
    eu, us = start_agent("eu1", "eu"), start_agent("us1", "us")

    assert eu.get("eu/db") == "eu-db-pass" and eu.get("global/key") == "everywhere"
    assert us.get("us/db") == "us-db-pass" and us.get("global/key") == "everywhere"
    for agent, foreign in ((eu, "us/db"), (us, "eu/db")):
        with pytest.raises(AgentError) as e:
            agent.get(foreign)
        assert e.value.status == 404  # the control plane holds it; this region can never decrypt it
        with agent.client() as c:
            assert foreign not in c.names()
    # the agents' disk caches hold no plaintext either
    for agent in (eu, us):
        cached = (agent.state_dir / "cache.json").read_bytes()
        assert b"db-pass" not in cached and b"everywhere" not in cached
        assert oct((agent.state_dir / "node.key").stat().st_mode & 0o777) == "0o600"
    assert oct(eu.socket.stat().st_mode & 0o777) == "0o660"
    nodes = {n["id"]: n for n in op.nodes()["nodes"]}
    assert nodes[eu.node_id]["region"] == "eu" and nodes[us.node_id]["region"] == "us"


def test_agents_outlive_the_control_plane_and_catch_up(control_plane: ControlPlane, start_agent: Any) -> None:
    op = control_plane.op
    op.put("svc/key", value="v1", regions=["eu"])
    a = start_agent("eu1", "eu")
    assert a.get("svc/key") == "v1"

    control_plane.kill()  # SIGKILL: no goodbye
    health = wait_until(lambda: (h := a.health())["status"] == "stale" and h, 15, "health to say stale")
    assert health["last_sync_age_s"] is not None
    assert a.get("svc/key") == "v1"  # still serving

    # an agent restarted while the control plane is still down serves from its disk cache
    a.stop()
    a.join_token = None
    a.start(wait_ready=False)
    assert a.get("svc/key") == "v1"
    with a.client() as c:
        resp_age = c.get("svc/key").age
    assert resp_age is not None and resp_age >= 0
    assert a.health()["status"] == "stale"

    control_plane.restart()  # same database; unsealed again with the shares
    control_plane.op.rotate("svc/key", value="v2")
    wait_until(lambda: a.get("svc/key") == "v2", 20, "the agent to catch up")
    assert a.health()["status"] == "ok"


def test_restart_while_control_plane_down_with_max_stale(control_plane: ControlPlane, start_agent: Any) -> None:
    control_plane.op.put("svc/key", value="v1", regions=["eu"])
    a = start_agent("eu1", "eu", "--max-stale", "1s")
    assert a.get("svc/key") == "v1"
    control_plane.kill()

    def refused() -> str | None:
        try:
            a.get("svc/key")
        except AgentError as exc:
            return f"{exc.status} {exc.code}"
        return None

    assert wait_until(refused, 15, "reads to be refused past --max-stale") == "503 too_stale"


def test_forbidden_uid_gets_403(control_plane: ControlPlane, start_agent: Any, workdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another uid")
    control_plane.op.put("app/key", value="secret-app", regions=["eu"])
    policy = workdir / "policy.toml"
    policy.write_text('[[rule]]\nuid = 0\nsecrets = ["*"]\n\n[[rule]]\nuid = 4242\nsecrets = ["other/*"]\n')
    a = start_agent("eu1", "eu", "--policy", str(policy))
    os.chown(a.socket, -1, 4242)  # let uid/gid 4242 connect; the policy, not the file mode, decides
    os.chmod(workdir, 0o755)
    code = (  # build the client first (the interpreter's files may not be readable by uid 4242); it
        # connects at the first request, after setuid, so the kernel reports uid 4242
        "import os\nfrom vault_edge.client import AgentClient, AgentError\n"
        f"c = AgentClient({str(a.socket)!r})\n"
        "os.setgid(4242); os.setuid(4242)\n"
        "try:\n"
        "    c.get('app/key'); print('READ')\n"
        "except AgentError as e:\n"
        "    print(e.status, e.code)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert out.stdout.strip() == "403 forbidden", out.stderr
    assert a.get("app/key") == "secret-app"  # root, allowed by the policy


def test_revoked_node_is_refused_wiped_and_its_region_rekeyed(control_plane: ControlPlane, start_agent: Any) -> None:
    op = control_plane.op
    op.put("eu/db", value="before", regions=["eu"])
    keep, gone = start_agent("eu1", "eu"), start_agent("eu2", "eu")
    gone_id = gone.node_id
    res = op.revoke_node(gone_id)
    assert res["key_version"] == 2
    assert gone.proc is not None
    wait_until(lambda: gone.proc.poll() is not None, 20, "the revoked agent to stop")
    assert gone.proc.returncode == 3 and "revoked" in gone.log()
    assert not (gone.state_dir / "cache.json").exists()
    op.rotate("eu/db", value="after")
    wait_until(lambda: keep.get("eu/db") == "after", 20, "the remaining agent to get the new key and value")
    nodes = {n["id"]: n["status"] for n in op.nodes()["nodes"]}
    assert nodes[gone_id] == "revoked"


def test_join_tokens_are_single_use_and_expire(control_plane: ControlPlane, workdir: Path) -> None:
    token = control_plane.join_token("eu")
    first = AgentProcess(workdir, "first", control_plane.addr, token).start()
    second = AgentProcess(workdir, "second", control_plane.addr, token)
    second.start(wait_ready=False, may_exit=True)  # a refusal may come before the check it is running
    assert second.proc is not None
    wait_until(lambda: second.proc.poll() is not None, 20, "the second enrolment to be refused")
    assert second.proc.returncode == 1 and "already used" in second.log()
    first.stop()
    audit = control_plane.op.audit(limit=1000)["entries"]
    assert any(e["action"] == "node.enroll" and e["outcome"] == "refused" for e in audit)

    # a token whose pin names another control plane is not even sent: it stays usable. The agent says
    # so and retries (a relay could send a key of its own: that must not end it), never sending it
    fresh = control_plane.join_token("eu")
    wrong_pin = fresh.rsplit(".", 1)[0] + ".AAAAAAAAAAAAAAAAAAAAAA"
    bogus = AgentProcess(workdir, "bogus", control_plane.addr, wrong_pin)
    bogus.start(wait_ready=False, may_exit=True)
    try:
        wait_until(lambda: "does not match the join token's pin" in bogus.log(), 20, "the pin to be refused")
        assert bogus.proc is not None and bogus.proc.poll() is None  # still running, retrying
    finally:
        bogus.stop()
    AgentProcess(workdir, "third", control_plane.addr, fresh).start().stop()


def test_agent_get_and_exec_through_the_cli(control_plane: ControlPlane, start_agent: Any) -> None:
    control_plane.op.put("db/password", value="pa55", regions=["eu"])
    control_plane.op.put("db/user", value="app", regions=["eu"])
    control_plane.op.put("db/main", value=json.dumps({"username": "app_a", "password": "pw-1"}), regions=["eu"])
    a = start_agent("eu1", "eu")
    env = {**os.environ, "VAULT_EDGE_SOCKET": str(a.socket)}
    run = [sys.executable, "-m", "vault_edge", "agent"]
    got = subprocess.run([*run, "get", "db/password"], env=env, capture_output=True, timeout=30)
    assert got.returncode == 0 and got.stdout == b"pa55"
    for args in (["db/main", "--field", "password"], ["db/main#password"]):  # one field of a structured value
        got = subprocess.run([*run, "get", *args], env=env, capture_output=True, timeout=30)
        assert got.returncode == 0 and got.stdout == b"pw-1", got.stderr
    doc = json.loads(
        subprocess.run([*run, "get", "db/user", "-o", "json"], env=env, capture_output=True, timeout=30).stdout
    )
    assert {k: doc[k] for k in ("name", "value", "version", "stage")} == {
        "name": "db/user",
        "value": "app",
        "version": 1,
        "stage": "current",
    }
    assert isinstance(doc["revision"], int)
    out = subprocess.run(
        [
            *run,
            "exec",
            "--env",
            "PW=db/password",
            "--env",
            "USR=db/user",
            "--",
            sys.executable,
            "-c",
            "import os; print(os.environ['USR'] + ':' + os.environ['PW'])",
        ],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0 and out.stdout == b"app:pa55\n"
    missing = subprocess.run([*run, "get", "no/such"], env=env, capture_output=True, timeout=30)
    assert missing.returncode == 1 and missing.stderr.startswith(b"error: ")


def test_changing_regions_deleting_and_destroying_reach_the_agents(
    control_plane: ControlPlane, start_agent: Any
) -> None:
    op = control_plane.op
    op.put("moving", value="m1", regions=["eu", "us"])
    op.put("doomed", value="d1", regions=["eu"])
    eu, us = start_agent("eu1", "eu"), start_agent("us1", "us")
    assert us.get("moving") == "m1" and eu.get("moving") == "m1"

    def gone(agent: AgentProcess, name: str) -> bool:
        try:
            agent.get(name)
        except AgentError as exc:
            return exc.status == 404
        return False

    op.put("moving", value="m2", regions=["eu"])  # residency shrinks: us may no longer decrypt it
    wait_until(lambda: gone(us, "moving"), 15, "the us agent to drop it")
    wait_until(lambda: eu.get("moving") == "m2", 15, "the eu agent to get v2")
    op.delete("doomed")
    wait_until(lambda: gone(eu, "doomed"), 15, "a deleted secret to disappear")
    op.put("doomed", value="d2")  # put brings it back, as a new version
    wait_until(lambda: eu.get("doomed") == "d2", 15, "the re-created secret")
    op.delete("doomed", destroy=True)
    wait_until(lambda: gone(eu, "doomed"), 15, "a destroyed secret to disappear")
    hist = op.history("doomed")
    assert all(v["destroyed"] for v in hist["versions"])
