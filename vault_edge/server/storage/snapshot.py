"""Whole-database copies for backup, restore and migration: every table of the schema, row by row,
read in one consistent snapshot and written in one transaction. Rows stay what they are (ciphertext
stays ciphertext, MACs stay MACs); nothing here holds a key.

Row encoding (JSON): each value as is (None, int, float, str), bytes as ``{"b": base64url}``. Python
floats round-trip exactly through JSON.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Engine, Integer, delete, func, insert, select, text

from vault_edge.server.storage import schema as t

Table = dict[str, Any]  # {"table": name, "columns": [...], "rows": [[...], ...]}


def _enc(v: Any) -> Any:
    if isinstance(v, bytes | bytearray | memoryview):
        return {"b": base64.urlsafe_b64encode(bytes(v)).decode()}
    return v


def _dec(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) != {"b"} or not isinstance(v["b"], str):
            raise ValueError('a value is neither a scalar nor {"b": base64}')
        return base64.urlsafe_b64decode(v["b"])
    if v is not None and not isinstance(v, int | float | str):
        raise ValueError('a value is neither a scalar nor {"b": base64}')
    return v


def tables() -> list[Any]:
    """Every table of the schema, parents before children."""
    return list(t.metadata.sorted_tables)


def dump(engine: Engine) -> list[Table]:
    """Every table, read in one snapshot (REPEATABLE READ on PostgreSQL: one snapshot for the whole
    transaction; on SQLite a read transaction is one snapshot already)."""
    opts = {"isolation_level": "REPEATABLE READ"} if engine.dialect.name == "postgresql" else {}
    out = []
    with engine.connect().execution_options(**opts) as conn, conn.begin():
        for table in tables():
            cols = [c.name for c in table.columns]
            key = list(table.primary_key.columns) or list(table.columns)
            rows = [[_enc(v) for v in r] for r in conn.execute(select(*table.columns).order_by(*key))]
            out.append({"table": table.name, "columns": cols, "rows": rows})
    return out


def counts(conn: Connection) -> dict[str, int]:
    return {tb.name: int(conn.execute(select(func.count()).select_from(tb)).scalar_one()) for tb in tables()}


def is_empty(conn: Connection) -> bool:
    """No vault here: every table empty but the counters the migrations seed (all at 0)."""
    for tb in tables():
        if tb is t.counter:
            if any(r.revision for r in conn.execute(select(t.counter))):
                return False
        elif conn.execute(select(func.count()).select_from(tb)).scalar_one():
            return False
    return True


def load(conn: Connection, data: list[Table]) -> dict[str, int]:
    """Write ``data`` (from ``dump``) into an empty database, in the caller's transaction. Refuses a
    table or column the schema does not have. Returns rows written per table."""
    known = {tb.name: tb for tb in tables()}
    written: dict[str, int] = {}
    for item in data:
        table = known.get(item.get("table", ""))
        if table is None:
            raise ValueError(f"unknown table {item.get('table')!r}")
        cols = item["columns"]
        if not set(cols) <= {c.name for c in table.columns}:
            raise ValueError(f"unknown columns in {table.name}")
        rows = [dict(zip(cols, (_dec(v) for v in r), strict=True)) for r in item["rows"]]
        if table is t.counter:
            conn.execute(delete(t.counter))
        for i in range(0, len(rows), 500):
            conn.execute(insert(table), rows[i : i + 500])
        written[table.name] = len(rows)
    if conn.dialect.name == "postgresql":
        _fix_sequences(conn)
    return written


def _fix_sequences(conn: Connection) -> None:
    """Rows came with their ids: move each serial column's sequence past them."""
    for tb in tables():
        pk = list(tb.primary_key.columns)
        if len(pk) == 1 and isinstance(pk[0].type, Integer) and pk[0].autoincrement is True:
            conn.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{tb.name}', '{pk[0].name}'), "  # noqa: S608 (schema names)
                    f"COALESCE(MAX({pk[0].name}), 1), MAX({pk[0].name}) IS NOT NULL) FROM {tb.name}"
                )
            )


def iter_audit(conn: Connection, batch: int = 1000) -> Iterator[Any]:
    after = 0
    while True:
        rows = conn.execute(select(t.audit).where(t.audit.c.seq > after).order_by(t.audit.c.seq).limit(batch)).all()
        if not rows:
            return
        yield from rows
        after = rows[-1].seq
