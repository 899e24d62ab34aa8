"""``vault-edge dev``: a control plane, two regions, a demo secret, an agent per region; Ctrl-C stops all."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from vault_edge.cli.output import err, out
from vault_edge.operator import OperatorClient

REGIONS = ("eu-west", "us-east")
DEMO = "demo/openai-key"


def run_dev(port: int, workdir: str | None, wait_http: Callable[..., None]) -> None:
    workdir = workdir or tempfile.mkdtemp(prefix="vault-edge-dev-")
    os.makedirs(workdir, exist_ok=True)
    token = "vet_dev_" + secrets.token_urlsafe(16)
    addr = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    cmd = [sys.executable, "-m", "vault_edge"]
    try:
        procs.append(subprocess.Popen([*cmd, "server", "--dev", "--dev-token", token, "--port", str(port),
                                       "--log-level", "warning"]))
        wait_http(f"{addr}/v1/sys/health", procs[0])
        with OperatorClient(addr, token) as c:
            for r in REGIONS:
                c.create_region(r)
            c.put(DEMO, value="sk-demo-" + secrets.token_hex(12), regions=[REGIONS[0]])
            c.put("demo/db-password", generate="24:alnum", regions=list(REGIONS))
            agents = _start_agents(c, cmd, addr, workdir, procs)
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


def _start_agents(c: OperatorClient, cmd: list[str], addr: str, workdir: str,
                  procs: list[subprocess.Popen[bytes]]) -> list[dict[str, Any]]:
    """Hook for the node agents (one per region); returns how to reach each."""
    return []


def _print_next(addr: str, token: str, agents: list[dict[str, Any]]) -> None:
    out.print(f"\n[bold]vault-edge dev[/] is running: control plane at {addr}")
    out.print(f"  export VAULT_EDGE_ADDR={addr} VAULT_EDGE_TOKEN={token}")
    out.print(f"  vault-edge status            vault-edge list          vault-edge get {DEMO}")
    out.print(f"  vault-edge rotate {DEMO} --generate 32:base64url --wait")
    for a in agents:
        out.print(f"  curl --unix-socket {a['socket']} http://localhost/v1/secrets/{DEMO}    # agent in {a['region']}")
    err.print("Ctrl-C stops everything.")


def _wait(procs: list[subprocess.Popen[bytes]]) -> None:
    import time

    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        err.print("[red]a dev process exited; stopping[/]")
    except KeyboardInterrupt:
        err.print("stopping")
