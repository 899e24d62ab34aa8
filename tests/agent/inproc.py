"""The agent's API and endpoint in the test process: a fake clock, fixture views, a served loop.

``FakeClock`` stands in for the agent's clock: time moves only when a test says so. ``Served`` runs
the real endpoint (``Listener``, ``_Conn``) and the real ``Api`` on an event loop (uvloop, as the agent)
in a thread of the test process; ``served.pair()`` gives a blocking client socket whose other end
the listener adopted (``socket.socketpair()``: the kernel's credentials are this process's). State
changes run on the loop's thread (``served.call``), as the sync loop makes them.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from tests.agent.support import RawConn
from vault_edge.agent.api import Api
from vault_edge.agent.endpoint import HEAD_TIMEOUT_S, IDLE_TIMEOUT_S, Listener
from vault_edge.agent.peercred import Caller
from vault_edge.agent.policy import Policy
from vault_edge.agent.view import AgentState, Entry, View

T = TypeVar("T")

NODE, REGION = "n-0123456789abcdef", "eu"
ME = Caller(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())
BINARY = b"\x00\xff\xfe raw \x80"
# The fixture agent's entries (tests/agent/fixture_agent.py --entries takes the same documents).
ENTRIES: list[dict[str, Any]] = [
    {"name": "db/main", "version": 3, "stage": "current", "value": "hunter2"},
    {"name": "db/main", "version": 2, "stage": "previous", "value": "hunter1", "expires_in": 3600},
    {"name": "old", "version": 2, "stage": "current", "value": "fresh"},
    {"name": "old", "version": 1, "stage": "previous", "value": "expired", "expires_in": -1},
    {"name": "bin", "version": 1, "stage": "current", "value_b64": base64.b64encode(BINARY).decode()},
    {"name": "openai", "version": 1, "stage": "current", "value": "sk-ökö-✓"},
    {"name": "tenant-a/key", "version": 1, "stage": "current", "value": "a-secret"},
    {"name": "tenant-b/key", "version": 1, "stage": "current", "value": "b-secret"},
]


class FakeClock:
    """The agent's clock, moved by hand: ``advance(s)`` moves the monotonic and the wall clock alike."""

    def __init__(self, monotonic: float = 1_000.0, wall: float = 1_800_000_000.0) -> None:
        self.now, self.date = monotonic, wall

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.date

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.date += seconds


def entries(docs: list[dict[str, Any]], wall: float) -> list[Entry]:
    """Entries from fixture documents, grace periods (``expires_in``) counted from ``wall``."""
    out = []
    for doc in docs:
        value = base64.b64decode(doc["value_b64"]) if "value_b64" in doc else doc["value"].encode()
        expires = wall + doc["expires_in"] if "expires_in" in doc else None
        out.append(Entry(doc["name"], doc.get("version", 1), doc.get("stage", "current"), value, expires))
    return out


def next_view(view: View) -> View:
    """What the fixture agent's SIGUSR1 installs: every value gets ``-r<revision>``, every version + 1."""
    revision = view.revision + 1
    return View(
        view.node,
        view.region,
        revision,
        [
            Entry(e.name, e.version + 1, e.stage, e.value + b"-r%d" % revision, e.expires_at)
            for e in view.by_version.values()
        ],
    )


def make_state(
    clock: FakeClock,
    docs: list[dict[str, Any]] | None = None,
    *,
    revision: int = 1,
    contact_age: float | None = 0.0,
    max_stale: float | None = None,
    load: bool = True,
) -> AgentState:
    """An agent state as the fixture agent makes it: a view of ``docs`` (ENTRIES by default) installed,
    the last contact ``contact_age`` seconds ago (None: never)."""
    state = AgentState(NODE, REGION, max_stale=max_stale, clock=clock)
    if load:
        state.install(View(NODE, REGION, revision, entries(ENTRIES if docs is None else docs, clock.wall())))
    if contact_age is not None:
        state.contact(clock.monotonic() - contact_age)
    return state


class Served:
    """``Api(state, policy)`` behind a real ``Listener`` on a uvloop loop in a thread of this process.

    No sweeper timer runs: tests call :meth:`sweep` after moving the fake clock."""

    def __init__(
        self,
        state: AgentState,
        policy: Policy | None = None,
        *,
        head_timeout: float = HEAD_TIMEOUT_S,
        idle_timeout: float = IDLE_TIMEOUT_S,
    ) -> None:
        import uvloop

        self.state = state
        self.clock = state.clock
        self.api = Api(state, policy or Policy(None))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind("")  # an autobound abstract address, never connected to: only adopt() feeds it
        self.sock.setblocking(False)
        self.sock.listen(1)
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="served-agent", daemon=True)
        self.thread.start()
        self.listener = self.call(
            lambda: Listener(self.sock, self.api, self.loop, head_timeout=head_timeout, idle_timeout=idle_timeout)
        )
        self.clients: list[socket.socket] = []

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the loop's thread and return its result."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return done.result(timeout=10)

    def pair(self, timeout: float = 5) -> socket.socket:
        """A connected client socket; the listener adopted its other end."""
        client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(timeout)
        self.call(lambda: self.listener.adopt(server))
        self.clients.append(client)
        return client

    def conn(self, timeout: float = 5) -> RawConn:
        return RawConn.over(self.pair(timeout))

    def install_next(self) -> None:
        self.call(lambda: self.state.install(next_view(self.state.view)))

    def contact(self) -> None:
        self.call(self.state.contact)

    def lost_contact(self) -> None:
        self.call(self.state.lost_contact)

    def sweep(self) -> None:
        self.call(self.listener.sweep)

    def open_conns(self) -> int:
        return self.call(lambda: len(self.listener.conns))

    def close(self) -> None:
        for c in self.clients:
            c.close()

        def stop() -> None:
            self.listener.close()
            for conn in list(self.listener.conns):
                if conn.transport is not None:
                    conn.transport.abort()

        self.call(stop)
        self.api.close()

        async def drain() -> None:  # let the connections see their ends, and cancelled holds finish
            for _ in range(3):
                await asyncio.sleep(0)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(drain(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
