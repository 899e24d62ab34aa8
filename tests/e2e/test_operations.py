"""Day-2 operations, for real (issue 13): metrics scraped and checked by promtool, JSON logs parsed,
a refused call in the audit file sink, the audit stdout sink, the policy reloaded on SIGHUP. Real processes throughout."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, stop_process, vault_edge_cmd
from tests.e2e.conftest import AgentProcess, ControlPlane, check_metrics, samples, wait_until
from vault_edge.client import AgentError

METRICS_TOKEN = "mt-5b1f0e2a"
VALUE = "ops-value-4471-never-in-metrics-or-logs"


@pytest.fixture
def plane(workdir: Path) -> Iterator[ControlPlane]:
    env = {
        "VAULT_EDGE_METRICS_TOKEN": METRICS_TOKEN,
        "VAULT_EDGE_AUDIT_FILE": str(workdir / "audit.jsonl"),
        "VAULT_EDGE_LOG_FORMAT": "json",
    }
    cp = ControlPlane(workdir, str(workdir / "vault.db"), env=env)
    cp.op.create_region("eu")
    yield cp
    cp.close()


def test_metrics_logs_and_audit_sink(
    plane: ControlPlane, workdir: Path, promtool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    plane.op.put("app/key", value=VALUE, regions=["eu"])
    agent = AgentProcess(
        workdir, "eu1", plane.addr, plane.join_token("eu"), ["--metrics-addr", str(port), "--log-format", "json"]
    )
    monkeypatch.setenv("VAULT_EDGE_METRICS_TOKEN", METRICS_TOKEN)  # the agent reads it from its environment
    agent.start()
    try:
        with agent.client() as c:  # one keep-alive connection: the second read is a cache hit
            assert c.get("app/key").text == VALUE and c.get("app/key").text == VALUE
            with pytest.raises(AgentError):
                c.get("app/none")
        url = f"http://127.0.0.1:{port}/metrics"
        assert httpx.get(url, timeout=5).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/other", timeout=5).status_code == 404
        r = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=5)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        check_metrics(promtool, r.text)
        m = samples(r.text)
        assert m['vault_edge_agent_status{status="ok"}'] == 1
        assert m["vault_edge_agent_revision"] >= 1 and m["vault_edge_agent_secrets"] == 1
        assert m['vault_edge_agent_answers_total{status="200"}'] >= 1
        assert m['vault_edge_agent_refusals_total{code="not_found"}'] == 1
        assert m["vault_edge_agent_cache_hits_total"] >= 1
        assert m["vault_edge_agent_sync_received_bytes_total"] > 0 and m["vault_edge_agent_sync_applied_total"] >= 1
        assert 0 <= m["vault_edge_agent_last_sync_age_seconds"] < 10
        assert m["vault_edge_agent_sync_failures_total"] == 0
        assert VALUE not in r.text and "app/key" not in r.text

        # the control plane: a rotation observed as propagation lag, the fleet by region and state
        rotated = plane.op.rotate("app/key", value=VALUE + "-2")
        wait_until(lambda: agent.get("app/key") == VALUE + "-2", 15, "the rotation at the agent")
        with httpx.Client(base_url=plane.addr, timeout=5) as h:
            assert h.get("/metrics").status_code == 401

            def scraped() -> dict[str, float] | None:
                text = h.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
                got = samples(text)
                return got if got.get("vault_edge_propagation_lag_seconds_count", 0) >= 1 else None

            m = wait_until(scraped, 15, "the agent's report of the rotation")
            text = h.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
        check_metrics(promtool, text)
        assert m['vault_edge_nodes{region="eu",state="ok"}'] == 1
        assert m['vault_edge_nodes{region="eu",state="down"}'] == 0
        assert m["vault_edge_sealed"] == 0 and m["vault_edge_rotations_total"] == 1
        assert m['vault_edge_audit_entries_total{action="secret.rotate",outcome="ok"}'] == 1
        assert m["vault_edge_scheduler_failures_total"] == 0
        assert m["vault_edge_propagation_lag_seconds_sum"] < 15
        assert not any("/v1/agent/sync" in k for k in m)  # long-polls are counted apart
        assert any(k.startswith("vault_edge_sync_answers_total") for k in m)
        assert VALUE not in text and "app/key" not in text
        assert rotated["version"] == 2

        # a refused call reaches the audit file sink, with the remote address
        with httpx.Client(base_url=plane.addr, timeout=5) as h:
            assert h.get("/v1/secrets", headers={"Authorization": "Bearer vet_nope"}).status_code == 401
        lines = [json.loads(x) for x in (workdir / "audit.jsonl").read_text().splitlines()]
        refused = [e for e in lines if e["outcome"] == "refused" and e["action"] == "api.auth"]
        assert refused and refused[-1]["detail"]["remote"] == "127.0.0.1" and refused[-1]["seq"] >= 1
        assert any(e["action"] == "secret.rotate" and e["target"] == "app/key" for e in lines)
        assert oct((workdir / "audit.jsonl").stat().st_mode & 0o777) == "0o600"
        seqs = [e["seq"] for e in lines if e["seq"] is not None]
        assert seqs == sorted(seqs) and VALUE not in (workdir / "audit.jsonl").read_text()
    finally:
        agent.stop()

    # logs: one JSON object per line, in both processes; the start-up lines say what an operator needs
    for log_text in (plane.server.log(), agent.log()):
        docs = [json.loads(line) for line in log_text.splitlines() if line.strip()]
        assert docs and all({"ts", "level", "logger", "msg"} <= set(d) for d in docs)
        assert VALUE not in log_text
    server_docs = [json.loads(line) for line in plane.server.log().splitlines() if line.strip()]
    start = [d["msg"] for d in server_docs if "control plane on" in d["msg"]]
    assert start and re.search(
        r"http://127\.0\.0\.1:\d+; database sqlite:///.*vault\.db; seal shamir, sealed", start[0]
    )
    assert not any('"GET /v1/agent/sync' in d["msg"] for d in server_docs)  # request logs are off by default
    # the schema's migration is one line of ours, not Alembic's dozen (multi-line ones among them)
    migrated = [d["msg"] for d in server_docs if "schema" in d["msg"]]
    assert len(migrated) == 1 and migrated[0].startswith("database schema migrated from empty to 0")
    assert not any(d["logger"].startswith("alembic") for d in server_docs)
    assert not any("\n" in d["msg"] for d in server_docs)  # so the text format is one line a record too
    assert any(
        f"metrics on http://127.0.0.1:{port}/metrics (bearer token required)" in json.loads(line)["msg"]
        for line in agent.log().splitlines()
        if line.strip()
    )


def test_audit_stdout_sink(workdir: Path) -> None:
    """``vault-edge server --audit-stdout``: a real server's stdout holds only audit entries, one JSON
    line each, accepted and refused alike naming the remote address, and no token, share or value
    (logs go to stderr)."""
    from vault_edge.operator import OperatorClient

    port = free_port()
    addr = f"http://127.0.0.1:{port}"
    out_path, err_path = workdir / "server.stdout", workdir / "server.stderr"
    cmd = [*vault_edge_cmd(), "server", "--db", str(workdir / "vault.db"), "--port", str(port), "--audit-stdout"]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "VAULT_EDGE_LOG_FORMAT": "json"})
    bad_token = "vet_" + os.urandom(16).hex()  # a token-shaped guess: refused, and never written out
    try:

        def up() -> bool:
            assert proc.poll() is None, err_path.read_text()[-2000:]
            try:
                return httpx.get(addr + "/v1/sys/status", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, 30, "the server")
        with OperatorClient(addr, "") as c:
            doc = c.init(shares=3, threshold=2)
            for share in doc["shares"][:2]:
                c.unseal(share)
        shares, root_token = doc["shares"], doc["root_token"]
        with OperatorClient(addr, root_token) as op:
            op.create_region("eu")
            op.put("app/key", value=VALUE, regions=["eu"])  # accepted
        with httpx.Client(base_url=addr, timeout=5) as h:  # refused: a bad token
            assert h.get("/v1/secrets", headers={"Authorization": f"Bearer {bad_token}"}).status_code == 401

        def entries() -> list[dict[str, Any]] | None:
            text = out_path.read_text()
            if not text.endswith("\n"):
                return None  # a line being written
            docs = [json.loads(line) for line in text.splitlines()]  # every line is JSON: nothing else on stdout
            done = any(d["action"] == "api.auth" for d in docs)
            return docs if done else None

        docs = wait_until(entries, 15, "the refusal on stdout")
    finally:
        stop_process(proc)
    assert docs and all(d["type"] == "audit" for d in docs)
    refused = [d for d in docs if d["action"] == "api.auth" and d["outcome"] == "refused"]
    assert len(refused) == 1 and refused[0]["seq"] >= 1
    assert refused[0]["detail"]["remote"] == "127.0.0.1" and refused[0]["detail"]["status"] == 401
    assert refused[0]["detail"]["path"] == "/v1/secrets" and refused[0]["actor"] == "anonymous"
    accepted = [d for d in docs if d["action"] == "secret.put" and d["target"] == "app/key"]
    assert len(accepted) == 1 and accepted[0]["outcome"] == "ok"
    assert accepted[0]["actor"].startswith("token:root/")  # the token's id, never the token
    assert accepted[0]["detail"]["remote"] == "127.0.0.1"
    assert {"sys.init", "sys.unseal", "region.create"} <= {d["action"] for d in docs}
    seqs = [d["seq"] for d in docs if d["seq"] is not None]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    written = out_path.read_text() + err_path.read_text()
    for secret in (VALUE, root_token, bad_token, *shares, *(" ".join(s.split()[4:]) for s in shares)):
        assert secret not in written


def test_policy_reloads_on_sighup(control_plane: ControlPlane, workdir: Path) -> None:
    op = control_plane.op
    op.put("a/one", value="one", regions=["eu"])
    op.put("b/two", value="two", regions=["eu"])
    policy = workdir / "policy.toml"
    policy.write_text(f'[[rule]]\nuid = {os.getuid()}\nsecrets = ["a/*"]\n')
    agent = AgentProcess(
        workdir, "eu1", control_plane.addr, control_plane.join_token("eu"), ["--policy", str(policy)]
    ).start()
    try:
        assert agent.get("a/one") == "one"
        with pytest.raises(AgentError) as e:
            agent.get("b/two")
        assert e.value.status == 403
        with agent.client() as c:  # a held connection, whose cached refusal must not outlive the reload
            with pytest.raises(AgentError):
                c.get("b/two")
            policy.write_text(f'[[rule]]\nuid = {os.getuid()}\nsecrets = ["a/*", "b/*"]\n')
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "reloaded" in agent.log(), 10, "the reload")
            assert c.get("b/two").text == "two"
        # a broken file leaves the policy in force, and the agent serving
        policy.write_text("[[rule]\nnot toml")
        agent.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "not reloaded" in agent.log(), 10, "the refused reload")
        assert agent.alive() and agent.get("b/two") == "two"
    finally:
        agent.stop()


CHILD = """
import os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def hup(*_):
    with out.open("a") as f:
        f.write(f"hup {os.getpid()}\\n")
signal.signal(signal.SIGHUP, hup)
with out.open("a") as f:
    f.write(f"start {os.getpid()} {len(os.environ['APP_KEY'])}\\n")
while True:
    time.sleep(0.1)
"""


@pytest.mark.parametrize("mode", ["restart", "signal"])
def test_exec_restarts_or_signals_the_child_on_rotation(
    control_plane: ControlPlane, start_agent: Any, workdir: Path, mode: str
) -> None:
    """The child records its pid and the length of the value it got (never the value itself)."""
    op = control_plane.op
    op.put("app/key", value="x" * 10, regions=["eu"])
    op.put("app/other", value="o", regions=["eu"])
    agent = start_agent("eu1", "eu")
    script, out = workdir / "child.py", workdir / "child.out"
    script.write_text(CHILD)
    flag = ["--restart-on-change"] if mode == "restart" else ["--signal-on-change", "HUP"]
    with subprocess.Popen(
        [
            *vault_edge_cmd(),
            "agent",
            "exec",
            "--socket",
            str(agent.socket),
            *flag,
            "--env",
            "APP_KEY=app/key",
            "--",
            sys.executable,
            str(script),
            str(out),
        ],
        stderr=subprocess.PIPE,
    ) as sup:
        try:
            wait_until(lambda: out.exists() and "start" in out.read_text(), 15, "the child")
            first = out.read_text().split()
            assert first[0] == "start" and first[2] == "10"
            op.rotate("app/other", value="unrelated")  # not a secret it was given: nothing happens
            time.sleep(2.5)
            assert out.read_text().split() == first
            op.rotate("app/key", value="y" * 20)
            if mode == "restart":
                lines = wait_until(lambda: len(ls := out.read_text().splitlines()) >= 2 and ls, 20, "the restart")
                second = lines[1].split()
                assert second[0] == "start" and second[1] != first[1] and second[2] == "20"
                with pytest.raises(ProcessLookupError):
                    os.kill(int(first[1]), 0)  # the old child is gone
            else:
                lines = wait_until(lambda: len(ls := out.read_text().splitlines()) >= 2 and ls, 20, "the HUP")
                assert lines[1] == f"hup {first[1]}"  # the same child, signalled
            assert sup.poll() is None
        finally:
            sup.send_signal(signal.SIGTERM)  # passed to the child; the supervisor exits with its status
            code = sup.wait(15)
        assert code == 128 + signal.SIGTERM
        assert sup.stderr is not None and b"yyyy" not in sup.stderr.read()
