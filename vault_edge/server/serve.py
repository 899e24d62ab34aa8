"""Run the control plane: the app built from settings, served by uvicorn until stopped.

The CLI calls :func:`serve` and shows a :class:`ServeError`'s message as its one-line error. A stop
(SIGTERM, SIGINT) is graceful: the held long-polls are released first, so agents re-poll (perhaps
another replica) at once instead of the stop waiting out their holds.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

from vault_edge.server.context import Context
from vault_edge.server.settings import Settings


class ServeError(Exception):
    """The control plane cannot start; the message says why (one line, no secret)."""


def serve(settings: Settings, log_level: str = "info", on_ready: Callable[[Context], None] | None = None) -> None:
    import uvicorn

    from vault_edge.server.app import create_app
    from vault_edge.server.hsm import SealError

    try:
        app = create_app(settings, on_ready=on_ready)
    except SealError as exc:
        raise ServeError(str(exc)) from None
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("psycopg"):
            raise ServeError("the PostgreSQL driver is not installed: pip install 'vault-edge[postgres]'") from None
        raise
    except OSError as exc:
        if settings.audit_file and exc.filename == settings.audit_file:
            raise ServeError(f"cannot open the audit file {settings.audit_file}: {exc.strerror}") from None
        raise ServeError(f"cannot open the database: {exc.strerror or exc}") from None
    except Exception as exc:  # a bad --db URL, an unreachable database, a failed migration
        first_line = (str(exc).splitlines() or [""])[0][:200]
        raise ServeError(f"cannot open the database: {type(exc).__name__}: {first_line}") from None
    # uvicorn re-raises the signal it stopped on; turn it into SystemExit so callers' `finally` runs
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # uvicorn's loggers propagate to the root handler logs.setup() installed: one format for all
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        log_config=None,
        access_log=settings.access_log,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=settings.keep_alive_s,
    )
    _releasing_server_class()(config).run()


def _releasing_server_class() -> Any:
    import uvicorn

    class ReleasingServer(uvicorn.Server):
        """Releases the held long-polls first, so a graceful stop does not wait out their holds."""

        async def shutdown(self, sockets: Any = None) -> None:
            self.config.app.state.hub.release()
            await super().shutdown(sockets)

    return ReleasingServer
