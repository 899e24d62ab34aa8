"""Rotation propagation: from ``rotate`` returning to every one of N agents serving the new value.

For each backend (SQLite file, PostgreSQL) and each N, on a fresh database: start a real
``vault-edge server``, init and unseal it through the operator API, create a region and a secret,
make N join tokens, and start ``bench/sim_agents.py`` (N simulated agents in one uvloop process, or
``--procs P`` processes; each agent speaks the real signed long-poll protocol with the agent's code).
Then, T times: wait until the control plane holds all N long-polls (its ``vault_edge_sync_waiting``
gauge), arm the fleet with a fresh value, call ``rotate`` through ``OperatorClient`` and take
``t0 = monotonic()`` when it returns; agent i's sample is ``t_i - t0``, ``t_i`` the monotonic time its installed view
first served the value (CLOCK_MONOTONIC is system-wide). p50/p99 are nearest-rank over the samples
(N per trial, N*T aggregated). Per trial it also takes the CPU seconds the server and the fleet used
(/proc/PID/stat), which says which side a slow propagation is waiting for.

    .venv/bin/python bench/propagation.py --agents 10,100,1000 --backends sqlite,postgres --trials 5 --procs 2

Raw results go to bench/results/propagation-<timestamp>.json (gitignored). ``--server-profile DIR``
runs the control plane under cProfile (event-loop thread only) and ``--py-spy PATH`` samples the
server and the fleet with py-spy during the trials (GIL samples); both only for diagnosis. Results
and method: the Propagation section of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vault_edge.operator import OperatorClient

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
REGION = "bench"
SECRET = "bench/provider-key"


# -- helpers -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(sorted_xs: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_xs:
        return math.nan
    return sorted_xs[max(0, math.ceil(p / 100 * len(sorted_xs)) - 1)]


def summary(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"n": len(s), "min": s[0], "p50": pct(s, 50), "p90": pct(s, 90), "p99": pct(s, 99), "max": s[-1]}


TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Lines:
    """JSON lines from a child's stdout, through a thread, with timeouts."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc, self.q = proc, queue.Queue[dict[str, Any] | None]()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.q.put(json.loads(line))
        self.q.put(None)

    def next(self, timeout: float, want: str | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {want or 'event'} from the agent fleet in {timeout:.0f}s")
            try:
                ev = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if ev is None:
                raise RuntimeError(f"the agent fleet exited (code {self.proc.wait()})")
            if ev["event"] == "error":
                raise RuntimeError(f"agent fleet: {ev}")
            if want is None or ev["event"] == want:
                return ev


# -- databases and the control plane -----------------------------------------------------------
class Database:
    def __init__(self, backend: str, workdir: Path, pg_server: str) -> None:
        self.backend, self.pg_server, self.pg_name = backend, pg_server, None
        if backend == "sqlite":
            self.url = str(workdir / "vault.db")
        else:
            import psycopg

            self.pg_name = f"ve_bench_{secrets.token_hex(4)}"
            with psycopg.connect(self._admin_url(), autocommit=True) as c:
                c.execute(f'CREATE DATABASE "{self.pg_name}"')
            self.url = f"{pg_server}/{self.pg_name}"

    def _admin_url(self) -> str:
        return self.pg_server.replace("postgresql+psycopg://", "postgresql://") + "/postgres"

    def drop(self) -> None:
        if self.pg_name:
            import psycopg

            with psycopg.connect(self._admin_url(), autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')


class Server:
    def __init__(self, db: str, workdir: Path, profile: str | None, wrapper: str | None = None) -> None:
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "server.log", "wb")  # noqa: SIM115
        cmd = [PY]
        if profile:
            cmd += ["-m", "cProfile", "-o", profile]
        cmd += [wrapper] if wrapper else ["-m", "vault_edge"]
        cmd += ["server", "--db", db, "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(workdir / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(self.addr + "/v1/sys/status", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.1)

    def waiting(self) -> float:
        text = httpx.get(self.addr + "/metrics", timeout=60).text
        m = re.search(r"^vault_edge_sync_waiting (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn exits cleanly, so cProfile writes its file
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Spy:
    """py-spy sampling one process into collapsed stacks: only the thread holding the GIL (Python CPU;
    py-spy's idle detection does not work in this container), without pausing the process."""

    def __init__(self, py_spy: str, pid: int, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", "100", "--nonblocking", "--gil",
                                      "--format", "raw", "-o", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- the simulated fleet ----------------------------------------------------------------------
class Fleet:
    """``bench/sim_agents.py`` in P processes (N/P agents each), driven together."""

    def __init__(self, server: Server, tokens: list[str], workdir: Path, args: argparse.Namespace) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.events: list[Lines] = []
        shards = [tokens[i::args.procs] for i in range(args.procs) if tokens[i::args.procs]]
        for i, shard in enumerate(shards):
            tok_file = workdir / f"tokens-{i}"
            tok_file.write_text("\n".join(shard) + "\n")
            os.chmod(tok_file, 0o600)
            cmd = [PY, str(ROOT / "bench" / "sim_agents.py"), "--server", server.addr, "--secret", SECRET,
                   "--tokens", str(tok_file), "--wait", str(args.wait), "--state-root", str(workdir)]
            if args.no_disk_cache:
                cmd.append("--no-disk-cache")
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            self.procs.append(proc)
            self.events.append(Lines(proc))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def send(self, cmd: dict[str, Any]) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(json.dumps(cmd) + "\n")
            p.stdin.flush()

    def gather(self, want: str, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [ev.next(max(0.0, deadline - time.monotonic()), want) for ev in self.events]

    def ready(self) -> dict[str, Any]:
        evs = self.gather("ready", 900)  # every process enrols its shard at the same time
        return {"enrol_s": max(e["enrol_s"] for e in evs), "enrol_max_s": max(e["enrol_max_s"] for e in evs),
                "first_sync_s": max(e["first_sync_s"] for e in evs), "log": [e["log"] for e in evs]}

    def report(self) -> dict[str, Any]:
        self.send({"cmd": "report"})
        evs = self.gather("report", 60)
        return {"times": [x for e in evs for x in e["times"]], "log": [e["log"] for e in evs],
                "samples": [e["samples"] for e in evs]}

    def cpu(self) -> float:
        return sum(cpu_s(pid) for pid in self.pids)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None and p.stdin is not None:
                try:
                    p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                    p.stdin.flush()
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# -- one series ----------------------------------------------------------------------------------
@dataclass
class Series:
    backend: str
    n: int
    procs: int
    trials: list[dict[str, Any]] = field(default_factory=list)
    ready: dict[str, Any] = field(default_factory=dict)
    tokens_s: float = 0.0
    failed: str | None = None


def wait_all_held(server: Server, n: int, timeout: float) -> float:
    t = time.monotonic()
    while server.waiting() < n:
        if time.monotonic() - t > timeout:
            raise TimeoutError(f"the control plane holds {server.waiting():.0f}/{n} long-polls after {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - t


def run_series(backend: str, n: int, args: argparse.Namespace, stamp: str) -> Series:
    series = Series(backend, n, min(args.procs, n))
    tag = f"{backend}-{n}"
    workdir = Path(tempfile.mkdtemp(prefix=f"ve-prop-{tag}-"))
    db = Database(backend, workdir, args.pg)
    server: Server | None = None
    fleet: Fleet | None = None
    spies: list[Spy] = []
    try:
        profile = str(Path(args.server_profile) / f"server-{tag}.prof") if args.server_profile else None
        server = Server(db.url, workdir, profile, args.server_wrapper)
        with OperatorClient(server.addr, "") as c:
            doc = c.init(shares=3, threshold=2)
            for share in doc["shares"][:2]:
                c.unseal(share)
        op = OperatorClient(server.addr, doc["root_token"], timeout=120)
        op.create_region(REGION)
        op.put(SECRET, value="initial-" + secrets.token_hex(8), regions=[REGION])
        t = time.monotonic()
        tokens = [op.join_token(REGION)["token"] for _ in range(n)]
        series.tokens_s = time.monotonic() - t
        fleet = Fleet(server, tokens, workdir, args)
        series.ready = fleet.ready()
        print(f"  [{tag}] {n} agents in {len(fleet.procs)} process(es) enrolled in {series.ready['enrol_s']:.2f}s "
              f"(join tokens {series.tokens_s:.2f}s), all serving after {series.ready['first_sync_s']:.2f}s more",
              flush=True)
        if args.py_spy:
            spies = [Spy(args.py_spy, pid, Path(args.results) / f"pyspy-{who}-{tag}-{stamp}.txt")
                     for who, pid in (("server", server.proc.pid), *((f"agents{i}", p)
                                                                     for i, p in enumerate(fleet.pids)))]
        for k in range(args.trials):
            held_s = wait_all_held(server, n, 120)
            time.sleep(args.pause)
            value = f"rotated-{k}-{secrets.token_hex(12)}"
            fleet.send({"cmd": "expect", "trial": k, "value": value})
            fleet.gather("armed", 30)
            cpu0 = (cpu_s(server.proc.pid), fleet.cpu())
            t_call = time.monotonic()
            res = op.rotate(SECRET, value=value)
            t0 = time.monotonic()
            try:
                times = [x for e in fleet.gather("done", args.timeout) for x in e["times"]]
            except TimeoutError:
                rep = fleet.report()
                missing = sum(1 for x in rep["times"] if x is None)
                series.failed = (f"trial {k}: {missing}/{n} agents never served the value in {args.timeout:.0f}s; "
                                 f"agent log counts {rep['log']}")
                print("  " + series.failed, flush=True)
                break
            cpu1 = (cpu_s(server.proc.pid), fleet.cpu())
            lat = [x - t0 for x in times]
            s = summary(lat)
            # CPU each side used from the rotate call to the last done event: the propagation, and
            # the re-polls of the agents served first (they overlap on a real fleet as well).
            cpu = {"server_cpu_s": cpu1[0] - cpu0[0], "agents_cpu_s": cpu1[1] - cpu0[1],
                   "window_s": max(times) - t_call}
            series.trials.append({"trial": k, "revision": res["revision"], "rotate_call_s": t0 - t_call,
                                  "t_call_monotonic": t_call, "t0_monotonic": t0,
                                  "rearm_s": held_s, "latencies_s": lat, **cpu,
                                  **{f"{key}_s": v for key, v in s.items() if key != "n"}})
            print(f"  [{tag}] trial {k}: p50 {s['p50'] * 1e3:7.1f} ms  p99 {s['p99'] * 1e3:7.1f} ms  "
                  f"max {s['max'] * 1e3:7.1f} ms  (rotate call {(t0 - t_call) * 1e3:.0f} ms, re-arm {held_s:.2f}s, "
                  f"cpu server {cpu['server_cpu_s']:.2f}s agents {cpu['agents_cpu_s']:.2f}s)", flush=True)
        for spy in spies:
            spy.stop()
        spies = []
        rep = fleet.report()
        series.ready["final_log"], series.ready["final_log_samples"] = rep["log"], rep["samples"]
    except Exception as exc:
        series.failed = f"{type(exc).__name__}: {exc}"
        print(f"  [{tag}] FAILED: {series.failed}", flush=True)
    finally:
        for spy in spies:
            spy.stop()
        if fleet is not None:
            fleet.close()
        if server is not None:
            server.stop()
            if series.failed:
                print(f"  server log tail ({workdir / 'server.log'}):\n"
                      + (workdir / "server.log").read_text(errors="replace")[-1500:], flush=True)
        db.drop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return series


# -- report ------------------------------------------------------------------------------------
def table(results: list[Series]) -> str:
    rows = ["| backend | N | agent procs | trials | p50 (ms) | p99 (ms) | max (ms) | worst trial p99 (ms) "
            "| rotate call (ms) | CPU s per rotation: server / agents | enrol N (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if not r.trials:
            rows.append(f"| {r.backend} | {r.n} | {r.procs} | 0 | failed: {r.failed} | | | | | | |")
            continue
        med = len(r.trials) // 2
        cpu_server = sorted(t["server_cpu_s"] for t in r.trials)[med]
        cpu_agents = sorted(t["agents_cpu_s"] for t in r.trials)[med]
        allx = [x for t in r.trials for x in t["latencies_s"]]
        s = summary(allx)
        worst = max(t["p99_s"] for t in r.trials)
        call = sorted(t["rotate_call_s"] for t in r.trials)[med]
        note = f" ({len(r.trials)} ok, then {r.failed})" if r.failed else ""
        rows.append(f"| {r.backend} | {r.n} | {r.procs} | {len(r.trials)}{note} | {s['p50'] * 1e3:.0f} "
                    f"| {s['p99'] * 1e3:.0f} | {s['max'] * 1e3:.0f} | {worst * 1e3:.0f} | {call * 1e3:.0f} "
                    f"| {cpu_server:.2f} / {cpu_agents:.2f} | {r.ready.get('enrol_s', 0):.1f} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", default="10,100,1000", help="comma-separated N")
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--pause", type=float, default=1.0, help="seconds between all polls held again and a rotation")
    p.add_argument("--wait", type=float, default=30.0, help="the agents' long-poll hold (agent default 30 s)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-trial limit for all N to serve")
    p.add_argument("--procs", type=int, default=1, help="agent-fleet processes (N/P simulated agents each)")
    p.add_argument("--no-disk-cache", action="store_true", help="simulated agents skip their cache file")
    p.add_argument("--pg", default=os.environ.get("VAULT_EDGE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432"))
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--server-profile", help="directory: run the server under cProfile, one .prof per series")
    p.add_argument("--py-spy", help="path to py-spy: sample the server and the agent fleet during the trials "
                   "(collapsed stacks in --results)")
    p.add_argument("--server-wrapper", help="diagnosis: a script run as `python SCRIPT server ...` instead of "
                   "`python -m vault_edge server ...` (an instrumented or patched control plane)")
    p.add_argument("--keep", action="store_true", help="keep work dirs (server logs, profiles)")
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the server and the fleet
    if args.server_profile:
        Path(args.server_profile).mkdir(parents=True, exist_ok=True)

    results: list[Series] = []
    started = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started))
    for backend in args.backends.split(","):
        for n in (int(x) for x in args.agents.split(",")):
            print(f"{backend}, N={n}:", flush=True)
            results.append(run_series(backend, n, args, stamp))
    out = table(results)
    print()
    print(out)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    raw = Path(args.results) / f"propagation-{stamp}.json"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "vault_edge"], capture_output=True,
                           text=True).stdout.strip()
    raw.write_text(json.dumps({
        "started": started, "argv": sys.argv, "commit": head, "vault_edge_dirty": bool(dirty),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "series": [r.__dict__ for r in results]}, indent=1))
    print(f"\nraw results: {raw}")
    return 0 if all(not r.failed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
