"""One log format for the control plane and the agent: ``--log-format text|json``.

``text`` is for people (``2026-12-01T10:00:00.123Z INFO vault_edge.agent: message``); ``json`` is one
object per line for a log pipeline: ``{"ts", "level", "logger", "msg"}``, plus ``"exc"`` (the
exception's class, never its message or traceback in the line: those can quote input) when a record
carries one. Timestamps are UTC, RFC 3339 with milliseconds, in both.

Nothing in the product logs a secret value; this module adds nothing that could (no request bodies,
no arguments). Standard library only: the agent imports it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final, TextIO

FORMATS: Final = ("text", "json")
LEVELS: Final = ("debug", "info", "warning", "error")


def _ts(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_ts(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line. A traceback is kept, as one string field, for the text of errors
    the code logs with ``exc_info`` (bugs); it never holds a value: the code logs none."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _ts(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc"] = record.exc_info[0].__name__
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), default=str)


def setup(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Send every logger's records to ``stream`` (stderr) in ``fmt``; the root level is ``level``.
    Replaces handlers set before (uvicorn's own included, which propagate to the root here)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per long-poll is noise
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugins and steps: the server logs one line
    return handler
