"""``vault-edge agent ...``: run the node agent, and local verbs against its socket.

Nothing here imports the server: the agent starts fast and stays small.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from vault_edge.cli.output import CliError, duration_option, emit_json, output_option


@click.group()
def agent() -> None:
    """The node agent (one per PoP host) and local reads through its socket."""


@agent.command("run")
@click.option("--server", envvar="VAULT_EDGE_ADDR", help="control plane URL (default: the one it enrolled with)")
@click.option("--state-dir", required=True, type=click.Path(file_okay=False), help="keys, enrolment, disk cache")
@click.option("--socket", "socket_path", envvar="VAULT_EDGE_SOCKET", required=True, type=click.Path(dir_okay=False),
              help="unix socket to serve workers on (created mode 0660)")
@click.option("--join-token", envvar="VAULT_EDGE_JOIN_TOKEN", help="single-use token for the first start")
@click.option("--join-token-file", type=click.Path(dir_okay=False),
              help="read the join token from a file (ignored once enrolled, or if the file is gone)")
@click.option("--policy", type=click.Path(exists=True, dir_okay=False), help="TOML policy: who may read what")
@click.option("--max-stale", callback=duration_option,
              help="refuse reads (503 too_stale) when out of contact longer than this (default: never)")
@click.option("--stale-after", default="75s", show_default=True, callback=duration_option,
              help="health says stale past this age")
@click.option("--wait", "wait", default="30s", show_default=True, callback=duration_option,
              help="long-poll hold asked of the control plane")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), help="CA bundle for an https control plane")
@click.option("--idle-timeout", default="60s", show_default=True, callback=duration_option,
              help="close a socket connection idle (no request in flight) this long")
@click.option("--max-conns-per-uid", default=256, show_default=True, type=click.IntRange(min=1),
              help="socket connections one uid may hold; more are closed at once")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
def agent_run(server: str | None, state_dir: str, socket_path: str, join_token: str | None,
              join_token_file: str | None, policy: str | None, max_stale: int | None, stale_after: int, wait: int,
              tls_ca: str | None, idle_timeout: int, max_conns_per_uid: int, log_level: str) -> None:
    """Run the node agent: enrol once, sync, cache, serve the socket."""
    from vault_edge.agent.run import AgentConfig, AgentError, main

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per long-poll is noise
    if join_token_file and not join_token and Path(join_token_file).is_file():
        join_token = Path(join_token_file).read_text().strip()
    cfg = AgentConfig(
        server=server, state_dir=Path(state_dir), socket=Path(socket_path), join_token=join_token,
        policy=Path(policy) if policy else None, max_stale=float(max_stale) if max_stale is not None else None,
        stale_after=float(stale_after or 75), wait=float(wait or 30),
        tls_ca=tls_ca, idle_timeout=float(idle_timeout or 60), max_conns_per_uid=max_conns_per_uid,
    )
    try:
        code = main(cfg)
    except AgentError as exc:
        raise CliError(str(exc)) from None
    sys.exit(code)


def _client(socket_path: str | None, token: str | None):  # type: ignore[no-untyped-def]
    from vault_edge.client import AgentClient

    return AgentClient(socket_path, token)


def _agent_errors(fn):  # type: ignore[no-untyped-def]
    import functools

    from vault_edge.client import AgentError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return fn(*args, **kwargs)
        except AgentError as exc:
            raise CliError(exc.message) from None

    return wrapper


socket_option = click.option("--socket", "socket_path", envvar="VAULT_EDGE_SOCKET", help="the agent's socket")
token_option = click.option("--token", envvar="VAULT_EDGE_AGENT_TOKEN", help="capability token (X-Vault-Edge-Token)")


@agent.command("get")
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1))
@click.option("--stage", type=click.Choice(["current", "previous", "pending"]))
@socket_option
@token_option
@output_option
@_agent_errors
def agent_get(name: str, version: int | None, stage: str | None, socket_path: str | None, token: str | None,
              fmt: str) -> None:
    """Read a secret from the local agent."""
    with _client(socket_path, token) as c:
        s = c.get(name, version, stage)
    if fmt == "json":
        from vault_edge.wire import value_fields

        emit_json({"name": s.name, **value_fields(s.value), "version": s.version, "stage": s.stage,
                   "revision": s.revision})
    else:
        sys.stdout.buffer.write(s.value + (b"\n" if sys.stdout.isatty() else b""))
        sys.stdout.flush()


@agent.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--env", "pairs", multiple=True, metavar="VAR=NAME[#FIELD]",
              help="put secret NAME (or one FIELD of a structured value) in variable VAR (repeat)")
@socket_option
@token_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_agent_errors
def agent_exec(pairs: tuple[str, ...], socket_path: str | None, token: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND with secrets in its environment: agent exec --env DB_PASSWORD=db/password -- ./app

    NAME#FIELD takes one field of a structured value: --env PGPASSWORD=db/main#password."""
    from vault_edge.wire.fields import FieldError, select, split_ref

    mapping: dict[str, str] = {}
    for pair in pairs:
        var, sep, name = pair.partition("=")
        if not sep or not var or not name or not var.replace("_", "").isalnum():
            raise click.BadParameter(f"{pair!r}: expected VAR=NAME", param_hint="--env")
        mapping[var] = name
    env = dict(os.environ)
    if mapping:
        try:
            refs = {var: split_ref(ref) for var, ref in mapping.items()}
        except FieldError as exc:
            raise click.BadParameter(str(exc), param_hint="--env") from None
        with _client(socket_path, token) as c:  # one round trip, one revision: fields of one version agree
            got = c.get_many(sorted({name for name, _ in refs.values()}))
        for var, (name, field) in refs.items():
            try:
                raw = got[name].value if field is None else select(got[name].value, field, repr(name))
                env[var] = raw.decode("utf-8")
            except FieldError as exc:
                raise CliError(str(exc)) from None
            except UnicodeDecodeError:
                raise CliError(f"{name} is binary; it cannot go into an environment variable") from None
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as exc:
        raise CliError(f"cannot run {command[0]}: {exc.strerror}") from None


@agent.command("token")
@output_option
def agent_token(fmt: str) -> None:
    """A new capability token for a workerd binding, and the line for the policy file."""
    from vault_edge.agent.policy import new_token

    token, digest = new_token()
    if fmt == "json":
        emit_json({"token": token, "token_sha256": digest})
    else:
        click.echo(token)
        click.echo(f'# policy.toml:\n[[rule]]\ntoken_sha256 = "{digest}"\nsecrets = ["..."]', err=True)
