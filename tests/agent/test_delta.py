"""Sync protocol 2 on the agent's side, in-process: full views and deltas opened (``open_answer``),
every way a delta can be wrong refused while the held view keeps being served, recovery through a
full view, and the disk cache (base + delta log) replayed at start and caught up by delta."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.agent.support import MockExchange
from vault_edge import wire
from vault_edge.agent.bundle import BundleError, Piece, open_answer
from vault_edge.agent.cache import DiskCache
from vault_edge.agent.identity import Enrolment, Identity
from vault_edge.agent.sync import Syncer, load_cached
from vault_edge.agent.view import EMPTY, AgentState, View
from vault_edge.crypto import envelope, signing
from vault_edge.crypto.signing import KeyPair
from vault_edge.wire import sync as wsync

NODE, OTHER, REGION = "n-0123456789abcdef", "n-fedcba9876543210", "eu"


class Plane:
    """What the control plane would send this node: real keys, real encryption, real signatures."""

    def __init__(self, state_dir: Path) -> None:
        seed = os.urandom(32)
        self.signer = signing.signing_key_from_seed(seed)
        self.region_key = os.urandom(32)
        keys = KeyPair.generate()
        self.identity = Identity(
            state_dir, keys, Enrolment(NODE, REGION, "http://cp", signing.public_of(seed), time.time())
        )
        self.grants = (wsync.Grant(REGION, 1, signing.seal_grant(keys.box_public, NODE, REGION, 1, self.region_key)),)

    def version(self, name: str, version: int, value: str, stage: str = "current") -> wsync.SealedVersion:
        dek = os.urandom(32)
        return wsync.SealedVersion(
            name,
            version,
            stage,
            1,
            envelope.wrap_data_key(self.region_key, name, version, REGION, 1, dek),
            envelope.encrypt_value(dek, name, version, value.encode()),
            1.0,
        )

    def answer(
        self,
        kind: str,
        since: int,
        revision: int,
        secrets: list[wsync.SealedVersion],
        names: tuple[str, ...] = (),
        *,
        base: int | None = None,
        node: str = NODE,
        nonce: str = "nonce",
    ) -> tuple[bytes, str]:
        body = wsync.RegionBody(
            kind,
            REGION,
            (since if base is None else base) if kind == wsync.DELTA else 0,
            revision,
            names if kind == wsync.DELTA else (),
            tuple(secrets),
        ).encode()
        env = wsync.Envelope(
            kind, node, nonce, int(time.time()), REGION, since, revision, wsync.digest(body), self.grants
        ).encode()
        return wsync.join(env, body), wire.b64e(signing.sign(self.signer, wsync.signed_message(env)))

    def full(self, revision: int, values: dict[str, tuple[int, str]], nonce: str = "nonce") -> tuple[bytes, str]:
        return self.answer(
            wsync.FULL, 0, revision, [self.version(n, v, s) for n, (v, s) in values.items()], nonce=nonce
        )


def values(view: View) -> dict[str, str]:
    return {n: view.lookup(n).value.decode() for n in view.names}  # type: ignore[union-attr]


@pytest.fixture
def plane(tmp_path: Path) -> Plane:
    return Plane(tmp_path)


def _open(
    plane: Plane,
    answer: tuple[bytes, str],
    held: View,
    nonce: str | None = "nonce",
    floor: dict[str, int] | None = None,
):  # type: ignore[no-untyped-def]
    return open_answer(plane.identity, answer[0], answer[1], nonce=nonce, held=held, floor=floor)


def _base(plane: Plane) -> View:
    opened = _open(plane, plane.full(10, {"a": (1, "a1"), "b": (1, "b1"), "c": (1, "c1")}), EMPTY)
    assert opened.kind == "full" and opened.view is not None
    return opened.view


def test_a_delta_replaces_the_names_it_lists_and_keeps_the_rest(plane: Plane) -> None:
    held = _base(plane)
    delta = plane.answer(
        wsync.DELTA, 10, 12, [plane.version("a", 2, "a2"), plane.version("a", 1, "a1", "previous")], ("a", "c")
    )  # c listed without versions: gone from the region
    opened = _open(plane, delta, held)
    assert opened.kind == "delta" and opened.revision == 12 and opened.view is not None
    assert values(opened.view) == {"a": "a2", "b": "b1"}
    assert opened.view.lookup("a", stage="previous").value == b"a1"  # type: ignore[union-attr]
    assert opened.floor == {"a": 2, "b": 1, "c": 1}  # c left: its floor stays
    assert opened.piece is not None and opened.piece.body in delta[0]


@pytest.mark.parametrize(
    "case", ["gap", "replayed", "other-node", "skips-a-revision", "onto-nothing", "body-swapped", "older"]
)
def test_a_wrong_delta_is_refused_whole(plane: Plane, case: str) -> None:
    held = _base(plane)
    a2 = [plane.version("a", 2, "a2")]
    answer = {
        "gap": plane.answer(wsync.DELTA, 11, 13, a2, ("a",)),  # made for revision 11; the node holds 10
        "replayed": plane.answer(wsync.DELTA, 10, 12, a2, ("a",), nonce="another request's"),
        "other-node": plane.answer(wsync.DELTA, 10, 12, a2, ("a",), node=OTHER),
        # signed for since=10, but its body only covers changes after 11: what happened at 11 is lost
        "skips-a-revision": plane.answer(wsync.DELTA, 10, 13, a2, ("a",), base=11),
        "onto-nothing": plane.answer(wsync.DELTA, 0, 12, a2, ("a",)),
        # the envelope and signature of one delta, the body of another (same revisions, same names)
        "body-swapped": _swap_body(
            plane.answer(wsync.DELTA, 10, 12, a2, ("a",)),
            plane.answer(wsync.DELTA, 10, 12, [plane.version("a", 3, "a3")], ("a",)),
        ),
        "older": plane.answer(wsync.DELTA, 10, 9, a2, ("a",)),
    }[case]
    with pytest.raises(BundleError):
        _open(plane, answer, EMPTY if case == "onto-nothing" else held)
    # a delta replayed onto the view it produced is refused too (it was made for the revision before)
    if case == "replayed":
        good = plane.answer(wsync.DELTA, 10, 12, a2, ("a",))
        after = _open(plane, good, held).view
        assert after is not None
        with pytest.raises(BundleError):
            _open(plane, good, after)


def test_a_stage_rollback_inside_a_delta_is_refused_alone(plane: Plane) -> None:
    held = _open(plane, plane.full(10, {"a": (5, "a5"), "b": (1, "b1")}), EMPTY).view
    assert held is not None
    delta = plane.answer(wsync.DELTA, 10, 12, [plane.version("a", 4, "a4"), plane.version("b", 2, "b2")], ("a", "b"))
    opened = _open(plane, delta, held)
    assert opened.refused == ("a",)
    assert opened.view is not None and values(opened.view) == {"a": "a5", "b": "b2"}


# -- the sync loop: refusal, recovery with a full view ------------------------------------------------


class Script:
    """A control plane over httpx.MockTransport: answers each request with the next scripted maker,
    called with the request's (since, full, nonce); records what was asked."""

    def __init__(self, makers: list) -> None:  # type: ignore[type-arg]
        self.makers, self.asked = list(makers), []  # type: ignore[var-annotated]

    def __call__(self, req: httpx.Request) -> httpx.Response:
        q = parse_qs(urlsplit(str(req.url)).query)
        since, full, nonce = int(q["since"][0]), q.get("full") == ["1"], req.headers[wire.H_NONCE]
        self.asked.append((since, full))
        raw, sig = self.makers.pop(0)(since, full, nonce)

        async def stream():  # type: ignore[no-untyped-def]
            yield raw

        return httpx.Response(200, content=stream(), headers={wire.H_SERVER_SIGNATURE: sig})


def _syncer(plane: Plane, script: Script, state: AgentState, cache: DiskCache, restored=None) -> Syncer:  # type: ignore[no-untyped-def]
    http = MockExchange(script)
    return Syncer(plane.identity, state, cache, "http://cp", http=http, restored=restored)


async def _round(syncer: Syncer) -> None:
    try:
        opened = await syncer.poll_once()
    except BundleError:
        return
    await syncer.apply(opened)


@pytest.mark.parametrize("bad", ["gap", "replayed", "rollback-then-gap"])
def test_a_refused_delta_keeps_the_view_served_and_a_full_view_recovers(plane: Plane, tmp_path: Path, bad: str) -> None:
    a2 = [plane.version("a", 2, "a2")]
    makers = [
        lambda s, f, n: plane.full(10, {"a": (1, "a1"), "b": (1, "b1")}, nonce=n),
        {
            "gap": lambda s, f, n: plane.answer(wsync.DELTA, s + 1, s + 3, a2, ("a",), nonce=n),
            "replayed": lambda s, f, n: plane.answer(wsync.DELTA, s, s + 2, a2, ("a",), nonce="old"),
            "rollback-then-gap": lambda s, f, n: plane.answer(wsync.DELTA, 3, 4, a2, ("a",), nonce=n),
        }[bad],
        lambda s, f, n: plane.full(14, {"a": (2, "a2"), "b": (2, "b2")}, nonce=n),
        lambda s, f, n: plane.answer(wsync.DELTA, s, s + 1, [plane.version("b", 3, "b3")], ("b",), nonce=n),
    ]
    script, state, cache = Script(makers), AgentState(NODE, REGION), DiskCache(tmp_path)
    syncer = _syncer(plane, script, state, cache)

    async def go() -> None:
        for i in range(4):
            await _round(syncer)
            if i == 1:  # the bad delta: refused, the view held is still the one served
                assert state.view.revision == 10 and values(state.view) == {"a": "a1", "b": "b1"}
        await syncer.close()

    asyncio.run(go())
    assert script.asked == [(0, True), (10, False), (10, True), (14, False)]  # full after the refusal, then deltas
    assert state.view.revision == 15 and values(state.view) == {"a": "a2", "b": "b3"}


# -- the disk cache -------------------------------------------------------------------------------


def _three_rounds(plane: Plane, tmp_path: Path) -> tuple[AgentState, Syncer, Script]:
    makers = [
        lambda s, f, n: plane.full(10, {"a": (1, "a1"), "b": (1, "b1")}, nonce=n),
        lambda s, f, n: plane.answer(wsync.DELTA, s, 11, [plane.version("a", 2, "a2")], ("a",), nonce=n),
        lambda s, f, n: plane.answer(wsync.DELTA, s, 12, [plane.version("b", 2, "b2")], ("b",), nonce=n),
    ]
    script, state = Script(makers), AgentState(NODE, REGION)
    syncer = _syncer(plane, script, state, DiskCache(tmp_path))

    async def go() -> None:
        for _ in range(3):
            await _round(syncer)
        await syncer.close()

    asyncio.run(go())
    return state, syncer, script


def test_the_disk_cache_is_a_base_and_a_log_of_deltas_replayed_at_start(plane: Plane, tmp_path: Path) -> None:
    state, _, _ = _three_rounds(plane, tmp_path)
    assert state.view.revision == 12
    log_lines = (tmp_path / "cache.log").read_bytes().split(b"\n")
    assert len(log_lines) == 4 and log_lines[-1] == b""  # the chain id, two deltas, the final newline
    restarted = AgentState(NODE, REGION)
    chain = load_cached(plane.identity, restarted, DiskCache(tmp_path))
    assert chain is not None and len(chain.deltas) == 2 and chain.written == 2
    assert restarted.view.revision == 12 and values(restarted.view) == {"a": "a2", "b": "b2"}
    assert restarted.floor == {"a": 2, "b": 2}


def test_a_restarted_agent_catches_up_by_delta(plane: Plane, tmp_path: Path) -> None:
    _three_rounds(plane, tmp_path)
    state = AgentState(NODE, REGION)
    cache = DiskCache(tmp_path)
    chain = load_cached(plane.identity, state, cache)
    script = Script([lambda s, f, n: plane.answer(wsync.DELTA, s, 13, [plane.version("a", 3, "a3")], ("a",), nonce=n)])
    syncer = _syncer(plane, script, state, cache, restored=chain)

    async def go() -> None:
        await _round(syncer)
        await syncer.close()

    asyncio.run(go())
    assert script.asked == [(12, False)]  # a delta from what the disk held, not a full view
    assert state.view.revision == 13 and values(state.view) == {"a": "a3", "b": "b2"}
    again = AgentState(NODE, REGION)
    load_cached(plane.identity, again, DiskCache(tmp_path))
    assert again.view.revision == 13  # the new delta appended to the same log


def test_a_torn_or_tampered_log_serves_what_came_before(plane: Plane, tmp_path: Path) -> None:
    _three_rounds(plane, tmp_path)
    log_path = tmp_path / "cache.log"
    good = log_path.read_bytes()
    log_path.write_bytes(good + b'{"envelope": "eyJ2Ijo')  # a kill mid-append: never served
    state = AgentState(NODE, REGION)
    chain = load_cached(plane.identity, state, DiskCache(tmp_path))
    assert chain is not None and state.view.revision == 12 and log_path.read_bytes() == good  # the tail cut off
    lines = good.split(b"\n")
    lines[2] = lines[2].replace(b'"signature": "', b'"signature": "A', 1)  # the second delta's signature broken
    log_path.write_bytes(b"\n".join(lines))
    state = AgentState(NODE, REGION)
    chain = load_cached(plane.identity, state, DiskCache(tmp_path))
    assert chain is not None and chain.written is None  # rewritten whole with the next full view
    assert state.view.revision == 11 and values(state.view) == {"a": "a2", "b": "b1"}
    syncer = _syncer(plane, Script([]), state, DiskCache(tmp_path), restored=chain)
    assert syncer.want_full


def test_a_log_of_another_base_is_ignored(plane: Plane, tmp_path: Path) -> None:
    """A kill between writing a new base and resetting the log leaves the old log behind: never replayed."""
    _three_rounds(plane, tmp_path)
    old_log = (tmp_path / "cache.log").read_bytes()
    cache = DiskCache(tmp_path)
    cache.save_base(Piece(*_split(plane.full(20, {"a": (3, "a3")}))), {"a": 3})
    (tmp_path / "cache.log").write_bytes(old_log)
    state = AgentState(NODE, REGION)
    chain = load_cached(plane.identity, state, DiskCache(tmp_path))
    assert chain is not None and chain.deltas == [] and state.view.revision == 20


def _swap_body(signed: tuple[bytes, str], other: tuple[bytes, str]) -> tuple[bytes, str]:
    return wsync.join(wsync.split(signed[0])[0], wsync.split(other[0])[1]), signed[1]


def _split(answer: tuple[bytes, str]) -> tuple[bytes, str, bytes]:
    env, body = wsync.split(answer[0])
    return env, answer[1], body


@pytest.mark.parametrize(
    ("which", "content"),
    [
        ("cache.json", b"[" * 200_000),  # deep enough to raise RecursionError in json
        ("cache.json", b"[1]"),
        ("cache.log", None),  # its second line nested as deep
    ],
)
def test_a_cache_file_garbled_by_anyone_is_ignored_not_fatal(
    plane: Plane, tmp_path: Path, which: str, content: bytes | None
) -> None:
    """The agent reads its cache before it serves: a file it cannot use is ignored (the agent syncs
    afresh), never an exception that ends the agent at every start."""
    _three_rounds(plane, tmp_path)
    path = tmp_path / which
    if content is None:
        content = path.read_bytes().split(b"\n")[0] + b"\n" + b"[" * 200_000 + b"\n"
    path.write_bytes(content)
    state = AgentState(NODE, REGION)
    load_cached(plane.identity, state, DiskCache(tmp_path))  # no exception


@pytest.mark.parametrize("contact", [b"-inf", b"inf", b"nan", b"1e300", b"-5"])
def test_a_garbled_last_contact_is_no_contact(plane: Plane, tmp_path: Path, contact: bytes) -> None:
    """(-inf made the agent's age an overflow at start; a date to come made a stale cache look fresh.)"""
    from vault_edge.agent.api import Api
    from vault_edge.agent.policy import Policy

    _three_rounds(plane, tmp_path)
    (tmp_path / "cache.contact").write_bytes(contact)
    state = AgentState(NODE, REGION)
    load_cached(plane.identity, state, DiskCache(tmp_path))
    Api(state, Policy(None))  # no exception
    age = state.age()
    assert age is not None and age > 10 * 365 * 86400  # as good as never: stale past any --max-stale


def test_a_bug_applying_an_answer_does_not_end_the_sync_loop(
    plane: Plane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an OSError of the cache write was handled there: any other exception ended the sync task,
    and with it the agent. Now it costs that answer (a full view is asked for next)."""
    makers = [
        lambda s, f, n: plane.full(10, {"a": (1, "a1")}, nonce=n),
        lambda s, f, n: plane.full(11, {"a": (2, "a2")}, nonce=n),
    ]
    script, state = Script(makers), AgentState(NODE, REGION)
    syncer = _syncer(plane, script, state, DiskCache(tmp_path))
    real_rewrite, broken = syncer._rewrite, [True]

    def rewrite(chain: Any) -> None:
        if broken:
            broken.clear()
            raise RuntimeError("a bug")
        real_rewrite(chain)

    monkeypatch.setattr(syncer, "_rewrite", rewrite)
    real_sleep = asyncio.sleep
    monkeypatch.setattr("vault_edge.agent.sync.asyncio.sleep", lambda delay, *a: real_sleep(0))

    async def go() -> None:
        task = asyncio.ensure_future(syncer.run())
        for _ in range(500):
            await real_sleep(0.01)
            if state.view.revision == 11 or task.done():
                break
        assert not task.done(), task.exception()
        task.cancel()
        await syncer.close()

    asyncio.run(go())
    assert state.view.revision == 11 and values(state.view) == {"a": "a2"}
    assert script.asked[:2] == [(0, True), (0, True)]
