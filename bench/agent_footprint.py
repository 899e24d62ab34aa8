"""The agent's footprint: resident memory serving N secrets, cold start from its disk cache, imports.

For each command under test (``--cmd LABEL=COMMAND``, default: this venv's ``vault-edge``):

1. start a dev control plane (``COMMAND server --dev``: throw-away database, already unsealed), create
   a region and ``--secrets`` secrets of ``--size`` bytes allowed in it, make a join token;
2. start a real ``COMMAND agent run`` with it, wait until ``/v1/health`` says ``ok`` with every secret,
   and read its memory from ``/proc/PID/status`` (VmRSS; VmHWM, the peak, which the first full sync
   sets; RssAnon, the heap, against RssFile, mapped code and data of the interpreter and the
   extension modules), then again after reading every secret once through the socket;
3. stop the agent and the control plane.

Then ``--restarts`` times, round robin over the commands (so machine load falls on each alike): the
cold start from the disk cache, with the control plane down: from just before ``exec`` of
``COMMAND agent run`` (already enrolled) until the socket answers ``GET /v1/secrets/NAME`` with 200,
polled every 2 ms on a fresh connection; the CPU time the agent had used by then and the time it
spent runnable but waiting for a CPU (``/proc/PID/task/*/schedstat``: on a shared machine the wall
time moves with the load, the CPU time much less); the agent's VmRSS, a second later.
Last, ``--import-runs`` more starts per command (round robin) under ``PYTHONPROFILEIMPORTTIME=1``
(``-X importtime``): the number of modules the process imported up to its first answer, their total
import time (the minimum, the least disturbed by other load, and the median; inflated by the
profiler itself: compare the commands, not the absolute figure), and which heavy packages among them.

    .venv/bin/python bench/agent_footprint.py              # this tree: 1,000 x 256 B, 7 restarts
    git -C ../main archive HEAD | tar -x -C /tmp/ve-main   # another tree to compare (same venv, its code)
    .venv/bin/python bench/agent_footprint.py --cmd after=.venv/bin/vault-edge --cmd "before=env \\
        PYTHONPATH=/tmp/ve-main $PWD/.venv/bin/python -c 'import sys; from vault_edge.cli.main import main; main()'"

Raw results go to bench/results/agent_footprint-<timestamp>.json (gitignored). Results and method:
the Agent footprint section of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vault_edge.operator import OperatorClient

ROOT = Path(__file__).resolve().parent.parent
REGION = "pop"
HEAVY = (
    "rich",
    "click",
    "pygments",
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "pydantic",
    "vault_edge.operator",
    "vault_edge.server",
    "vault_edge.cli.main",
    "vault_edge.cli.output",
)


# -- small helpers -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) / 1024
    return out


def schedstat(pid: int) -> tuple[float, float]:
    """(on CPU, waiting to run) so far, in ms, over all the process's threads (/proc/PID/task/*/schedstat)."""
    cpu = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            on, queued, _ = (task / "schedstat").read_text().split()
        except (OSError, ValueError):
            continue  # a thread that just exited
        cpu, wait = cpu + int(on), wait + int(queued)
    return cpu / 1e6, wait / 1e6


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def http_get(sock_path: str, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """One GET over a fresh unix-socket connection (``Connection: close``): (status, body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def read_all(sock_path: str, names: list[str]) -> None:
    """Every name once over one keep-alive connection (as a worker would), each answer checked."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(sock_path)
        f = s.makefile("rb")
        for name in names:
            s.sendall(f"GET /v1/secrets/{name} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            status = int(f.readline().split(b" ", 2)[1])
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            f.read(length)
            if status != 200:
                raise RuntimeError(f"{name}: HTTP {status}")


# -- one command under test --------------------------------------------------------------------
@dataclass
class Subject:
    label: str
    cmd: list[str]
    workdir: Path
    names: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    nice: int = 0  # niceness of the cold-started agents

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def socket(self) -> str:
        return str(self.workdir / "a.sock")

    def agent_args(self, server: str) -> list[str]:
        return [
            *self.cmd,
            "agent",
            "run",
            "--server",
            server,
            "--state-dir",
            str(self.state_dir),
            "--socket",
            self.socket,
            "--log-level",
            "warning",
        ]

    def log(self, name: str) -> Any:
        return open(self.workdir / name, "ab")

    def setup(self, n: int, size: int, verbose: bool) -> None:
        """Control plane up, N secrets in the region, the agent enrolled and synced, memory read."""
        port, token = free_port(), "vet_bench_" + secrets.token_urlsafe(16)
        addr = f"http://127.0.0.1:{port}"
        with self.log("server.log") as log:
            server = subprocess.Popen(
                [*self.cmd, "server", "--dev", "--dev-token", token, "--port", str(port), "--log-level", "warning"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        agent = None
        try:
            wait_for(lambda: _unsealed(addr), 60, "the control plane", server)
            t0 = time.monotonic()
            with OperatorClient(addr, token) as c:
                c.create_region(REGION)
                for i in range(n):
                    name = f"bench/s{i:04d}"
                    # size bytes of ASCII (hex): an API key's shape, 256 by default
                    c.put(name, value=secrets.token_hex(size // 2 + 1)[:size], regions=[REGION])
                    self.names.append(name)
                join = c.join_token(REGION)["token"]
            if verbose:
                print(f"[{self.label}] {n} secrets put in {time.monotonic() - t0:.1f}s", file=sys.stderr)
            t0 = time.monotonic()
            with self.log("agent.log") as log:
                agent = subprocess.Popen(
                    [*self.agent_args(addr), "--join-token", join],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                )
            wait_for(
                lambda: self._health().get("status") == "ok" and self._health().get("secrets") == n,
                120,
                "the agent in sync",
                agent,
            )
            self.result["enrol_and_sync_s"] = time.monotonic() - t0
            time.sleep(1.0)
            self.result["synced"] = proc_status(agent.pid)
            read_all(self.socket, self.names)
            time.sleep(0.5)
            self.result["after_reads"] = proc_status(agent.pid)
        finally:
            stop(agent)
            stop(server)

    def _health(self) -> dict[str, Any]:
        try:
            status, body = http_get(self.socket, "/v1/health")
        except OSError:
            return {}
        return json.loads(body) if status == 200 else {}

    def cold_start(self, env: dict[str, str] | None = None, log_name: str = "cold.log") -> dict[str, Any]:
        """Exec the enrolled agent with the control plane down; time to the first 200 from the disk cache."""
        unreachable = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        path = f"/v1/secrets/{self.names[0]}"
        with self.log(log_name) as log:
            t0 = time.monotonic()
            agent = subprocess.Popen(
                self.agent_args(unreachable),
                stdout=log,
                stderr=log,
                cwd=self.workdir,
                env={**os.environ, **(env or {})},
                preexec_fn=(lambda: os.nice(self.nice)) if self.nice else None,
            )
        try:
            while True:
                try:
                    status, _ = http_get(self.socket, path, timeout=1)
                    if status == 200:
                        break
                except OSError:
                    pass
                if agent.poll() is not None:
                    raise RuntimeError(f"[{self.label}] the agent exited ({agent.returncode}): see {self.workdir}")
                if time.monotonic() - t0 > 30:
                    raise RuntimeError(f"[{self.label}] no answer from the disk cache in 30s")
                time.sleep(0.002)
            took = time.monotonic() - t0
            cpu_ms, runq_ms = schedstat(agent.pid)
            at_serve = proc_status(agent.pid)
            time.sleep(1.0)
            return {
                "cold_start_s": took,
                "cpu_ms": cpu_ms,
                "runq_wait_ms": runq_ms,
                "at_serve": at_serve,
                "settled": proc_status(agent.pid),
            }
        finally:
            stop(agent)

    def import_profile(self) -> dict[str, Any]:
        """One cold start under -X importtime: modules imported, their total time, heavy ones among them."""
        log = self.workdir / "importtime.log"
        log.unlink(missing_ok=True)
        self.cold_start(env={"PYTHONPROFILEIMPORTTIME": "1"}, log_name=log.name)
        mods: list[tuple[str, int, int]] = []
        for line in log.read_text(errors="replace").splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
            if m:
                mods.append((m.group(4), int(m.group(1)), int(m.group(2))))
        names = {m[0] for m in mods}
        heavy = sorted(h for h in HEAVY if any(n == h or n.startswith(h + ".") for n in names))
        top = sorted(((n, cum) for n, _, cum in mods), key=lambda x: -x[1])
        return {
            "modules": len(mods),
            "total_ms": sum(m[1] for m in mods) / 1000,
            "heavy": heavy,
            "top_cumulative_ms": [(n, c / 1000) for n, c in top[:12]],
        }


def _unsealed(addr: str) -> bool:
    try:
        r = httpx.get(f"{addr}/v1/sys/status", timeout=1)
    except httpx.TransportError:
        return False
    return r.status_code == 200 and r.json().get("sealed") is False


def wait_for(pred: Any, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready in {timeout:.0f}s")
        time.sleep(0.05)


# -- report ------------------------------------------------------------------------------------
def med(xs: list[float]) -> float:
    return statistics.median(xs)


def report(subjects: list[Subject], args: argparse.Namespace) -> str:
    lines = [
        f"agent_footprint: {args.secrets} secrets x {args.size} B, {args.restarts} cold starts each (round robin), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, CPython {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
        + (f", cold starts at nice {args.nice}" if args.nice else ""),
        "",
        "| command | VmRSS synced | VmHWM (peak) | VmRSS after reading all | anon + file | VmRSS cold-started "
        "| cold start median (min, max) | its CPU / run-queue wait | modules | import time min (median) "
        "| heavy packages loaded |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for s in subjects:
        r, imp = s.result, s.result["imports"]
        cs = [c["cold_start_s"] * 1000 for c in r["cold"]]
        after = r["after_reads"]
        lines.append(
            f"| {s.label} | {r['synced']['VmRSS']:.1f} MiB | {r['synced']['VmHWM']:.1f} MiB | {after['VmRSS']:.1f} MiB "
            f"| {after['RssAnon']:.1f} + {after['RssFile']:.1f} MiB "
            f"| {med([c['settled']['VmRSS'] for c in r['cold']]):.1f} MiB "
            f"| {med(cs):.0f} ms ({min(cs):.0f}, {max(cs):.0f}) "
            f"| {med([c['cpu_ms'] for c in r['cold']]):.0f} / {med([c['runq_wait_ms'] for c in r['cold']]):.0f} ms "
            f"| {imp['modules']} | {imp['total_ms_min']:.0f} ms ({imp['total_ms']:.0f}) "
            f"| {', '.join(imp['heavy']) or 'none'} |"
        )
    for s in subjects:
        top = ", ".join(f"{n} {ms:.0f}" for n, ms in s.result["imports"]["top_cumulative_ms"][:8])
        lines.append(f"\n[{s.label}] largest cumulative imports (ms, under the profiler): {top}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cmd",
        action="append",
        metavar="LABEL=COMMAND",
        help="a vault-edge command to measure (repeat to compare; default: this venv's vault-edge)",
    )
    ap.add_argument("--secrets", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256, help="bytes per secret value")
    ap.add_argument("--restarts", type=int, default=7, help="cold starts per command")
    ap.add_argument("--import-runs", type=int, default=5, help="starts under -X importtime per command")
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the cold-started agents at this niceness (e.g. -10, as root: less of the wait for a "
        "CPU that other work on a shared machine adds)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directories (logs, state)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()

    cmds = args.cmd or [f"this-tree={Path(sys.executable).parent / 'vault-edge'}"]
    base = Path(tempfile.mkdtemp(prefix="ve-fp-", dir="/tmp"))  # short: unix socket paths <= 108 bytes
    subjects = []
    for i, spec in enumerate(cmds):
        label, sep, command = spec.partition("=")
        if not sep:
            label, command = f"cmd{i}", spec
        d = base / str(i)
        d.mkdir()
        argv = shlex.split(command)
        if "/" in argv[0]:  # the processes run in their own work directory
            argv[0] = str(Path(argv[0]).resolve())
        subjects.append(Subject(label, argv, d, nice=args.nice))
    try:
        for s in subjects:
            s.setup(args.secrets, args.size, not args.quiet)
            s.result["cold"] = []
        for r in range(args.restarts):
            for s in subjects:
                c = s.cold_start()
                s.result["cold"].append(c)
                if not args.quiet:
                    print(
                        f"[{s.label}] cold start {r + 1}: {c['cold_start_s'] * 1000:.0f} ms, "
                        f"RSS {c['settled']['VmRSS']:.1f} MiB",
                        file=sys.stderr,
                    )
        for s in subjects:
            s.result["import_runs"] = []
        for _ in range(args.import_runs):
            for s in subjects:
                s.result["import_runs"].append(s.import_profile())
        for s in subjects:
            runs = s.result["import_runs"]
            totals = [r["total_ms"] for r in runs]
            s.result["imports"] = {
                **runs[-1],
                "total_ms": med(totals),
                "total_ms_min": min(totals),
                "total_ms_all": totals,
            }
        text = report(subjects, args)
        print(text)
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        path = out / f"agent_footprint-{time.strftime('%Y%m%dT%H%M%S')}.json"
        path.write_text(
            json.dumps(
                {"args": vars(args), "subjects": [{"label": s.label, "cmd": s.cmd, **s.result} for s in subjects]},
                indent=1,
            )
        )
        print(f"\nraw results: {path.relative_to(ROOT)}", file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
