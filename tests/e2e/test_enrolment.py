"""Enrolment that survives a storm, for real: a control plane process, an agent process, and a relay
between them that holds answers back or sheds them as an overloaded control plane would."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import AgentProcess, ControlPlane, wait_until
from tests.e2e.proxy import Proxy
from vault_edge import wire

ENROLL = "/v1/agent/enroll"


@pytest.fixture
def relay(control_plane: ControlPlane) -> Iterator[Proxy]:
    p = Proxy(control_plane.addr)
    yield p
    p.close()


@pytest.fixture
def agents(relay: Proxy) -> Iterator[list[AgentProcess]]:
    """Agents to stop at teardown (before the relay and the control plane go)."""
    started: list[AgentProcess] = []
    yield started
    for a in started:
        a.stop()


def _node_rows(control_plane: ControlPlane) -> list[tuple[str, str | None, str]]:
    with sqlite3.connect(control_plane.db) as db:
        return list(db.execute("SELECT id, join_token_id, status FROM nodes"))


def test_an_enrolment_answer_lost_to_the_agents_timeout_is_retried_with_the_same_token(
    control_plane: ControlPlane, relay: Proxy, agents: list[AgentProcess], workdir: Path
) -> None:
    """The control plane enrols the node at once, but its answer reaches the agent only after the
    agent's enrolment timeout: the agent gives up on it and asks again with the same token and keys.
    It gets the node the lost answer named, and the control plane holds that one node, no orphan."""
    relay.holds[ENROLL] = [4.0]  # the first answer waits 4 s on the path; the agent waits 1 s
    token = control_plane.join_token("eu")
    control_plane.op.put("eu/db", value="reached", regions=["eu"])
    agent = AgentProcess(workdir, "slow", relay.addr, token, ["--enroll-timeout", "1s"])
    agents.append(agent)
    agent.start()
    assert agent.get("eu/db") == "reached"
    assert "no answer in 1s" in agent.log() and "already used" not in agent.log()
    wait_until(lambda: relay.held, 10, "the held answer to be let go")
    path, status, body = relay.held[0]
    assert (path, status) == (ENROLL, 200)
    lost = json.loads(body)["node"]
    assert agent.node_id == lost  # the retry learnt the node the lost answer named
    tries = [a for a in relay.arrivals if a[2] == ENROLL]
    # retried after its timeout, not before (the relay sees the first try a little after the agent
    # starts its 1 s wait, and the back-off after a timeout may be close to nothing)
    assert len(tries) >= 2 and tries[1][0] - tries[0][0] >= 0.9
    assert _node_rows(control_plane) == [(lost, wire.parse_join_token(token)[0], "active")]
    assert [(n["id"], n["status"]) for n in control_plane.op.nodes()["nodes"]] == [(lost, "active")]
    audit = control_plane.op.audit(limit=1000)["entries"]
    enrols = [e for e in audit if e["action"] == "node.enroll"]
    assert [e["outcome"] for e in enrols].count("ok") == 1
    assert any(e["outcome"] == "repeated" and e["target"] == lost for e in enrols)


def test_a_shed_enrolment_is_retried_after_its_retry_after(
    control_plane: ControlPlane, relay: Proxy, agents: list[AgentProcess], workdir: Path
) -> None:
    """A 503 overloaded with Retry-After: 2 (as the control plane sheds past its in-flight limit): the
    agent waits at least that long, then enrols."""
    relay.hostile, relay.hostile_paths = "overloaded", (ENROLL,)
    agent = AgentProcess(workdir, "shed", relay.addr, control_plane.join_token("eu"))
    agents.append(agent)
    agent.start(wait_ready=False)
    wait_until(lambda: relay.hostile_sent >= 1, 20, "the first enrolment to be shed")
    relay.hostile = None
    wait_until(lambda: agent.health()["status"] == "ok", 20, "the agent to enrol after its wait")
    tries = [a for a in relay.arrivals if a[2] == ENROLL]
    assert len(tries) == 2
    assert 2.0 <= tries[1][0] - tries[0][0] <= 6.0  # Retry-After honoured, with jitter, and bounded
    assert "503" in agent.log()
    assert [n[0] for n in _node_rows(control_plane)] == [agent.node_id]
