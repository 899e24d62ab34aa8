"""Structured values: a credential kept by a rotator is a JSON object (``username``, ``password``,
``host``, ``port``, ...), and a reader may ask for one field: ``?field=password`` on the agent's
socket, ``NAME#FIELD`` in ``agent exec --env``. Pure: bytes in, bytes out."""

from __future__ import annotations

import json
import re

_FIELD = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class FieldError(ValueError):
    """``status`` 400 (not a field name, not a structured value) or 404 (no such field)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = "not_found" if status == 404 else "bad_request"


def check_field(field: str) -> str:
    if not _FIELD.fullmatch(field):
        raise FieldError(400, "a field name is 1 to 64 letters, digits, '_', '.' or '-'")
    return field


def select(value: bytes, field: str, name: str = "the secret") -> bytes:
    """One field of a JSON-object value: a string as its UTF-8 bytes, anything else as JSON text."""
    check_field(field)
    try:
        doc = json.loads(value)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise FieldError(400, f"{name} is not a structured value (a JSON object): read it whole")
    if field not in doc:
        raise FieldError(404, f"{name} has no field {field!r}")
    got = doc[field]
    return got.encode() if isinstance(got, str) else json.dumps(got, separators=(",", ":")).encode()


def split_ref(ref: str) -> tuple[str, str | None]:
    """``NAME#FIELD`` → (NAME, FIELD); ``NAME`` → (NAME, None)."""
    name, sep, field = ref.partition("#")
    return (name, check_field(field)) if sep else (name, None)
