"""Engines for SQLite (default, embedded) and PostgreSQL (psycopg 3), and migrations with Alembic."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url

log = logging.getLogger("vault_edge.server")
MIGRATIONS = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 0x7661756C74  # "vault": one migrator at a time among replicas


def default_sqlite_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vault-edge" / "vault-edge.db"


def normalize_url(db: str | None) -> str:
    """``None`` → the per-user SQLite file; a plain path → a SQLite file; a URL stays a URL."""
    if not db:
        path = default_sqlite_path()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return f"sqlite:///{path}"
    if "://" not in db:
        return f"sqlite:///{Path(db).expanduser().resolve()}"
    if db.startswith("postgresql://") or db.startswith("postgres://"):
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    return db


def display_url(url: URL) -> str:
    """The database URL for a log line: the password hidden, in the userinfo (SQLAlchemy's ``***``)
    and as libpq's ``?password=`` query parameter alike."""
    query = {k: "***" if k.lower() in ("password", "sslpassword") else v for k, v in url.query.items()}
    return url.set(query=query).render_as_string(hide_password=True).replace("=%2A%2A%2A", "=***")


def make_engine(db: str | None) -> Engine:
    url = make_url(normalize_url(db))
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        _sqlite_setup(engine)
        if url.database and url.database != ":memory:" and not os.path.exists(url.database):
            # Create the file private (0600) before SQLite does: it holds ciphertext and metadata.
            fd = os.open(url.database, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        return engine
    if url.get_backend_name() == "postgresql":
        return create_engine(url, pool_size=10, max_overflow=30, pool_pre_ping=True)
    raise ValueError(f"unsupported database {url.get_backend_name()!r}: use sqlite or postgresql+psycopg")


def _sqlite_setup(engine: Engine) -> None:
    """WAL, full fsync, foreign keys; and transactions we begin ourselves, so that a writer takes the
    write lock up front (BEGIN IMMEDIATE) instead of failing to upgrade a read lock later."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        immediate = conn.get_execution_options().get("vault_edge_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration. Safe with several replicas starting at once."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.connect().execution_options(vault_edge_write=True) as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        before = MigrationContext.configure(conn).get_current_revision()
        command.upgrade(cfg, "head")
        after = MigrationContext.configure(conn).get_current_revision()
    if after != before:  # one line, in place of Alembic's own (logs.setup quiets them: a dozen a start)
        log.info("database schema migrated from %s to %s", before or "empty", after)
