"""The agent's enrolment under load (httpx.MockTransport playing the control plane): a 503's
Retry-After is honoured (capped, with jitter), a slow answer is given up on after the enrolment
timeout, and every retry carries the same token and keys, signed afresh."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent.support import MockExchange
from vault_edge import wire
from vault_edge.agent import identity as ident
from vault_edge.agent.cache import DiskCache
from vault_edge.agent.sync import RETRY_AFTER_CAP_S, Answer, Syncer, retry_after
from vault_edge.agent.view import AgentState
from vault_edge.crypto import signing


def _answer(status: int, retry: str | bytes | None) -> Answer:
    headers = httpx.Headers({"retry-after": retry} if retry is not None else {})
    return Answer(status, headers, b"{}")


@pytest.mark.parametrize(
    ("status", "header", "hint"),
    [
        (503, "3", 3.0),
        (503, " 0 ", 0.0),
        (503, "999999", RETRY_AFTER_CAP_S),
        (503, "Wed, 21 Oct 2015 07:28:00 GMT", None),
        (503, "-1", None),
        (503, "1.5", None),
        (503, "\u0663".encode(), None),
        (503, "9" * 40, None),
        (503, None, None),
        (500, "3", None),
        (502, "3", None),
    ],
)
def test_retry_after_is_read_from_a_503_only_and_capped(
    status: int, header: str | bytes | None, hint: float | None
) -> None:
    assert retry_after(_answer(status, header)) == hint


def _response(status: int, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    """An answer streamed as from the network (a bytes body would count as already read)."""

    async def stream() -> AsyncIterator[bytes]:
        yield body

    return httpx.Response(status, headers={"content-type": "application/json", **(headers or {})}, content=stream())


class FakeControlPlane:
    """Answers /v1/sys/status with its key; enrolment attempts by a script: ``503:N`` (shed, Retry-After
    N), ``hang`` (never answers), ``ok`` (the signed answer for that request's nonce)."""

    def __init__(self, script: list[str]) -> None:
        self.server = signing.KeyPair.generate()
        self.script = script
        self.enrolments: list[httpx.Request] = []
        self.never = asyncio.Event()

    def token(self) -> str:
        return wire.make_join_token(
            secrets.token_hex(8), secrets.token_urlsafe(32), wire.server_pin(self.server.sign_public)
        )

    async def handle(self, req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v1/sys/status":
            return _response(200, json.dumps({"server_key": wire.b64e(self.server.sign_public)}).encode())
        self.enrolments.append(req)
        step = self.script.pop(0)
        if step.startswith("503:"):
            return _response(
                503, b'{"error":{"code":"overloaded","message":"too many enrolments"}}', {"retry-after": step[4:]}
            )
        if step == "hang":
            await self.never.wait()
        inner = json.loads(signing.open_for_server(self.server.signer(), wire.b64d(json.loads(req.content)["sealed"])))
        out = json.dumps(
            {
                "v": wire.PROTOCOL_VERSION,
                "node": "n-00000000000000aa",
                "region": "eu",
                "server_key": wire.b64e(self.server.sign_public),
                "revision": 7,
                "sign_public": inner["sign_public"],
                "nonce": req.headers[wire.H_NONCE],
            }
        ).encode()
        sig = signing.sign(self.server.signer(), wire.response_message("enroll", out))
        return _response(200, out, {wire.H_SERVER_SIGNATURE: wire.b64e(sig)})


def _enrol(
    tmp_path: Path, cp: FakeControlPlane, monkeypatch: pytest.MonkeyPatch, timeout: float = 0.3
) -> tuple[ident.Identity, list[float]]:
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, *args: Any) -> None:  # the back-off is recorded, not waited
        slept.append(delay)
        assert len(slept) < 20, "the agent kept retrying"
        await real_sleep(0)

    monkeypatch.setattr("vault_edge.agent.sync.asyncio.sleep", sleep)

    async def go() -> ident.Identity:
        http = MockExchange(cp.handle)
        identity = ident.load_or_create(tmp_path / "state")
        syncer = Syncer(
            identity,
            AgentState(),
            DiskCache(tmp_path / "state"),
            "http://cp",
            join_token=cp.token(),
            http=http,
            enroll_timeout=timeout,
        )
        try:
            return await syncer.enroll()
        finally:
            await syncer.close()

    return asyncio.run(go()), slept


def test_a_shed_enrolment_waits_its_retry_after_with_jitter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cp = FakeControlPlane(["503:5", "503:5", "503:1000", "ok"])
    identity, slept = _enrol(tmp_path, cp, monkeypatch)
    assert identity.enrolment is not None and identity.enrolment.node == "n-00000000000000aa"
    assert len(slept) == 3
    assert all(5 <= d <= 10 for d in slept[:2])  # at least what was asked, spread up to twice that
    assert slept[0] != slept[1]  # jittered: a fleet shed at once does not come back at once
    assert RETRY_AFTER_CAP_S <= slept[2] <= 2 * RETRY_AFTER_CAP_S  # a relay's huge Retry-After is capped


def test_a_slow_answer_is_given_up_and_retried_with_the_same_token_and_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = FakeControlPlane(["hang", "hang", "ok"])
    identity, slept = _enrol(tmp_path, cp, monkeypatch, timeout=0.2)
    assert identity.enrolment is not None and identity.enrolment.node == "n-00000000000000aa"
    assert len(cp.enrolments) == 3 and len(slept) == 2
    assert all(d <= 1.0 for d in slept)  # the jittered back-off of the first attempts, not a fixed wait
    # Same token and keys each time (the sealed request is the same), signed afresh each time.
    assert len({r.content for r in cp.enrolments}) == 1
    assert len({r.headers[wire.H_NONCE] for r in cp.enrolments}) == 3
    inner = json.loads(
        signing.open_for_server(cp.server.signer(), wire.b64d(json.loads(cp.enrolments[0].content)["sealed"]))
    )
    assert wire.b64d(inner["sign_public"]) == identity.keys.sign_public
    assert wire.b64d(inner["box_public"]) == identity.keys.box_public
    for r in cp.enrolments:
        ts = int(r.headers[wire.H_TIMESTAMP])
        msg = wire.request_message("POST", "/v1/agent/enroll", wire.ENROLL_NODE, ts, r.headers[wire.H_NONCE], r.content)
        assert signing.verify(identity.keys.sign_public, msg, wire.b64d(r.headers[wire.H_SIGNATURE]))


class _RelayedPlane(FakeControlPlane):
    """A relay on the path that lies: ``status_lies`` status answers with a key of its own, then
    ``enrol_lies`` enrolment answers garbled (the control plane's own answer forwarded, then replaced)."""

    def __init__(self, script: list[str], status_lies: int = 0, enrol_lies: int = 0, garble: bytes = b"") -> None:
        super().__init__(script)
        self.status_lies, self.enrol_lies, self.garble = status_lies, enrol_lies, garble

    async def handle(self, req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v1/sys/status" and self.status_lies:
            self.status_lies -= 1
            other = signing.KeyPair.generate().sign_public
            return _response(200, json.dumps({"server_key": wire.b64e(other)}).encode())
        if req.url.path == "/v1/agent/enroll" and self.enrol_lies:
            self.enrol_lies -= 1
            await super().handle(req)  # the control plane enrolled the node; its answer is lost
            return _response(200, self.garble)
        return await super().handle(req)


@pytest.mark.parametrize(
    ("status_lies", "enrol_lies", "garble"),
    [
        (1, 0, b""),  # a key the join token's pin refuses
        (0, 1, b'{"garbled": true}'),  # an unsigned 200
        (0, 1, b"\xff" * 10),
    ],
)
def test_a_relay_that_lies_during_enrolment_is_retried_past(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status_lies: int, enrol_lies: int, garble: bytes
) -> None:
    """Anything on the path can send these: the agent retries (enrolment is idempotent), where it
    ended with status 1 (an agent started by a supervisor would flap, one left alone would stay down)."""
    cp = _RelayedPlane(["ok"] * 3, status_lies, enrol_lies, garble)
    identity, slept = _enrol(tmp_path, cp, monkeypatch)
    assert identity.enrolment is not None and identity.enrolment.node == "n-00000000000000aa"
    assert len(slept) == 1
