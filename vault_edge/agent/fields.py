"""One field of a structured value, for the socket API's ``?field=``: the only agent-side change of
rotation at the source (``wire/fields.py`` does the work), called from one place in the read path."""

from __future__ import annotations

from dataclasses import replace

from vault_edge.agent.view import Entry
from vault_edge.wire import fields


def with_field(entry: Entry, field: str) -> Entry:
    """``entry`` serving only ``field`` of its JSON-object value; FieldError (400/404) otherwise."""
    return replace(entry, value=fields.select(entry.value, field, repr(entry.name)))
