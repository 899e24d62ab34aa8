"""``vault-edge operator ...`` (recovery shares, root key rotation) and ``backup``, ``restore``,
``migrate``.

Shares are read one per line from stdin, or asked for with a hidden prompt on a terminal, never taken
as arguments (``ps`` would show them); the passphrase comes from VAULT_EDGE_PASSPHRASE or a prompt.
``restore`` and ``migrate`` work on databases directly (offline) and import the server lazily.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from vault_edge.cli import session
from vault_edge.cli.output import CliError, emit_json, err, out, output_option
from vault_edge.operator import OperatorClient


def _read_shares(threshold: int, source: str | None) -> list[str]:
    if source is not None:
        lines = Path(source).read_text().splitlines() if source != "-" else sys.stdin.read().splitlines()
    elif not sys.stdin.isatty():
        lines = sys.stdin.read().splitlines()
    else:
        lines = [click.prompt(f"Share {i} of {threshold}", hide_input=True, err=True) for i in range(1, threshold + 1)]
    shares = [s.strip() for s in lines if s.strip()]
    if not shares:
        raise CliError("no shares given: one per line on stdin (or --shares-file), or at the prompts")
    return shares


def _passphrase(needed: bool) -> str | None:
    if not needed:
        return None
    value = os.environ.get("VAULT_EDGE_PASSPHRASE")
    if value is None and sys.stdin.isatty():
        value = click.prompt("Passphrase", hide_input=True, err=True)
    if not value:
        raise CliError("this vault has a passphrase: set VAULT_EDGE_PASSPHRASE or enter it at the prompt")
    return value


shares_file_option = click.option(
    "--shares-file",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="the shares, one per line (default: stdin, or prompts on a terminal)",
)


def _authority(c: OperatorClient, shares_file: str | None) -> tuple[list[str], str | None]:
    status = c.status()
    if not status["initialized"]:
        raise CliError("the vault is not initialized")
    return _read_shares(status["threshold"], shares_file), _passphrase(bool(status.get("passphrase")))


@click.group()
def operator() -> None:
    """Recovery shares and the root key: generate-root, rekey, seal-migrate, rotate."""


@operator.command("generate-root")
@shares_file_option
@output_option
def generate_root(shares_file: str | None, fmt: str) -> None:
    """A new root token, from a threshold of the (recovery) shares."""
    with session.client() as c:
        given, passphrase = _authority(c, shares_file)
        res = c.generate_root(given, passphrase)
    emit_json(res) if fmt == "json" else out.print(res["root_token"])


@operator.command("rekey")
@click.option("--shares", "count", type=click.IntRange(1, 16), default=5, show_default=True)
@click.option("--threshold", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option("--new-passphrase", is_flag=True, help="protect the new shares with a passphrase (prompted)")
@shares_file_option
@output_option
def rekey(count: int, threshold: int, new_passphrase: bool, shares_file: str | None, fmt: str) -> None:
    """New shares (N, T of them needed) from a threshold of the current ones; the old ones stop working."""
    with session.client() as c:
        given, passphrase = _authority(c, shares_file)
        new = (
            click.prompt("New passphrase", hide_input=True, confirmation_prompt=True, err=True)
            if new_passphrase
            else ""
        )
        res = c.rekey_shares(given, passphrase, new_shares=count, new_threshold=threshold, new_passphrase=new)
    if fmt == "json":
        emit_json(res)
        return
    err.print("[bold yellow]The old shares no longer open this vault. Store each new share apart.[/]")
    for i, share in enumerate(res["shares"], 1):
        out.print(f"Share {i}: {share}")


@operator.command("seal-migrate")
@click.option("--to", "to", type=click.Choice(["pkcs11", "shamir"]), required=True)
@shares_file_option
@output_option
def seal_migrate(to: str, shares_file: str | None, fmt: str) -> None:
    """Move the seal to the HSM (the server must run with --seal pkcs11) or back to the shares."""
    with session.client() as c:
        given, passphrase = _authority(c, shares_file)
        res = c.seal_migrate(given, to, passphrase)
    if fmt == "json":
        emit_json(res)
    elif to == "pkcs11":
        out.print("Sealed by the HSM now: starts unseal themselves; the shares are recovery shares.")
    else:
        out.print("Sealed by the shares now: start the server without --seal pkcs11; each start needs the shares.")


@operator.command("rotate")
@output_option
def rotate(fmt: str) -> None:
    """A new root key version; every region key is re-wrapped under it."""
    with session.client() as c:
        res = c.rotate_root()
    emit_json(res) if fmt == "json" else out.print(
        f"Root key version {res['root_key_version']}: {res['region_keys_rewrapped']} region key(s) re-wrapped."
    )


def _write_private(path: str, data: bytes) -> None:
    """Temp file 0600 in the same directory, fsync, rename over, fsync the directory."""
    target = Path(path).resolve()
    fd, tmp = tempfile.mkstemp(prefix=".vault-edge-backup-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@output_option
def backup(file: str, fmt: str) -> None:
    """Write an encrypted, integrity-checked snapshot of the running control plane to FILE."""
    with session.client() as c:
        data = c.backup()
    _write_private(file, data)
    res = {"file": file, "bytes": len(data)}
    emit_json(res) if fmt == "json" else out.print(f"Backup written to {file} ({len(data)} bytes).")


def _hsm_options(f: Any) -> Any:
    for opt in reversed(
        [
            click.option(
                "--seal",
                type=click.Choice(["shamir", "pkcs11"]),
                default="shamir",
                show_default=True,
                help="where the root key comes from: the shares, or the HSM",
            ),
            click.option("--pkcs11-lib"),
            click.option("--pkcs11-slot", type=int),
            click.option("--pkcs11-key-label"),
            click.option("--pkcs11-pin-file", type=click.Path(dir_okay=False)),
        ]
    ):
        f = opt(f)
    return f


@contextlib.contextmanager
def _database_errors() -> Iterator[None]:
    """The offline verbs open databases themselves: a missing driver, a bad URL or an unreachable
    database is one line on stderr (as `vault-edge server` says it), never a traceback."""
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("psycopg"):
            raise CliError("the PostgreSQL driver is not installed: pip install 'vault-edge[postgres]'") from None
        raise
    except (SQLAlchemyError, ArgumentError) as exc:
        first_line = (str(exc).splitlines() or [""])[0][:200]
        raise CliError(f"cannot open the database: {type(exc).__name__}: {first_line}") from None


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--db", required=True, help="the empty database to restore into (URL or SQLite path)")
@shares_file_option
@_hsm_options
@output_option
def restore(
    file: str,
    db: str,
    shares_file: str | None,
    seal: str,
    pkcs11_lib: str | None,
    pkcs11_slot: int | None,
    pkcs11_key_label: str | None,
    pkcs11_pin_file: str | None,
    fmt: str,
) -> None:
    """Restore a backup into an empty database, offline; the root key from the shares or the HSM."""
    from vault_edge.crypto.errors import ShareError
    from vault_edge.server.hsm import Pkcs11Seal, SealError, read_pin
    from vault_edge.server.ops import backup as ops
    from vault_edge.server.ops import seal as seal_ops

    raw = Path(file).read_bytes()

    def get_root(meta: dict[str, str]) -> bytes:
        if seal == "pkcs11":
            if not (pkcs11_lib and pkcs11_slot is not None and pkcs11_key_label) or "root_pkcs11" not in meta:
                raise CliError(
                    "--seal pkcs11 needs --pkcs11-lib, --pkcs11-slot, --pkcs11-key-label, "
                    "and a backup of a vault sealed by the HSM"
                )
            hsm = Pkcs11Seal(pkcs11_lib, pkcs11_slot, pkcs11_key_label, read_pin(pkcs11_pin_file))
            from vault_edge import wire

            return hsm.decrypt(wire.b64d(meta["root_pkcs11"]), seal_ops.hsm_ad(meta, pkcs11_key_label))
        scheme = seal_ops._scheme(meta)
        given = _read_shares(scheme.min_shares, shares_file)
        return seal_ops.root_from_shares(meta, given, _passphrase(meta.get("passphrase") == "1"))

    try:
        with _database_errors():
            res = ops.restore(raw, db, get_root, time.time())
    except (ops.BackupError, SealError, ShareError) as exc:
        raise CliError(str(exc)) from None
    doc = {
        "rows": res.rows,
        "from_revision": res.from_revision,
        "revision": res.revision,
        "audit_entries": res.audit_entries,
    }
    if fmt == "json":
        emit_json(doc)
    else:
        out.print(
            f"Restored {sum(res.rows.values())} rows; revision {res.from_revision} → {res.revision}; "
            f"audit chain verified ({res.audit_entries} entries). Start the server on it and unseal."
        )


@click.command()
@click.option("--from", "source", required=True, help="the source database (URL or SQLite path); stop its servers")
@click.option("--to", "target", required=True, help="the empty target database")
@output_option
def migrate(source: str, target: str, fmt: str) -> None:
    """Copy a vault to another database (SQLite ↔ PostgreSQL), offline; verified by counts and the audit chain."""
    from vault_edge.server.ops import backup as ops

    try:
        with _database_errors():
            res = ops.migrate_db(source, target)
    except ops.BackupError as exc:
        raise CliError(str(exc)) from None
    if fmt == "json":
        emit_json({"rows": res.rows, "audit_entries": res.audit_entries})
    else:
        out.print(
            f"Copied {sum(res.rows.values())} rows; counts and the audit chain ({res.audit_entries} entries) verified."
        )
