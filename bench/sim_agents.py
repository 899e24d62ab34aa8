"""A fleet of simulated node agents in one process, driven by ``bench/propagation.py``.

Each simulated agent is a real agent minus its unix socket: its own X25519/Ed25519 key pair and
state dir, enrolled with its own join token (``Syncer.enroll``: pinned control-plane key, signed
request, verified answer), then ``Syncer.run`` (signed long-poll, protocol 2: deltas, ``open_answer``:
signature check, nonce echo, anti-rollback, grant / data key / value decryption, ``AgentState.install``,
disk cache).
The only differences from ``vault-edge agent run``: no socket server, and one event loop for all
agents. Each agent has its own HTTP client (``vault_edge.agent.http1.Client``, the agent's own, with
the timeouts ``Syncer`` gives itself), so every agent holds its own connection.

"Serving" is measured where the socket server would read: :class:`TimedState` records
``time.monotonic()`` right after ``install`` when the installed view's current value of the secret
is the expected one. CLOCK_MONOTONIC is system-wide on Linux, so the controller compares it with its
own ``time.monotonic()`` taken when ``rotate`` returned.

Bytes: ``Syncer.received_bytes`` counts the sync answers' bodies; :class:`CountingClient` adds up
each answer's status line and headers as well (what the wire carried, short of TCP/IP). For each
agent the ``done`` event carries what it received from ``expect`` to serving the value (``bytes``,
``header_bytes``), and ``total_bytes`` everything the process's agents received from ``expect`` to
``done`` (answers to other agents' polls included: e.g. an ``unchanged`` at the end of a hold). The
``ready`` event carries each agent's first sync (a full view) in ``full_bytes``.

Start-up: an agent enrols and then runs (its first sync is a full view); at most
``--enrol-concurrency`` agents are between the start of their enrolment and their first served view
at any time, so a fleet of thousands neither queues enrolments past the control plane's timestamp
window nor opens thousands of connections at once (0: all at once).

Each line of ``--tokens`` is a join token, or ``URL TOKEN`` (this agent's control plane, e.g. one of
several replicas; ``--server`` otherwise).

Control is JSON lines: on stdin ``{"cmd": "expect", "trial": K, "value": V}`` (acknowledged with
``{"event": "armed"}``), ``{"cmd": "report"}`` (the times so far) and ``{"cmd": "quit"}``; on stdout
``ready``, ``armed``, ``done`` (all agents serve V) and ``report`` events.

    python bench/sim_agents.py --server URL --secret NAME --tokens FILE [--wait 30] [--no-disk-cache]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvloop

from vault_edge.agent.bundle import Piece
from vault_edge.agent.cache import DiskCache
from vault_edge.agent.files import ensure_private_dir
from vault_edge.agent.http1 import Answer, Client
from vault_edge.agent.identity import Identity
from vault_edge.agent.sync import Syncer
from vault_edge.agent.view import AgentState, View
from vault_edge.crypto.signing import KeyPair


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class CountingHandler(logging.Handler):
    """Counts the agents' warnings and errors (failed polls, refused answers) by message shape."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.samples: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.levelname}:{record.msg[:60]}"
        self.counts[key] += 1
        self.samples.setdefault(key, record.getMessage()[:300])


class NullCache(DiskCache):
    """``--no-disk-cache``: skip the per-agent cache files (an fsync per applied answer), but count what
    would be written, so the agents ask for full views when a real one would."""

    def save_base(self, base: Piece, floor: dict[str, int], received_at: float | None = None) -> None:
        self.chain, self.log_bytes, self.base_bytes = "null", 0, len(base.body)

    def append(self, delta: Piece, received_at: float | None = None) -> None:
        self.log_bytes += len(delta.body)

    def touch(self, received_at: float) -> None:
        return None


class CountingClient(Client):
    """The agent's client, adding up the status line and header bytes of every answer it reads."""

    def __init__(self, fleet: Fleet, idx: int, base_url: str, timeout: float) -> None:
        super().__init__(base_url, connect_timeout=10.0, timeout=timeout)
        self.fleet, self.idx = fleet, idx

    async def request(self, method: str, target: str, **kw: Any) -> Answer:
        answer = await super().request(method, target, **kw)
        self.fleet.header_bytes[self.idx] += answer.head_size
        return answer


class Fleet:
    def __init__(self, n: int, secret: str) -> None:
        self.n, self.secret = n, secret
        self.trial: int | None = None
        self.expected: bytes | None = None
        self.times: list[float | None] = [None] * n
        self.served = 0
        self.initial_served = 0
        loop = asyncio.get_running_loop()
        self.initial_done = loop.create_future()
        self.first: list[asyncio.Future[None]] = [loop.create_future() for _ in range(n)]
        self.syncers: list[Syncer] = []
        self.header_bytes = [0] * n  # status lines and headers of every answer each agent received
        self.full_bytes: list[int] = [0] * n  # body bytes received up to the first served view
        self.mark: list[tuple[int, int]] = []  # (body, header) bytes of each agent at ``arm``
        self.got: list[tuple[int, int] | None] = [None] * n  # what each received from ``arm`` to serving

    def received(self, idx: int) -> tuple[int, int]:
        return self.syncers[idx].received_bytes, self.header_bytes[idx]

    def arm(self, trial: int, value: bytes) -> None:
        self.trial, self.expected = trial, value
        self.times = [None] * self.n
        self.got = [None] * self.n
        self.mark = [self.received(i) for i in range(self.n)]
        self.served = 0

    def on_install(self, idx: int, view: View, at: float) -> None:
        entry = view.lookup(self.secret)
        if entry is None:
            return
        if self.expected is None:
            if self.times[idx] is None:
                self.times[idx] = at
                self.full_bytes[idx] = self.syncers[idx].received_bytes
                self.initial_served += 1
                if not self.first[idx].done():
                    self.first[idx].set_result(None)
                if self.initial_served == self.n and not self.initial_done.done():
                    self.initial_done.set_result(None)
            return
        if self.times[idx] is None and entry.value == self.expected:
            self.times[idx] = at
            body, head = self.received(idx)
            self.got[idx] = (body - self.mark[idx][0], head - self.mark[idx][1])
            self.served += 1
            if self.served == self.n:
                now = [self.received(i) for i in range(self.n)]
                emit(
                    "done",
                    trial=self.trial,
                    times=self.times,
                    bytes=[g[0] if g else None for g in self.got],
                    header_bytes=[g[1] if g else None for g in self.got],
                    total_bytes=sum(b - m[0] for (b, _h), m in zip(now, self.mark, strict=True)),
                    total_header_bytes=sum(h - m[1] for (_b, h), m in zip(now, self.mark, strict=True)),
                )


class TimedState(AgentState):
    """The agent's state, noting the monotonic time each view is installed."""

    def __init__(self, fleet: Fleet, idx: int) -> None:
        super().__init__()
        self.fleet, self.idx = fleet, idx

    def install(self, view: View) -> None:
        super().install(view)
        self.fleet.on_install(self.idx, view, time.monotonic())


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def main(args: argparse.Namespace) -> int:
    # Each real agent has its own process and its own thread pool for its disk-cache write, which it
    # now makes before serving an answer; hundreds of simulated agents in one process would otherwise
    # queue behind the default pool's few threads, which no real agent does.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=args.threads))
    counting = CountingHandler()
    logging.getLogger("vault_edge").addHandler(counting)
    logging.getLogger("vault_edge").setLevel(logging.WARNING)

    lines = [line.split() for line in Path(args.tokens).read_text().splitlines() if line.strip()]
    n = len(lines)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * n + 256  # each agent's client may hold 2 connections; cache files, threads, pipes besides
    if hard < need:
        emit(
            "error",
            message=f"RLIMIT_NOFILE hard limit {hard} < {need} needed for {n} agents in one process: "
            "raise it (ulimit -Hn, limits.conf) or use more processes",
        )
        return 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fleet = Fleet(n, args.secret)
    base = Path(tempfile.mkdtemp(prefix="ve-sim-", dir=args.state_root))
    syncers = fleet.syncers

    for i, fields in enumerate(lines):
        server, token = (fields[0], fields[1]) if len(fields) > 1 else (args.server, fields[0])
        state_dir = ensure_private_dir(base / f"a{i:05d}")
        identity = Identity(state_dir, KeyPair.generate(), None)
        # The same client Syncer makes for itself, counting header bytes.
        http = CountingClient(fleet, i, server.rstrip("/"), args.wait + 20.0)
        cache = NullCache(state_dir) if args.no_disk_cache else DiskCache(state_dir)
        syncers.append(
            Syncer(identity, TimedState(fleet, i), cache, server, join_token=token, wait=args.wait, http=http)
        )

    # Start-up: each agent enrols, then runs; at most --enrol-concurrency of them at a time between
    # the start of their enrolment and their first served view (its own connection each).
    sem = asyncio.Semaphore(args.enrol_concurrency or n)
    lat: list[float] = []
    tasks: list[asyncio.Task[None]] = []
    enrolled_at: list[float] = []

    async def start(i: int, s: Syncer) -> None:
        async with sem:
            t = time.monotonic()
            await s.enroll()
            enrolled_at.append(time.monotonic())
            lat.append(enrolled_at[-1] - t)
            task = asyncio.create_task(s.run(), name=f"agent-{i}")
            tasks.append(task)
            # hold the slot until the first view is served (or the agent's task ended: reported below)
            await asyncio.wait([fleet.first[i], task], return_when=asyncio.FIRST_COMPLETED)

    t_enrol = time.monotonic()
    starting = asyncio.ensure_future(asyncio.gather(*(start(i, s) for i, s in enumerate(syncers))))
    await asyncio.wait([starting], timeout=args.ready_timeout)
    failure = None
    if not starting.done():
        failure = f"after {args.ready_timeout:.0f}s"
    elif starting.exception() is not None:
        failure = f"an agent's enrolment failed: {starting.exception()!r}"
    elif not fleet.initial_done.done():
        ended = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        failure = f"{len(ended)} agent tasks ended: {ended[0].exception()!r}" if ended else "?"
    if failure:
        emit(
            "error",
            message=f"{len(enrolled_at)}/{n} agents enrolled, {fleet.initial_served}/{n} serve the secret; {failure}",
            log=dict(counting.counts),
            samples=counting.samples,
        )
        return 1
    lat.sort()
    enrol_s = max(enrolled_at) - t_enrol
    emit(
        "ready",
        agents=n,
        enrol_s=enrol_s,
        enrol_p50_s=lat[len(lat) // 2],
        enrol_max_s=lat[-1],
        first_sync_s=time.monotonic() - t_enrol - enrol_s,
        full_bytes=fleet.full_bytes,
        log=dict(counting.counts),
    )

    reader = await stdin_lines()
    code = 0
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "expect":
            fleet.arm(int(cmd["trial"]), cmd["value"].encode())
            emit("armed", trial=fleet.trial)
        elif cmd["cmd"] == "report":
            emit("report", trial=fleet.trial, times=fleet.times, log=dict(counting.counts), samples=counting.samples)
        elif cmd["cmd"] == "quit":
            break
    crashed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    if crashed:
        emit("error", message=f"{len(crashed)} agent tasks ended: {crashed[0].exception()!r}")
        code = 1
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for s in syncers:
        with contextlib.suppress(Exception):
            await s.close()
    shutil.rmtree(base, ignore_errors=True)
    return code


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--tokens", required=True, help="file with one join token per line")
    p.add_argument("--wait", type=float, default=30.0, help="long-poll hold asked for (agent default: 30 s)")
    p.add_argument("--no-disk-cache", action="store_true")
    p.add_argument("--threads", type=int, default=64, help="threads for the agents' disk-cache writes")
    p.add_argument(
        "--enrol-concurrency",
        type=int,
        default=0,
        help="agents enrolling or making their first sync at a time (0: all at once)",
    )
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--state-root", default=None, help="where the agents' state dirs go (default: $TMPDIR)")
    uvloop.install()
    sys.exit(asyncio.run(main(p.parse_args())))
