"""Staleness and anti-rollback, in-process: the real sync loop (``Syncer.run``) against a control plane
behind ``httpx.MockTransport`` (real keys, encryption and signatures: ``test_delta.Plane``), the real
API over the agent's state, and a fake clock, so ages of minutes take no time.

The end-to-end tests (``tests/e2e/test_agent.py``) keep the whole: a control plane process killed,
agent processes restarted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.agent.inproc import FakeClock
from tests.agent.support import MockExchange
from tests.agent.test_api import ask, error_of
from tests.agent.test_delta import NODE, REGION, Plane
from vault_edge import wire
from vault_edge.agent.api import Api
from vault_edge.agent.cache import DiskCache
from vault_edge.agent.policy import Policy
from vault_edge.agent.sync import Backoff, Syncer, load_cached
from vault_edge.agent.view import AgentState
from vault_edge.crypto import signing
from vault_edge.wire import sync as wsync


class ControlPlane:
    """Answers the agent's long-polls: a full view when the agent is behind (or asks for one), else
    holds the poll, as the real one does, until :meth:`release` (then ``unchanged``). Down, it fails
    every exchange (held ones included) as an unreachable host would."""

    def __init__(self, plane: Plane, values: dict[str, tuple[int, str]], revision: int = 10) -> None:
        self.plane, self.values, self.revision = plane, dict(values), revision
        self.up = True
        self.polls = 0
        self._release: asyncio.Event | None = None

    def release(self) -> None:
        if self._release is not None:
            self._release.set()

    def go_down(self) -> None:
        self.up = False
        self.release()

    async def __call__(self, req: httpx.Request) -> httpx.Response:
        self.polls += 1
        if not self.up:
            raise httpx.ConnectError("the control plane is down")
        q = parse_qs(urlsplit(str(req.url)).query)
        since, nonce = int(q["since"][0]), req.headers[wire.H_NONCE]
        if q.get("full") == ["1"] or since < self.revision:
            raw, sig = self.plane.full(self.revision, self.values, nonce=nonce)
        else:
            self._release = asyncio.Event()
            await self._release.wait()
            if not self.up:
                raise httpx.ConnectError("the control plane is down")
            env = wsync.Envelope(wsync.UNCHANGED, NODE, nonce, 0, REGION, since, since).encode()
            raw, sig = wsync.join(env), wire.b64e(signing.sign(self.plane.signer, wsync.signed_message(env)))

        async def stream() -> AsyncIterator[bytes]:  # streamed, as from the network
            yield raw

        return httpx.Response(200, content=stream(), headers={wire.H_SERVER_SIGNATURE: sig})


class Agent:
    """An agent's state, API and sync loop over one state dir, on the running loop, with a fake clock."""

    def __init__(
        self, plane: Plane, cp: ControlPlane, state_dir: Path, clock: FakeClock, *, max_stale: float | None = None
    ) -> None:
        self.clock, self.cp = clock, cp
        self.state = AgentState(NODE, REGION, max_stale=max_stale, clock=clock)
        self.api = Api(self.state, Policy(None))
        cache = DiskCache(state_dir)
        self.restored = load_cached(plane.identity, self.state, cache)
        http = MockExchange(cp)
        self.syncer = Syncer(plane.identity, self.state, cache, "http://cp", http=http, restored=self.restored)
        self.syncer.backoff = Backoff(base=0.001, cap=0.001)  # retry at once: the test moves the time
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.syncer.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.syncer.close()

    def get(self, target: str) -> Any:
        return ask(self.api, target)

    def health(self) -> dict[str, Any]:
        return self.get("/v1/health").json()  # type: ignore[no-any-return]


async def until(pred: Callable[[], object], what: str) -> None:
    for _ in range(5000):
        if pred():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    yield Plane(tmp_path)


def test_an_agent_outlives_the_control_plane_and_catches_up(plane: Plane, tmp_path: Path) -> None:
    clock = FakeClock()
    cp = ControlPlane(plane, {"svc/key": (1, "v1")})

    async def go() -> None:
        a = Agent(plane, cp, tmp_path, clock, max_stale=300)
        a.start()
        await until(lambda: a.state.loaded, "the first view")
        assert a.get("/v1/secrets/svc/key").json()["value"] == "v1"
        assert a.health()["status"] == "ok"
        clock.advance(29)  # the poll is held: no news is no contact
        assert a.get("/v1/secrets/svc/key").headers["age"] == "29"
        cp.release()  # the hold ends with a signed `unchanged`: a contact
        await until(lambda: a.health()["last_sync_age_s"] == 0, "the unchanged answer")

        cp.go_down()  # the held poll fails, and every retry after it
        await until(lambda: a.health()["status"] == "stale", "health to say stale")
        clock.advance(120)
        r = a.get("/v1/secrets/svc/key")
        assert r.status == 200 and r.json()["value"] == "v1" and r.headers["age"] == "120"  # still serving
        assert a.health()["last_sync_age_s"] == 120
        clock.advance(180.001)
        assert error_of(a.get("/v1/secrets/svc/key"))[:2] == (503, "too_stale")  # past --max-stale 300

        cp.values, cp.revision, cp.up = {"svc/key": (2, "v2")}, 11, True  # back, with a rotation
        await until(lambda: a.state.view.revision == 11, "the agent to catch up")
        r = a.get("/v1/secrets/svc/key")
        assert r.status == 200 and r.json()["value"] == "v2" and r.headers["age"] == "0"
        assert a.health()["status"] == "ok"
        await a.stop()

    asyncio.run(go())


@pytest.mark.parametrize("max_stale", [None, 60.0, 30.0])
def test_an_agent_restarted_while_the_control_plane_is_down(
    plane: Plane, tmp_path: Path, max_stale: float | None
) -> None:
    """It serves from its disk cache, says stale, and its Age goes on from the cached answer's time:
    ``--max-stale`` counts across the restart."""
    cp = ControlPlane(plane, {"svc/key": (1, "v1")})
    first = FakeClock(monotonic=1_000.0, wall=1_800_000_000.0)

    async def before() -> None:
        a = Agent(plane, cp, tmp_path, first)
        a.start()
        await until(lambda: a.state.loaded, "the first view")
        await a.stop()

    asyncio.run(before())
    cp.up = False
    # 42 s later, another process: its monotonic clock starts elsewhere
    after = FakeClock(monotonic=7.0, wall=first.date + 42)

    async def restarted() -> None:
        a = Agent(plane, cp, tmp_path, after, max_stale=max_stale)
        assert a.restored is not None
        doc = a.health()
        assert doc["status"] == "stale" and doc["last_sync_age_s"] == 42 and doc["revision"] == 10
        r = a.get("/v1/secrets/svc/key")
        if max_stale is not None and max_stale < 42:
            assert error_of(r)[:2] == (503, "too_stale")
        else:
            assert r.status == 200 and r.json()["value"] == "v1" and r.headers["age"] == "42"
        a.start()
        await until(lambda: cp.polls >= 3, "a few failed polls")
        assert a.health()["status"] == "stale"
        cp.values, cp.revision, cp.up = {"svc/key": (2, "v2")}, 11, True  # back, with a rotation
        await until(lambda: a.health()["status"] == "ok", "the control plane to answer")
        r = a.get("/v1/secrets/svc/key")
        assert r.status == 200 and r.json()["value"] == "v2" and r.headers["age"] == "0"
        await a.stop()

    asyncio.run(restarted())


def test_a_restarted_agent_never_serves_a_version_below_one_it_served(plane: Plane, tmp_path: Path) -> None:
    """Anti-rollback across a restart: the control plane's database restored from an old copy answers
    with an older version of a secret; the agent keeps serving the newer one it served before, and
    takes the rest of the answer."""
    clock = FakeClock()
    cp = ControlPlane(plane, {"k": (2, "k2"), "other": (1, "o1")})

    async def before() -> None:
        a = Agent(plane, cp, tmp_path, clock)
        a.start()
        await until(lambda: a.state.loaded, "the first view")
        assert a.get("/v1/secrets/k").json()["version"] == 2
        await a.stop()

    asyncio.run(before())
    cp.values, cp.revision = {"k": (1, "k1"), "other": (2, "o2")}, 12  # a rolled-back k, a newer other

    async def restarted() -> None:
        a = Agent(plane, cp, tmp_path, clock)
        a.syncer.want_full = True
        a.start()
        await until(lambda: a.state.view.revision == 12, "the rolled-back answer")
        assert a.get("/v1/secrets/k").json()["value"] == "k2"  # held, not rolled back
        assert a.get("/v1/secrets/other").json()["value"] == "o2"
        assert error_of(a.get("/v1/secrets/k?version=1"))[:2] == (404, "not_found")
        await a.stop()

    asyncio.run(restarted())
    # Restarted again: the disk now holds that answer, and the floor with it; its k is below the
    # floor, and nothing of k is held any more, so k is not served at all until a newer version comes.
    again = AgentState(NODE, REGION, clock=clock)
    load_cached(plane.identity, again, DiskCache(tmp_path))
    assert again.view.lookup("k") is None and again.floor["k"] == 2
    assert again.view.lookup("other").value == b"o2"  # type: ignore[union-attr]
