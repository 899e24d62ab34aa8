"""``vault-edge egress create | list | delete``: egress routes, for keyless workers.

A route lets the agents of its regions call an upstream API for a worker and inject a secret into
the call (the worker never holds it): see the README, "Keyless workers".
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from vault_edge.cli import session
from vault_edge.cli.output import emit_json, out, output_option, table, when


@click.group()
def egress() -> None:
    """Egress routes: the agent calls an upstream API for a worker, adding the key itself."""


@egress.command()
@click.argument("name")
@click.option("--upstream", required=True, metavar="URL", help="https://host[:port][/base]")
@click.option("--secret", required=True, metavar="NAME", help="the secret to inject")
@click.option(
    "--inject",
    "inject",
    multiple=True,
    required=True,
    metavar="SPEC",
    help="header:NAME=TEMPLATE, query:NAME=TEMPLATE or basic:USER:PASSWORD; TEMPLATE uses {value} or "
    "{value.FIELD} (repeatable)",
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    metavar="METHOD",
    help="a method workers may use (repeatable; default: GET HEAD POST PUT PATCH DELETE OPTIONS)",
)
@click.option(
    "--path", "paths", multiple=True, metavar="PREFIX", help="a path prefix workers may call (repeatable; default: /)"
)
@click.option("--regions", help="regions whose agents serve it: a,b or * (default: the secret's regions)")
@click.option(
    "--retry-previous-on-401",
    is_flag=True,
    help="during a rotation's grace, retry an upstream 401 once with the previous value (request bodies up to "
    "64 KiB only: larger ones are not kept to be sent again)",
)
@output_option
def create(
    name: str,
    upstream: str,
    secret: str,
    inject: tuple[str, ...],
    methods: tuple[str, ...],
    paths: tuple[str, ...],
    regions: str | None,
    retry_previous_on_401: bool,
    fmt: str,
) -> None:
    """Define an egress route NAME."""
    body: dict[str, Any] = {"name": name, "upstream": upstream, "secret": secret, "inject": list(inject)}
    if methods:
        body["methods"] = [m.upper() for m in methods]
    if paths:
        body["paths"] = list(paths)
    if regions:
        body["regions"] = regions.split(",")
    if retry_previous_on_401:
        body["retry_previous_on_401"] = True
    with session.client() as c:
        res = c.request("POST", "/v1/egress", json=body)
    if fmt == "json":
        emit_json(res)
        return
    out.print(
        f"egress route {res['name']}: {res['upstream']} with {res['secret']} (revision {res['revision']}), "
        f"regions {','.join(res['regions'])}"
    )


@egress.command("list")
@output_option
def list_routes(fmt: str) -> None:
    """List egress routes."""
    with session.client() as c:
        res = c.request("GET", "/v1/egress")
    if fmt == "json":
        emit_json(res)
        return
    table(
        None,
        ["name", "upstream", "secret", "inject", "methods", "paths", "regions", "retry 401", "created"],
        (
            (
                r["name"],
                r["upstream"],
                r["secret"],
                " ".join(r["inject"]),
                ",".join(r["methods"]),
                " ".join(r["paths"]),
                ",".join(r["regions"]),
                "previous" if r.get("retry_previous_on_401") else "-",
                when(r["created_at"]),
            )
            for r in res["routes"]
        ),
    )
    for name in res.get("refused", []):
        click.echo(f"warning: egress route {name!r} failed its integrity check and is not served", err=True)


@egress.command()
@click.argument("name")
@output_option
def delete(name: str, fmt: str) -> None:
    """Delete the egress route NAME (agents stop serving it at their next sync)."""
    with session.client() as c:
        res = c.request("DELETE", f"/v1/egress/{quote(name, safe='')}")
    if fmt == "json":
        emit_json(res)
        return
    out.print(f"egress route {name} deleted (revision {res['revision']})")
