"""``vault-edge server`` (the control plane) and ``vault-edge dev`` (everything, for a first look).

Server modules are imported inside the commands, so agent-side verbs never load FastAPI or SQLAlchemy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

import click

from vault_edge.cli.output import CliError, err

# Every field of server/settings.py is a VAULT_EDGE_* variable (tests/cli/test_conventions.py checks
# this text, `vault-edge --help` and the README name them all); kept as text so `--help` loads no server.
ENVIRONMENT = """\b
Environment: each option above also reads VAULT_EDGE_<OPTION> (the flag wins):
  VAULT_EDGE_DB, VAULT_EDGE_HOST, VAULT_EDGE_PORT, VAULT_EDGE_DEV, VAULT_EDGE_DEV_TOKEN,
  VAULT_EDGE_TLS_CERT, VAULT_EDGE_TLS_KEY, VAULT_EDGE_LOG_FORMAT, VAULT_EDGE_ACCESS_LOG,
  VAULT_EDGE_METRICS_TOKEN, VAULT_EDGE_AUDIT_FILE, VAULT_EDGE_AUDIT_STDOUT, VAULT_EDGE_SEAL,
  VAULT_EDGE_PKCS11_LIB, VAULT_EDGE_PKCS11_SLOT, VAULT_EDGE_PKCS11_KEY_LABEL,
  VAULT_EDGE_PKCS11_PIN_FILE, VAULT_EDGE_PKCS11_GENERATE_KEY (not --log-level);
  VAULT_EDGE_PKCS11_PIN holds the HSM's PIN when there is no --pkcs11-pin-file.

\b
Tunables, environment only [default]:
  VAULT_EDGE_MAX_BODY_BYTES        largest request body [1048576]
  VAULT_EDGE_MAX_VALUE_BYTES       largest secret value [262144]
  VAULT_EDGE_DEFAULT_GRACE_S       how long `previous` stays readable after a rotation [86400]
  VAULT_EDGE_NODE_DOWN_AFTER_S     a node silent this long counts as down, not lagging [90]
  VAULT_EDGE_SYNC_MAX_WAIT_S       the longest long-poll hold an agent may ask [60]
  VAULT_EDGE_SEALED_HOLD_MAX       agents' polls held while sealed, answered at the unseal [20000]
  VAULT_EDGE_SEALED_RETRY_AFTER_S  the Retry-After of the polls past that [10]
  VAULT_EDGE_KEEP_ALIVE_S          how long an idle keep-alive connection is kept [75]
  VAULT_EDGE_JOIN_TOKEN_TTL_S      a join token's lifetime when `node token` gives no --ttl [3600]
  VAULT_EDGE_ENROLL_MAX_IN_FLIGHT  enrolments at once; past it, 503 overloaded [32]
  VAULT_EDGE_ENROLL_RETRY_AFTER_S  the Retry-After of that 503 [2]
  VAULT_EDGE_CONTACT_LINGER_MS     how long a small batch of node contacts waits for more before its commit [20]
  VAULT_EDGE_SCHEDULER_INTERVAL_S  how often due scheduled rotations are looked for [1.0]
  VAULT_EDGE_MIN_ROTATE_EVERY_S    the shortest --rotate-every accepted [60]
"""


@click.command(epilog=ENVIRONMENT)
@click.option("--dev", is_flag=True, help="initialize with one share, unseal, use a throw-away database")
@click.option("--dev-token", help="the root token to use in --dev mode (default: random)")
@click.option("--db", help="database URL (postgresql+psycopg://...) or SQLite path; default: per-user SQLite")
@click.option("--host", default=None, help="listen address (default 127.0.0.1)")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="listen port (default 8420)")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False))
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="VAULT_EDGE_LOG_FORMAT",
    help="json: one object per line (env VAULT_EDGE_LOG_FORMAT)",
)
@click.option(
    "--access-log/--no-access-log",
    default=None,
    help="one log line per HTTP request (default off: a long-poll per node per change is noise)",
)
@click.option(
    "--metrics-token",
    default=None,
    help="require Authorization: Bearer TOKEN on /metrics (prefer VAULT_EDGE_METRICS_TOKEN)",
)
@click.option(
    "--audit-file",
    type=click.Path(dir_okay=False),
    help="also append each audit entry to this JSON-lines file (created 0600, fsync'd)",
)
@click.option("--audit-stdout", is_flag=True, default=None, help="also write each audit entry to stdout (JSON lines)")
@click.option(
    "--seal",
    type=click.Choice(["shamir", "pkcs11"]),
    default=None,
    help="shamir (operators enter shares; the default) or pkcs11 (auto-unseal through an HSM)",
)
@click.option("--pkcs11-lib", help="the PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so)")
@click.option("--pkcs11-slot", type=int, help="the slot id of the token")
@click.option("--pkcs11-key-label", help="the label of the AES key that wraps the root key")
@click.option(
    "--pkcs11-pin-file",
    type=click.Path(dir_okay=False),
    help="a file holding the token's PIN (else VAULT_EDGE_PKCS11_PIN; never on the command line)",
)
@click.option(
    "--pkcs11-generate-key",
    is_flag=True,
    default=None,
    help="make the AES key (non-extractable) in the token if it is missing",
)
def server(
    dev: bool,
    dev_token: str | None,
    db: str | None,
    host: str | None,
    port: int | None,
    tls_cert: str | None,
    tls_key: str | None,
    log_level: str,
    log_format: str,
    access_log: bool | None,
    metrics_token: str | None,
    audit_file: str | None,
    audit_stdout: bool | None,
    **seal: Any,
) -> None:
    """Run the control plane (FastAPI on uvicorn). Its environment variables are listed below."""
    from vault_edge import logs
    from vault_edge.server.serve import ServeError, serve
    from vault_edge.server.settings import Settings

    if bool(tls_cert) != bool(tls_key):
        raise CliError("give both --tls-cert and --tls-key")
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "db": db,
            "host": host,
            "port": port,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "dev": dev or None,
            "dev_token": dev_token,
            "access_log": access_log,
            "metrics_token": metrics_token,
            "audit_file": audit_file,
            "audit_stdout": audit_stdout,
            **seal,
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    logs.setup(log_level, log_format)
    tmpdir = None
    if settings.dev and not settings.db:
        tmpdir = tempfile.mkdtemp(prefix="vault-edge-dev-")
        settings.db = os.path.join(tmpdir, "dev.db")
    try:
        serve(settings, log_level, on_ready=_dev_bootstrap(settings) if settings.dev else None)
    except ServeError as exc:
        raise CliError(str(exc)) from None
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _dev_bootstrap(settings: Any) -> Any:
    def bootstrap(ctx: Any) -> None:
        from vault_edge.crypto.shares import ShareScheme
        from vault_edge.server.ops import system

        if system.status(ctx)["initialized"]:
            err.print("[yellow]dev: this database is already initialized; unseal it with its share[/]")
            return
        res = system.initialize(ctx, ShareScheme.simple(1, 1), root_token=settings.dev_token or None)
        system.unseal(ctx, res["shares"][0], None)
        scheme = "https" if settings.tls_cert else "http"
        err.print(
            "[bold red]WARNING: dev mode.[/] One unseal share, already unsealed, a throw-away database. "
            "Never use this for real secrets.\n"
            f"  Unseal share: {res['shares'][0]}\n"
            f"  Root token:   {res['root_token']}\n"
            f"  export VAULT_EDGE_ADDR={scheme}://{settings.host}:{settings.port} "
            f"VAULT_EDGE_TOKEN={res['root_token']}"
        )

    return bootstrap


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CliError("the control plane exited during start-up (see its output above)")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise CliError(f"the control plane did not answer at {url}")


@click.command()
@click.option("--port", type=click.IntRange(0, 65535), default=8420, show_default=True)
@click.option("--dir", "workdir", type=click.Path(file_okay=False), help="where sockets and agent state go")
def dev(port: int, workdir: str | None) -> None:
    """A dev control plane with two regions, a demo secret and an agent per region, in one command."""
    from vault_edge.cli.dev_env import run_dev

    run_dev(port or _free_port(), workdir, _wait_http)
