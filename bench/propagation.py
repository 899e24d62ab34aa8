"""Rotation propagation: from ``rotate`` returning to every one of N agents serving the new value.

For each backend (SQLite file, PostgreSQL) and each N, on a fresh database: start a real
``vault-edge server`` (with PostgreSQL, ``--replicas K`` of them on the one database), init and
unseal it through the operator API, create ``--regions R`` regions, put the measured secret in all
of them and ``--secrets S`` filler secrets of 256 bytes in each, make N join tokens (agent i in
region i mod R, on replica (i div R) mod K, so each region's agents are spread over the replicas),
and start ``bench/sim_agents.py`` (N simulated agents in ``--procs P`` uvloop processes; each agent
speaks the real signed long-poll protocol with the agent's code). Once the control plane holds all N
long-polls (the sum of the replicas' ``vault_edge_sync_waiting`` gauges) it samples the replicas'
RSS and CPU over ``--idle`` seconds. Then, T times: wait until all N polls are held again, arm the
fleet with a fresh value, call ``rotate`` through ``OperatorClient`` (on the first replica) and take
``t0 = monotonic()`` when it returns; agent i's sample is ``t_i - t0``, ``t_i`` the monotonic time its
installed view first served the value (CLOCK_MONOTONIC is system-wide). p50/p99 are nearest-rank
over the samples (N per trial, N*T aggregated). Per trial it also takes the CPU seconds the servers
and the fleet used (/proc/PID/stat), which says which side a slow propagation is waiting for, and the
bytes the agents received (sync answer bodies, ``Syncer.received_bytes``; headers counted apart).

Before anything starts it checks that the file-descriptor limits (each fleet process and each
replica), the system's file table and the ephemeral port range allow the largest N asked for, and
stops with what to change otherwise.

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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vault_edge.operator import OperatorClient

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SECRET = "bench/provider-key"
FILLER_BYTES = 256
MAX_LISTED_REGIONS = 256  # a secret's region list (the API's bound); past it the secret goes to "*"
UVICORN_BACKLOG = 2048  # uvicorn's default listen backlog (the server CLI does not change it)


def region_names(r: int) -> list[str]:
    return [f"bench-{i:03d}" for i in range(r)]


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


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else math.nan


TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def status_kb(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` field in kB (VmRSS, VmHWM)."""
    m = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def nofile_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE a running process has (``/proc/PID/limits``)."""
    m = re.search(r"^Max open files\s+(\d+|unlimited)", Path(f"/proc/{pid}/limits").read_text(), re.M)
    return 1 << 30 if m is None or m.group(1) == "unlimited" else int(m.group(1))


def raise_nofile() -> None:
    """preexec_fn for the control plane: its soft fd limit up to the hard one (it holds a socket per poll)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- what the machine allows, checked before anything starts -----------------------------------
def fleet_fds(agents: int) -> int:
    """File descriptors one fleet process may need: each agent's client holds up to 2 connections
    (``max_connections=2``; one in steady state), plus cache files, threads' pipes, stdio."""
    return 2 * agents + 256


def server_fds(polls: int, enrol_concurrency: int) -> int:
    """One replica: a socket per held poll, the enrolments in flight, its database pool, logs."""
    return polls + enrol_concurrency + 256


def preflight(ns: list[int], backends: list[str], args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(problems that stop the run, warnings) for the largest series asked for."""
    problems, warnings = [], []
    n = max(ns)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_proc = math.ceil(n / min(args.procs, n))
    replicas = min((args.replicas if b == "postgres" else 1) for b in backends)  # the fewest: most polls each
    per_replica = math.ceil(n / replicas)
    need_fleet, need_server = fleet_fds(per_proc), server_fds(per_replica, args.enrol_concurrency)
    if hard < need_fleet:
        more = math.ceil(2 * n / max(1, hard - 256))
        problems.append(
            f"RLIMIT_NOFILE hard limit {hard} < {need_fleet} needed by each fleet process "
            f"({per_proc} agents x 2 connections + 256): use --procs {more} or more, or raise the "
            "hard limit (ulimit -Hn; limits.conf / LimitNOFILE)"
        )
    if hard < need_server:
        problems.append(
            f"RLIMIT_NOFILE hard limit {hard} < {need_server} needed by a control plane holding "
            f"{per_replica} long-polls: raise the hard limit (ulimit -Hn), or (PostgreSQL) --replicas"
        )
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    if hard < max(need_fleet, need_server) and nr_open < max(need_fleet, need_server):
        problems.append(f"fs.nr_open {nr_open} caps any process's fd limit below what is needed: raise it first")
    file_max = int(Path("/proc/sys/fs/file-max").read_text())
    in_use = int(Path("/proc/sys/fs/file-nr").read_text().split()[0])
    total = need_fleet * min(args.procs, n) + need_server * replicas
    if total > file_max - in_use:
        problems.append(
            f"the system file table (fs.file-max {file_max}, {in_use} in use) cannot take the "
            f"~{total} descriptors of the fleet and the control plane: raise fs.file-max"
        )
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = hi - lo + 1
    # Every agent connects from 127.0.0.1 to one replica's port: one ephemeral port per connection to
    # it (a connection it closes keeps its port in TIME_WAIT for 60 s).
    if per_replica > ports:
        problems.append(
            f"the ephemeral port range {lo}-{hi} ({ports} ports) is smaller than the {per_replica} "
            "connections to one replica's port: widen net.ipv4.ip_local_port_range"
        )
    elif 2 * per_replica > ports:
        warnings.append(
            f"the ephemeral port range {lo}-{hi} ({ports} ports) leaves little room over the "
            f"{per_replica} connections to one replica's port (reconnections, TIME_WAIT)"
        )
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    backlog = min(somaxconn, UVICORN_BACKLOG)
    if args.enrol_concurrency > backlog:
        warnings.append(
            f"--enrol-concurrency {args.enrol_concurrency} is above the listen backlog ({backlog}: "
            "uvicorn's 2048, net.core.somaxconn): connections beyond it wait for SYN retransmits"
        )
    # The fleet's memory, from smoke runs of this simulator: ~60 MB per process, and per agent ~50 kB
    # plus ~1.6 kB per secret its region holds (its decrypted view); rounded up.
    fleet_mb = min(args.procs, n) * 60 + n * (64 + 2 * (args.secrets + 1)) / 1024
    avail_mb = int(re.search(r"^MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M).group(1)) / 1024
    if fleet_mb > 0.7 * avail_mb:
        problems.append(
            f"the simulated fleet would need ~{fleet_mb / 1024:.1f} GB ({n} agents with {args.secrets + 1} "
            f"secrets each) against {avail_mb / 1024:.1f} GB available: fewer --secrets at this N"
        )
    warnings.append(
        f"N = {n}: fleet memory ~{fleet_mb / 1024:.1f} GB of {avail_mb / 1024:.1f} GB available; "
        f"fd limit {soft} soft / {hard} hard (raised to the hard one for the fleet and the "
        f"servers); each fleet process needs {need_fleet} ({per_proc} agents), each replica "
        f"{need_server}; ephemeral ports {ports}, {per_replica} connections per replica port; "
        f"listen backlog {backlog}"
    )
    return problems, warnings


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
    def __init__(
        self, db: str, workdir: Path, profile: str | None, wrapper: str | None = None, name: str = "server"
    ) -> None:
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        cmd = [PY]
        if profile:
            cmd += ["-m", "cProfile", "-o", profile]
        cmd += [wrapper] if wrapper else ["-m", "vault_edge"]
        cmd += ["server", "--db", db, "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=raise_nofile)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.addr + "/v1/sys/status", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.1)

    def waiting(self) -> float:
        # only this gauge: a whole scrape reads every node from the database (the fleet gauges)
        text = httpx.get(self.addr + "/metrics?name[]=vault_edge_sync_waiting", timeout=60).text
        m = re.search(r"^vault_edge_sync_waiting (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def rss_kb(self) -> int:
        return status_kb(self.proc.pid, "VmRSS")

    def cpu(self) -> float:
        return cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn exits cleanly, so cProfile writes its file
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Plane:
    """The control plane: one server, or (PostgreSQL) several replicas on one database."""

    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers

    def waiting(self) -> float:
        return sum(s.waiting() for s in self.servers)

    def cpu(self) -> float:
        return sum(s.cpu() for s in self.servers)

    def rss_kb(self) -> list[int]:
        return [s.rss_kb() for s in self.servers]


class Spy:
    """py-spy sampling one process into collapsed stacks: only the thread holding the GIL (Python CPU;
    py-spy's idle detection does not work in this container), without pausing the process."""

    def __init__(self, py_spy: str, pid: int, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                "100",
                "--nonblocking",
                "--gil",
                "--format",
                "raw",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- the simulated fleet ----------------------------------------------------------------------
class Fleet:
    """``bench/sim_agents.py`` in P processes (N/P agents each), driven together. ``assigned`` is one
    ``(replica URL, join token)`` per agent."""

    def __init__(self, assigned: list[tuple[str, str]], workdir: Path, args: argparse.Namespace) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.events: list[Lines] = []
        nprocs = min(args.procs, len(assigned))
        shards = [assigned[i::nprocs] for i in range(nprocs)]
        concurrency = math.ceil(args.enrol_concurrency / nprocs) if args.enrol_concurrency else 0
        for i, shard in enumerate(shards):
            tok_file = workdir / f"tokens-{i}"
            tok_file.write_text("".join(f"{url} {token}\n" for url, token in shard))
            os.chmod(tok_file, 0o600)
            cmd = [
                PY,
                str(ROOT / "bench" / "sim_agents.py"),
                "--server",
                shard[0][0],
                "--secret",
                SECRET,
                "--tokens",
                str(tok_file),
                "--wait",
                str(args.wait),
                "--state-root",
                str(workdir),
                "--enrol-concurrency",
                str(concurrency),
                "--ready-timeout",
                str(args.ready_timeout),
            ]
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

    def ready(self, timeout: float) -> dict[str, Any]:
        evs = self.gather("ready", timeout + 60)  # every process starts its shard at the same time
        return {
            "enrol_s": max(e["enrol_s"] for e in evs),
            "enrol_max_s": max(e["enrol_max_s"] for e in evs),
            "enrol_p50_s": median([e["enrol_p50_s"] for e in evs]),
            "first_sync_s": max(e["first_sync_s"] for e in evs),
            "full_bytes": [x for e in evs for x in e["full_bytes"]],
            "log": [e["log"] for e in evs],
        }

    def report(self) -> dict[str, Any]:
        self.send({"cmd": "report"})
        evs = self.gather("report", 60)
        return {
            "times": [x for e in evs for x in e["times"]],
            "log": [e["log"] for e in evs],
            "samples": [e["samples"] for e in evs],
        }

    def cpu(self) -> float:
        return sum(cpu_s(pid) for pid in self.pids)

    def rss_kb(self) -> int:
        return sum(status_kb(pid, "VmRSS") for pid in self.pids)

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
    regions: int
    secrets: int
    replicas: int
    trials: list[dict[str, Any]] = field(default_factory=list)
    ready: dict[str, Any] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)
    idle: dict[str, Any] = field(default_factory=dict)
    tokens_s: float = 0.0
    failed: str | None = None


def log_total(per_proc: list[dict[str, int]]) -> Counter[str]:
    """The fleet processes' counts of the agents' warnings and errors, summed by kind."""
    total: Counter[str] = Counter()
    for counts in per_proc:
        total.update(counts)
    return total


def wait_all_held(plane: Plane, n: int, timeout: float) -> float:
    t = time.monotonic()
    while plane.waiting() < n:
        if time.monotonic() - t > timeout:
            raise TimeoutError(f"the control plane holds {plane.waiting():.0f}/{n} long-polls after {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - t


def populate(
    op: OperatorClient, addr: str, token: str, args: argparse.Namespace, n: int, series: Series, replicas: list[str]
) -> list[tuple[str, str]]:
    """Regions, the measured secret in all of them, the filler secrets, and N join tokens, each with
    the replica its agent polls."""
    t = time.monotonic()
    regions = region_names(args.regions)
    for r in regions:
        op.create_region(r)
    where = regions if len(regions) <= MAX_LISTED_REGIONS else ["*"]
    op.put(SECRET, value="initial-" + secrets.token_hex(8), regions=where)
    series.setup["regions_s"] = time.monotonic() - t
    # Filler: S secrets, each in every region (so each region holds S + 1 secrets), put through a few
    # clients at once. A region's view is the same whether its secrets are its own or shared.
    t = time.monotonic()

    def fill(idx: range) -> None:
        with OperatorClient(addr, token, timeout=120) as c:
            for i in idx:
                c.put(f"fill/{i:05d}", value=secrets.token_hex(FILLER_BYTES // 2), regions=where)

    workers = 4
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(fill, [range(w, args.secrets, workers) for w in range(workers)]))
    series.setup["secrets_s"] = time.monotonic() - t

    t = time.monotonic()

    def tokens(idx: range) -> list[tuple[int, str]]:
        with OperatorClient(addr, token, timeout=120) as c:
            return [(g, c.join_token(regions[g % len(regions)])["token"]) for g in idx]

    with ThreadPoolExecutor(workers) as ex:
        made = dict(x for part in ex.map(tokens, [range(w, n, workers) for w in range(workers)]) for x in part)
    series.tokens_s = time.monotonic() - t
    # agent g: region g mod R, replica (g div R) mod K (a region's agents alternate over the replicas)
    return [(replicas[(g // len(regions)) % len(replicas)], made[g]) for g in range(n)]


def run_series(backend: str, n: int, args: argparse.Namespace, stamp: str) -> Series:
    replicas = args.replicas if backend == "postgres" else 1
    series = Series(backend, n, min(args.procs, n), args.regions, args.secrets, replicas)
    tag = f"{backend}-{n}"
    workdir = Path(tempfile.mkdtemp(prefix=f"ve-prop-{tag}-"))
    db = Database(backend, workdir, args.pg)
    servers: list[Server] = []
    fleet: Fleet | None = None
    spies: list[Spy] = []
    try:
        for k in range(replicas):
            profile = str(Path(args.server_profile) / f"server{k or ''}-{tag}.prof") if args.server_profile else None
            servers.append(Server(db.url, workdir, profile, args.server_wrapper, f"server{k or ''}"))
            if k == 0:
                with OperatorClient(servers[0].addr, "") as c:
                    doc = c.init(shares=3, threshold=2)
            with OperatorClient(servers[k].addr, "") as c:
                for share in doc["shares"][:2]:
                    c.unseal(share)
        plane = Plane(servers)
        need = server_fds(math.ceil(n / replicas), args.enrol_concurrency)
        limits = [nofile_limit(s.proc.pid) for s in servers]
        if min(limits) < need:
            raise RuntimeError(
                f"a control plane runs with an fd limit of {min(limits)} (< {need} for "
                f"{math.ceil(n / replicas)} held polls): raise the hard limit (ulimit -Hn)"
            )
        series.setup["server_nofile"] = limits
        op = OperatorClient(servers[0].addr, doc["root_token"], timeout=120)
        assigned = populate(op, servers[0].addr, doc["root_token"], args, n, series, [s.addr for s in servers])
        replica_of = [[sv.addr for sv in servers].index(url) for url, _token in assigned]
        time.sleep(1.0)  # let the servers settle (view loads after the puts) before the baseline
        series.setup["baseline_rss_kb"] = plane.rss_kb()
        cpu_start = (plane.cpu(), time.monotonic())
        fleet = Fleet(assigned, workdir, args)
        series.ready = fleet.ready(args.ready_timeout)
        series.ready["start_server_cpu_s"] = plane.cpu() - cpu_start[0]
        series.ready["start_fleet_cpu_s"] = fleet.cpu()
        series.ready["start_s"] = time.monotonic() - cpu_start[1]
        full = sorted(series.ready["full_bytes"])
        series.ready["full_view_bytes"] = {"p50": pct(full, 50), "max": full[-1]}
        print(
            f"  [{tag}] {n} agents in {len(fleet.procs)} process(es), {args.regions} region(s), "
            f"{args.secrets} filler secret(s), {replicas} replica(s): setup "
            f"{series.setup['regions_s'] + series.setup['secrets_s']:.1f}s, join tokens {series.tokens_s:.1f}s, "
            f"enrolled in {series.ready['enrol_s']:.2f}s (each {series.ready['enrol_p50_s'] * 1e3:.0f} ms p50, "
            f"{series.ready['enrol_max_s'] * 1e3:.0f} ms max), all serving after {series.ready['first_sync_s']:.2f}s "
            f"more (CPU s: server {series.ready['start_server_cpu_s']:.1f}, fleet "
            f"{series.ready['start_fleet_cpu_s']:.1f}); full view {full[len(full) // 2]} bytes",
            flush=True,
        )
        if args.idle > 0:
            held_s = wait_all_held(plane, n, 300)
            time.sleep(1.0)
            rss0, cpu0, fleet_cpu0, t = plane.rss_kb(), plane.cpu(), fleet.cpu(), time.monotonic()
            time.sleep(args.idle)
            rss1, cpu1, fleet_cpu1, dt = plane.rss_kb(), plane.cpu(), fleet.cpu(), time.monotonic() - t
            base = series.setup["baseline_rss_kb"]
            series.idle = {
                "held_s": held_s,
                "window_s": dt,
                "rss_kb": rss1,
                "rss_start_kb": rss0,
                "server_cpu_per_s": (cpu1 - cpu0) / dt,
                "fleet_cpu_per_s": (fleet_cpu1 - fleet_cpu0) / dt,
                "rss_per_poll_kb": (sum(rss1) - sum(base)) / n,
                "fleet_rss_kb": fleet.rss_kb(),
                "waiting_end": [sv.waiting() for sv in servers],
            }
            print(
                f"  [{tag}] idle {dt:.0f}s holding {n} polls: server RSS {sum(rss1) / 1024:.0f} MB "
                f"(baseline {sum(base) / 1024:.0f} MB, {series.idle['rss_per_poll_kb']:.1f} kB per poll), "
                f"server CPU {series.idle['server_cpu_per_s']:.3f} s/s, polls held per replica "
                f"{'+'.join(f'{w:.0f}' for w in series.idle['waiting_end'])}, fleet RSS "
                f"{series.idle['fleet_rss_kb'] / 1024:.0f} MB ({series.idle['fleet_rss_kb'] / n:.0f} kB per "
                f"agent)",
                flush=True,
            )
        if args.py_spy:
            spies = [
                Spy(args.py_spy, pid, Path(args.results) / f"pyspy-{who}-{tag}-{stamp}.txt")
                for who, pid in (
                    *((f"server{k or ''}", s.proc.pid) for k, s in enumerate(servers)),
                    *((f"agents{i}", p) for i, p in enumerate(fleet.pids)),
                )
            ]
        for k in range(args.trials):
            held_s = wait_all_held(plane, n, 120)
            time.sleep(args.pause)
            value = f"rotated-{k}-{secrets.token_hex(12)}"
            fleet.send({"cmd": "expect", "trial": k, "value": value})
            fleet.gather("armed", 30)
            cpu0 = (plane.cpu(), fleet.cpu())
            t_call = time.monotonic()
            res = op.rotate(SECRET, value=value)
            t0 = time.monotonic()
            try:
                done = fleet.gather("done", args.timeout)
            except TimeoutError:
                rep = fleet.report()
                missing = sum(1 for x in rep["times"] if x is None)
                series.failed = (
                    f"trial {k}: {missing}/{n} agents never served the value in {args.timeout:.0f}s; "
                    f"agent log counts {rep['log']}"
                )
                print("  " + series.failed, flush=True)
                break
            cpu1 = (plane.cpu(), fleet.cpu())
            times = [x for e in done for x in e["times"]]
            per_agent = [x for e in done for x in e["bytes"]]
            per_agent_h = [x for e in done for x in e["header_bytes"]]
            lat = [x - t0 for x in times]
            s = summary(lat)
            if replicas > 1:  # process i ran agents i, i + P, i + 2P, ... (Fleet's shards)
                by: dict[int, list[float]] = {}
                for i, e in enumerate(done):
                    for j, x in enumerate(e["times"]):
                        by.setdefault(replica_of[i + j * len(done)], []).append(x - t0)
                by_replica = {k: summary(v) for k, v in sorted(by.items())}
            # CPU each side used from the rotate call to the last done event: the propagation, and
            # the re-polls of the agents served first (they overlap on a real fleet as well).
            cpu = {
                "server_cpu_s": cpu1[0] - cpu0[0],
                "agents_cpu_s": cpu1[1] - cpu0[1],
                "window_s": max(times) - t_call,
            }
            # Bytes: what the fleet received from arming to each process's done, per agent; and each
            # agent's own from arming to serving the value (sync answer bodies; headers apart).
            nbytes = {
                "bytes_per_node": sum(e["total_bytes"] for e in done) / n,
                "header_bytes_per_node": sum(e["total_header_bytes"] for e in done) / n,
                "bytes_agent_max": max(per_agent),
                "bytes_agent_min": min(per_agent),
                "header_bytes_agent_max": max(per_agent_h),
            }
            series.trials.append(
                {
                    "trial": k,
                    "revision": res["revision"],
                    "rotate_call_s": t0 - t_call,
                    "t_call_monotonic": t_call,
                    "t0_monotonic": t0,
                    "rearm_s": held_s,
                    "latencies_s": lat,
                    **cpu,
                    **nbytes,
                    "by_replica": by_replica if replicas > 1 else None,
                    **{f"{key}_s": v for key, v in s.items() if key != "n"},
                }
            )
            print(
                f"  [{tag}] trial {k}: p50 {s['p50'] * 1e3:7.1f} ms  p99 {s['p99'] * 1e3:7.1f} ms  "
                f"max {s['max'] * 1e3:7.1f} ms  (rotate call {(t0 - t_call) * 1e3:.0f} ms, re-arm {held_s:.2f}s, "
                f"cpu server {cpu['server_cpu_s']:.2f}s agents {cpu['agents_cpu_s']:.2f}s, "
                f"{nbytes['bytes_per_node']:.0f} B/node + {nbytes['header_bytes_per_node']:.0f} B headers, "
                f"max {nbytes['bytes_agent_max']})",
                flush=True,
            )
            if replicas > 1:
                print(
                    "      by replica (0: rotated through): "
                    + ", ".join(
                        f"{k}: p50 {v['p50'] * 1e3:.0f} p99 {v['p99'] * 1e3:.0f} ms" for k, v in by_replica.items()
                    ),
                    flush=True,
                )
        for spy in spies:
            spy.stop()
        spies = []
        series.setup["end_rss_kb"] = plane.rss_kb()
        series.setup["end_hwm_kb"] = [status_kb(s.proc.pid, "VmHWM") for s in servers]
        rep = fleet.report()
        series.ready["final_log"], series.ready["final_log_samples"] = rep["log"], rep["samples"]
        at_start, at_end = log_total(series.ready["log"]), log_total(rep["log"])
        if at_end:
            samples = {k: v for per_proc in rep["samples"] for k, v in per_proc.items()}
            print(
                f"  [{tag}] the agents logged {sum(at_end.values())} warnings/errors "
                f"({sum(at_start.values())} by the time all served), by kind (one example each):",
                flush=True,
            )
            for kind, count in at_end.most_common():
                print(f"    {count} x {samples.get(kind, kind)}", flush=True)
    except Exception as exc:
        series.failed = f"{type(exc).__name__}: {exc}"
        print(f"  [{tag}] FAILED: {series.failed}", flush=True)
    finally:
        for spy in spies:
            spy.stop()
        if fleet is not None:
            fleet.close()
        for server in servers:
            server.stop()
            if series.failed:
                print(
                    f"  server log tail ({server.log_path}):\n" + server.log_path.read_text(errors="replace")[-1500:],
                    flush=True,
                )
        db.drop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return series


# -- report ------------------------------------------------------------------------------------
COLUMNS = [
    "backend",
    "N",
    "regions",
    "secrets/region",
    "replicas",
    "agent procs",
    "trials",
    "p50 (ms)",
    "p99 (ms)",
    "max (ms)",
    "worst trial p99 (ms)",
    "rotate call (ms)",
    "CPU s per rotation: server / agents",
    "bytes/node/rotation: mean (agent max) + headers",
    "full view (bytes)",
    "idle server RSS MB (kB per poll)",
    "idle server CPU s/s",
    "enrol N (s)",
    "agent warnings: start-up / trials",
]


def table(results: list[Series]) -> str:
    rows = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for r in results:
        lead = f"| {r.backend} | {r.n} | {r.regions} | {r.secrets + 1} | {r.replicas} | {r.procs} "
        if not r.trials:
            rows.append(lead + f"| 0 | failed: {r.failed} |" + " |" * (len(COLUMNS) - 8))
            continue
        med = len(r.trials) // 2
        cpu_server = sorted(t["server_cpu_s"] for t in r.trials)[med]
        cpu_agents = sorted(t["agents_cpu_s"] for t in r.trials)[med]
        allx = [x for t in r.trials for x in t["latencies_s"]]
        s = summary(allx)
        worst = max(t["p99_s"] for t in r.trials)
        call = sorted(t["rotate_call_s"] for t in r.trials)[med]
        nbytes = median([t["bytes_per_node"] for t in r.trials])
        hbytes = median([t["header_bytes_per_node"] for t in r.trials])
        bmax = max(t["bytes_agent_max"] for t in r.trials)
        full = r.ready.get("full_view_bytes", {}).get("p50", math.nan)
        if r.idle:
            rss = f"{sum(r.idle['rss_kb']) / 1024:.0f} ({r.idle['rss_per_poll_kb']:.1f})"
            idle_cpu = f"{r.idle['server_cpu_per_s']:.3f}"
        else:
            rss = idle_cpu = "-"
        note = f" ({len(r.trials)} ok, then {r.failed})" if r.failed else ""
        start = sum(log_total(r.ready.get("log", [])).values())
        warned = f"{start} / {sum(log_total(r.ready.get('final_log', [])).values()) - start}"
        rows.append(
            lead + f"| {len(r.trials)}{note} | {s['p50'] * 1e3:.0f} "
            f"| {s['p99'] * 1e3:.0f} | {s['max'] * 1e3:.0f} | {worst * 1e3:.0f} | {call * 1e3:.0f} "
            f"| {cpu_server:.2f} / {cpu_agents:.2f} | {nbytes:.0f} ({bmax}) + {hbytes:.0f} | {full} "
            f"| {rss} | {idle_cpu} | {r.ready.get('enrol_s', 0):.1f} | {warned} |"
        )
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", default="10,100,1000", help="comma-separated N")
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument(
        "--regions",
        type=int,
        default=30,
        help="regions the agents are spread over (round robin); the measured secret is in all of them",
    )
    p.add_argument(
        "--secrets",
        type=int,
        default=0,
        help=f"filler secrets of {FILLER_BYTES} bytes in each region (besides the measured one)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="PostgreSQL only: control-plane replicas on the one "
        "database, the fleet split over them, rotations through the first (SQLite: always 1)",
    )
    p.add_argument(
        "--idle",
        type=float,
        default=10.0,
        help="seconds of idle (all N polls held) over which the "
        "control plane's RSS and CPU are sampled before the trials (0: skip)",
    )
    p.add_argument("--pause", type=float, default=1.0, help="seconds between all polls held again and a rotation")
    p.add_argument("--wait", type=float, default=30.0, help="the agents' long-poll hold (agent default 30 s)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-trial limit for all N to serve")
    p.add_argument("--procs", type=int, default=1, help="agent-fleet processes (N/P simulated agents each)")
    p.add_argument(
        "--enrol-concurrency",
        type=int,
        default=64,
        help="agents enrolling or making their first sync at a time, over the whole fleet (0: all at once)",
    )
    p.add_argument(
        "--ready-timeout", type=float, default=1800.0, help="limit for the fleet's enrolment and first syncs"
    )
    p.add_argument("--no-disk-cache", action="store_true", help="simulated agents skip their cache file")
    p.add_argument("--pg", default=os.environ.get("VAULT_EDGE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432"))
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--server-profile", help="directory: run the server under cProfile, one .prof per series")
    p.add_argument(
        "--py-spy",
        help="path to py-spy: sample the server and the agent fleet during the trials (collapsed stacks in --results)",
    )
    p.add_argument(
        "--server-wrapper",
        help="diagnosis: a script run as `python SCRIPT server ...` instead of "
        "`python -m vault_edge server ...` (an instrumented or patched control plane)",
    )
    p.add_argument("--keep", action="store_true", help="keep work dirs (server logs, profiles)")
    p.add_argument("--check", action="store_true", help="only check the limits for the largest N, then exit")
    args = p.parse_args()
    ns = [int(x) for x in args.agents.split(",")]
    backends = args.backends.split(",")
    if args.regions < 1 or args.secrets < 0 or args.replicas < 1 or args.procs < 1 or min(ns) < 1:
        p.error("--regions, --replicas, --procs and --agents are at least 1, --secrets at least 0")
    if args.replicas > 1 and "postgres" not in backends:
        p.error("--replicas needs the postgres backend (SQLite runs one control plane)")
    problems, warnings = preflight(ns, backends, args)
    for w in warnings:
        print(f"note: {w}", flush=True)
    if problems:
        print(f"cannot run N = {max(ns)}:\n" + "\n".join(f"  - {x}" for x in problems), file=sys.stderr)
        return 2
    if args.check:
        return 0
    # a SIGTERM (timeout, kill) unwinds like Ctrl-C: servers and fleet stopped, the database dropped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the server and the fleet
    if args.server_profile:
        Path(args.server_profile).mkdir(parents=True, exist_ok=True)

    results: list[Series] = []
    started = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started))
    for backend in backends:
        for n in ns:
            print(f"{backend}, N={n}:", flush=True)
            results.append(run_series(backend, n, args, stamp))
    out = table(results)
    print()
    print(out)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    raw = Path(args.results) / f"propagation-{stamp}.json"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "vault_edge"], capture_output=True, text=True
    ).stdout.strip()
    raw.write_text(
        json.dumps(
            {
                "started": started,
                "argv": sys.argv,
                "commit": head,
                "vault_edge_dirty": bool(dirty),
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                    "loadavg_end": os.getloadavg(),
                },
                "columns": COLUMNS,
                "table": out,
                "series": [r.__dict__ for r in results],
            },
            indent=1,
        )
    )
    print(f"\nraw results: {raw}")
    return 0 if all(not r.failed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
