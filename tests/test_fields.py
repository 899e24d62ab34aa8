"""Structured values: one field of a JSON-object value (wire/fields.py), as the socket's ?field= and
agent exec's NAME#FIELD use it."""

from __future__ import annotations

import pytest

from vault_edge.wire.fields import FieldError, select, split_ref

CRED = b'{"username": "app_a", "password": "p\\u00e4ss", "port": 5432, "tls": true, "opts": {"a": [1]}}'


@pytest.mark.parametrize(
    ("field", "want"),
    [
        ("username", b"app_a"),
        ("password", "päss".encode()),
        ("port", b"5432"),
        ("tls", b"true"),
        ("opts", b'{"a":[1]}'),
    ],
)
def test_select(field: str, want: bytes) -> None:
    assert select(CRED, field) == want


@pytest.mark.parametrize(
    ("value", "field", "status"),
    [
        (CRED, "nope", 404),
        (b"plain text", "password", 400),
        (b"[1, 2]", "0", 400),
        (b"\xff\xfe", "a", 400),
        (CRED, "", 400),
        (CRED, "a b", 400),
        (CRED, "x" * 65, 400),
        (CRED, "pass/word", 400),
        (b'"str"', "a", 400),
    ],
)
def test_refused(value: bytes, field: str, status: int) -> None:
    with pytest.raises(FieldError) as exc:
        select(value, field, "'db/main'")
    assert exc.value.status == status
    assert b"p\\u00e4ss".decode() not in str(exc.value)  # never quotes the value


def test_split_ref() -> None:
    assert split_ref("db/main#password") == ("db/main", "password")
    assert split_ref("db/main") == ("db/main", None)
    with pytest.raises(FieldError):
        split_ref("db/main#bad field")
