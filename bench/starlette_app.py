"""The alternative the issue asked to measure: Starlette on uvicorn (uvloop + httptools) on a unix socket.

It serves the same read as the agent's endpoint (``GET /v1/secrets/{name}`` from a ``View``, the same
JSON and headers), but does less: no kernel identity, no policy, no cache of answers. It is here
only so that the choice of a small asyncio server over a framework is backed by figures.

    python bench/starlette_app.py --socket /tmp/st.sock --secret s000=0123456789abcdef0123
"""

from __future__ import annotations

import argparse
import os

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vault_edge.agent.view import Entry, View


def make_app(view: View) -> Starlette:
    async def read(request: Request) -> Response:
        e = view.lookup(request.path_params["name"])
        headers = {"X-Vault-Edge-Revision": str(view.revision), "Age": "0", "Cache-Control": "no-store"}
        if e is None:
            return JSONResponse({"error": {"code": "not_found", "message": "no such secret"}}, 404, headers)
        doc = {
            "name": e.name,
            "value": e.value.decode(),
            "encoding": "utf-8",
            "version": e.version,
            "stage": e.stage,
            "revision": view.revision,
        }
        return JSONResponse(doc, headers=headers)

    return Starlette(routes=[Route("/v1/secrets/{name:path}", read)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--secret", action="append", default=[], metavar="NAME=VALUE")
    args = p.parse_args()
    entries = [Entry(n, 1, "current", v.encode()) for n, _, v in (s.partition("=") for s in args.secret)]
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    uvicorn.run(
        make_app(View("n-bench", "bench", 1, entries)),
        uds=args.socket,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
