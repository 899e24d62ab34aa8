"""The agent's hot path, measured beside its ceilings in one run: a secret read over the unix socket.

Starts each server as a real process, drives it with ``udsbench`` (C, closed loop, keep-alive), and
prints a markdown table: req/s median (min to max), p50 and p99 per series and connection count, the
server's CPU use, and each series' ratio to the C ceiling measured in the same run. Runs go round
robin (every series once, then again), so a slow drift of a shared machine spreads evenly.

Series (``--series``, comma-separated; all by default):

    raw-c        udsceiling: a minimal C epoll server, fixed 64-byte answer (the machine's ceiling)
    raw-python   bench/tools/pyserve.py: plain asyncio, no routing (the ceiling for a pure-Python server)
    raw-uvloop   pyserve.py --uvloop (what the event loop alone allows)
    vault-edge   the agent's endpoint (--agent-cmd; default: tests/agent/fixture_agent.py, one secret)
    starlette    Starlette on uvicorn(uds=, uvloop, httptools) serving the same read (bench/starlette_app.py)

Tools: ``make bench-tools`` builds udsbench and udsceiling from ``bench/tools/`` into
``bench/tools/build/`` with the system ``cc``; ``--load`` drives the servers with another generator
that takes the same flags (-u -c -d -W -p -H -j) and prints the same JSON keys, such as the shared
``udsload``. Point the agent series at a real agent with e.g. ``--agent-cmd 'vault-edge agent run ...
--socket {socket}'`` (it must create ``{socket}`` and serve ``--path``); ``--no-start`` reads an
already running socket instead.

    make bench                                                  # the short run: 1 run x (c1, c16), -d 3 -W 1
    .venv/bin/python bench/socket_read.py                       # 3 runs x (c1, c16) x 5 series, -d 5 -W 1
    .venv/bin/python bench/socket_read.py --series raw-c,vault-edge --runs 5 --duration 10
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SECRET = ("s000", "0123456789abcdef0123")
CLK_TCK = os.sysconf("SC_CLK_TCK")
DASH = "\N{EN DASH}"  # as in the shared peer-baseline tables


@dataclass
class Series:
    name: str
    cmd: str  # a shell-style command; {socket}, {python}, {tools}, {root} are filled in
    note: str
    sock: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    results: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


def default_series(python: str) -> dict[str, Series]:
    fixture = f"{python} {{root}}/tests/agent/fixture_agent.py --socket {{socket}} --secret {SECRET[0]}={SECRET[1]}"
    return {
        s.name: s
        for s in (
            Series("raw-c", "{tools}/udsceiling {socket}", "udsceiling: C epoll, fixed answer"),
            Series(
                "raw-python",
                f"{python} {{root}}/bench/tools/pyserve.py {{socket}}",
                "pyserve.py: asyncio, fixed answer, no routing",
            ),
            Series(
                "raw-uvloop", f"{python} {{root}}/bench/tools/pyserve.py --uvloop {{socket}}", "pyserve.py on uvloop"
            ),
            Series("vault-edge", fixture, "the agent endpoint: peercred, policy, routing, cached answers"),
            Series(
                "starlette",
                f"{python} {{root}}/bench/starlette_app.py --socket {{socket}} --secret {SECRET[0]}={SECRET[1]}",
                "uvicorn+httptools+uvloop, no policy",
            ),
        )
    }


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def probe(sock: str, path: str) -> bool:
    """One keep-alive GET; True on a 200."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(sock)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            return s.recv(65536).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def pinned(cpu: int | None) -> Callable[[], None] | None:
    """A preexec_fn that pins the child (and every thread it makes) to one CPU, or None."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def start(series: Series, state_dir: Path, path: str, fill: dict[str, str], cpu: int | None) -> None:
    series.sock = str(state_dir / f"{series.name}.sock")
    series.log = state_dir / f"{series.name}.log"
    argv = shlex.split(series.cmd.format(socket=series.sock, **fill))
    with open(series.log, "wb") as log:
        series.proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=pinned(cpu),
        )
    deadline = time.monotonic() + 30
    while not probe(series.sock, path):
        if series.proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{series.name} did not start ({' '.join(argv)}):\n{series.log.read_text()[-2000:]}")
        time.sleep(0.05)


def stop(series: Series) -> None:
    """SIGTERM the process we started (by its pid, never by name); SIGKILL after 15 s."""
    proc = series.proc
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(load: Path, series: Series, conns: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        str(load),
        "-u",
        series.sock,
        "-c",
        str(conns),
        "-d",
        str(args.duration),
        "-W",
        str(args.warmup),
        "-p",
        args.path,
        "-j",
    ]
    for h in args.header:
        cmd += ["-H", h]
    pid = series.proc.pid if series.proc else None
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, preexec_fn=pinned(args.load_cpu))
    cpu1 = cpu_seconds(pid) if pid else 0.0
    if not out.stdout.strip():
        raise SystemExit(f"{load.name} printed nothing for {series.name} c{conns}: {out.stderr}")
    doc: dict[str, Any] = json.loads(out.stdout)
    doc["server_cpu_s"] = round(cpu1 - cpu0, 2)
    doc["series"] = series.name
    return doc


def fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def fmt_us(x: float) -> str:
    return f"{x:.0f} µs" if x < 10_000 else f"{x / 1000:.1f} ms"


def table(all_series: list[Series], conns_list: list[int], duration: float) -> str:
    ceiling = {
        c: statistics.median(r["rps"] for r in s.results[c])
        for s in all_series
        if s.name == "raw-c"
        for c in conns_list
    }
    lines = [
        f"| series | conns | runs | req/s median (min{DASH}max) | p50 | p99 | server CPU | req per server CPU-s "
        "| vs C ceiling | errors, non-2xx |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in conns_list:
        for s in all_series:
            runs = s.results.get(c, [])
            if not runs:
                continue
            rps = [r["rps"] for r in runs]
            med = statistics.median(rps)
            ratio = f"{med / ceiling[c]:.2f}" if c in ceiling else DASH
            span = duration + runs[0]["warmup_s"]
            cpu = statistics.median(r["server_cpu_s"] for r in runs) / span
            # requests per CPU-second of the server: how much work a request costs, even when the
            # machine's other load took CPU away from the server during a run
            per_run = [r["rps"] * span / r["server_cpu_s"] for r in runs if r["server_cpu_s"] > 0]
            per_cpu = statistics.median(per_run) if per_run else 0.0
            bad = sum(r["errors"] for r in runs), sum(r["non_2xx"] for r in runs)
            lines.append(
                f"| {s.name} | {c} | {len(runs)} | {fmt_int(med)} ({fmt_int(min(rps))}{DASH}{fmt_int(max(rps))}) | "
                f"{fmt_us(statistics.median(r['p50_us'] for r in runs))} | "
                f"{fmt_us(statistics.median(r['p99_us'] for r in runs))} | {cpu:.2f} | {fmt_int(per_cpu)} | {ratio} | "
                f"{bad[0]}, {bad[1]} |"
            )
    return "\n".join(lines)


@contextlib.contextmanager
def running(selected: list[Series], state_dir: Path, args: argparse.Namespace, fill: dict[str, str]) -> Iterator[None]:
    try:
        for s in selected:
            if args.no_start and s.name == "vault-edge":
                s.sock = args.agent_socket
                continue
            start(s, state_dir, args.path, fill, args.server_cpu)
        yield
    finally:
        for s in selected:
            stop(s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tools",
        type=Path,
        default=ROOT / "bench" / "tools" / "build",
        help="where `make bench-tools` put udsbench and udsceiling",
    )
    p.add_argument("--load", type=Path, help="the load generator (default: TOOLS/udsbench)")
    p.add_argument("--series", default="raw-c,raw-python,raw-uvloop,vault-edge,starlette")
    p.add_argument("--conns", default="1,16", help="connection counts, comma-separated")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", "-d", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", "-W", type=float, default=1.0, help="unmeasured seconds before each run")
    p.add_argument("--path", default=f"/v1/secrets/{SECRET[0]}")
    p.add_argument("--header", "-H", action="append", default=[], help="extra request header (udsbench -H)")
    p.add_argument("--agent-cmd", help="command for the vault-edge series; {socket} is replaced by the socket path")
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=CMD",
        help="one more series, in --series order if named there, else after (e.g. another tree's agent: "
        "'vault-edge-main=env PYTHONPATH=DIR {python} DIR/tests/agent/fixture_agent.py "
        "--socket {socket} --secret s000=...'); {socket}, {python}, {root}, {tools} are filled in",
    )
    p.add_argument("--no-start", action="store_true", help="do not start vault-edge; read --agent-socket instead")
    p.add_argument("--agent-socket", help="with --no-start: the running agent's socket")
    p.add_argument("--python", default=sys.executable, help="interpreter for the Python servers")
    p.add_argument("--out", type=Path, help="append every run's udsbench JSON here (JSON lines)")
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin the load generator to CPU 0 and the servers to CPU 1 (steadier on a shared 2-vCPU VM)",
    )
    args = p.parse_args(argv)
    args.load_cpu, args.server_cpu = (0, 1) if args.pin else (None, None)

    if args.no_start and not args.agent_socket:
        p.error("--no-start needs --agent-socket")
    known = default_series(args.python)
    if args.agent_cmd:
        known["vault-edge"].cmd = args.agent_cmd
        known["vault-edge"].note = f"{args.agent_cmd}"
    for spec in args.extra:
        name, _, cmd = spec.partition("=")
        if not name or not cmd or name in known:
            p.error(f"--extra wants a new series NAME=CMD, not {spec!r}")
        known[name] = Series(name, cmd, cmd)
    names = [n.strip() for n in args.series.split(",") if n.strip()]
    names += [e.partition("=")[0] for e in args.extra if e.partition("=")[0] not in names]
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown series {', '.join(unknown)} (known: {', '.join(known)})")
    selected = [known[n] for n in names]
    load = args.load or args.tools / "udsbench"
    for tool in [load, *([args.tools / "udsceiling"] if "raw-c" in names else [])]:
        if not tool.exists():
            print(f"{tool} is missing: build the tools with `make bench-tools`", file=sys.stderr)
            return 2
    conns_list = [int(c) for c in args.conns.split(",")]
    fill = {"python": args.python, "tools": str(args.tools), "root": str(ROOT)}

    started = dt.datetime.now(dt.UTC)
    print(
        f"# socket read, {started:%Y-%m-%d %H:%M} UTC: {platform.node()}, {os.cpu_count()} CPUs, "
        f"{platform.python_implementation()} {platform.python_version()}, kernel {platform.release()}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="ve-bench-") as tmp, running(selected, Path(tmp), args, fill):
        for rep in range(1, args.runs + 1):
            for c in conns_list:
                for s in selected:
                    r = measure(load, s, c, args)
                    r["rep"] = rep
                    s.results.setdefault(c, []).append(r)
                    print(
                        f"  {s.name:<11} c{c:<3} run {rep}: {r['rps']:>10,.0f} req/s  p50 {r['p50_us']:.0f} µs  "
                        f"p99 {r['p99_us']:.0f} µs  cpu {r['server_cpu_s']:.2f}s  "
                        f"errors {r['errors']} non-2xx {r['non_2xx']}",
                        file=sys.stderr,
                    )
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps({"date": started.isoformat(), **r}) + "\n")

    settings = (
        f"{load.name} -c {{{','.join(map(str, conns_list))}}} -d {args.duration:g} -W {args.warmup:g} "
        f"-p {args.path}, {args.runs} runs each, round robin"
        f"{f', {load.name} pinned to CPU 0 and servers to CPU 1' if args.pin else ''}"
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"Measured {started:%Y-%m-%d} on {os.cpu_count()} vCPUs (CPython {platform.python_version()}, kernel "
        f"{platform.release()}); {settings}; load average at the end {load}.\n"
    )
    print(table(selected, conns_list, args.duration))
    print()
    for s in selected:
        print(f"- `{s.name}`: {s.note}")
    if any(s.name == "raw-c" for s in selected) and any(s.name == "vault-edge" for s in selected):
        ve = next(s for s in selected if s.name == "vault-edge")
        c_ = next(s for s in selected if s.name == "raw-c")
        top = max(conns_list)
        ve_med = statistics.median(r["rps"] for r in ve.results[top])
        c_med = statistics.median(r["rps"] for r in c_.results[top])
        p99 = statistics.median(r["p99_us"] for r in ve.results[top])
        print(
            f"\nvault-edge at {top} connections: {ve_med:,.0f} req/s = {ve_med / c_med:.0%} of the C ceiling "
            f"({c_med:,.0f}), p99 {fmt_us(p99)}."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
