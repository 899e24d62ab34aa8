"""Keyless workers, for real: a control plane process, the real CLI defining egress routes, an agent
process (``--egress-ca``, a policy file), a real HTTPS upstream with a test CA that records what it
receives, and workers on the agent's unix socket who never see the key, errors included."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent.egress_upstream import Upstream, make_ca
from tests.agent.egress_upstream_h2 import H2Upstream
from tests.agent.test_egress import Conn
from tests.conftest import cli, free_port
from tests.e2e.conftest import AgentProcess, ControlPlane, check_metrics, samples, wait_until

KEY, KEY2 = "sk-live-e2e-000111222333", "sk-live-e2e-rotated-444555"
TOKEN = "tenant-a-binding-token-0123456789"


@pytest.fixture
def pki(workdir: Path) -> tuple[Path, Path, Path]:
    d = workdir / "pki"
    d.mkdir()
    return make_ca(d)


@pytest.fixture(params=["h1", "h2"])
def upstream(request: pytest.FixtureRequest, pki: tuple[Path, Path, Path]) -> Iterator[Upstream]:
    """An upstream on HTTP/1.1, and one that speaks HTTP/2 only."""
    u: Any = Upstream(pki[1], pki[2]) if request.param == "h1" else H2Upstream(pki[1], pki[2])
    yield u
    u.close()


class Worker:
    """A worker process's view of the agent: raw HTTP on its socket, every byte kept."""

    def __init__(self, agent: AgentProcess, token: str | None = None) -> None:
        self.path, self.token, self.received = str(agent.socket), token, []  # type: list[bytes]

    def call(self, method: str, target: str, headers: str = "", body: bytes = b"") -> tuple[int, dict[str, str], Any]:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(15)
        s.connect(self.path)
        with s:
            token = f"X-Vault-Edge-Token: {self.token}\r\n" if self.token else ""
            status, h, raw = Conn(s, self.received).request(method, target, token + headers, body)
        try:
            return status, h, json.loads(raw)
        except ValueError:
            return status, h, raw


def test_keyless_workers_end_to_end(
    control_plane: ControlPlane,
    start_agent: Any,
    workdir: Path,
    pki: tuple[Path, Path, Path],
    upstream: Upstream,
    promtool: str,
) -> None:
    op = control_plane.op
    op.put("openai/api-key", value=KEY, regions=["eu"])
    env = {"VAULT_EDGE_ADDR": control_plane.addr, "VAULT_EDGE_TOKEN": control_plane.token}
    r = cli(
        "egress",
        "create",
        "openai",
        "--upstream",
        upstream.url,
        "--secret",
        "openai/api-key",
        "--inject",
        "header:Authorization=Bearer {value}",
        "--method",
        "GET",
        "--method",
        "POST",
        "--path",
        "/v1/",
        "--retry-previous-on-401",
        "-o",
        "json",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["regions"] == ["eu"] and json.loads(r.stdout)["retry_previous_on_401"] is True
    r = cli(
        "egress",
        "create",
        "bad",
        "--upstream",
        "http://api.example.com",
        "--secret",
        "openai/api-key",
        "--inject",
        "header:Authorization=Bearer {value}",
        env=env,
    )
    assert r.returncode == 1 and r.stderr.decode().count("\n") == 1 and "https" in r.stderr.decode()
    r = cli("egress", "list", "-o", "json", env=env)
    assert r.returncode == 0 and [x["name"] for x in json.loads(r.stdout)["routes"]] == ["openai"]
    assert json.loads(r.stdout)["routes"][0]["retry_previous_on_401"] is True

    policy = workdir / "policy.toml"
    policy.write_text(
        f'[[rule]]\nuid = {os.getuid()}\nsecrets = ["public/*"]\n\n'
        f'[[rule]]\ntoken_sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"\negress = ["openai"]\n'
    )
    metrics_port = free_port()
    agent = start_agent(
        "eu1",
        "eu",
        "--policy",
        str(policy),
        "--egress-ca",
        str(pki[0]),
        "--egress-timeout",
        "2s",
        "--metrics-addr",
        str(metrics_port),
        "--metrics-token",  # the flag (test_operations gives the agent VAULT_EDGE_METRICS_TOKEN)
        "egress-metrics-token",
        "--log-level",  # everything it logs, HTTP/2's header compression included, is checked for the key
        "debug",
    )
    worker, stranger = Worker(agent, TOKEN), Worker(agent)

    # through a binding to the socket
    status, _, doc = worker.call("POST", "/v1/egress/openai/v1/echo", "Authorization: Bearer mine\r\n", b"{}")
    assert status == 200, doc
    assert upstream.last().header("Authorization") == [f"Bearer {KEY}"]
    # as a forward proxy (workerd's globalOutbound, style = proxy)
    status, _, doc = worker.call("GET", f"{upstream.url}/v1/ok")
    assert status == 200 and doc == {"ok": True} and upstream.last().header("Authorization") == [f"Bearer {KEY}"]
    assert worker.call("GET", "https://api.example.com/v1/ok")[0] == 403  # a host no route names
    # refusals: a caller without the route, a worker reading the key itself, a path the route does not allow
    assert stranger.call("GET", "/v1/egress/openai/v1/ok")[0] == 403
    assert stranger.call("GET", f"{upstream.url}/v1/ok")[0] == 403
    assert worker.call("GET", "/v1/secrets/openai/api-key")[0] == 403
    assert worker.call("GET", "/v1/egress/openai/admin")[0] == 403
    assert len(upstream.seen) == 2  # the refused calls sent nothing

    # a rotation: the next call uses the new key
    op.rotate("openai/api-key", value=KEY2)
    wait_until(
        lambda: (
            worker.call("GET", "/v1/egress/openai/v1/ok")[0] == 200
            and upstream.last().header("Authorization") == [f"Bearer {KEY2}"]
        ),
        20,
        "the rotated key upstream",
    )

    # the upstream gone: a clear error, never the key; the agent serves on
    upstream.close()
    status, _, doc = worker.call("GET", "/v1/egress/openai/v1/ok")
    assert status == 502 and doc["error"]["code"] == "upstream_unreachable"

    # the egress seen by Prometheus (issue 13), per route, checked by promtool; never the key
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    assert httpx.get(url, timeout=5).status_code == 401
    text = httpx.get(url, headers={"Authorization": "Bearer egress-metrics-token"}, timeout=5).text
    check_metrics(promtool, text)
    m = samples(text)
    assert m['vault_edge_agent_egress_requests_total{route="openai"}'] >= 3
    assert m['vault_edge_agent_egress_upstream_answers_total{route="openai",class="2xx"}'] >= 3
    assert m['vault_edge_agent_egress_upstream_failures_total{route="openai",kind="connect"}'] == 1
    assert m['vault_edge_agent_egress_upstream_seconds_count{route="openai"}'] >= 3
    assert KEY not in text and KEY2 not in text and TOKEN not in text

    # the route deleted: gone from the agent at its next sync
    r = cli("egress", "delete", "openai", env=env)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: worker.call("GET", "/v1/egress/openai/v1/ok")[0] == 404, 20, "the route to go")

    assert agent.alive() and agent.health()["status"] == "ok"
    agent.stop()
    everything = b"".join(worker.received + stranger.received)
    log = agent.log()
    for value in (KEY, KEY2):
        assert value.encode() not in everything
        assert value not in log


def test_the_control_plane_shows_each_nodes_egress_counts(
    control_plane: ControlPlane, start_agent: Any, workdir: Path, pki: tuple[Path, Path, Path], upstream: Upstream
) -> None:
    """A real agent's egress calls, counted per route and status class, reach `vault-edge node list`
    and `vault-edge node status` through its signed sync polls (the e2e agents poll with --wait 2s)."""
    op = control_plane.op
    op.put("openai/api-key", value=KEY, regions=["eu"])
    env = {"VAULT_EDGE_ADDR": control_plane.addr, "VAULT_EDGE_TOKEN": control_plane.token}
    r = cli(
        "egress",
        "create",
        "openai",
        "--upstream",
        upstream.url,
        "--secret",
        "openai/api-key",
        "--inject",
        "header:Authorization=Bearer {value}",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    policy = workdir / "policy.toml"
    policy.write_text(f'[[rule]]\nuid = {os.getuid()}\negress = ["openai"]\n')
    agent = start_agent("eu1", "eu", "--policy", str(policy), "--egress-ca", str(pki[0]))
    node = agent.node_id
    r = cli("node", "list", "-o", "json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["nodes"][0]["egress"] is None  # no call yet

    worker = Worker(agent)
    for _ in range(3):
        assert worker.call("GET", "/v1/egress/openai/v1/ok")[0] == 200
    assert worker.call("GET", f"{upstream.url}/v1/nothing-here")[0] == 404
    assert worker.call("GET", "/v1/egress/openai/v1/ok")[0] == 200
    assert worker.call("POST", "/v1/egress/openai/v1/status?code=503", body=b"{}")[0] == 503

    def reported() -> dict[str, Any] | None:
        r = cli("node", "list", "-o", "json", env=env)
        assert r.returncode == 0, r.stderr
        eg = json.loads(r.stdout)["nodes"][0]["egress"]
        return eg if eg and eg["requests"] == 6 else None

    eg = wait_until(reported, 20, "the agent's egress counts in `node list`")
    counts = eg["routes"]["openai"]
    assert (counts["2xx"], counts["4xx"], counts["5xx"], counts["failed"]) == (4, 1, 1, 0)
    assert abs(eg["since"] - time.time()) < 120 and counts["ms"] >= 0

    r = cli("node", "list", env=env)
    assert r.returncode == 0 and node in r.stdout.decode() and "6 (2 4xx/5xx)" in r.stdout.decode()
    r = cli("node", "status", node, env=env)
    text = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    assert "6 calls since" in text
    rows = ([c for c in line.split() if c != "│"] for line in text.splitlines())
    row = next(r for r in rows if r[:1] == ["openai"])
    assert row[1:8] == ["6", "0", "4", "0", "1", "1", "0"]  # calls, 1xx..5xx, failed
    r = cli("node", "status", node, "-o", "json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["egress"]["routes"]["openai"] == counts
    r = cli("node", "status", "n-0000000000000000", env=env)
    assert r.returncode == 1 and r.stderr.decode().count("\n") == 1 and "no node" in r.stderr.decode()
    assert KEY not in agent.log() and KEY.encode() not in b"".join(worker.received)
