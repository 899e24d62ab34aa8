"""The agent's socket API: routes a parsed request, applies the policy, builds the answer.

    Api(state, policy, clock).answer(request, caller) → Answer(bytes, cacheable) | Hold(long-poll)

No sockets here (``endpoint`` is the transport: it frames, parses, caches and writes); tests call
:meth:`Api.answer` directly, with a fake clock.

    GET /v1/secrets/{name}        200 {"name","value","encoding","version","stage","revision"}
        ?version=N | ?stage=S     (Accept: application/octet-stream: the raw value)
    GET /v1/secrets               200 {"names": [...]}: only the names the caller may read
    GET /v1/secrets?names=a,b,c   200 {"secrets": [...]}: a batch read, all or nothing (&stage=S)
    GET /v1/health                200 {"status","node","region","revision","last_sync_age_s","secrets"}
    GET /v1/watch?since=R&wait=S  a long-poll: {"revision","changed"} once the view passes R, or after S s
    ANY /v1/egress/{route}/{path}, and absolute URIs (a forward proxy): the egress proxy, ``agent/egress.py``
        (keyless workers); routed by prefix before anything else, so reads pay one string test for it

Headers on every answer: ``X-Vault-Edge-Revision`` (the view's revision) and ``Age`` (whole seconds
since the agent last heard from the control plane, carried over restarts by the disk cache; ``0``
when it never has: ``/v1/health`` then says ``last_sync_age_s`` null), and ``Cache-Control: no-store``.
Values are in JSON as ``wire.value_fields`` puts them (text when UTF-8, else base64url).

Order of checks on a read: 400 (bad request) → 403 (policy: a name the caller may not read is
forbidden whether or not it exists) → 503 (``not_ready``, ``too_stale``) → 404 (absent or past grace).

Caching (the endpoint's per-connection cache replays answers marked cacheable): the API starts a new
``epoch`` whenever an answer could change, told by the state on every install and contact
(``AgentState.subscribe``), and sets ``until`` to the next instant at which one changes with time
alone: the integer ``Age`` ticking over, ``--max-stale`` passing, at most a second ahead. Answers
about an entry with a grace-period end (``previous``), health and watch are never cacheable.

Time is ``clock``'s (the state's by default): ``monotonic()`` for ages and staleness, ``wall()`` for
grace periods. A long-poll's wait is the event loop's own timer.
"""

from __future__ import annotations

import asyncio
import json
import math
from functools import partial
from typing import Any, Final
from urllib.parse import unquote

from vault_edge import wire
from vault_edge.agent.clock import Clock
from vault_edge.agent.egress import PREFIX as EGRESS_PREFIX
from vault_edge.agent.egress import Egress, EgressSettings
from vault_edge.agent.endpoint import STATUS_LINE, Answer, BadRequest, Exchange, Hold, Request
from vault_edge.agent.fields import with_field
from vault_edge.agent.peercred import Caller
from vault_edge.agent.policy import Policy
from vault_edge.agent.view import AgentState, Entry
from vault_edge.wire.fields import FieldError

MAX_BATCH: Final = 256  # names in one ?names= read
WATCH_DEFAULT_S: Final = 30.0
WATCH_MAX_S: Final = 300.0
_JSON: Final = b"application/json"
_OCTETS: Final = b"application/octet-stream"
_READ_PARAMS: Final = frozenset({"version", "stage", "field"})
_LIST_PARAMS: Final = frozenset({"names", "stage"})
_WATCH_PARAMS: Final = frozenset({"since", "wait"})
_NONE: Final[frozenset[str]] = frozenset()


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class Api:
    """The API over one agent state and policy; one per served socket (it subscribes to the state:
    :meth:`close` unsubscribes)."""

    def __init__(
        self, state: AgentState, policy: Policy, clock: Clock | None = None, egress: EgressSettings | None = None
    ) -> None:
        self.state, self.policy = state, policy
        self.egress = Egress(state, policy, self.error, egress)
        self.clock: Clock = state.clock if clock is None else clock
        self.epoch = 0
        self.until = -math.inf  # monotonic time at which cached answers must be dropped
        self.stale = False
        self.common = b""  # the headers every answer carries, for this epoch
        self._changed: asyncio.Future[None] | None = None
        # Metrics (agent/metrics.py reads them at scrape time): answers built here, i.e. cache misses,
        # by status, and error answers by code. Plain int increments: nothing else on the hot path.
        self.statuses: dict[int, int] = dict.fromkeys(STATUS_LINE, 0)
        self.refusals: dict[str, int] = {}
        state.subscribe(self.refresh)
        self.refresh()

    def close(self) -> None:
        self.state.unsubscribe(self.refresh)

    @property
    def needs_exe(self) -> bool:
        return self.policy.uses_exe

    def refresh(self) -> None:
        """Start a new epoch: recompute what depends on the view, the last contact and the clock."""
        st, now = self.state, self.clock.monotonic()
        age = st.age(now)
        age_s = 0 if age is None else max(0, int(age))
        self.stale = st.too_stale(now)
        until = now + 1.0
        if age is not None:
            until = min(until, now + (age_s + 1 - age))  # when the integer Age ticks over
            if st.max_stale is not None and not self.stale:
                until = min(until, math.nextafter(now + (st.max_stale - age), math.inf))
        self.until = until
        self.common = b"X-Vault-Edge-Revision: %d\r\nAge: %d\r\nCache-Control: no-store\r\n" % (st.view.revision, age_s)
        self.epoch += 1

    # -- building answers

    def build(self, status: int, body: bytes, ctype: bytes = _JSON, extra: bytes = b"", close: bool = False) -> bytes:
        self.statuses[status] += 1
        return b"".join(
            (
                STATUS_LINE[status],
                b"Content-Type: ",
                ctype,
                b"\r\nContent-Length: %d\r\n" % len(body),
                self.common,
                extra,
                b"Connection: close\r\n" if close else b"",
                b"\r\n",
                body,
            )
        )

    def error(self, status: int, code: str, message: str, *, close: bool = False, extra: bytes = b"") -> bytes:
        self.refusals[code] = self.refusals.get(code, 0) + 1
        body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
        return self.build(status, body, extra=extra, close=close)

    # -- routing

    def answer(self, req: Request, caller: Caller) -> Answer | Hold | Exchange:
        """Route one parsed request to its answer (errors included), or to a long-poll."""
        if req.target[0] != "/" or req.target.startswith(EGRESS_PREFIX):
            return self.egress.answer(req, caller)
        if req.method != "GET":
            return Answer(self.error(405, "method_not_allowed", "only GET is served", extra=b"Allow: GET\r\n"), True)
        path, _, query = req.target.partition("?")
        try:
            if path.startswith("/v1/secrets/"):
                return self._read(
                    _name(unquote(path[12:], errors="strict")), parse_query(query, _READ_PARAMS), req, caller
                )
            if path == "/v1/secrets":
                params = parse_query(query, _LIST_PARAMS)
                if "names" in params:
                    return self._batch(params, req, caller)
                if "stage" in params:
                    raise BadRequest(400, "stage applies to a read, not to the list of names")
                return self._list(req, caller)
            if path == "/v1/health":
                parse_query(query, _NONE)
                return Answer(self._health(), False)
            if path == "/v1/watch":
                params = parse_query(query, _WATCH_PARAMS)
                since = _int_param(params, "since")
                wait = params.get("wait", str(WATCH_DEFAULT_S))
                try:
                    seconds = float(wait)
                except ValueError:
                    seconds = math.nan
                if not 0 <= seconds <= math.inf:
                    raise BadRequest(400, "wait must be a number of seconds ≥ 0")
                return Hold(partial(self.watch, since, min(seconds, WATCH_MAX_S)))
        except UnicodeDecodeError:
            return Answer(self.error(400, "bad_request", "invalid percent-encoding in the request target"), True)
        except BadRequest as bad:  # well framed, so the connection stays open
            return Answer(self.error(bad.status, "bad_request", str(bad)), True)
        except _Refusal as r:
            return Answer(
                self.error(r.status, r.code, str(r), extra=b"Retry-After: 1\r\n" if r.status == 503 else b""), True
            )
        return Answer(self.error(404, "not_found", f"no such endpoint: {path[:100]}"), True)

    # -- reads

    def _ready(self) -> None:
        if not self.state.loaded:
            raise _Refusal(503, "not_ready", "the agent has no secrets yet (first sync or cache load pending)")
        if self.stale:
            raise _Refusal(503, "too_stale", "the agent has not heard from the control plane within --max-stale")

    def _entry(
        self, name: str, version: int | None, stage: str | None, req: Request, caller: Caller, wall: float
    ) -> Entry:
        if not self.policy.allows(caller, req.token, name):
            raise _Refusal(403, "forbidden", f"the caller may not read {name!r}")
        self._ready()
        entry = self.state.view.lookup(name, version=version, stage=stage, now=wall)
        if entry is None:
            what = f" version {version}" if version is not None else f" at stage {stage}" if stage else ""
            raise _Refusal(404, "not_found", f"no secret {name!r}{what}")
        return entry

    def _doc(self, e: Entry) -> dict[str, Any]:
        return {
            "name": e.name,
            **wire.value_fields(e.value),
            "version": e.version,
            "stage": e.stage,
            "revision": self.state.view.revision,
        }

    def _read(self, name: str, params: dict[str, str], req: Request, caller: Caller) -> Answer:
        version, stage = _int_param(params, "version", minimum=1), _stage_param(params)
        if version is not None and stage is not None:
            raise BadRequest(400, "give version or stage, not both")
        e = self._entry(name, version, stage, req, caller, self.clock.wall())
        if "field" in params:  # a structured value's one field (agent/fields.py)
            try:
                e = with_field(e, params["field"])
            except FieldError as exc:
                raise _Refusal(exc.status, exc.code, str(exc)) from None
        cacheable = e.expires_at is None  # a grace period's end is wall-clock; re-check it every time
        if wants_raw(req.accept):
            extra = b"X-Vault-Edge-Version: %d\r\nX-Vault-Edge-Stage: %s\r\n" % (e.version, e.stage.encode())
            return Answer(self.build(200, e.value, _OCTETS, extra), cacheable)
        return Answer(self.build(200, _dumps(self._doc(e))), cacheable)

    def _batch(self, params: dict[str, str], req: Request, caller: Caller) -> Answer:
        names = [_name(n) for n in params["names"].split(",")]
        if len(names) > MAX_BATCH:
            raise BadRequest(400, f"at most {MAX_BATCH} names in one read")
        stage = _stage_param(params)
        wall = self.clock.wall()
        entries = [self._entry(n, None, stage, req, caller, wall) for n in names]
        cacheable = all(e.expires_at is None for e in entries)
        return Answer(self.build(200, _dumps({"secrets": [self._doc(e) for e in entries]})), cacheable)

    def _list(self, req: Request, caller: Caller) -> Answer:
        if req.token is not None and not self.policy.knows_token(req.token):
            raise _Refusal(403, "forbidden", "the X-Vault-Edge-Token matches no policy rule")
        self._ready()
        names = [n for n in self.state.view.names if self.policy.allows(caller, req.token, n)]
        return Answer(self.build(200, _dumps({"names": names})), True)

    def _health(self) -> bytes:
        st, now = self.state, self.clock.monotonic()
        age = st.age(now)
        view = st.view
        return self.build(
            200,
            _dumps(
                {
                    "status": st.status(now),
                    "node": view.node or st.node,
                    "region": view.region or st.region,
                    "revision": view.revision,
                    "last_sync_age_s": None if age is None else round(age, 3),
                    "secrets": len(view.names),
                }
            ),
        )

    async def watch(self, since: int | None, wait: float) -> bytes:
        """Hold until the view's revision passes ``since`` (default: the current one) or ``wait`` ends."""
        st = self.state
        if since is None:
            since = st.view.revision
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while st.view.revision <= since:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # One shared future per install, so timed-out watches leave nothing behind in the state.
            if self._changed is None or self._changed.done():
                self._changed = st.changed()
            await asyncio.wait((self._changed,), timeout=remaining)
        if self.clock.monotonic() >= self.until:
            self.refresh()
        revision = st.view.revision
        return self.build(200, _dumps({"revision": revision, "changed": revision > since}))


# ------------------------------------------------------------------------------------ parameters


def wants_raw(accept: str | None) -> bool:
    """True when Accept lists application/octet-stream before (or without) application/json."""
    if accept is None:
        return False
    for item in accept.split(","):
        media = item.split(";", 1)[0].strip().lower()
        if media == "application/octet-stream":
            return True
        if media == "application/json":
            return False
    return False


def parse_query(query: str, allowed: frozenset[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    if not query:
        return params
    for part in query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        key, value = unquote(key, errors="strict"), unquote(value, errors="strict")
        if key not in allowed:
            takes = f"allowed: {', '.join(sorted(allowed))}" if allowed else "this endpoint takes none"
            raise BadRequest(400, f"unknown query parameter {key!r} ({takes})")
        if key in params:
            raise BadRequest(400, f"query parameter {key!r} given twice")
        params[key] = value
    return params


def _int_param(params: dict[str, str], key: str, *, minimum: int = 0) -> int | None:
    raw = params.get(key)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18 or int(raw) < minimum:
        raise BadRequest(400, f"{key} must be an integer ≥ {minimum}")
    return int(raw)


def _stage_param(params: dict[str, str]) -> str | None:
    stage = params.get("stage")
    if stage is not None and stage not in wire.STAGES:
        raise BadRequest(400, f"stage must be one of {', '.join(wire.STAGES)}")
    return stage


def _name(raw: str) -> str:
    if not wire.valid_name(raw):
        raise BadRequest(400, "invalid secret name")
    return raw


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()
