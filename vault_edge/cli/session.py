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

from vault_edge.cli.output import checked
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


def control_plane_url(text: str) -> str:
    """``--addr`` / ``VAULT_EDGE_ADDR``: an http(s) URL with a host; a usage error (exit 2) otherwise."""
    from urllib.parse import urlsplit

    try:
        url = urlsplit(text.strip())
        url.port  # noqa: B018 - raises ValueError on a port that is no number or out of range
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"not a control-plane address: {text!r} (e.g. http://127.0.0.1:8420)")
    return text.strip()


def client(token: str | None = None) -> OperatorClient:
    """The operator client of a verb; a malformed ``--addr`` / ``VAULT_EDGE_ADDR`` is a usage error
    (exit 2), checked here rather than when the option is read, so verbs that do not talk to the
    control plane (``agent get``, ``agent exec``) do not trip on it."""
    g = globals_()
    if g.addr:
        checked(control_plane_url, g.addr, "--addr / VAULT_EDGE_ADDR")
    if token is None:
        token = os.environ.get("VAULT_EDGE_TOKEN") or stored_token()
    return OperatorClient(
        addr=g.addr, token=token or "", verify=g.ca_cert or os.environ.get("VAULT_EDGE_CACERT") or True
    )
