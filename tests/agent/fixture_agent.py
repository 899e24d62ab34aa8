"""A real agent socket server over fixture secrets, for the endpoint tests and the benchmark.

It builds a ``View`` from fixture entries, installs it in an ``AgentState`` and calls
``endpoint.serve`` with the agent's ``Api`` on the loop the agent uses (uvloop when installed). No
control plane, no sync.

    python tests/agent/fixture_agent.py --socket /tmp/a.sock --secret db=hunter2 [--policy F] ...

Signals drive the state as a sync loop would: SIGUSR1 installs the next revision (every value gets
a ``-r<revision>`` suffix and its version goes up by one), SIGUSR2 marks the control plane
unreachable, SIGHUP records a contact, SIGTERM/SIGINT stop the server and remove the socket.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from vault_edge.agent import endpoint
from vault_edge.agent.api import Api
from vault_edge.agent.policy import Policy, PolicyError
from vault_edge.agent.view import AgentState, Entry, View


def load_entries(args: argparse.Namespace) -> list[Entry]:
    now = time.time()
    entries = []
    if args.entries:
        for doc in json.loads(Path(args.entries).read_text()):
            value = base64.b64decode(doc["value_b64"]) if "value_b64" in doc else doc["value"].encode()
            expires = now + doc["expires_in"] if "expires_in" in doc else None
            entries.append(Entry(doc["name"], doc.get("version", 1), doc.get("stage", "current"), value, expires))
    for spec in args.secret:
        name, _, value = spec.partition("=")
        entries.append(Entry(name, 1, "current", value.encode()))
    return entries


def next_view(view: View) -> View:
    revision = view.revision + 1
    bumped = [
        Entry(e.name, e.version + 1, e.stage, e.value + b"-r%d" % revision, e.expires_at)
        for e in view.by_version.values()
    ]
    return View(view.node, view.region, revision, bumped)


async def main(args: argparse.Namespace) -> int:
    try:
        policy = Policy.load(args.policy)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = AgentState(args.node, args.region, max_stale=args.max_stale)
    if not args.no_load:
        state.install(View(args.node, args.region, args.revision, load_entries(args)))
    if args.contact_age is not None:
        state.contact(state.clock.monotonic() - args.contact_age)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def handle(signum: int) -> None:
        if signum == signal.SIGUSR1:
            state.install(next_view(state.view))
        elif signum == signal.SIGUSR2:
            state.lost_contact()
        elif signum == signal.SIGHUP:
            state.contact()
        elif not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        loop.add_signal_handler(sig, handle, sig)
    # handlers first: a signal sent as soon as the socket answers must find them
    try:
        server = await endpoint.serve(
            args.socket, Api(state, policy), mode=int(args.mode, 8), head_timeout=args.head_timeout
        )
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"fixture agent serving {args.socket}", file=sys.stderr, flush=True)
    try:
        await stop
    finally:
        server.close()
        if os.path.exists(args.socket):
            os.unlink(args.socket)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--policy", help="policy file (default: the agent's own uid and root only)")
    p.add_argument("--entries", help="JSON list of {name, version, stage, value | value_b64, expires_in}")
    p.add_argument("--secret", action="append", default=[], metavar="NAME=VALUE", help="a current version 1")
    p.add_argument("--revision", type=int, default=1)
    p.add_argument("--node", default="n-0123456789abcdef")
    p.add_argument("--region", default="eu")
    p.add_argument("--max-stale", type=float, default=None)
    p.add_argument("--contact-age", type=float, default=0.0, help="seconds since the last contact at start (default 0)")
    p.add_argument(
        "--no-contact",
        dest="contact_age",
        action="store_const",
        const=None,
        help="never heard from the control plane (as after a restart from the disk cache)",
    )
    p.add_argument("--no-load", action="store_true", help="start with no view (status: starting)")
    p.add_argument("--mode", default="660", help="socket mode, octal")
    p.add_argument("--head-timeout", type=float, default=endpoint.HEAD_TIMEOUT_S)
    return p.parse_args(argv)


def entry_point() -> Any:
    return endpoint.run(main(parse_args()))


if __name__ == "__main__":
    sys.exit(entry_point())
