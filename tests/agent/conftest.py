"""Fixtures: real agent processes on real unix sockets (helpers in ``support``)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.support import Agent, start_fixture, wait_for_socket


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory other users can traverse (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="ve-agent-", dir="/tmp"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_agent(sock_dir: Path) -> Iterator[Callable[..., Agent]]:
    """start_agent(*args, entries=[...], policy="toml text") → a running Agent; stopped at teardown."""
    agents: list[Agent] = []

    def start(
        *args: str, entries: list[dict[str, Any]] | None = None, policy: str | None = None, name: str = "agent"
    ) -> Agent:
        sock = str(sock_dir / f"{name}.sock")
        argv = ["--socket", sock, *args]
        if entries is not None:
            f = sock_dir / f"{name}-entries.json"
            f.write_text(json.dumps(entries))
            argv += ["--entries", str(f)]
        if policy is not None:
            f = sock_dir / f"{name}-policy.toml"
            f.write_text(policy)
            argv += ["--policy", str(f)]
        log = sock_dir / f"{name}.log"
        proc = start_fixture(argv, log)
        wait_for_socket(sock, proc, log)
        agent = Agent(sock, proc, log)
        agents.append(agent)
        return agent

    yield start
    for a in agents:
        a.stop()
