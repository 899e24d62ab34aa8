"""What every operator verb shares: the global options, the token helper, the client they make.

Vault's conventions: the address and CA come from ``--addr`` / ``--ca-cert`` (given before the verb:
``vault-edge --addr URL status``), else ``VAULT_EDGE_ADDR`` / ``VAULT_EDGE_CACERT``; the token from
``VAULT_EDGE_TOKEN``, else the file ``vault-edge login`` wrote (``~/.vault-edge-token``, mode 0600,
or ``VAULT_EDGE_TOKEN_FILE``), as Vault's default token helper keeps ``~/.vault-token``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import click

from vault_edge.operator import OperatorClient


@dataclass
class Globals:
    addr: str | None = None
    ca_cert: str | None = None
    fmt: str | None = None


def globals_() -> Globals:
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return obj if isinstance(obj, Globals) else Globals()


def token_file() -> Path:
    return Path(os.environ.get("VAULT_EDGE_TOKEN_FILE") or Path.home() / ".vault-edge-token")


def stored_token() -> str | None:
    """The token ``vault-edge login`` stored, if any (a missing or unreadable file: none)."""
    try:
        return token_file().read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None


def store_token(token: str) -> Path:
    """Write the token file atomically, mode 0600 from its creation (a temp file renamed over)."""
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, token.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def client(token: str | None = None) -> OperatorClient:
    g = globals_()
    if token is None:
        token = os.environ.get("VAULT_EDGE_TOKEN") or stored_token()
    return OperatorClient(
        addr=g.addr, token=token or "", verify=g.ca_cert or os.environ.get("VAULT_EDGE_CACERT") or True
    )
