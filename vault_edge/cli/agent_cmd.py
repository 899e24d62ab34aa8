"""``vault-edge agent ...``: the node agent, and local verbs against its socket.

Nothing here imports the server. ``agent run`` itself is parsed and run by
:mod:`vault_edge.cli.agent_run`, which the entry point reaches without importing this module.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from vault_edge.cli import agent_run as agent_run_cmd
from vault_edge.cli.output import CliError, duration_option, emit_json, output_option


@click.group()
def agent() -> None:
    """The node agent (one per PoP host) and local reads through its socket."""


@agent.command(
    "run",
    add_help_option=False,
    short_help=agent_run_cmd.SUMMARY,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def agent_run(args: tuple[str, ...]) -> None:
    """A stub: lists ``run`` in ``vault-edge agent --help`` and forwards to the one definition of its
    options, :mod:`vault_edge.cli.agent_run` (where the entry point sends ``agent run`` directly)."""
    sys.exit(agent_run_cmd.main(list(args)))


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
@click.option("--field", help="one field of a structured (JSON object) value, e.g. password")
@socket_option
@token_option
@output_option
@_agent_errors
def agent_get(
    name: str,
    version: int | None,
    stage: str | None,
    field: str | None,
    socket_path: str | None,
    token: str | None,
    fmt: str,
) -> None:
    """Read a secret from the local agent (NAME#FIELD, or --field, for one field of a structured value)."""
    if field is None and "#" in name:
        name, _, field = name.partition("#")
    with _client(socket_path, token) as c:
        s = c.get(name, version, stage, field)
    if fmt == "json":
        from vault_edge.wire import value_fields

        emit_json(
            {"name": s.name, **value_fields(s.bytes), "version": s.version, "stage": s.stage, "revision": s.revision}
        )
    else:
        sys.stdout.buffer.write(s.bytes + (b"\n" if sys.stdout.isatty() else b""))
        sys.stdout.flush()


@agent.command("exec", context_settings={"ignore_unknown_options": True})
@click.option(
    "--env",
    "pairs",
    multiple=True,
    metavar="VAR=NAME[#FIELD]",
    help="put secret NAME (or one FIELD of a structured value) in variable VAR (repeat)",
)
@click.option(
    "--restart-on-change",
    is_flag=True,
    help="supervise COMMAND: restart it when one of its secrets changes (else COMMAND replaces this process)",
)
@click.option(
    "--signal-on-change",
    "change_signal",
    metavar="SIG",
    help="supervise COMMAND: send it SIG (e.g. HUP) when one of its secrets changes, without restarting",
)
@click.option(
    "--stop-signal",
    default="TERM",
    show_default=True,
    metavar="SIG",
    help="with --restart-on-change: how the running command is asked to stop",
)
@click.option(
    "--stop-timeout",
    default="10s",
    show_default=True,
    callback=duration_option,
    help="with --restart-on-change: SIGKILL after this long",
)
@socket_option
@token_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_agent_errors
def agent_exec(
    pairs: tuple[str, ...],
    restart_on_change: bool,
    change_signal: str | None,
    stop_signal: str,
    stop_timeout: int,
    socket_path: str | None,
    token: str | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND with secrets in its environment: agent exec --env DB_PASSWORD=db/password -- ./app

    NAME#FIELD takes one field of a structured value: --env PGPASSWORD=db/main#password. With
    --restart-on-change (or --signal-on-change SIG) COMMAND runs under a supervisor that watches the
    agent and restarts (or signals) it when a secret it was given rotates; the supervisor exits with
    COMMAND's status."""
    from vault_edge.wire.fields import FieldError, select, split_ref

    mapping: dict[str, str] = {}
    for pair in pairs:
        var, sep, name = pair.partition("=")
        if not sep or not var or not name or not var.replace("_", "").isalnum():
            raise click.BadParameter(f"{pair!r}: expected VAR=NAME", param_hint="--env")
        mapping[var] = name
    if restart_on_change or change_signal:
        from vault_edge.cli.supervise import Supervisor, parse_signal

        if restart_on_change and change_signal:
            raise click.UsageError("give --restart-on-change or --signal-on-change, not both")
        if not mapping:
            raise click.UsageError("--restart-on-change and --signal-on-change need at least one --env VAR=NAME")
        try:
            stop, change = parse_signal(stop_signal), parse_signal(change_signal or "HUP")
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        sup = Supervisor(
            list(command),
            mapping,
            lambda: _client(socket_path, token),
            mode="signal" if change_signal else "restart",
            stop_signal=stop,
            change_signal=change,
            stop_timeout=float(stop_timeout),
        )
        sys.exit(sup.run())
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
                raw = got[name].bytes if field is None else select(got[name].bytes, field, repr(name))
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


@agent.command("render")
@click.option(
    "--template",
    "pairs",
    multiple=True,
    metavar="SRC:DEST",
    help="render template file SRC into DEST (repeat); for per-file settings use --config",
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="a TOML file of [[template]] entries: source, destination, perms, user, group, command, command_timeout",
)
@click.option("--perms", metavar="MODE", help='with --template: the files\' mode, an octal string [default: "0600"]')
@click.option("--user", metavar="USER", help="with --template: the files' owner, a name or uid (needs root)")
@click.option("--group", metavar="GROUP", help="with --template: the files' group, a name or gid (needs root)")
@click.option("--command", metavar="CMD", help="with --template: run `sh -c CMD` after a file changed")
@click.option("--command-timeout", metavar="DUR", help="with --command: kill it after this long [default: 30s]")
@click.option("--once", is_flag=True, help="render every file once and exit (for init containers)")
@socket_option
@token_option
def agent_render(
    pairs: tuple[str, ...],
    config: Path | None,
    perms: str | None,
    user: str | None,
    group: str | None,
    command: str | None,
    command_timeout: str | None,
    once: bool,
    socket_path: str | None,
    token: str | None,
) -> None:
    """Render files from templates with secrets from the agent, and render them again when those
    secrets rotate (atomic writes, mode and owner, a command run after), as Vault Agent templates do.

    A template is Jinja2 text with secret(NAME) and secret(NAME, FIELD) (or secret("NAME#FIELD")):

    \b
        password = {{ secret("db/main", "password") }}

    Every secret a file names is read at one revision, so a file never mixes versions. A file is
    rewritten (and its command run) only when its content changes. At start any error is one line
    and exit 1, with no file written; later, a template that fails keeps its previous file (logged,
    tried again at the next change), and an agent that goes away leaves every file as it is."""
    from vault_edge.cli.render import Renderer, RenderError, cli_specs, load_config

    if not pairs and config is None:
        raise click.UsageError("give --template SRC:DEST (repeatable) or --config FILE")
    if not pairs and any(v is not None for v in (perms, user, group, command, command_timeout)):
        raise click.UsageError("--perms, --user, --group, --command apply to --template; in --config set them per file")
    specs = cli_specs(pairs, perms=perms, user=user, group=group, command=command, command_timeout=command_timeout)
    try:
        if config is not None:
            specs += load_config(config)
        sys.exit(Renderer(specs, lambda: _client(socket_path, token)).run(once=once))
    except RenderError as exc:
        raise CliError(str(exc)) from None
