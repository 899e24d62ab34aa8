"""``vault-edge agent run``: the node agent's command line, parsed with the standard library.

The agent is the one long-lived process on every PoP host, so what it imports it holds for its whole
life. The ``vault-edge`` entry point (:mod:`vault_edge.cli.entry`) sends ``agent run`` here before it
imports the operator CLI: no click, no rich (nor the pygments rich brings), no operator client, none
of the server. The options are the ones DESIGN.md fixes, with the CLI's conventions: environment
defaults, durations as operators type them, exit 2 on usage, exit 1 with one line on stderr on error.
``vault-edge agent --help`` lists this command through a click stub that forwards here
(:mod:`vault_edge.cli.agent_cmd`), so there is one definition of the options: this one.
"""

from __future__ import annotations

import argparse
import os
import sys

PROG = "vault-edge agent run"
SUMMARY = "Run the node agent: enrol once, sync, cache, serve the socket."
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def _duration(text: str) -> int:
    from vault_edge.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_duration(text: str) -> int:
    """A duration above zero: a hold, a timeout or an age of 0 is never what was meant (and is refused,
    not silently replaced by the default)."""
    n = _duration(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1s")
    return n


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not in the range x>=1")
    return n


def _dir_path(text: str) -> str:
    """A directory that may not exist yet (it is created), but not a file."""
    if os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"directory {text!r} is a file")
    return text


def _file_path(text: str) -> str:
    """A file that may not exist yet, but not a directory."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"file {text!r} is a directory")
    return text


def _existing_file(text: str) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"file {text!r} does not exist")
    return _file_path(text)


def _metrics_addr(text: str) -> tuple[str, int]:
    from vault_edge.agent.metrics import parse_addr

    try:
        return parse_addr(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parser() -> argparse.ArgumentParser:
    env = os.environ
    p = argparse.ArgumentParser(
        prog=PROG,
        description=SUMMARY,
        allow_abbrev=False,
        epilog="Environment: VAULT_EDGE_ADDR (--server), VAULT_EDGE_SOCKET (--socket), VAULT_EDGE_JOIN_TOKEN "
        "(--join-token), VAULT_EDGE_ENROLL_TIMEOUT (--enroll-timeout), VAULT_EDGE_METRICS_ADDR "
        "(--metrics-addr), VAULT_EDGE_METRICS_TOKEN (--metrics-token), VAULT_EDGE_LOG_FORMAT (--log-format). "
        "SIGHUP reloads --policy. Exit 3: this node was revoked "
        "(enrol again with a new join token).",
    )
    p.add_argument(
        "--server",
        metavar="URL",
        default=env.get("VAULT_EDGE_ADDR") or None,
        help="control plane URL (default: the one it enrolled with)",
    )
    p.add_argument("--state-dir", metavar="DIR", required=True, type=_dir_path, help="keys, enrolment, disk cache")
    socket_env = env.get("VAULT_EDGE_SOCKET") or None
    p.add_argument(
        "--socket",
        dest="socket_path",
        metavar="PATH",
        default=socket_env,
        required=socket_env is None,
        type=_file_path,
        help="unix socket to serve workers on (created mode 0660)",
    )
    p.add_argument(
        "--join-token",
        metavar="TOKEN",
        default=env.get("VAULT_EDGE_JOIN_TOKEN") or None,
        help="single-use token for the first start",
    )
    p.add_argument(
        "--join-token-file",
        metavar="FILE",
        type=_file_path,
        help="read the join token from a file (ignored once enrolled, or if the file is gone)",
    )
    p.add_argument("--policy", metavar="FILE", type=_existing_file, help="TOML policy: who may read what")
    p.add_argument(
        "--max-stale",
        metavar="DUR",
        type=_duration,
        help="refuse reads (503 too_stale) when out of contact longer than this (default: never)",
    )
    p.add_argument(
        "--stale-after",
        metavar="DUR",
        default="75s",
        type=_positive_duration,
        help="health says stale past this age (default: 75s)",
    )
    p.add_argument(
        "--wait",
        metavar="DUR",
        default="30s",
        type=_positive_duration,
        help="long-poll hold asked of the control plane (default: 30s)",
    )
    p.add_argument("--tls-ca", metavar="FILE", type=_existing_file, help="CA bundle for an https control plane")
    p.add_argument(
        "--idle-timeout",
        metavar="DUR",
        default="60s",
        type=_positive_duration,
        help="close a socket connection idle (no request in flight) this long (default: 60s)",
    )
    p.add_argument(
        "--max-conns-per-uid",
        metavar="N",
        default=256,
        type=_positive_int,
        help="socket connections one uid may hold; more are closed at once (default: 256)",
    )
    p.add_argument(
        "--enroll-timeout",
        metavar="DUR",
        default=env.get("VAULT_EDGE_ENROLL_TIMEOUT") or "30s",
        type=_positive_duration,
        help="give up waiting for an enrolment answer after this long and retry, with the same token "
        "and keys (default: 30s)",
    )
    p.add_argument(
        "--metrics-addr",
        metavar="[HOST:]PORT",
        type=_metrics_addr,
        default=env.get("VAULT_EDGE_METRICS_ADDR") or None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1; "
        "default: no metrics endpoint)",
    )
    p.add_argument(
        "--metrics-token",
        metavar="TOKEN",
        default=env.get("VAULT_EDGE_METRICS_TOKEN") or None,
        help="require Authorization: Bearer TOKEN on /metrics (prefer VAULT_EDGE_METRICS_TOKEN: ps shows arguments)",
    )
    p.add_argument(
        "--egress-ca",
        metavar="FILE",
        type=_existing_file,
        help="CA bundle for egress upstreams (default: the system's CAs)",
    )
    p.add_argument(
        "--egress-timeout",
        metavar="DUR",
        default="60s",
        type=_positive_duration,
        help="egress: give up connecting to, writing to or waiting on an upstream after this (default: 60s)",
    )
    p.add_argument(
        "--egress-max-body",
        metavar="BYTES",
        default=8 << 20,
        type=_positive_int,
        help="egress: largest request body a worker may send (default: 8 MiB)",
    )
    p.add_argument(
        "--egress-max-answer",
        metavar="BYTES",
        default=64 << 20,
        type=_positive_int,
        help="egress: most answer bytes relayed from an upstream (default: 64 MiB)",
    )
    p.add_argument(
        "--egress-http2",
        choices=("on", "off"),
        default="on",
        help="egress: offer HTTP/2 to upstreams (TLS ALPN) and take it where they pick it; off: HTTP/1.1 only "
        "(HTTP/2 costs the agent 2-3 times the CPU per call) (default: on)",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="(default: info)")
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=env.get("VAULT_EDGE_LOG_FORMAT") or "text",
        help="text, or json: one object per line (default: text)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (the arguments after ``agent run``), run the agent until it stops: its exit code."""
    from pathlib import Path

    from vault_edge import logs

    p = parser()
    args = p.parse_args(argv)  # exits 2 on a usage error, 0 after --help
    if args.log_format not in LOG_FORMATS:  # from the environment, which argparse does not check
        p.error(f"argument --log-format: invalid choice: {args.log_format!r} (choose from text, json)")
    logs.setup(args.log_level, args.log_format)  # (httpx and httpcore at WARNING: their lines name URLs)
    join_token = args.join_token
    if args.join_token_file and not join_token and Path(args.join_token_file).is_file():
        join_token = Path(args.join_token_file).read_text().strip()

    from vault_edge.agent.egress import EgressSettings
    from vault_edge.agent.run import AgentConfig, StartError
    from vault_edge.agent.run import main as run_agent

    cfg = AgentConfig(
        server=args.server,
        state_dir=Path(args.state_dir),
        socket=Path(args.socket_path),
        join_token=join_token,
        policy=Path(args.policy) if args.policy else None,
        max_stale=float(args.max_stale) if args.max_stale is not None else None,
        stale_after=float(args.stale_after),
        wait=float(args.wait),
        tls_ca=args.tls_ca,
        idle_timeout=float(args.idle_timeout),
        max_conns_per_uid=args.max_conns_per_uid,
        enroll_timeout=float(args.enroll_timeout),
        metrics_addr=args.metrics_addr,
        metrics_token=args.metrics_token,
        egress=EgressSettings(
            ca_file=args.egress_ca,
            timeout=float(args.egress_timeout),
            max_body=args.egress_max_body,
            max_answer=args.egress_max_answer,
            http2=args.egress_http2 == "on",
        ),
    )
    try:
        return run_agent(cfg)
    except (StartError, OSError, ValueError) as exc:  # expected failures: one line, exit 1, no traceback
        print(f"error: {str(exc) or type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
