"""The fleet console at ``/ui``: server-rendered pages (Jinja2), a small script for live updates over
server-sent events, sessions in HttpOnly cookies. It shows and acts only through ``server/ops``, with
the signed-in token's principal, so a page shows what the API would show that token; no page ever
holds a secret's value."""

from __future__ import annotations

from fastapi import FastAPI

from vault_edge.server.ui.routes import router
from vault_edge.server.ui.sessions import SessionStore


def mount(app: FastAPI) -> None:
    """Serve the console from ``app`` (``create_app`` calls this once)."""
    app.state.ui_sessions = SessionStore(app.state.ctx.clock)
    app.state.ui_streams = {}
    app.include_router(router)
