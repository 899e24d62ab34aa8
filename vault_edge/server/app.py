"""The control plane's ASGI app: routes, error shapes, body limit, metrics, lifecycle."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vault_edge import __version__
from vault_edge.crypto.errors import DecryptionError
from vault_edge.server import ui
from vault_edge.server.admission import InFlight
from vault_edge.server.audit import REMOTE
from vault_edge.server.barrier import Barrier, Sealed, UnsealRefused
from vault_edge.server.contacts import ContactLog
from vault_edge.server.context import Context
from vault_edge.server.errors import ApiError, answer_of, body
from vault_edge.server.fastpath import SyncFastPath
from vault_edge.server.hub import Hub
from vault_edge.server.metrics import authorized, install
from vault_edge.server.routes import admin, agent, egress, rotation, secrets, sys
from vault_edge.server.routes import seal as seal_routes
from vault_edge.server.scheduler import Scheduler
from vault_edge.server.sealhold import SealHold
from vault_edge.server.settings import Settings
from vault_edge.server.storage.engine import display_url, make_engine, migrate
from vault_edge.server.storage.repo import Store, TamperedRow

log = logging.getLogger("vault_edge.server")

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "bad_request",
    429: "too_many_requests",
}


class ErrorResponse(JSONResponse):
    """Error bodies are ASCII JSON: a message that quotes hostile input (a lone surrogate, a control
    character) still renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def error(status: int, code: str, message: str, headers: Any = None) -> ErrorResponse:
    return ErrorResponse(body(status, code, message), status_code=status, headers=headers)


class BodyLimit:
    """413 for a body over ``limit`` bytes, by Content-Length up front or as a streamed body crosses
    it. No exception crosses the app's task groups: past the limit the app is told the client left,
    whatever it sends afterwards is dropped, and what it raises about it is swallowed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope["headers"]:
            if k == b"content-length" and (not v.isdigit() or len(v) > 18 or int(v) > self.limit):
                return await error(413, "too_large", f"request body over {self.limit} bytes")(scope, receive, send)
        seen, refused, started = 0, False, False

        async def limited() -> Message:
            nonlocal seen, refused, started
            if refused:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    refused = True
                    if not started:
                        started = True
                        await error(413, "too_large", f"request body over {self.limit} bytes")(scope, receive, send)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded(msg: Message) -> None:
            nonlocal started
            if refused:
                return
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited, guarded)
        except Exception:
            if not refused:
                raise


class ControlPlane(FastAPI):
    """The control plane's ASGI app. Every HTTP request names its caller's address (the connection's
    peer) for the audit entries it makes (``audit.REMOTE``), accepted or refused, whichever route or
    thread makes them. A sync long-poll (the hot path: every node holds one and re-polls after each
    change) then goes straight to ``fastpath``, before Starlette's and FastAPI's middleware stack
    (error and telemetry wrappers, body limits, request metrics), which every other request takes as
    usual. The route ``GET /v1/agent/sync`` stays declared for the OpenAPI schema."""

    fastpath: SyncFastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        client = scope.get("client")
        token = REMOTE.set(str(client[0])[:128] if client else None)
        try:
            if self.fastpath is not None and SyncFastPath.wants(scope):
                await self.fastpath.serve(scope, receive, send)
            else:
                await super().__call__(scope, receive, send)
        finally:
            REMOTE.reset(token)


class Metrics:
    """Request counts and latency per route template, as plain ASGI (no per-request task group)."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def observed(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, observed)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")  # the router fills in the scope
            self.requests.labels(scope["method"], path, str(status)).inc()
            self.latency.labels(path).observe(time.perf_counter() - t0)


def _validation_message(exc: RequestValidationError) -> str:
    """A clear message naming the field, never echoing the input (it may hold a secret)."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            return "request body is not valid JSON"
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _audit_refusal(ctx: Context, request: Request, exc: ApiError) -> None:
    """Audit a 401 or 403 of the operator API: every refusal is audited, in this one place.

    Throttled per kind (``Auditor.record_alone``): anyone can send a request without a token. The kind
    is the route's operation (``api.auth`` for a 401) and the error code, never the message, which may
    quote a name the caller chose and so would make kinds without bound. The detail names the remote
    address, the method and the path: never the query string, the body or the token. The actor is the
    token that authenticated (a 403 for lacking a right), else ``anonymous``."""
    route = request.scope.get("route")
    if getattr(route, "path", "").startswith("/v1/agent/"):
        return  # node refusals are audited where they are judged (ops.nodes.refuse), target per node
    who = getattr(request.state, "principal", None)
    tags = getattr(route, "tags", None) or ["api"]
    action = "api.auth" if exc.status == 401 else f"{tags[0]}.{getattr(route, 'name', 'unknown')}"
    ctx.auditor.record_alone(
        who.actor if who is not None else "anonymous",
        action,
        outcome="refused",
        reason=exc.code,
        status=exc.status,
        message=exc.message[:300],
        remote=request.client.host if request.client else "",
        method=request.method,
        path=request.url.path[:512],
    )


def _open_audit_sinks(ctx: Context, settings: Settings) -> None:
    """Audit sinks beside the database (``--audit-file``, ``--audit-stdout``); a file that cannot be
    opened stops the start (OSError), rather than running without the sink the operator asked for."""
    from vault_edge.server.audit import FileSink, StdoutSink

    if settings.audit_file:
        ctx.auditor.sinks.append(FileSink(settings.audit_file))
    if settings.audit_stdout:
        ctx.auditor.sinks.append(StdoutSink())


def _startup_line(ctx: Context, settings: Settings) -> None:
    """One line an operator (or a log search) finds at every start: version, address, database (its
    password hidden), seal type and state, audit sinks."""
    scheme = "https" if settings.tls_cert else "http"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    state = "unsealed" if not ctx.barrier.sealed else "sealed"
    if ctx.seal_error:
        state += f" ({ctx.seal_error[:200]})"
    sinks = [
        s
        for s, on in (("file " + str(settings.audit_file), settings.audit_file), ("stdout", settings.audit_stdout))
        if on
    ]
    log.info(
        "vault-edge %s control plane on %s://%s:%d; database %s; seal %s, %s; audit sinks: %s",
        __version__,
        scheme,
        host,
        settings.port,
        display_url(ctx.store.engine.url),
        settings.seal,
        state,
        ", ".join(sinks) or "database only",
    )


def create_app(
    settings: Settings | None = None, store: Store | None = None, barrier: Barrier | None = None, on_ready: Any = None
) -> FastAPI:
    settings = settings or Settings()
    if store is None:
        engine = make_engine(settings.db)
        migrate(engine)
        store = Store(engine)
    ctx = Context(store, barrier or Barrier(), settings)
    if settings.seal == "pkcs11":
        from vault_edge.server import hsm

        ctx.hsm = hsm.from_settings(settings)  # SealError: a missing option or PIN, said at start
    hub = Hub(ctx)
    contacts = ContactLog(ctx, settings.contact_linger_ms / 1000)
    scheduler = Scheduler(ctx)
    sealhold = SealHold(ctx.barrier, settings.sealed_hold_max)
    registry = CollectorRegistry()
    requests = Counter("vault_edge_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("vault_edge_request_seconds", "HTTP request latency", ["route"], registry=registry)
    Gauge("vault_edge_sealed", "1 while sealed", registry=registry).set_function(lambda: float(ctx.barrier.sealed))
    Gauge("vault_edge_sync_waiting", "long-polls held", registry=registry).set_function(lambda: float(hub.waiting))
    Gauge("vault_edge_sync_held_sealed", "long-polls held until the unseal", registry=registry).set_function(
        lambda: float(sealhold.held)
    )
    Gauge(
        "vault_edge_sync_sealed_shed",
        "long-polls refused at once while sealed (over VAULT_EDGE_SEALED_HOLD_MAX) since start",
        registry=registry,
    ).set_function(lambda: float(sealhold.shed))
    enrolments = InFlight("enrolments", settings.enroll_max_in_flight, settings.enroll_retry_after_s)
    Gauge("vault_edge_enrolments_in_flight", "enrolments in progress", registry=registry).set_function(
        lambda: float(enrolments.active)
    )
    Gauge(
        "vault_edge_enrolments_shed",
        "enrolments refused with 503 (over the in-flight limit) since start",
        registry=registry,
    ).set_function(lambda: float(enrolments.shed))
    install(registry, ctx, scheduler, contacts)  # fleet gauges, propagation lag, audit and rotation counters
    _open_audit_sinks(ctx, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.start(asyncio.get_running_loop())
        sealhold.start(asyncio.get_running_loop())  # before auto-unseal: its release finds the loop
        if ctx.hsm is not None:
            from vault_edge.server.ops import seal as seal_ops

            await asyncio.to_thread(seal_ops.auto_unseal, ctx)  # before serving: no share, no human
        scheduler.start()
        if on_ready is not None:
            await asyncio.to_thread(on_ready, ctx)
        _startup_line(ctx, settings)
        try:
            yield
        finally:
            scheduler.stop()
            hub.stop()

    app = ControlPlane(title="vault-edge control plane", version=__version__, lifespan=lifespan)
    app.state.ctx, app.state.hub, app.state.scheduler, app.state.contacts = ctx, hub, scheduler, contacts
    app.state.enrolments, app.state.sealhold = enrolments, sealhold
    for router in (
        sys.router,
        seal_routes.router,
        secrets.router,
        admin.router,
        agent.router,
        rotation.router,
        egress.router,
    ):
        app.include_router(router)
    ui.mount(app)  # the fleet console at /ui

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        if not authorized(request.headers.get("authorization"), settings.metrics_token):
            return error(401, "unauthorized", "give Authorization: Bearer <the --metrics-token>")
        names = request.query_params.getlist("name[]")  # only these families (Prometheus' convention)
        chosen = registry.restricted_registry(names) if names else registry
        return Response(generate_latest(chosen), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status in (401, 403):
            await asyncio.to_thread(_audit_refusal, ctx, request, exc)
        return error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(Sealed)
    @app.exception_handler(UnsealRefused)
    async def barrier_refusal(request: Request, exc: Sealed | UnsealRefused) -> JSONResponse:
        return await api_error(request, answer_of(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, "bad_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return error(exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(DecryptionError)
    async def integrity(request: Request, exc: DecryptionError) -> JSONResponse:
        # Stored ciphertext that does not open where it claims to belong (tampered, or moved to
        # another name, version or region): refused, logged, audited; nothing else is touched.
        log.error("integrity check failed on %s %s", request.method, request.url.path)
        await asyncio.to_thread(
            ctx.auditor.record_alone, "system", "integrity", request.url.path, "refused", throttle=None
        )  # tampering: every one is recorded
        return error(
            500,
            "integrity_error",
            "stored ciphertext failed its integrity check (tampered or moved); it was not served",
        )

    @app.exception_handler(TamperedRow)
    async def tampered(request: Request, exc: TamperedRow) -> JSONResponse:
        # A row that grants authority or sets order, written without the root key: refused, logged,
        # audited (every one); the request changed nothing (its transaction rolled back).
        log.error("integrity check failed on %s %s: %s", request.method, request.url.path, exc)
        await asyncio.to_thread(
            ctx.auditor.record_alone,
            "system",
            "integrity",
            f"{exc.table}:{exc.key}"[:300],
            "refused",
            throttle=None,
            path=request.url.path,
        )
        return error(500, "integrity_error", f"{exc}; it was not used")

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s", type(exc).__name__, exc_info=exc)
        return error(500, "internal", "internal error (see the server log)")

    @app.exception_handler(DataError)
    async def bad_data(_: Request, exc: DataError) -> JSONResponse:
        # A backstop: input the edge should have refused and the database did (NUL in PostgreSQL text,
        # a number out of a column's range). The database, not us, says it is bad input.
        log.warning("database refused a value: %s", type(exc.orig).__name__)
        return error(400, "bad_request", "a value in the request is not storable (out of range or invalid characters)")

    app.add_middleware(Metrics, requests=requests, latency=latency)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    sync_answers = Counter(
        "vault_edge_sync_answers",
        "sync long-polls answered (kept out of the request metrics)",
        ["status"],
        registry=registry,
    )
    app.fastpath = SyncFastPath(
        ctx=ctx,
        hub=hub,
        contacts=contacts,
        limit=settings.max_body_bytes,
        answers=sync_answers,
        sealhold=sealhold,
    )  # the hot path meets no middleware
    return app
