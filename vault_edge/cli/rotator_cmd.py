"""``vault-edge rotator ...`` and ``rotation status``: rotation at the source.

    vault-edge rotator create pg --type postgres --admin-secret rotators/pg-admin --admin-value - \\
        --host 127.0.0.1 --port 5432 --database app --strategy alternate --usernames app_a,app_b
    vault-edge put db/main --rotator pg --rotate-every 30d --regions eu
    vault-edge rotate db/main --wait          # runs the rotator; returns once the old credential is retired
    vault-edge rotation status db/main
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from vault_edge.cli import session
from vault_edge.cli.output import CliError, ago, emit_json, out, output_option, table, when
from vault_edge.operator import OperatorClient

POLL_S = 0.2


def _client() -> OperatorClient:
    """The client of every verb here: --addr, --ca-cert and the token `login` stored, as elsewhere."""
    return session.client()


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise CliError(f"{what}: a JSON object")
    return doc


@click.group()
def rotator() -> None:
    """Rotators: change a credential where it lives (postgres, mysql, redis, webhook)."""


@rotator.command("create")
@click.argument("name")
@click.option("--type", "kind", required=True, type=click.Choice(["postgres", "mysql", "redis", "webhook"]))
@click.option("--admin-secret", required=True, help="the secret (in no region) holding the admin credential")
@click.option("--admin-value", help="the admin credential as a JSON object, or - for stdin (stored in --admin-secret)")
@click.option("--config", "config_json", help="the rotator's settings as a JSON object (or @FILE)")
@click.option("--host")
@click.option("--port", type=click.IntRange(1, 65535))
@click.option("--database")
@click.option("--strategy", type=click.Choice(["alternate", "single"]))
@click.option("--usernames", help="alternate: two roles a,b; single: one role")
@click.option("--username", help="redis: the ACL user")
@output_option
def rotator_create(
    name: str,
    kind: str,
    admin_secret: str,
    admin_value: str | None,
    config_json: str | None,
    host: str | None,
    port: int | None,
    database: str | None,
    strategy: str | None,
    usernames: str | None,
    username: str | None,
    fmt: str,
) -> None:
    """Create (or replace) rotator NAME."""
    config: dict[str, Any] = {}
    if config_json:
        text = open(config_json[1:]).read() if config_json.startswith("@") else config_json  # noqa: SIM115
        config = _json_object(text, "--config")
    flags = {
        "host": host,
        "port": port,
        "database": database,
        "strategy": strategy,
        "username": username,
        "usernames": usernames.split(",") if usernames else None,
    }
    config.update({k: v for k, v in flags.items() if v is not None})
    body: dict[str, Any] = {"type": kind, "admin_secret": admin_secret, "config": config}
    if admin_value is not None:
        text = sys.stdin.read() if admin_value == "-" else admin_value
        body["admin_value"] = _json_object(text, "--admin-value")
    with _client() as c:
        res = c.create_rotator(name, **body)
    if fmt == "json":
        emit_json(res)
    else:
        out.print(f"rotator {name} ({kind}) created; it logs in with {admin_secret} (control plane only).")


@rotator.command("list")
@output_option
def rotator_list(fmt: str) -> None:
    """List rotators."""
    with _client() as c:
        res = c.rotators()
    if fmt == "json":
        emit_json(res)
        return
    table(
        None,
        ["name", "type", "admin secret", "target", "strategy"],
        [
            (
                r["name"],
                r["type"],
                r["admin_secret"],
                f"{r['config'].get('host', '')}:{r['config'].get('port', '')}",
                r["config"].get("strategy", ""),
            )
            for r in res["rotators"]
        ],
    )


@rotator.command("delete")
@click.argument("name")
@output_option
def rotator_delete(name: str, fmt: str) -> None:
    """Delete a rotator no secret uses."""
    with _client() as c:
        res = c.delete_rotator(name)
    emit_json(res) if fmt == "json" else out.print(f"rotator {name} deleted.")


@click.group()
def rotation() -> None:
    """Rotations at the source: their steps and what a retire waits for."""


@rotation.command("status")
@click.argument("name")
@click.option("--limit", type=click.IntRange(1, 100), default=5, show_default=True)
@output_option
def rotation_status(name: str, limit: int, fmt: str) -> None:
    """NAME's rotator, schedule and last rotations (step, since when, nodes a retire waits for)."""
    with _client() as c:
        res = c.rotation_status(name, limit)
    if fmt == "json":
        emit_json(res)
        return
    rot = res["rotator"] or {}
    out.print(
        f"{name}: rotator {rot.get('name')} ({rot.get('type')}"
        + (f", {rot['strategy']}" if rot.get("strategy") else "")
        + ")"
        + (f", next rotation {when(res['next_rotation_at'])}" if res.get("next_rotation_at") else "")
    )
    table(
        None,
        ["rotation", "step", "since", "version", "previous", "waiting for", "down", "error"],
        [
            (
                r["rotation"],
                r["step"] + (" (two live past grace)" if r.get("two_live_past_grace") else ""),
                ago(r["since"]),
                r["version"],
                r["previous_version"],
                ",".join(r.get("waiting_for", [])),
                ",".join(r.get("down", [])),
                r.get("last_error") or "",
            )
            for r in res["rotations"]
        ],
    )


def wait_rotation(c: OperatorClient, name: str, rotation_id: int, timeout: float) -> dict[str, Any]:
    """Follow rotation ``rotation_id`` of ``name`` until it is done or aborted, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        doc = next((r for r in c.rotation_status(name, 20)["rotations"] if r["rotation"] == rotation_id), None)
        if doc is None:
            raise CliError(f"rotation {rotation_id} of {name} is no longer listed")
        if doc["step"] in ("done", "aborted") or time.monotonic() >= deadline:
            return doc
        time.sleep(POLL_S)


def rotated(c: OperatorClient, name: str, res: dict[str, Any], wait: bool, timeout: int, fmt: str) -> None:
    """What ``rotate NAME`` prints for a secret kept by a rotator (called from cli/main.py)."""
    if not wait:
        emit_json(res) if fmt == "json" else out.print(
            f"{name}: rotation {res['rotation']} started (step {res['step']}); "
            f"follow it with `vault-edge rotation status {name}`"
        )
        return
    doc = wait_rotation(c, name, res["rotation"], timeout)
    if fmt == "json":
        emit_json({"name": name, **doc})
    if doc["step"] == "aborted":
        raise CliError(f"rotation {doc['rotation']} of {name} aborted: {doc.get('last_error') or 'see the audit log'}")
    if doc["step"] != "done":
        waiting = ", ".join(doc.get("waiting_for", [])) or "none"
        raise CliError(f"timed out at step {doc['step']} (retire waits for: {waiting})")
    if fmt != "json":
        out.print(f"{name}: version {doc['version']} is current everywhere and the old credential is retired.")
