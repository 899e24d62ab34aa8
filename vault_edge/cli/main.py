"""``vault-edge``: operator verbs against the control plane, and the agent's local verbs.

Exit 0 on success, 1 with one line on stderr on error, 2 on usage errors (and ``status``: 2 when
sealed, as Vault's). Every verb that prints data takes ``--output json`` (or the global ``--output``,
or ``VAULT_EDGE_FORMAT``).
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from vault_edge import __version__
from vault_edge.cli import rotator_cmd, session
from vault_edge.cli.output import (
    FORMATS,
    CliError,
    ago,
    duration_option,
    duration_text,
    emit_json,
    err,
    out,
    output_option,
    table,
    usage,
    when,
)
from vault_edge.operator import ClientError, OperatorClient

ENVIRONMENT = """\b
Environment (a flag, where there is one, wins):
  VAULT_EDGE_ADDR        control plane URL (--addr; default http://127.0.0.1:8420)
  VAULT_EDGE_CACERT      CA bundle to verify an https control plane (--ca-cert)
  VAULT_EDGE_TOKEN       operator token (else the file `vault-edge login` wrote)
  VAULT_EDGE_TOKEN_FILE  where `login` stores the token (default ~/.vault-edge-token, mode 0600)
  VAULT_EDGE_FORMAT      table or json: the default of every --output
  VAULT_EDGE_PASSPHRASE  the shares' passphrase, for the share that completes an unseal
  VAULT_EDGE_SOCKET      the agent's socket (agent get, agent exec, agent run)
  VAULT_EDGE_AGENT_TOKEN capability token for the agent's socket (X-Vault-Edge-Token)
  VAULT_EDGE_JOIN_TOKEN  an agent's join token (agent run)
  VAULT_EDGE_*           every `server` option, e.g. VAULT_EDGE_DB (see `vault-edge server --help`)

\b
Exit codes: 0 ok, 1 error (one line on stderr), 2 usage error; `status`: 2 when sealed.
Shell completion: eval "$(_VAULT_EDGE_COMPLETE=bash_source vault-edge)" (zsh_source, fish_source).
"""


class Cli(click.Group):
    """Turns every expected failure into one line on stderr and exit 1 (never a traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ClientError as exc:
            raise CliError(exc.message) from None
        except (OSError, ValueError) as exc:
            raise CliError(str(exc) or type(exc).__name__) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


EXIT_SEALED = 2


def fail(message: str) -> NoReturn:
    raise CliError(message)


def client() -> OperatorClient:
    return session.client()


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]}, epilog=ENVIRONMENT)
@click.version_option(__version__, prog_name="vault-edge")
@click.option("--addr", envvar="VAULT_EDGE_ADDR", metavar="URL", help="the control plane (env VAULT_EDGE_ADDR)")
@click.option(
    "--ca-cert",
    envvar="VAULT_EDGE_CACERT",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="CA bundle for https (env VAULT_EDGE_CACERT)",
)
@click.option(
    "--output",
    "-o",
    "fmt",
    envvar="VAULT_EDGE_FORMAT",
    type=click.Choice(FORMATS),
    help="the default --output of every verb (env VAULT_EDGE_FORMAT)",
)
@click.pass_context
def cli(ctx: click.Context, addr: str | None, ca_cert: str | None, fmt: str | None) -> None:
    """vault-edge: one sealed source of truth, a tiny agent in every PoP.

    Global options go before the verb: vault-edge --addr https://vault:8420 status
    """
    ctx.obj = session.Globals(addr or None, ca_cert or None, fmt)


# -- values --------------------------------------------------------------------------------------
def read_value(value: str | None, from_file: str | None, prompt: bool) -> bytes | None:
    """VALUE, ``-`` (stdin, one trailing newline dropped), ``--from-file`` (exact bytes), or a
    hidden prompt when nothing was given on a terminal."""
    if value is not None and from_file is not None:
        usage("give VALUE or --from-file, not both")
    if from_file is not None:
        with open(from_file, "rb") as f:
            return f.read()
    if value == "-":
        data = sys.stdin.buffer.read()
        return data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
    if value is not None:
        return value.encode()
    if prompt and sys.stdin.isatty():
        return click.prompt("Value", hide_input=True, err=True).encode()
    return None


def value_body(data: bytes | None) -> dict[str, str]:
    if data is None:
        return {}
    try:
        return {"value": data.decode("utf-8")}
    except UnicodeDecodeError:
        from vault_edge.wire import b64e

        return {"value_b64": b64e(data)}


def write_value(doc: dict[str, Any]) -> None:
    from vault_edge.wire import b64d

    raw = b64d(doc["value"]) if doc.get("encoding") == "base64" else str(doc["value"]).encode()
    sys.stdout.buffer.write(raw + (b"\n" if sys.stdout.isatty() else b""))
    sys.stdout.flush()


# -- sys -----------------------------------------------------------------------------------------
@cli.command()
@click.option("--shares", type=click.IntRange(1, 16), default=5, show_default=True)
@click.option("--threshold", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option(
    "--group",
    "groups",
    multiple=True,
    metavar="T/N",
    help="a share group: T of N shares (repeat; e.g. one group per site)",
)
@click.option(
    "--group-threshold",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    help="how many groups must be complete",
)
@click.option("--passphrase", is_flag=True, help="protect the shares with a passphrase (prompted)")
@output_option
def init(
    shares: int, threshold: int, groups: tuple[str, ...], group_threshold: int, passphrase: bool, fmt: str
) -> None:
    """Initialize the vault: make the root key and split it into SLIP-39 shares."""
    body: dict[str, Any] = {"shares": shares, "threshold": threshold, "group_threshold": group_threshold}
    if groups:
        try:
            body["groups"] = [{"threshold": int(t), "shares": int(n)} for t, n in (g.split("/") for g in groups)]
        except ValueError:
            usage("--group takes T/N, e.g. --group 2/3")
    if passphrase:
        body["passphrase"] = click.prompt("Passphrase", hide_input=True, confirmation_prompt=True, err=True)
    with client() as c:
        res = c.init(**body)
    if fmt == "json":
        emit_json(res)
        return
    err.print(
        "[bold yellow]Store each share apart, with a different person. They are shown once; "
        "the root key exists nowhere else.[/]"
    )
    for i, share in enumerate(res["shares"], 1):
        out.print(f"Share {i}: {share}")
    out.print(f"\nRoot token: {res['root_token']}")
    err.print(f"\nThe vault is sealed. Unseal it with {res['threshold']} shares: vault-edge unseal")


def _passphrase() -> str:
    """The passphrase, asked only for the share that completes the unseal: VAULT_EDGE_PASSPHRASE, else
    a hidden prompt on a terminal, else the next line of stdin (after the share, with ``unseal -``)."""
    import os

    passphrase = os.environ.get("VAULT_EDGE_PASSPHRASE")
    if passphrase is None:
        if sys.stdin.isatty():
            passphrase = click.prompt("Passphrase (this share completes the unseal)", hide_input=True, err=True)
        else:
            passphrase = sys.stdin.readline().rstrip("\r\n")
    if not passphrase:
        fail(
            "this share completes the unseal and the vault has a passphrase: enter it at the prompt, on the "
            "line after the share on stdin, or in VAULT_EDGE_PASSPHRASE"
        )
    return passphrase


@cli.command()
@click.argument("share", required=False)
@click.option("--reset", is_flag=True, help="forget the shares entered so far")
@output_option
def unseal(share: str | None, reset: bool, fmt: str) -> None:
    """Enter one unseal share (SHARE, - for stdin, or a hidden prompt).

    The control plane takes the vault's passphrase only with the share that completes the unseal (so
    nobody can change it while operators are mid-way): it is asked for with that share only."""
    with client() as c:
        if reset:
            res = c.unseal(reset=True)
        else:
            status = c.status()
            if not status["initialized"]:
                fail("the vault is not initialized: run `vault-edge init`")
            if not status["sealed"]:
                res = status
            else:
                if share == "-":
                    share = sys.stdin.readline().strip()
                elif share is None:
                    share = click.prompt(
                        f"Unseal share ({status['progress'] + 1} of {status['threshold']})", hide_input=True, err=True
                    )
                # The last share by count; with groups the count can say "last" too early, and another
                # operator's share may come in meanwhile: the control plane says which, changing nothing.
                last = status.get("passphrase") and status["progress"] + 1 >= status["threshold"]
                passphrase = _passphrase() if last else None
                try:
                    res = c.unseal(share=share, passphrase=passphrase)
                except ClientError as exc:
                    if exc.code == "passphrase_not_final" and passphrase is not None:
                        res = c.unseal(share=share)
                    elif exc.code == "passphrase_required" and passphrase is None:
                        res = c.unseal(share=share, passphrase=_passphrase())
                    else:
                        raise
    if fmt == "json":
        emit_json(res)
    elif res["sealed"]:
        out.print(f"Sealed: {res['progress']} of {res['threshold']} shares entered.")
    else:
        out.print("Unsealed.")


@cli.command()
@output_option
def seal(fmt: str) -> None:
    """Seal the vault: forget the root key until the next unseal."""
    with client() as c:
        res = c.seal()
    emit_json(res) if fmt == "json" else out.print("Sealed.")


@cli.command()
@click.argument("name", required=False)
@output_option
def status(name: str | None, fmt: str) -> None:
    """The vault's seal status; with NAME, which version each node of its regions serves.

    Exit 0 unsealed, 2 sealed (or not initialized), 1 on error: as `vault status`."""
    with client() as c:
        if name is None:
            res = c.status()
            if fmt == "json":
                emit_json(res)
            else:
                table(
                    None,
                    ["key", "value"],
                    [
                        ("initialized", res["initialized"]),
                        ("sealed", res["sealed"]),
                        ("progress", f"{res['progress']}/{res['threshold']}"),
                        ("shares", res["shares"]),
                        ("revision", res["revision"]),
                        ("server pin", res.get("server_pin", "")),
                    ],
                )
            if res["sealed"]:
                sys.exit(EXIT_SEALED)
            return
        res = c.propagation(name)
    if fmt == "json":
        emit_json(res)
        return
    out.print(f"{name}: current version {res['current']}, regions {', '.join(res['regions'])}")
    table(
        None,
        ["region", "node", "serving", "applied rev", "state", "last seen"],
        [
            (n["region"], n["id"], n["serving"], n["applied_revision"], n["state"], ago(n["last_seen"]))
            for n in res["nodes"]
        ],
    )


# -- regions -------------------------------------------------------------------------------------
@cli.group()
def region() -> None:
    """Regions: where secrets may be decrypted."""


@region.command("create")
@click.argument("name")
@output_option
def region_create(name: str, fmt: str) -> None:
    """Create a region (and its first region key)."""
    with client() as c:
        res = c.create_region(name)
    emit_json(res) if fmt == "json" else out.print(f"Region {name} created (key version {res['key_version']}).")


@region.command("list")
@output_option
def region_list(fmt: str) -> None:
    """List regions."""
    with client() as c:
        res = c.regions()
    if fmt == "json":
        emit_json(res)
        return
    table(
        None,
        ["region", "key version", "nodes", "secrets", "created"],
        [(r["name"], r["key_version"], r["nodes"], r["secrets"], when(r["created_at"])) for r in res["regions"]],
    )


@region.command("rekey")
@click.argument("name")
@output_option
def region_rekey(name: str, fmt: str) -> None:
    """New region key: re-wrap its data keys, grant it to its nodes, delete the old one."""
    with client() as c:
        res = c.rekey(name)
    emit_json(res) if fmt == "json" else out.print(f"Region {name} re-keyed (key version {res['key_version']}).")


# -- secrets -------------------------------------------------------------------------------------
@cli.command()
@click.argument("name")
@click.argument("value", required=False)
@click.option("--from-file", type=click.Path(dir_okay=False), help="read the value from a file (exact bytes)")
@click.option("--regions", help="regions allowed to decrypt it: a,b or * (default *)")
@click.option("--generate", "spec", help="generate the value: LENGTH:ALPHABET, e.g. 32:base64url")
@click.option(
    "--rotate-every", callback=duration_text, help="rotate (generate) on a schedule, e.g. 30d (needs --generate)"
)
@click.option(
    "--grace", callback=duration_text, help="how long the replaced version stays readable as previous (e.g. 1h)"
)
@click.option("--rotator", help="keep it with this rotator, at its source (see `vault-edge rotator`)")
@output_option
def put(
    name: str,
    value: str | None,
    from_file: str | None,
    regions: str | None,
    spec: str | None,
    rotate_every: str | None,
    grace: str | None,
    rotator: str | None,
    fmt: str,
) -> None:
    """Store a secret: a new version, made current. VALUE, - (stdin), --from-file, or --generate."""
    data = read_value(value, from_file, prompt=spec is None and rotator is None)
    if data is None and spec is None and rotator is None:
        usage("give a VALUE, - for stdin, --from-file F, or --generate SPEC")
    if data is not None and spec is not None:
        usage("give a value or --generate, not both")
    body = {
        **value_body(data),
        "generate": spec,
        "rotate_every": rotate_every,
        "grace": grace,
        "regions": regions.split(",") if regions else None,
        "rotator": rotator,
    }
    with client() as c:
        res = c.put(name, **body)
    if fmt == "json":
        emit_json(res)
    else:
        out.print(
            f"{name}: version {res['version']} (revision {res['revision']}), regions {','.join(res['regions'])}"
            + (f", kept by rotator {rotator}" if rotator else "")
        )


@cli.command()
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1))
@click.option("--stage", type=click.Choice(["current", "previous", "pending"]))
@output_option
def get(name: str, version: int | None, stage: str | None, fmt: str) -> None:
    """Print a secret's value (current, or --version N, or --stage S)."""
    with client() as c:
        res = c.get(name, version=version, stage=stage)
    if fmt == "json":
        emit_json({k: res[k] for k in ("name", "value", "version", "stage", "revision", "encoding")})
    else:
        write_value(res)


@cli.command("list")
@click.argument("prefix", required=False, default="")
@output_option
def list_(prefix: str, fmt: str) -> None:
    """List secret names (optionally under PREFIX)."""
    with client() as c:
        res = c.list(prefix)
    if fmt == "json":
        emit_json(res)
        return
    table(
        None,
        ["name", "version", "regions", "updated", "rotates"],
        [
            (
                s["name"],
                s["version"],
                ",".join(s["regions"]),
                when(s["updated_at"]),
                when(s["next_rotation_at"]) if s["next_rotation_at"] else "",
            )
            for s in res["secrets"]
        ],
    )


@cli.command()
@click.argument("name")
@output_option
def history(name: str, fmt: str) -> None:
    """A secret's versions, their origin and stages."""
    with client() as c:
        res = c.history(name)
    if fmt == "json":
        emit_json(res)
        return
    table(
        f"{name} ({', '.join(res['regions'])})" + (" [deleted]" if res["deleted"] else ""),
        ["version", "created", "origin", "stages", "destroyed"],
        [
            (
                v["version"],
                when(v["created_at"]),
                v["origin"],
                ", ".join(
                    s["stage"] + (f" until {when(s['expires_at'])}" if s["expires_at"] else "") for s in v["stages"]
                ),
                "yes" if v["destroyed"] else "",
            )
            for v in res["versions"]
        ],
    )


@cli.command()
@click.argument("name")
@click.argument("value", required=False)
@click.option("--from-file", type=click.Path(dir_okay=False))
@click.option("--generate", "spec", help="generate the new value: LENGTH:ALPHABET (default: the secret's spec)")
@click.option(
    "--grace", callback=duration_text, help="how long the replaced version stays readable as previous (e.g. 1h, 0)"
)
@click.option(
    "--stage",
    type=click.Choice(["current", "pending"]),
    default="current",
    show_default=True,
    help="pending: stage it for a two-phase rotation (then `vault-edge promote`)",
)
@click.option("--wait", is_flag=True, help="return only when every live node of its regions serves it")
@click.option("--timeout", default="60s", show_default=True, callback=duration_option, help="how long --wait waits")
@output_option
def rotate(
    name: str,
    value: str | None,
    from_file: str | None,
    spec: str | None,
    grace: str | None,
    stage: str,
    wait: bool,
    timeout: int,
    fmt: str,
) -> None:
    """A new version of NAME: VALUE, - (stdin), --from-file, or generated."""
    data = read_value(value, from_file, prompt=False)
    with client() as c:
        res = c.rotate(
            name, **value_body(data), generate=spec, grace=grace, stage=None if stage == "current" else stage
        )
        if "rotation" in res:  # kept by a rotator: --wait follows it through retire
            return rotator_cmd.rotated(c, name, res, wait, timeout, fmt)
        if not wait:
            emit_json(res) if fmt == "json" else out.print(f"{name}: version {res['version']} is {stage}.")
            return
        from vault_edge.cli.propagate import wait_for_propagation

        ok, prop = wait_for_propagation(c, name, res["revision"], timeout, quiet=fmt == "json")
    if fmt == "json":
        emit_json({**res, "propagated": ok, "lagging": prop["lagging"], "down": prop["down"]})
    if not ok:
        fail(
            f"timed out after {timeout}s waiting for propagation; version {res['version']} of {name} was "
            f"committed (revision {res['revision']}) and is {stage}, and {len(prop['lagging'])} node(s) still "
            f"lag: {', '.join(prop['lagging'])} (see `vault-edge status {name}`)"
        )
    if fmt != "json":
        out.print(
            f"{name}: version {res['version']} is served by every live node "
            f"({sum(1 for n in prop['nodes'] if n['done'])} nodes)."
        )


@cli.command()
@click.argument("name")
@click.option("--grace", callback=duration_text, help="how long the replaced version stays readable as previous")
@output_option
def promote(name: str, grace: str | None, fmt: str) -> None:
    """Make the pending version current."""
    with client() as c:
        res = c.promote(name, grace)
    emit_json(res) if fmt == "json" else out.print(f"{name}: version {res['version']} is current.")


@cli.command()
@click.argument("name")
@click.option("--to", "to", type=click.IntRange(min=1), required=True, help="the version whose value to restore")
@click.option("--grace", callback=duration_text, help="how long the replaced version stays readable as previous")
@output_option
def rollback(name: str, to: int, grace: str | None, fmt: str) -> None:
    """A new version holding version V's value."""
    with client() as c:
        res = c.rollback(name, to, grace)
    emit_json(res) if fmt == "json" else out.print(f"{name}: version {res['version']} (= version {to}) is current.")


@cli.command()
@click.argument("name")
@click.option("--destroy", is_flag=True, help="remove every version's ciphertext for good")
@output_option
def delete(name: str, destroy: bool, fmt: str) -> None:
    """Delete a secret (soft: `put` brings it back), or --destroy it."""
    with client() as c:
        res = c.delete(name, destroy)
    emit_json(res) if fmt == "json" else out.print(f"{name}: {'destroyed' if destroy else 'deleted'}.")


# -- nodes ---------------------------------------------------------------------------------------
@cli.group()
def node() -> None:
    """Nodes (agents): join tokens, listing, status (with egress counts), revocation."""


@node.command("token")
@click.option("--region", required=True)
@click.option("--ttl", callback=duration_text, help="how long the token is valid (default 1h, at most 7d)")
@output_option
def node_token(region: str, ttl: str | None, fmt: str) -> None:
    """A single-use join token for one agent of REGION."""
    with client() as c:
        res = c.join_token(region, ttl)
    if fmt == "json":
        emit_json(res)
    else:
        out.print(res["token"])
        err.print(
            f"Single use, valid until {when(res['expires_at'])}. Put it in a file (or "
            "VAULT_EDGE_JOIN_TOKEN), not on a command line: vault-edge agent run --join-token-file FILE ..."
        )


@node.command("list")
@click.option("--region")
@output_option
def node_list(region: str | None, fmt: str) -> None:
    """List nodes with their applied revision and last contact."""
    with client() as c:
        res = c.nodes(region)
    if fmt == "json":
        emit_json(res)
        return
    table(
        None,
        ["node", "region", "status", "revision", "last seen", "egress calls", "hostname"],
        [
            (n["id"], n["region"], n["status"], n["revision"], ago(n["last_seen"]), _calls(n), n["hostname"])
            for n in res["nodes"]
        ],
    )


def _calls(n: dict[str, Any]) -> str:
    """A node's egress calls in a cell: the total, and the upstream answers that were not 2xx/3xx."""
    eg = n.get("egress")
    if not eg:
        return "-"
    routes = eg["routes"].values()
    bad = sum(r["4xx"] + r["5xx"] for r in routes)
    failed = sum(r["failed"] for r in routes)
    extra = ", ".join(x for x in (f"{bad} 4xx/5xx" if bad else "", f"{failed} failed" if failed else "") if x)
    return f"{eg['requests']}" + (f" ({extra})" if extra else "")


@node.command("status")
@click.argument("node_id")
@output_option
def node_status(node_id: str, fmt: str) -> None:
    """One node: status, applied revision, last contact, and its egress calls per route (as of its
    last contact, counted since the agent started)."""
    with client() as c:
        n = c.node(node_id)
    if fmt == "json":
        emit_json(n)
        return
    for label, v in (
        ("node", n["id"]),
        ("region", n["region"]),
        ("hostname", n["hostname"]),
        ("status", n["status"]),
        ("revision", n["revision"]),
        ("last seen", f"{ago(n['last_seen'])} ({when(n['last_seen'])})" if n["last_seen"] else "never"),
        ("enrolled", when(n["enrolled_at"])),
    ):
        out.print(f"{label + ':':<10} {v}")
    eg = n.get("egress")
    if not eg:
        out.print("egress:    no calls reported")
        return
    out.print(
        f"egress:    {eg['requests']} calls since {when(eg['since'])} (the agent's start), as of its last contact"
    )
    table(
        None,
        ["route", "calls", "1xx", "2xx", "3xx", "4xx", "5xx", "failed", "mean ms"],
        [
            (
                name,
                r["requests"],
                r["1xx"],
                r["2xx"],
                r["3xx"],
                r["4xx"],
                r["5xx"],
                r["failed"],
                _mean_ms(r),
            )
            for name, r in sorted(eg["routes"].items())
        ],
    )


def _mean_ms(r: dict[str, int]) -> str:
    answered = r["1xx"] + r["2xx"] + r["3xx"] + r["4xx"] + r["5xx"]
    return f"{r['ms'] / answered:.1f}" if answered else "-"


@node.command("revoke")
@click.argument("node_id")
@output_option
def node_revoke(node_id: str, fmt: str) -> None:
    """Revoke a node and re-key its region."""
    with client() as c:
        res = c.revoke_node(node_id)
    if fmt == "json":
        emit_json(res)
    else:
        out.print(f"{node_id} revoked; region {res['region']} re-keyed (key version {res['key_version']}).")


# -- operator tokens and audit --------------------------------------------------------------------
@cli.group()
def token() -> None:
    """Operator tokens scoped to name prefixes and verbs."""


@token.command("create")
@click.option("--name", required=True)
@click.option("--prefix", "prefixes", multiple=True, default=("",), help="name prefix (repeat; default: all)")
@click.option(
    "--verb", "verbs", multiple=True, required=True, type=click.Choice(["read", "list", "write", "delete", "admin"])
)
@click.option(
    "--ttl",
    callback=duration_text,
    help="how long the token is valid (default: no expiry; never past the creating token)",
)
@output_option
def token_create(name: str, prefixes: tuple[str, ...], verbs: tuple[str, ...], ttl: str | None, fmt: str) -> None:
    """Create a scoped operator token (shown once)."""
    with client() as c:
        res = c.create_token(name=name, prefixes=list(prefixes), verbs=list(verbs), ttl=ttl)
    emit_json(res) if fmt == "json" else out.print(res["token"])


@token.command("lookup")
@output_option
def token_lookup(fmt: str) -> None:
    """The token in use (VAULT_EDGE_TOKEN, else the one `vault-edge login` stored): name, scope, expiry."""
    with client() as c:
        res = c.lookup_self()
    if fmt == "json":
        emit_json(res)
        return
    table(
        None,
        ["key", "value"],
        [
            ("id", res["id"]),
            ("name", res["name"]),
            ("prefixes", ",".join(p or "*" for p in res["prefixes"])),
            ("verbs", ",".join(res["verbs"])),
            ("expires", when(res["expires_at"]) if res["expires_at"] else "never"),
        ],
    )


@token.command("list")
@output_option
def token_list(fmt: str) -> None:
    with client() as c:
        res = c.tokens()
    if fmt == "json":
        emit_json(res)
        return
    table(
        None,
        ["id", "name", "prefixes", "verbs", "expires", "revoked"],
        [
            (
                t["id"],
                t["name"],
                ",".join(p or "*" for p in t["prefixes"]),
                ",".join(t["verbs"]),
                when(t["expires_at"]) if t["expires_at"] else "",
                "yes" if t["revoked"] else "",
            )
            for t in res["tokens"]
        ],
    )


@token.command("revoke")
@click.argument("token_id")
@output_option
def token_revoke(token_id: str, fmt: str) -> None:
    with client() as c:
        res = c.revoke_token(token_id)
    more = res.get("descendants_revoked") or []
    also = f", with the {len(more)} token(s) made from it" if more else ""
    emit_json(res) if fmt == "json" else out.print(f"token {token_id} revoked{also}.")


@cli.command()
@click.argument("token", required=False)
@output_option
def login(token: str | None, fmt: str) -> None:
    """Check TOKEN (argument, - for stdin, or a hidden prompt) and store it for later verbs.

    Stored in ~/.vault-edge-token (or VAULT_EDGE_TOKEN_FILE), mode 0600, as Vault's token helper does;
    VAULT_EDGE_TOKEN, when set, still wins over the file."""
    import os

    if token == "-":
        token = sys.stdin.readline().strip()
    elif token is None:
        token = click.prompt("Token", hide_input=True, err=True).strip()
    if not token:
        usage("give a token: vault-edge login TOKEN, - for stdin, or type it at the prompt")
    with session.client(token=token) as c:
        res = c.lookup_self()  # a token the control plane refuses is never stored
    path = session.store_token(token)
    if fmt == "json":
        emit_json({**res, "token_file": str(path)})
    else:
        out.print(
            f"Logged in as {res['actor']} ({','.join(res['verbs'])} on "
            f"{','.join(p or '*' for p in res['prefixes'])}); token stored in {path}"
        )
    if os.environ.get("VAULT_EDGE_TOKEN") and os.environ["VAULT_EDGE_TOKEN"] != token:
        err.print("[yellow]note: VAULT_EDGE_TOKEN is set and wins over the stored token; unset it to use this one[/]")


def _audit_rows(entries: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["seq"], when(e["at"]), e["actor"], e["action"], e["target"], e["outcome"]) for e in entries]


AUDIT_COLUMNS = ["seq", "time", "actor", "action", "target", "outcome"]


@cli.group(invoke_without_command=True)
@click.option("--after", type=click.IntRange(min=0), default=0)
@click.option("--limit", type=click.IntRange(1, 1000), default=100)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="keep printing new entries as they are written (with -o json: one JSON object per line)",
)
@click.option("--interval", default="1s", callback=duration_option, help="how often --follow asks (default 1s)")
@output_option
@click.pass_context
def audit(ctx: click.Context, after: int, limit: int, follow: bool, interval: int, fmt: str) -> None:
    """The audit log (hash-chained); `audit verify` checks the chain; --follow tails it."""
    if ctx.invoked_subcommand:
        return
    if follow:
        _follow(after, limit, max(1, interval), fmt)
        return
    with client() as c:
        res = c.audit(after, limit)
    if fmt == "json":
        emit_json(res)
        return
    table(None, AUDIT_COLUMNS, _audit_rows(res["entries"]))


def _follow(after: int, limit: int, interval: int, fmt: str) -> None:
    """Tail the log: the entries after ``after`` (the last ``limit`` of them when ``after`` is 0), then
    each new one as it comes, until interrupted. JSON: one object per line (JSON lines), for a pipe."""
    import json
    import time

    with client() as c:
        if after == 0:  # start from the end, as `tail -f` does: the last `limit` entries
            seq = 0
            while page := c.audit(seq, 1000)["entries"]:
                seq = page[-1]["seq"]
            after = max(0, seq - limit)
        while True:
            entries = c.audit(after, 1000)["entries"]
            for e in entries:
                if fmt == "json":
                    sys.stdout.write(json.dumps(e, separators=(",", ":")) + "\n")
                else:
                    out.print("  ".join(str(v) for v in _audit_rows([e])[0]))
                after = e["seq"]
            sys.stdout.flush()
            if len(entries) < 1000:
                time.sleep(interval)


@audit.command("verify")
@output_option
def audit_verify(fmt: str) -> None:
    """Check the audit log's hash chain and MACs."""
    with client() as c:
        res = c.audit_verify()
    if fmt == "json":
        emit_json(res)
    else:
        out.print(
            f"{res['entries']} entries: {res['reason']}"
            + (
                f" ({res['sealed_events']} events while sealed, kept outside the chain)"
                if res.get("sealed_events")
                else ""
            )
        )
    if not res["ok"]:
        fail(f"audit chain broken at entry {res['first_bad']}: {res['reason']}")


def _register_subcommands() -> None:
    from vault_edge.cli import agent_cmd, egress_cmd, operator_cmd, server_cmd

    cli.add_command(server_cmd.server)
    cli.add_command(server_cmd.dev)
    cli.add_command(agent_cmd.agent)
    cli.add_command(egress_cmd.egress)
    for command in (operator_cmd.operator, operator_cmd.backup, operator_cmd.restore, operator_cmd.migrate):
        cli.add_command(command)
    cli.add_command(rotator_cmd.rotator)
    cli.add_command(rotator_cmd.rotation)


_register_subcommands()


def main() -> None:
    cli(prog_name="vault-edge")
