"""The console's HTTP handlers: thin, each one a session check, one operation (``server/ops``) or
view (``views``), and a template. Forms carry a per-session CSRF token; every response carries the
security headers; errors are HTML pages with the API's status codes.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from vault_edge.server import auth
from vault_edge.server.auth import Principal
from vault_edge.server.barrier import Sealed  # the console shows only the seal status then
from vault_edge.server.context import Context
from vault_edge.server.errors import ApiError, bad_request, forbidden, unauthorized
from vault_edge.server.ops import nodes, rotation, tokens
from vault_edge.server.ui import views
from vault_edge.server.ui.sessions import Session, SessionStore, same

HERE = Path(__file__).parent
STATIC = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
MAX_FORM_BYTES = 16 << 10
STREAM_S = 25.0  # an event stream ends after this; the browser reconnects (so no stream outlives a restart long)
POLL_S = 0.5  # how often a stream looks for a change
MAX_STREAMS, MAX_STREAMS_PER_SESSION = 64, 4

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}

env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
env.filters["path"] = lambda s: quote(str(s), safe="/")


class SignIn(Exception):
    """No live session: go to the sign-in page."""


@dataclass
class Caller:
    who: Principal
    session: Session
    session_id: str
    ctx: Context


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def cookie_name(request: Request) -> str:
    # Over TLS the __Host- prefix pins the cookie to this host, Secure, path / (no sibling can set it).
    return "__Host-ve_session" if _secure(request) else "ve_session"


def pre_cookie_name(request: Request) -> str:
    return "__Host-ve_pre" if _secure(request) else "ve_pre"


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/" if _secure(request) else "/ui",
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )


def _del_cookie(request: Request, response: Response, name: str) -> None:
    response.delete_cookie(
        name, path="/" if _secure(request) else "/ui", secure=_secure(request), httponly=True, samesite="strict"
    )


def ctx_of(request: Request) -> Context:
    return request.app.state.ctx  # type: ignore[no-any-return]


def sessions_of(request: Request) -> SessionStore:
    return request.app.state.ui_sessions  # type: ignore[no-any-return]


def caller(request: Request, touch: bool = True) -> Caller:
    """The signed-in principal, read afresh from its token's row (a revoked token ends the session).
    ``touch``: the request is someone using the console (it restarts the session's idle timer)."""
    ctx, store = ctx_of(request), sessions_of(request)
    if ctx.barrier.sealed:
        store.clear()  # a seal signs everyone out
        raise Sealed
    session_id = request.cookies.get(cookie_name(request))
    session = store.get(session_id, touch)
    if session is None or session_id is None:
        raise SignIn
    try:
        with ctx.store.read() as tx:
            who = auth.principal_by_id(tx, session.token_id, ctx.clock())
    except ApiError:
        store.end(session_id)
        raise SignIn from None
    request.state.principal = who  # names the actor of a refusal
    return Caller(who, session, session_id, ctx)


async def form_of(request: Request, caller_: Caller | None = None, pre: str | None = None) -> dict[str, str]:
    """A urlencoded form, its CSRF token checked against the session's (or, before sign-in, against
    the pre-session cookie: a double submit), and its Origin against ours."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise forbidden("cross-origin form refused")
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise forbidden("cross-site form refused")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise ApiError(415, "unsupported_media_type", "a form is application/x-www-form-urlencoded")
    raw = await request.body()
    if len(raw) > MAX_FORM_BYTES:
        raise ApiError(413, "too_large", "form too large")
    try:
        fields = dict(
            reversed(parse_qsl(raw.decode(), keep_blank_values=True, strict_parsing=False, max_num_fields=16))
        )
    except (ValueError, UnicodeDecodeError):
        raise bad_request("malformed form") from None
    expected = caller_.session.csrf if caller_ is not None else (pre or "")
    if not same(fields.get("csrf", ""), expected):
        raise forbidden("the form's CSRF token is missing or stale: reload the page and try again")
    return fields


def page(request: Request, template: str, code: int = 200, caller_: Caller | None = None, **data: Any) -> HTMLResponse:
    who = caller_.who if caller_ else None
    html = env.get_template(template).render(
        who=who,
        csrf=caller_.session.csrf if caller_ else "",
        path=request.url.path,
        fleet=bool(who and views.fleet_visible(who)),
        audit=bool(who and views.audit_visible(who)),
        tokens=bool(who and "admin" in who.verbs),
        **data,
    )
    return HTMLResponse(html, status_code=code)


def _refused(request: Request, exc: ApiError) -> None:
    """A 401 or 403 of the console is audited as the API's are (throttled per kind)."""
    who = getattr(request.state, "principal", None)
    route = request.scope.get("route")
    ctx_of(request).auditor.record_alone(
        who.actor if who is not None else "anonymous",
        f"ui.{getattr(route, 'name', 'unknown')}",
        outcome="refused",
        reason=exc.code,
        status=exc.status,
        message=exc.message[:300],
        remote=request.client.host if request.client else "",
        method=request.method,
        path=request.url.path[:512],
    )


class UiRoute(APIRoute):
    """Every console response gets the security headers; errors become HTML pages (not the API's JSON)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except SignIn:
                response = RedirectResponse("/ui/signin", status_code=303)
            except Sealed:
                status = await run_in_threadpool(_status, ctx_of(request))
                response = page(request, "sealed.html", 503, seal=status)
            except ApiError as exc:
                if exc.status in (401, 403):
                    await run_in_threadpool(_refused, request, exc)
                response = page(request, "error.html", exc.status, error=exc)
            except RequestValidationError:
                response = page(request, "error.html", 400, error=bad_request("invalid request"))
            for k, v in HEADERS.items():
                response.headers.setdefault(k, v)
            return response

        return route


def _status(ctx: Context) -> dict[str, Any]:
    from vault_edge.server.ops import system

    return system.status(ctx)


router = APIRouter(prefix="/ui", include_in_schema=False, route_class=UiRoute)


# -- static files and sign-in ----------------------------------------------------------------------
@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        raise ApiError(404, "not_found", "no such file")
    return Response(
        (HERE / "static" / name).read_bytes(), media_type=STATIC[name], headers={"Cache-Control": "no-cache"}
    )


@router.get("/signin")
def signin_page(request: Request) -> Response:
    try:
        caller(request)
        return RedirectResponse("/ui", status_code=303)
    except SignIn:
        pass
    pre = request.cookies.get(pre_cookie_name(request)) or ""
    if len(pre) != 43:
        pre = secrets.token_urlsafe(32)
    response = page(request, "signin.html", pre=pre)
    _set_cookie(request, response, pre_cookie_name(request), pre, max_age=3600)
    return response


@router.post("/signin")
async def signin(request: Request) -> Response:
    ctx, store = ctx_of(request), sessions_of(request)
    if ctx.barrier.sealed:
        raise Sealed
    pre = request.cookies.get(pre_cookie_name(request), "")
    fields = await form_of(request, pre=pre)
    token = fields.get("token", "").strip()
    if len(token) > 256:
        raise unauthorized("invalid or revoked token")

    def check() -> Principal:
        with ctx.store.read() as tx:
            return auth.authenticate(tx, token, ctx.clock())

    try:
        who = await run_in_threadpool(check)
    except ApiError as exc:
        await run_in_threadpool(_refused, request, exc)
        return page(request, "signin.html", 401, pre=pre, error="That token was refused (invalid, revoked or expired).")

    def record() -> None:
        with ctx.store.write(serialize=False) as tx:
            ctx.auditor.record(tx, who.actor, "ui.signin", remote=request.client.host if request.client else "")

    await run_in_threadpool(record)  # audited first: no session without its entry
    store.end(request.cookies.get(cookie_name(request)))  # a session this browser had ends (no fixation)
    session_id, _ = store.create(who.id, who.expires_at)
    response: Response = RedirectResponse("/ui", status_code=303)
    _set_cookie(request, response, cookie_name(request), session_id)
    _del_cookie(request, response, pre_cookie_name(request))
    return response


@router.post("/signout")
async def signout(request: Request) -> Response:
    c = await run_in_threadpool(caller, request)
    await form_of(request, c)
    sessions_of(request).end(c.session_id)

    def record() -> None:
        with c.ctx.store.write(serialize=False) as tx:
            c.ctx.auditor.record(tx, c.who.actor, "ui.signout")

    await run_in_threadpool(record)
    response = RedirectResponse("/ui/signin", status_code=303)
    _del_cookie(request, response, cookie_name(request))
    return response


# -- pages -----------------------------------------------------------------------------------------
@router.get("")
def overview(request: Request) -> Response:
    c = caller(request)
    data = views.overview(c.ctx, c.who, list(request.app.state.scheduler.failures))
    return page(request, "overview.html", caller_=c, **data)


@router.get("/regions")
def regions_page(request: Request) -> Response:
    c = caller(request)
    return page(request, "regions.html", caller_=c, fleet_data=views.fleet(c.ctx, c.who))


@router.get("/secrets")
def secrets_page(request: Request) -> Response:
    c = caller(request)
    prefix = request.query_params.get("prefix", "")
    if len(prefix) > 256:
        raise bad_request("prefix: at most 256 characters")
    return page(request, "secrets.html", caller_=c, prefix=prefix, rows=views.secret_rows(c.ctx, c.who, prefix))


@router.get("/secrets/{name:path}")
def secret_page(name: str, request: Request) -> Response:
    c = caller(request)
    return page(
        request,
        "secret.html",
        caller_=c,
        s=views.secret_detail(c.ctx, c.who, name),
        live=views.rotation(c.ctx, c.who, name),
    )


@router.get("/audit")
def audit_page(request: Request) -> Response:
    c = caller(request)
    f = views.AuditFilter.parse(dict(request.query_params))
    return page(request, "audit.html", caller_=c, f=f, raw=dict(request.query_params), **views.audit(c.ctx, c.who, f))


@router.get("/tokens")
def tokens_page(request: Request) -> Response:
    c = caller(request)
    return page(request, "tokens.html", caller_=c, rows=views.token_list(c.ctx, c.who))


# -- actions: a confirmation page (GET), then the operation (POST, CSRF-checked) ---------------------
@router.get("/nodes/{node_id}/revoke")
def revoke_node_confirm(node_id: str, request: Request) -> Response:
    c = caller(request)
    c.who.require_global_admin()
    return page(
        request,
        "confirm.html",
        caller_=c,
        action=f"/ui/nodes/{quote(node_id)}/revoke",
        title=f"Revoke node {node_id}",
        text="The node is refused from now on, wipes its cache and stops; its region is re-keyed. "
        "Values it held must still be rotated.",
        button="Revoke node",
    )


@router.post("/nodes/{node_id}/revoke")
async def revoke_node(node_id: str, request: Request) -> Response:
    c = await run_in_threadpool(caller, request)
    await form_of(request, c)
    out = await run_in_threadpool(nodes.revoke, c.ctx, c.who, node_id)
    return page(
        request,
        "done.html",
        caller_=c,
        title="Node revoked",
        text=f"Node {out['id']} is revoked; region {out['region']} is now on key version {out['key_version']}.",
        back="/ui/regions",
    )


@router.get("/tokens/{token_id}/revoke")
def revoke_token_confirm(token_id: str, request: Request) -> Response:
    c = caller(request)
    c.who.require("admin")
    return page(
        request,
        "confirm.html",
        caller_=c,
        action=f"/ui/tokens/{quote(token_id)}/revoke",
        title=f"Revoke token {token_id}",
        text="The token, and every token made from it, stops working at once.",
        button="Revoke token",
    )


@router.post("/tokens/{token_id}/revoke")
async def revoke_token(token_id: str, request: Request) -> Response:
    c = await run_in_threadpool(caller, request)
    await form_of(request, c)
    out = await run_in_threadpool(tokens.revoke, c.ctx, c.who, token_id)
    extra = f" and {len(out['descendants_revoked'])} made from it" if out["descendants_revoked"] else ""
    return page(
        request,
        "done.html",
        caller_=c,
        title="Token revoked",
        text=f"Token {out['id']}{extra} revoked.",
        back="/ui/tokens",
    )


@router.get("/rotate/{name:path}")
def rotate_confirm(name: str, request: Request) -> Response:
    c = caller(request)
    c.who.require("write", name)
    s = views.secret_detail(c.ctx, c.who, name)
    return page(request, "rotate.html", caller_=c, s=s)


@router.post("/rotate/{name:path}")
async def rotate(name: str, request: Request) -> Response:
    """A generated value only: a value typed into a page would pass through the browser (its memory,
    autofill, extensions), which the console is built never to hold. Values come from the CLI. As
    ``rotate`` does through the API: a secret kept by a rotator is rotated at its source (no spec)."""
    c = await run_in_threadpool(caller, request)
    fields = await form_of(request, c)
    spec = fields.get("generate", "").strip() or None
    await run_in_threadpool(rotation.rotate, c.ctx, c.who, name, None, spec)
    return RedirectResponse(f"/ui/secrets/{quote(name, safe='/')}", status_code=303)


# -- live updates ----------------------------------------------------------------------------------
@router.get("/events/rotation/{name:path}")
async def rotation_events(name: str, request: Request) -> Response:
    """Server-sent events: the secret's propagation, each time it changes (polled every ``POLL_S``).
    The stream ends after ``STREAM_S`` (the browser reconnects), and at once when the session ends."""
    c = await run_in_threadpool(caller, request, False)  # (a tab left open keeps no session alive)
    first = await run_in_threadpool(views.rotation, c.ctx, c.who, name)  # a 403 or 404 before any stream
    state = request.app.state
    open_streams: dict[str, int] = state.ui_streams
    total = sum(open_streams.values())
    if total >= MAX_STREAMS or open_streams.get(c.session_id, 0) >= MAX_STREAMS_PER_SESSION:
        raise ApiError(429, "too_many_requests", "too many live views open")
    open_streams[c.session_id] = open_streams.get(c.session_id, 0) + 1

    async def events() -> AsyncIterator[str]:
        try:
            last = json.dumps(first, separators=(",", ":"))
            yield f"retry: 1000\nevent: rotation\ndata: {last}\n\n"
            deadline = time.monotonic() + STREAM_S
            while time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
                try:
                    now_c = await run_in_threadpool(caller, request, False)
                    doc = await run_in_threadpool(views.rotation, now_c.ctx, now_c.who, name)
                except (SignIn, Sealed, ApiError):
                    yield "event: end\ndata: {}\n\n"
                    return
                data = json.dumps(doc, separators=(",", ":"))
                if data != last:
                    last = data
                    yield f"event: rotation\ndata: {data}\n\n"
        finally:
            open_streams[c.session_id] -= 1
            if not open_streams[c.session_id]:
                del open_streams[c.session_id]

    return StreamingResponse(events(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})
