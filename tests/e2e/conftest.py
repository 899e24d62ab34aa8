"""Real processes for end-to-end tests: a control plane, node agents on real unix sockets."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import debian
from tests.conftest import ServerProcess, stop_process, vault_edge_cmd
from vault_edge.client import AgentClient, AgentError
from vault_edge.operator import OperatorClient


def wait_until(pred: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except (AgentError, OSError) as exc:
            last_exc = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


@pytest.fixture(scope="session")
def promtool() -> str:
    """Debian's ``prometheus`` package: installed when missing (as root); under CI=true a promtool that
    still cannot be had fails the test, naming what is missing."""
    return debian.command("promtool", "prometheus", "the metrics tests (promtool check metrics)")


def check_metrics(promtool: str, text: str) -> None:
    """``promtool check metrics``: a valid exposition, and no lint warning either."""
    r = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (r.stdout, r.stderr, text)


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` → value, for the sample lines of a text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


class AgentProcess:
    def __init__(
        self,
        workdir: Path,
        name: str,
        server: str,
        join_token: str | None,
        extra: list[str] | None = None,
        nofile: tuple[int, int] | None = None,
    ) -> None:
        self.name = name
        self.nofile = nofile  # (soft, hard) RLIMIT_NOFILE to start the agent under
        self.state_dir = workdir / f"{name}-state"
        self.socket = workdir / f"{name}.sock"
        self.log_path = workdir / f"{name}.log"
        self.server, self.join_token, self.extra = server, join_token, extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, may_exit: bool = False) -> AgentProcess:
        args = [
            *vault_edge_cmd(),
            "agent",
            "run",
            "--server",
            self.server,
            "--state-dir",
            str(self.state_dir),
            "--socket",
            str(self.socket),
            "--wait",
            "2s",
            *self.extra,
        ]
        if self.join_token:
            args += ["--join-token", self.join_token]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._limits)
        wait_until(lambda: self.socket.exists() or self.proc.poll() is not None, 20, f"{self.name}'s socket")
        assert may_exit or self.proc.poll() is None, f"agent exited: {self.log()[-3000:]}"
        if wait_ready:
            wait_until(lambda: self.health()["status"] == "ok", 20, f"{self.name} in sync")
        return self

    def _limits(self) -> None:
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)

    def status(self, key: str) -> int:
        """A field of /proc/PID/status in KiB (VmRSS, VmHWM: the peak resident set)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {key}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = 15) -> int | None:
        stop_process(self.proc, sig)
        return self.proc.returncode if self.proc else None

    def client(self, token: str | None = None) -> AgentClient:
        return AgentClient(str(self.socket), token)

    def get(self, name: str, **kw: Any) -> str:
        with self.client() as c:
            return c.get(name, **kw).text

    def health(self) -> dict[str, Any]:
        with self.client() as c:
            return c.health()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def node_id(self) -> str:
        return json.loads((self.state_dir / "node.json").read_text())["node"]


class ControlPlane:
    """A real `vault-edge server`, initialized and unsealed, with an operator client."""

    def __init__(self, workdir: Path, db: str, env: dict[str, str] | None = None) -> None:
        self.workdir, self.db = workdir, db
        self.env = {"VAULT_EDGE_MIN_ROTATE_EVERY_S": "1", **(env or {})}
        self.server = ServerProcess(db, workdir / "server.log", env=self.env).start()
        self.replicas: list[ServerProcess] = []
        self.addr = self.server.addr
        with OperatorClient(self.addr, "") as c:
            doc = c.init(shares=3, threshold=2)
        self.shares, self.token = doc["shares"], doc["root_token"]
        self.unseal()
        self.op = OperatorClient(self.addr, self.token)

    def unseal(self, addr: str | None = None) -> None:
        with OperatorClient(addr or self.addr, "") as c:
            for share in self.shares[:2]:
                c.unseal(share)

    def add_replica(self) -> ServerProcess:
        """Another `vault-edge server` on the same database, unsealed with the same shares."""
        r = ServerProcess(self.db, self.workdir / f"replica-{len(self.replicas)}.log", env=self.env).start()
        self.replicas.append(r)
        self.unseal(r.addr)
        return r

    def kill(self) -> None:
        self.server.stop(9)

    def restart(self, unseal: bool = True) -> None:
        self.server.stop()
        self.server = ServerProcess(self.db, self.workdir / "server.log", port=self.server.port, env=self.env).start()
        if unseal:
            self.unseal()

    def join_token(self, region: str) -> str:
        return str(self.op.join_token(region)["token"])

    def close(self) -> None:
        self.op.close()
        for r in self.replicas:
            r.stop()
        self.server.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    # unix socket paths are limited to 108 bytes: keep them short
    d = Path(tempfile.mkdtemp(prefix="ve-", dir=os.environ.get("VE_E2E_DIR", "/tmp")))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def control_plane(workdir: Path) -> Iterator[ControlPlane]:
    cp = ControlPlane(workdir, str(workdir / "vault.db"))
    for region in ("eu", "us"):
        cp.op.create_region(region)
    yield cp
    cp.close()


@pytest.fixture
def start_agent(workdir: Path, control_plane: ControlPlane) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(
        name: str,
        region: str,
        *extra: str,
        server: str | None = None,
        wait_ready: bool = True,
        nofile: tuple[int, int] | None = None,
    ) -> AgentProcess:
        a = AgentProcess(
            workdir, name, server or control_plane.addr, control_plane.join_token(region), list(extra), nofile=nofile
        )
        started.append(a)
        return a.start(wait_ready=wait_ready)

    yield start
    for a in started:
        a.stop()
