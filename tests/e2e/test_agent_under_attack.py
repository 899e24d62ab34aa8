"""The agent never falls: nothing a relay on its path or a local caller sends makes it exit or stop
serving its other callers.

Real processes throughout: a control plane, a relay between it and the agent (``proxy.Proxy``), a
`vault-edge agent run`, hostile local clients of another uid, and a well-behaved reader (the
bystander) reading on the socket during every attack. Run with ``pytest -s`` to see the figures.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.support import NOBODY_ID, RawConn, get, wait_for_socket
from tests.e2e.conftest import AgentProcess, ControlPlane, wait_until
from tests.e2e.proxy import Proxy
from vault_edge.agent.cache import DiskCache
from vault_edge.client import AgentClient
from vault_edge.operator import OperatorClient

MIB = 1024  # KiB per MiB, for /proc figures


class Bystander:
    """A well-behaved worker reading one secret over and over on a keep-alive connection."""

    def __init__(self, agent: AgentProcess, name: str, label: str) -> None:
        self.agent, self.name, self.label = agent, name, label
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self.last: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Bystander:
        self._thread.start()
        wait_until(lambda: self.ok > 0, 10, "the bystander's first read")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)
        print(f"\n[bystander] {self.label}: {self.ok} reads served, {self.failed} failed")

    def _run(self) -> None:
        with AgentClient(str(self.agent.socket), timeout=5) as c:
            while not self._stop.is_set():
                try:
                    self.last = c.get(self.name).text
                    self.ok += 1
                except Exception as exc:
                    self.failed += 1
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                self._stop.wait(0.005)

    def check(self) -> None:
        assert self.failed == 0, f"{self.failed} failed reads (of {self.ok + self.failed}): {self.errors[:5]}"


@pytest.fixture
def proxy(control_plane: ControlPlane) -> Iterator[Proxy]:
    p = Proxy(control_plane.addr)
    yield p
    p.close()


def _failures(a: AgentProcess) -> int:
    """Sync rounds that failed (a transient failure, or an answer refused)."""
    log = a.log()
    return log.count("sync failed") + log.count("refused a sync answer")


# -- 5. a relay answering with an invalid Content-Encoding ------------------------------------------


def test_a_relay_garbling_the_encoding_of_sync_answers_is_a_transient_failure(
    control_plane: ControlPlane, start_agent: Any, proxy: Proxy
) -> None:
    op = control_plane.op
    op.put("eu/db", value="enc-v1", regions=["eu"])
    a = start_agent("eu1", "eu", server=proxy.addr)
    with Bystander(a, "eu/db", "relay answers sync with a broken gzip body") as reader:
        before = _failures(a)
        proxy.hostile = "bad_gzip"
        op.rotate("eu/db", value="enc-v2")
        wait_until(
            lambda: proxy.hostile_sent >= 3 and _failures(a) >= before + 3,
            30,
            "the agent to meet the broken encoding three times",
        )
        assert a.alive(), a.log()[-3000:]
        proxy.hostile = None
        wait_until(lambda: a.get("eu/db") == "enc-v2", 30, "catch-up once the relay behaves")
    reader.check()
    assert a.alive()


def test_a_relay_answering_poll_again_at_once_cannot_make_the_agent_spin(
    control_plane: ControlPlane, start_agent: Any, proxy: Proxy
) -> None:
    """A sealed control plane that held a poll says ``503 Retry-After: 0`` (poll again at once); a relay
    can send the same without holding anything, on every poll: the agent's polls stay at least a second
    apart (no tight loop), it keeps serving, and it catches up once the relay behaves."""
    op = control_plane.op
    op.put("eu/db", value="spin-v1", regions=["eu"])
    a = start_agent("eu1", "eu", server=proxy.addr)
    with Bystander(a, "eu/db", "relay answers every sync with 503 Retry-After: 0") as reader:
        proxy.hostile = "sealed_now"
        wait_until(lambda: proxy.hostile_sent >= 1, 15, "the first hostile answer")
        t0, sent0 = time.monotonic(), proxy.hostile_sent
        time.sleep(6)
        polls, took = proxy.hostile_sent - sent0, time.monotonic() - t0
        print(f"\n[relay 503 Retry-After: 0] {polls} polls in {took:.1f}s")
        assert 2 <= polls <= took / 1.0 + 1, polls  # retried, and never closer than a second apart
        assert a.alive(), a.log()[-3000:]
        proxy.hostile = None
        op.rotate("eu/db", value="spin-v2")
        wait_until(lambda: a.get("eu/db") == "spin-v2", 30, "catch-up once the relay behaves")
    reader.check()
    assert a.alive()


@pytest.mark.parametrize("path", ["/v1/sys/status", "/v1/agent/enroll"])
def test_a_relay_garbling_enrolment_is_a_transient_failure(
    control_plane: ControlPlane, start_agent: Any, proxy: Proxy, path: str
) -> None:
    control_plane.op.put("eu/db", value="enrolled", regions=["eu"])
    proxy.hostile, proxy.hostile_paths = "bad_gzip", (path,)
    a = start_agent("eu1", "eu", server=proxy.addr, wait_ready=False)
    wait_until(
        lambda: proxy.hostile_sent >= 2 and a.log().count("enrolment: control plane") >= 2,
        30,
        f"the agent to retry a garbled {path}",
    )
    assert a.alive(), a.log()[-3000:]
    proxy.hostile = None
    wait_until(lambda: a.health()["status"] == "ok", 30, "enrolment once the relay behaves")
    assert a.get("eu/db") == "enrolled"


def test_a_relay_refusing_enrolment_does_not_stop_the_agent(
    control_plane: ControlPlane, start_agent: Any, proxy: Proxy
) -> None:
    """A relay answers the enrolment with a 401 of its own: only a refusal the control plane signed, for
    this very request, ends an enrolment; anything else is retried."""
    control_plane.op.put("eu/db", value="enrolled", regions=["eu"])
    proxy.hostile, proxy.hostile_paths = "refuse", ("/v1/agent/enroll",)
    a = start_agent("eu1", "eu", server=proxy.addr, wait_ready=False)
    wait_until(lambda: proxy.hostile_sent >= 2, 30, "the agent to retry a forged refusal")
    assert a.alive(), a.log()[-3000:]
    assert "not signed by the control plane" in a.log()
    proxy.hostile = None
    wait_until(lambda: a.health()["status"] == "ok", 30, "enrolment once the relay behaves")
    assert a.get("eu/db") == "enrolled"


# -- 6. a relay's gzip bomb, an endless identity body ----------------------------------------------


@pytest.mark.parametrize("kind", ["gzip_bomb", "oversized"])
def test_a_relay_cannot_inflate_the_agent(
    control_plane: ControlPlane, start_agent: Any, proxy: Proxy, kind: str
) -> None:
    """A 250 KiB gzip stream inflating to 256 MiB, and a 160 MiB chunked identity body: the agent asks for
    identity, refuses any other Content-Encoding unread, and stops reading past MAX_BUNDLE (64 MiB)."""
    op = control_plane.op
    op.put("eu/db", value="small-v1", regions=["eu"])
    a = start_agent("eu1", "eu", server=proxy.addr)
    with Bystander(a, "eu/db", f"relay sends {kind}") as reader:
        hwm0 = a.status("VmHWM")
        before = _failures(a)
        proxy.hostile = kind
        op.rotate("eu/db", value="small-v2")
        wait_until(
            lambda: proxy.hostile_sent >= 2 and _failures(a) >= before + 2, 40, f"the agent to meet {kind} twice"
        )
        grown = a.status("VmHWM") - hwm0
        print(
            f"\n[{kind}] agent peak RSS grew by {grown / MIB:.1f} MiB (VmHWM {hwm0 / MIB:.0f} → "
            f"{(hwm0 + grown) / MIB:.0f} MiB)"
        )
        assert a.alive(), a.log()[-3000:]
        assert grown < 96 * MIB  # MAX_BUNDLE (64 MiB) at most is ever held, plus slack
        proxy.hostile = None
        wait_until(lambda: a.get("eu/db") == "small-v2", 30, "catch-up once the relay behaves")
    reader.check()
    sync_heads = [ln for ln in bytes(proxy.wire).lower().split(b"\n") if b"accept-encoding" in ln]
    assert sync_heads and all(ln.strip() == b"accept-encoding: identity" for ln in sync_heads), sync_heads[:3]


# -- 7. local clients exhausting descriptors ---------------------------------------------------------


@contextlib.contextmanager
def idle_connections(a: AgentProcess, workdir: Path, n: int) -> Iterator[int]:
    """``n`` idle connections to the agent's socket, opened and held by a forked process of uid nobody."""
    os.chmod(workdir, 0o711)
    os.chown(a.socket, 0, NOBODY_ID)  # the socket is 0660: group nogroup may connect
    report_r, report_w = os.pipe()
    hold_r, hold_w = os.pipe()
    with warnings.catch_warnings():  # the child only makes sockets and exits: no lock of a thread is needed
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the attacker: drop to nobody for real, connect n times, hold them until told
        try:
            os.close(report_r)
            os.close(hold_w)
            os.setgroups([])
            os.setgid(NOBODY_ID)
            os.setuid(NOBODY_ID)
            held = []
            for _ in range(n):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(2)
                try:
                    s.connect(str(a.socket))
                except OSError:
                    s.close()
                    continue
                held.append(s)
            os.write(report_w, str(len(held)).encode())
            os.close(report_w)
            os.read(hold_r, 1)
        finally:
            os._exit(0)
    os.close(report_w)
    os.close(hold_r)
    try:
        with os.fdopen(report_r, "rb") as f:
            opened = int(f.read() or 0)
        yield opened
    finally:
        os.close(hold_w)  # the child's read returns: it exits, its connections close
        os.waitpid(pid, 0)


def _open_fds(a: AgentProcess) -> int:
    assert a.proc is not None
    return len(os.listdir(f"/proc/{a.proc.pid}/fd"))


def _cached_revision(a: AgentProcess) -> int:
    cached = DiskCache(a.state_dir).load()
    return cached.revision if cached is not None else 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid (nobody)")
def test_idle_connections_of_one_uid_are_capped(control_plane: ControlPlane, start_agent: Any, workdir: Path) -> None:
    """2,000 idle connections from one uid, the agent started at the default soft limit of 1,024: the
    soft limit is raised to the hard one, the uid is held to 256 connections, a rotation is applied
    and persisted, a fresh connection from another uid is served."""
    op = control_plane.op
    op.put("eu/db", value="fd-v1", regions=["eu"])
    a = start_agent("eu1", "eu", nofile=(1024, 4096))
    limits = Path(f"/proc/{a.proc.pid}/limits").read_text()
    assert any(ln.startswith("Max open files") and ln.split()[3:5] == ["4096", "4096"] for ln in limits.splitlines()), (
        limits
    )
    with Bystander(a, "eu/db", "2,000 idle connections from uid nobody") as reader:
        base = _open_fds(a)
        with idle_connections(a, workdir, 2000) as opened:
            fds = _open_fds(a)
            print(f"\n[idle flood] attacker opened {opened} connections; the agent holds {fds} fds ({base} before)")
            assert fds <= base + 256 + 8
            op.rotate("eu/db", value="fd-v2")
            wait_until(lambda: reader.last == "fd-v2", 20, "the bystander to see the rotation")
            wait_until(lambda: _cached_revision(a) == a.health()["revision"], 10, "the rotation on disk")
            assert a.get("eu/db") == "fd-v2"  # a fresh connection, another uid
            assert a.alive(), a.log()[-3000:]
    reader.check()
    assert 1 <= a.log().count("connections per uid") <= 3  # logged once per window, not per refusal


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid (nobody)")
def test_the_agent_keeps_descriptors_for_itself_and_closes_idle_connections(
    control_plane: ControlPlane, start_agent: Any, workdir: Path
) -> None:
    """No per-uid cap, a hard limit of 200 descriptors, 300 idle connections: the agent stops accepting
    short of its limit (so its own work, a sync and a cache write, still has descriptors), closes the
    idle ones after --idle-timeout, and accepts again."""
    op = control_plane.op
    op.put("eu/db", value="rsv-v1", regions=["eu"])
    a = start_agent("eu1", "eu", "--max-conns-per-uid", "100000", "--idle-timeout", "3s", nofile=(200, 200))
    with (
        Bystander(a, "eu/db", "300 idle connections against 200 descriptors") as reader,
        idle_connections(a, workdir, 300) as opened,
    ):
        peak = _open_fds(a)
        print(f"\n[fd reserve] attacker queued {opened} connections; the agent holds {peak} of 200 fds")
        assert peak <= 200 - 32
        op.rotate("eu/db", value="rsv-v2")
        wait_until(lambda: reader.last == "rsv-v2", 20, "the bystander to see the rotation")
        wait_until(lambda: _cached_revision(a) == a.health()["revision"], 10, "the rotation on disk")
        assert "stop accepting" in a.log()
        # idle connections are closed, accepting resumes, the backlog drains: a fresh one is served
        wait_until(lambda: a.get("eu/db") == "rsv-v2", 45, "a fresh connection to be served")
        after = _open_fds(a)
        print(f"[fd reserve] after the idle timeout the agent holds {after} fds")
        assert a.alive(), a.log()[-3000:]
    reader.check()


def test_a_failed_cache_write_keeps_serving_and_is_retried(control_plane: ControlPlane, start_agent: Any) -> None:
    op = control_plane.op
    op.put("eu/db", value="disk-v1", regions=["eu"])
    a = start_agent("eu1", "eu")
    log = a.state_dir / "cache.log"  # where a delta is written (appended) before it is served
    log.unlink()
    log.mkdir()  # every write of the log now fails (an append to, or a rename over, a directory)
    with Bystander(a, "eu/db", "disk cache unwritable") as reader:
        op.rotate("eu/db", value="disk-v2")
        wait_until(lambda: reader.last == "disk-v2", 20, "the new view served despite the failed write")
        wait_until(lambda: "cache write failed" in a.log(), 10, "the failure logged")
        assert a.alive(), a.log()[-3000:]
        log.rmdir()
        # the write is retried whole (base, then each delta): done once the disk holds what is served
        wait_until(lambda: log.is_file() and _cached_revision(a) == a.health()["revision"], 20, "the write retried")
    reader.check()
    assert "disk-v2" not in a.log()


# -- 8. SIGKILL between serving and persisting ------------------------------------------------------


def test_a_killed_agent_never_serves_older_than_it_served(control_plane: ControlPlane, start_agent: Any) -> None:
    """Rotations all the time; the agent is SIGKILLed right after it serves a new version, restarted,
    and its first read must not be older than the highest read before."""
    op = control_plane.op
    op.put("eu/k", value="0", regions=["eu"])
    a = start_agent("eu1", "eu")
    a.join_token = None
    stop = threading.Event()

    def rotate() -> None:
        with OperatorClient(control_plane.addr, control_plane.token) as c:
            i = 0
            while not stop.is_set():
                i += 1
                c.rotate("eu/k", value=str(i))
                stop.wait(0.03)

    rotator = threading.Thread(target=rotate, daemon=True)
    rotator.start()
    highest, restarts, violations, planted_left = 0, 0, [], 0
    stale = a.state_dir / ".cache.json.4194305.tmp"  # as a kill mid-write leaves (pid above pid_max)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and restarts < 25:
            # The killed agent's socket file stays behind: wait for the new agent to listen (a probe
            # that closes its socket; httpx would leak one connecting to the dead file), then read.
            wait_for_socket(str(a.socket), a.proc, a.log_path)
            if restarts:
                planted_left += stale.exists()  # cleaned before the new agent serves
            with a.client() as c:
                first = wait_until(lambda c=c: c.get("eu/k"), 10, "a read after the restart")
                if first.version < highest:
                    violations.append((restarts, highest, first.version))
                highest = max(highest, first.version)
                # wait for the agent to serve a newer version, then kill it at once
                c.watch(first.revision, wait=5)
                served = c.get("eu/k").version
                os.kill(a.proc.pid, signal.SIGKILL)
            highest = max(highest, served)
            a.proc.wait()
            stale.write_bytes(b"half a cache")
            a.start(wait_ready=False)
            restarts += 1
    finally:
        stop.set()
        rotator.join(10)
    print(
        f"\n[kill loop] {restarts} SIGKILL restarts, highest version served {highest}, "
        f"{len(violations)} reads older than served after a restart"
    )
    assert restarts >= 5
    assert violations == [], f"(restart, highest served before, first read after): {violations}"
    assert planted_left == 0  # stale temp files are cleaned at start


# -- 9. many distinct tokens -------------------------------------------------------------------------


def test_distinct_tokens_do_not_grow_the_agent(control_plane: ControlPlane, start_agent: Any, workdir: Path) -> None:
    """A caller forbidden everything sends 16,000 distinct 7 KB tokens: the policy's decision memo is
    keyed by digest and bounded in bytes, so the agent's RSS stays flat."""
    control_plane.op.put("eu/db", value="tok-v1", regions=["eu"])
    policy = workdir / "policy.toml"
    policy.write_text(
        f'[[rule]]\nuid = {os.getuid()}\nsecrets = ["*"]\n\n'
        f'[[rule]]\ntoken_sha256 = "{hashlib.sha256(b"x").hexdigest()}"\nsecrets = ["none/*"]\n'
    )
    a = start_agent("eu1", "eu", "--policy", str(policy))
    with Bystander(a, "eu/db", "16,000 distinct 7 KB tokens") as reader:
        rss0 = a.status("VmRSS")
        n, batch, forbidden = 16_000, 50, 0
        with RawConn(str(a.socket), timeout=30) as conn:
            for start in range(0, n, batch):
                conn.send(
                    b"".join(
                        get("/v1/secrets/eu/db", f"X-Vault-Edge-Token: {i:08d}{'t' * 7000}\r\n")
                        for i in range(start, start + batch)
                    )
                )
                for _ in range(batch):
                    forbidden += conn.response().status == 403
        rss1 = a.status("VmRSS")
        print(f"\n[tokens] {forbidden} requests refused 403; agent RSS {rss0 / MIB:.1f} → {rss1 / MIB:.1f} MiB")
        assert forbidden == n
        assert rss1 - rss0 < 32 * MIB
        assert a.alive()
    reader.check()
