"""Enrolment and the long-poll sync loop with the control plane (signed requests over :mod:`http1`).

    GET /v1/agent/sync?since=R&wait=S&proto=2[&full=1][&egress=REPORT]
                            (signed by the node, query included; ``since`` is the applied revision,
                            ``egress`` the egress proxy's counters: ``wire.egress.Report``)
      → what changed after R (a delta), or the full view (at enrolment, after a gap the control plane
        no longer holds, or when asked with ``full=1``), or, after S seconds, a signed ``unchanged``

The control plane records each poll as the node's contact, with its applied revision and its egress
report (cumulative counters since the agent started, per route): ``vault-edge node list|status``
shows them. They are as fresh as the poll that carried them: up to one ``--wait`` old.

Each answer is verified and decrypted off to the side (``bundle.open_answer``), written to the disk
cache (a full answer as its base, a delta appended to its log), then installed in one assignment
(persisted before it is served: see :meth:`Syncer.apply`). The agent asks for a full view after an
answer it refused, and when the deltas on disk outweigh ``REFRESH_RATIO`` times the base (which
bounds the cache and its replay at start, at an amortised cost of 1/REFRESH_RATIO of each delta).
When the control plane is away the agent keeps serving what it has and retries with jittered
exponential back-off (full jitter, capped), so a fleet does not reconnect in lockstep; a 503's
``Retry-After`` replaces the back-off (a sealed control plane holds the poll until it unseals, then
says 0: see :meth:`Syncer._sync_delay`), within a floor between polls that no answer can lower.

Anything on the path is a transient failure, never a reason to exit: every exchange goes through
:meth:`vault_edge.agent.http1.Client.request`, which turns whatever the exchange raises (transport,
TLS, framing, timeouts) into :class:`PathFailure`. It asks for ``Accept-Encoding: identity``,
refuses any other ``Content-Encoding`` without reading the body (a relay's gzip bomb is never
inflated), and reads the body raw, stopping past a limit (``MAX_BUNDLE``; ``MAX_ERROR_BODY`` for a
refusal). Tests and the fleet simulator may give :class:`Syncer` any object with the same
``request`` and ``aclose`` (:class:`Exchange`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from vault_edge import wire
from vault_edge.agent.bundle import MAX_BUNDLE, BundleError, GrantCache, Opened, Piece, open_answer
from vault_edge.agent.cache import DiskCache
from vault_edge.agent.http1 import Answer, Client, PathFailure
from vault_edge.agent.identity import Enrolment, Identity, save_enrolment
from vault_edge.agent.view import AgentState
from vault_edge.crypto import signing
from vault_edge.wire import egress as wegress
from vault_edge.wire import enrol as wenrol
from vault_edge.wire import revoke
from vault_edge.wire import sync as wsync

log = logging.getLogger("vault_edge.agent.sync")


class EnrolError(Exception):
    """Enrolment refused (bad, used or expired token; wrong control plane): do not retry."""


class Revoked(Exception):
    """The control plane revoked this node."""


MAX_ERROR_BODY = 64 * 1024  # refusals are small JSON documents
REFRESH_RATIO = 4  # a full view is asked for once the deltas on disk outweigh the base this many times
REFRESH_MIN = 256 * 1024  # ... and weigh this much (a small region is cheap to replay)


@dataclass
class Chain:
    """What the disk cache should hold: the last full answer and the deltas applied since, and how
    much of it is known to be on disk (``written`` deltas after the base, or nothing)."""

    base: Piece
    deltas: list[Piece]
    written: int | None = None  # None: the base itself is not on disk (a rewrite is needed)
    floor: dict[str, int] = field(default_factory=dict)  # the anti-rollback floor once the base was installed


class Exchange(Protocol):
    """What :class:`Syncer` needs of an HTTP client: :class:`vault_edge.agent.http1.Client`'s calls."""

    async def request(
        self,
        method: str,
        target: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        limit: int,
        error_limit: int | None = None,
        timeout: float | None = None,
    ) -> Answer: ...

    async def aclose(self) -> None: ...


class Backoff:
    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        self.base, self.cap, self.attempt = base, cap, 0
        self.rng = rng or random.SystemRandom()

    def next(self) -> float:
        delay = self.rng.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return delay

    def reset(self) -> None:
        self.attempt = 0


def signed_headers(identity: Identity, method: str, target: str, body: bytes, node: str) -> dict[str, str]:
    ts = int(time.time())
    nonce = wire.b64e(secrets.token_bytes(wire.NONCE_BYTES))
    sig = signing.sign(identity.keys.signer(), wire.request_message(method, target, node, ts, nonce, body))
    return {wire.H_NODE: node, wire.H_TIMESTAMP: str(ts), wire.H_NONCE: nonce, wire.H_SIGNATURE: wire.b64e(sig)}


def _error_message(resp: Answer) -> str:
    try:
        return str(json.loads(resp.content)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError, RecursionError):  # any body at all: it may be hostile
        return f"HTTP {resp.status_code}"


def _server_signed(key: bytes, kind: str, resp: Answer) -> bool:
    """True if ``key`` signed ``resp``'s body as a ``kind`` answer: checked before the body is parsed."""
    try:
        sig = wire.b64d(resp.headers.get(wire.H_SERVER_SIGNATURE, ""), max_len=128)
    except wire.WireError:
        return False
    return signing.verify(key, wire.response_message(kind, resp.content), sig)


def _refusal_proven(key: bytes, resp: Answer, nonce: str, request_body: bytes) -> bool:
    """True only for an enrolment refusal the pinned control-plane key signed for this very request
    (its nonce and body digest are in what the signature covers): anything else is a relay's."""
    try:
        sig = wire.b64d(resp.headers.get(wire.H_SERVER_SIGNATURE, ""), max_len=128)
    except wire.WireError:
        return False
    return signing.verify(key, wire.refusal_message(nonce, request_body, resp.content), sig)


def enrolment_body(server_key: bytes, token: str, box_public: bytes, sign_public: bytes, hostname: str) -> bytes:
    """The enrolment request, sealed to the (pinned) control-plane key: the token is readable by it alone."""
    inner = wenrol.Request(token, box_public, sign_public, hostname).encode()
    return wenrol.seal_envelope(signing.seal_to_server(server_key, inner))


ENROLL_TIMEOUT_S = 30.0  # one enrolment exchange, connect to last byte (a retry is answered the same)
RETRY_AFTER_CAP_S = 120.0  # the most of a 503's Retry-After honoured (a relay can send any)
MIN_POLL_GAP_S = 1.0  # after a failed sync poll, the next starts at least this long (to twice it) after it


def retry_after(resp: Answer) -> float | None:
    """The wait a 503 asks for, in seconds (``Retry-After: N``; an HTTP date is ignored), capped at
    ``RETRY_AFTER_CAP_S``; None when there is none."""
    raw = resp.headers.get("retry-after", "").strip() if resp.status_code == 503 else ""
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
        return None
    return min(float(raw), RETRY_AFTER_CAP_S)


class Syncer:
    def __init__(
        self,
        identity: Identity,
        state: AgentState,
        cache: DiskCache,
        server: str,
        *,
        join_token: str | None = None,
        wait: float = 30.0,
        ca_file: str | None = None,
        http: Exchange | None = None,
        restored: Chain | None = None,
        enroll_timeout: float = ENROLL_TIMEOUT_S,
        report: Callable[[], str | None] | None = None,
    ) -> None:
        self.identity, self.state, self.cache = identity, state, cache
        self.server = server.rstrip("/")
        self.join_token = join_token
        self.enroll_timeout = enroll_timeout
        self.wait = wait
        self.http: Exchange = http or Client(self.server, ca_file=ca_file, connect_timeout=10.0, timeout=wait + 20.0)
        self.grants = GrantCache()
        self.backoff = Backoff()
        self.applied = 0  # answers installed, for logs and tests
        self.received_bytes = 0  # of sync answers, for benchmarks and metrics
        self.failures = 0  # sync rounds that failed (metrics)
        self.chain = restored  # the answers behind the installed view, for the disk cache
        self.want_full = restored is None or restored.written is None
        self.received_at = state.clock.wall()
        self.report = report  # the egress counters, carried in each poll's (signed) query

    async def close(self) -> None:
        await self.http.aclose()

    # -- enrolment -----------------------------------------------------------------------------
    async def enroll(self) -> Identity:
        if not self.join_token:
            raise EnrolError("this node is not enrolled: give --join-token (from `vault-edge node token`)")
        try:
            token_id, _secret, pin = wire.parse_join_token(self.join_token)
        except wire.WireError as exc:
            raise EnrolError(str(exc)) from None
        # Check the control plane against the token's pin before sending it the token: a join token
        # must never reach an impostor. (The enrolment answer is then checked against the same key.)
        pinned = await self._pinned_server_key(pin)
        keys = self.identity.keys
        body = enrolment_body(pinned, self.join_token, keys.box_public, keys.sign_public, socket.gethostname())
        target = "/v1/agent/enroll"
        # Every try sends the same token and keys, signed afresh (new nonce and timestamp): a retry of
        # an enrolment whose answer was lost (a timeout, a dropped connection) is answered again with
        # the same node, so giving up on a slow answer never leaves an orphan node behind.
        while True:
            headers = signed_headers(self.identity, "POST", target, body, wire.ENROLL_NODE)
            try:
                resp = await asyncio.wait_for(
                    self.http.request(
                        "POST",
                        target,
                        content=body,
                        headers={**headers, "content-type": "application/json"},
                        limit=MAX_ERROR_BODY,
                    ),
                    self.enroll_timeout,
                )
            except (PathFailure, TimeoutError) as exc:
                reason = str(exc) if isinstance(exc, PathFailure) else f"no answer in {self.enroll_timeout:g}s"
                delay = self.backoff.next()
                log.warning("enrolment: control plane unreachable (%s); retrying in %.1fs", reason, delay)
                await asyncio.sleep(delay)
                continue
            if resp.status_code >= 500:
                delay = self._delay_after(resp)
                log.warning(
                    "enrolment: control plane answered %s (%s); retrying in %.1fs",
                    resp.status_code,
                    _error_message(resp),
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            if resp.status_code != 200 and not _refusal_proven(pinned, resp, headers[wire.H_NONCE], body):
                delay = self.backoff.next()
                log.warning(
                    "enrolment: a %s not signed by the control plane for this request (%s): a relay's, "
                    "not a refusal; retrying in %.1fs",
                    resp.status_code,
                    _error_message(resp),
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            if resp.status_code != 200:  # a refusal the control plane signed for this request
                raise EnrolError(f"enrolment refused: {_error_message(resp)}")
            answer, problem = _enrolment_answer(pinned, resp, headers[wire.H_NONCE], keys.sign_public)
            if answer is None:  # anything on the path could have sent it: retried (enrolment is idempotent)
                delay = self.backoff.next()
                log.warning("enrolment: an answer %s (a relay's?); retrying in %.1fs", problem, delay)
                await asyncio.sleep(delay)
                continue
            break
        enrolment = Enrolment(answer.node, answer.region, self.server, answer.server_key, time.time())
        self.identity = save_enrolment(self.identity, enrolment)
        self.state.node, self.state.region = enrolment.node, enrolment.region
        self.backoff.reset()
        log.info("enrolled as %s in region %s (join token %s)", enrolment.node, enrolment.region, token_id)
        return self.identity

    def _delay_after(self, resp: Answer) -> float:
        """How long to wait after a 5xx: a 503's Retry-After (capped) spread over [hint, 2 * hint],
        so a fleet shed at once does not come back at once; the jittered back-off when larger, or
        when there is no hint."""
        delay = self.backoff.next()
        hint = retry_after(resp)
        if hint is not None:
            delay = max(delay, hint + self.backoff.rng.uniform(0, hint))
        return delay

    async def _pinned_server_key(self, pin: str) -> bytes:
        while True:
            # Nothing here is trusted yet (the pin is checked below): an answer that cannot be used, from
            # the control plane or from anything on the path, is retried like an unreachable one; so is
            # a key the pin refuses (a relay could send one: it must not end the agent).
            key: bytes | None = None
            try:
                resp = await self.http.request("GET", "/v1/sys/status", headers={}, limit=MAX_ERROR_BODY)
                doc = json.loads(resp.content) if resp.status_code == 200 else {}
                if doc.get("server_key"):
                    key = wire.b64d(doc["server_key"])
                reason = f"HTTP {resp.status_code}" if resp.status_code != 200 else "not initialized"
            except PathFailure as exc:
                reason = str(exc)
            except (ValueError, TypeError, AttributeError, RecursionError, wire.WireError):
                reason = "a malformed status answer"
            if key is not None and wire.server_pin(key) == pin:
                return key
            if key is not None:  # a relay's, or the wrong control plane: the token is not sent to it
                reason = "its key does not match the join token's pin: wrong --control-plane, or a relay"
            delay = self.backoff.next()
            log.warning("enrolment: control plane not ready (%s); retrying in %.1fs", reason, delay)
            await asyncio.sleep(delay)

    # -- sync ----------------------------------------------------------------------------------
    @property
    def cache_behind(self) -> bool:
        """An installed answer is not on disk yet (a failed write, retried every round)."""
        return self.chain is not None and self.chain.written != len(self.chain.deltas)

    async def poll_once(self) -> Opened:
        """One signed long-poll; the answer verified and opened, not yet installed."""
        enrolment = self.identity.enrolment
        assert enrolment is not None
        held = self.state.view
        target = f"/v1/agent/sync?since={held.revision}&wait={self.wait:g}&proto={wsync.PROTOCOL}"
        if self.want_full or held.revision == 0:
            target += "&full=1"
        counts = self.report() if self.report is not None else None
        if counts:  # in the signed target: the control plane stores it as this node's report
            target += f"&{wegress.REPORT_PARAM}={counts}"
        headers = signed_headers(self.identity, "GET", target, b"", enrolment.node)
        resp = await self.http.request("GET", target, headers=headers, limit=MAX_BUNDLE, error_limit=MAX_ERROR_BODY)
        if resp.status_code == 403 and self._proves_revocation(resp, headers[wire.H_NONCE]):
            raise Revoked(_error_message(resp))
        if resp.status_code != 200:
            raise PathFailure(f"{resp.status_code}: {_error_message(resp)}", retry_after(resp))
        self.received_bytes += len(resp.content)
        try:
            return open_answer(
                self.identity,
                resp.content,
                resp.headers.get(wire.H_SERVER_SIGNATURE),
                nonce=headers[wire.H_NONCE],
                held=held,
                grants=self.grants,
                floor=self.state.floor,
            )
        except BundleError:
            self.want_full = True  # whatever went wrong, a full view (checked the same way) recovers
            raise

    def _proves_revocation(self, resp: Answer, nonce: str) -> bool:
        """True only for a refusal the control plane signed, naming this node and this request's nonce:
        a bare 403 (from a proxy, an impostor, a replay) is a transient failure, never a reason to wipe."""
        enrolment = self.identity.enrolment
        assert enrolment is not None
        proven = _server_signed(enrolment.server_key, revoke.KIND, resp) and revoke.proves(
            resp.content, enrolment.node, nonce
        )
        if not proven:
            log.warning(
                "a 403 without the control plane's signed proof of revocation (%s): ignored", _error_message(resp)
            )
        return proven

    async def apply(self, opened: Opened) -> None:
        """Persist, then install: a view is served only once it is on disk.

        The invariant is that an agent never serves, after a restart, something older than it served
        before. Writing the disk cache (a full answer as a new base, written atomically; a delta
        appended to the log and fsync'd) before the view is installed keeps it across a SIGKILL at
        any point: a kill before the write leaves the old state on disk and the old view was the one
        served; a kill after it finds the new one there.

        The trade-off, when the write fails (disk full, a read-only or broken state dir, EMFILE): the
        new view is installed anyway, since refusing it would keep serving values the control plane
        has rotated away, and availability of the current value is the product. The cache is then
        known to be behind (``cache_behind``) and rewritten whole on every later round until that
        succeeds; a restart in that window serves the older cached view. Logged loudly meanwhile.
        """
        self.received_at = self.state.clock.wall()
        if opened.view is not None:
            assert opened.piece is not None
            if opened.kind == wsync.FULL or self.chain is None:
                self.chain = Chain(opened.piece, [], None, dict(opened.floor))
                self.want_full = False
            else:
                self.chain.deltas.append(opened.piece)
            self.state.floor = opened.floor  # written with it: what was served is never undercut
            await self.flush_cache()
            self.state.contact()
            self.state.install(opened.view)
            self.applied += 1
            log.info("applied revision %d (%s, %d secrets)", opened.revision, opened.kind, len(opened.view.names))
            for name in opened.refused:
                log.error(
                    "refused a rollback of %r (the answer's current version is older than the one held); "
                    "keeping the held one",
                    name,
                )
            if self.cache.log_bytes > max(REFRESH_RATIO * self.cache.base_bytes, REFRESH_MIN):
                self.want_full = True  # the log outweighs its base: start a new one
        else:
            self.state.contact()
            if self.cache_behind:
                await self.flush_cache()
            else:
                try:
                    await asyncio.to_thread(self.cache.touch, self.received_at)
                except OSError as exc:
                    log.warning(
                        "cache write failed (%s): the last contact time is not on disk; serving on",
                        exc.strerror or type(exc).__name__,
                    )

    async def flush_cache(self) -> bool:
        """Write what the disk cache lacks, if anything. True when the cache is up to date."""
        chain = self.chain
        if chain is None or chain.written == len(chain.deltas):
            return True
        try:
            if chain.written is None:  # a new base, or a failed write before: the whole chain
                await asyncio.to_thread(self._rewrite, chain)
            else:
                for piece in chain.deltas[chain.written :]:
                    await asyncio.to_thread(self.cache.append, piece, self.received_at)
                    chain.written += 1
        except OSError as exc:
            chain.written = None  # rewritten whole next time: an append may have half-happened
            log.error(
                "cache write failed (%s): serving the new view from memory; the disk cache is behind "
                "(a restart now would serve an older view) and the write will be retried",
                exc.strerror or type(exc).__name__,
            )
            return False
        return True

    def _rewrite(self, chain: Chain) -> None:
        """The base with the floor of its time (replaying the deltas raises it again), then each delta
        (``save_base`` resets the log, so nothing is doubled)."""
        deltas = list(chain.deltas)
        self.cache.save_base(chain.base, chain.floor, self.received_at)
        for piece in deltas:
            self.cache.append(piece, self.received_at)
        chain.written = len(deltas)

    def _sync_delay(self, exc: PathFailure, elapsed: float) -> float:
        """How long to wait after a failed poll that took ``elapsed`` seconds.

        Without a hint: the jittered exponential back-off. A 503's ``Retry-After`` is honoured in its
        place, spread over [hint, 2 * hint], and never longer than the back-off's cap: a sealed
        control plane that held the poll (``server/sealhold.py``) says 0, meaning "the hold was the
        wait, poll again", and the agent is back in a held poll at once, so it hears of the unseal
        within a round trip instead of after up to 30 s of back-off. Whatever a relay sends (a 503
        with ``Retry-After: 0``, at once, forever), two poll starts are never closer than
        ``MIN_POLL_GAP_S`` (jittered up to twice that): no tight loop, and a fleet stays spread."""
        delay = self.backoff.next()
        hint = exc.retry_after
        if hint is None:
            return delay
        rng = self.backoff.rng
        delay = min(hint + rng.uniform(0, hint), self.backoff.cap)
        return max(delay, rng.uniform(MIN_POLL_GAP_S, 2 * MIN_POLL_GAP_S) - elapsed)

    async def run(self) -> None:
        if not self.identity.enrolled:
            await self.enroll()
        while True:
            if self.cache_behind:
                await self._unfailing(self.flush_cache())  # retried every round (at most --wait apart)
            started = time.monotonic()
            try:
                opened = await self.poll_once()
            except Revoked:
                raise
            except PathFailure as exc:
                self.failures += 1
                self.state.lost_contact()
                delay = self._sync_delay(exc, time.monotonic() - started)
                log.warning("sync failed (%s); serving what we hold; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            except BundleError as exc:
                self.failures += 1
                delay = max(1.0, self.backoff.next())
                log.error(
                    "refused a sync answer: %s; keeping revision %d; retrying in %.1fs",
                    exc,
                    self.state.view.revision,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            except Exception as exc:  # a bug must not stop the agent serving what it holds; no value in logs
                self.failures += 1
                self.state.lost_contact()
                delay = max(1.0, self.backoff.next())
                log.error(
                    "sync failed unexpectedly (%s); serving what we hold; retrying in %.1fs", type(exc).__name__, delay
                )
                await asyncio.sleep(delay)
                continue
            self.backoff.reset()
            await self._unfailing(self.apply(opened))

    async def _unfailing(self, step: Coroutine[Any, Any, object]) -> None:
        """Run a step of the loop that only a bug can fail (anything else it handles): the agent goes
        on serving what it holds, and asks for a full view next."""
        try:
            await step
        except Exception as exc:  # no value in logs: the type only
            self.failures += 1
            self.want_full = True
            delay = max(1.0, self.backoff.next())
            log.error(
                "sync failed unexpectedly (%s); serving what we hold; retrying in %.1fs", type(exc).__name__, delay
            )
            await asyncio.sleep(delay)


def load_cached(identity: Identity, state: AgentState, cache: DiskCache) -> Chain | None:
    """Serve from the disk cache before (or without) any contact: the base, then each delta of the log
    replayed through the same checks as a live answer (a delta that does not apply ends the replay:
    the view is the last good one, and a full view is asked for). The chain behind the installed
    view, or None when nothing could be installed."""
    cached = cache.load()
    state.floor = cache.floor() if cached is None else dict(cached.floor)
    if cached is None or identity.enrolment is None:
        return None
    grants = GrantCache()
    try:
        opened = open_answer(
            identity,
            cached.base.envelope + b"\n" + cached.base.body,
            cached.base.signature,
            nonce=None,
            held=state.view,
            floor=state.floor,
            grants=grants,
        )
    except BundleError as exc:
        log.error("refused the disk cache: %s", exc)
        return None
    if opened.view is None or opened.kind != wsync.FULL:
        log.error("refused the disk cache: its base is not a full view")
        return None
    chain, refused = Chain(cached.base, [], 0, dict(opened.floor)), set(opened.refused)
    for delta in cached.deltas:
        try:
            nxt = open_answer(
                identity,
                delta.envelope + b"\n" + delta.body,
                delta.signature,
                nonce=None,
                held=opened.view,
                floor=opened.floor,
                grants=grants,
            )
        except BundleError as exc:
            log.error(
                "the disk cache's delta log stops applying at revision %d (%s): serving that; a full "
                "view will be asked for",
                opened.revision,
                exc,
            )
            chain.written = None  # rewritten with the next full view
            break
        if nxt.view is None:
            break
        opened, refused = nxt, refused | set(nxt.refused)
        chain.deltas.append(delta)
        chain.written = len(chain.deltas)
    assert opened.view is not None
    for name in sorted(refused):
        log.error(
            "the disk cache holds %r older than a version served before: not serving it until a newer one arrives", name
        )
    state.floor = opened.floor
    state.install(opened.view)
    # Age survives restarts: the last contact is when the cached answer (or a later `unchanged`) came.
    # (a contact yet to come is none: it would make a stale cache look fresh, past --max-stale)
    received = cached.received_at if cached.received_at <= state.clock.wall() + 1.0 else 0.0
    state.contact(state.clock.monotonic() - max(0.0, state.clock.wall() - received))
    state.lost_contact()
    log.info(
        "serving revision %d from the disk cache (%d secrets; %d deltas replayed)",
        opened.revision,
        len(opened.view.names),
        len(chain.deltas),
    )
    return chain


def _enrolment_answer(pinned: bytes, resp: Answer, nonce: str, sign_public: bytes) -> tuple[wenrol.Answer | None, str]:
    """The enrolment answer if the pinned control plane signed it for this request, else (None, what
    is wrong with it)."""
    if not _server_signed(pinned, wenrol.KIND, resp):
        return None, "not signed by the pinned control-plane key"
    try:
        answer = wenrol.Answer.decode(resp.content)
    except wire.WireError:
        return None, "that cannot be read"
    if answer.server_key != pinned:
        return None, "naming another control-plane key than the pinned one"
    if answer.nonce != nonce or answer.sign_public != sign_public:
        return None, "made for another request"
    return answer, ""
