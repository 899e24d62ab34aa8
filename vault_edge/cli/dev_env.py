"""``vault-edge dev``: a control plane, two regions, a demo secret, an agent per region; Ctrl-C stops all."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from vault_edge.cli.output import err, out
from vault_edge.operator import OperatorClient

REGIONS = ("eu-west", "us-east")
DEMO = "demo/openai-key"


def _exit_on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_dev(port: int, workdir: str | None, wait_http: Callable[..., None]) -> None:
    signal.signal(signal.SIGTERM, _exit_on_term)  # so that `finally` stops the children
    own_dir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="vault-edge-dev-")
    os.makedirs(workdir, exist_ok=True)
    token = "vet_dev_" + secrets.token_urlsafe(16)
    addr = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    cmd = [sys.executable, "-m", "vault_edge"]
    try:
        procs.append(
            subprocess.Popen(
                [*cmd, "server", "--dev", "--dev-token", token, "--port", str(port), "--log-level", "warning"]
            )
        )
        wait_http(f"{addr}/v1/sys/health", procs[0])
        with OperatorClient(addr, token) as c:
            for r in REGIONS:
                c.create_region(r)
            c.put(DEMO, value="sk-demo-" + secrets.token_hex(12), regions=[REGIONS[0]])
            c.put("demo/db-password", generate="24:alnum", regions=list(REGIONS))
            agents = _start_agents(c, cmd, addr, workdir, procs)
        _demo_read(agents)
        _print_next(addr, token, agents)
        _wait(procs)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)


def _start_agents(
    c: OperatorClient, cmd: list[str], addr: str, workdir: str, procs: list[subprocess.Popen[bytes]]
) -> list[dict[str, Any]]:
    """One agent per region, each with its own state dir and socket; wait until each serves."""
    from vault_edge.client import AgentClient, AgentError

    agents = []
    for region in REGIONS:
        sock = os.path.join(workdir, f"{region}.sock")
        token = c.join_token(region)["token"]
        procs.append(
            subprocess.Popen(
                [
                    *cmd,
                    "agent",
                    "run",
                    "--server",
                    addr,
                    "--state-dir",
                    os.path.join(workdir, f"{region}-state"),
                    "--socket",
                    sock,
                    "--join-token",
                    token,
                    "--log-level",
                    "warning",
                ]
            )
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with AgentClient(sock) as a:
                    if a.health()["status"] == "ok":
                        break
            except AgentError:
                pass
            if time.monotonic() > deadline or procs[-1].poll() is not None:
                raise RuntimeError(f"the {region} agent did not start (see its output above)")
            time.sleep(0.1)
        agents.append({"region": region, "socket": sock})
    return agents


def _demo_read(agents: list[dict[str, Any]]) -> None:
    from vault_edge.client import AgentClient

    with AgentClient(agents[0]["socket"]) as a:
        a.get(DEMO)  # warm the keep-alive connection
        t0 = time.perf_counter()
        secret = a.get(DEMO)
        took = (time.perf_counter() - t0) * 1e6
    shown = secret.text[:8] + "…"
    out.print(
        f"demo read through the {agents[0]['region']} agent: {DEMO} = {shown} (version {secret.version}, "
        f"{took:.0f} µs including the Python client)"
    )


def _print_next(addr: str, token: str, agents: list[dict[str, Any]]) -> None:
    out.print(f"\n[bold]vault-edge dev[/] is running: control plane at {addr}")
    out.print(f"  console: {addr}/ui   (sign in with the token {token})")
    if not shutil.which("vault-edge"):
        out.print(f"  . {os.path.dirname(sys.executable)}/activate      # puts vault-edge on PATH")
    out.print(f"  export VAULT_EDGE_ADDR={addr} VAULT_EDGE_TOKEN={token}")
    out.print(f"  vault-edge status            vault-edge list          vault-edge get {DEMO}")
    out.print(f"  vault-edge rotate {DEMO} --generate 32:base64url --wait")
    for a in agents:
        out.print(f"  curl --unix-socket {a['socket']} http://localhost/v1/secrets/{DEMO}    # agent in {a['region']}")
    out.print(f"  VAULT_EDGE_SOCKET={agents[0]['socket']} vault-edge agent get {DEMO}" if agents else "")
    out.print(f"  ({DEMO} is allowed in {REGIONS[0]} only: the {REGIONS[1]} agent answers 404)")
    err.print("Ctrl-C stops everything.")


def _wait(procs: list[subprocess.Popen[bytes]]) -> None:
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        err.print("[red]a dev process exited; stopping[/]")
    except KeyboardInterrupt:
        err.print("stopping")
