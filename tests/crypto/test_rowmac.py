"""Row MACs and keyed token digests: canonical, keyed per purpose, and every edit refused."""

from __future__ import annotations

import pickle

import pytest

from vault_edge.crypto import rowmac

ROOT = bytes(range(32))
FIELDS: tuple[rowmac.Field, ...] = ("n-0123456789abcdef", "eu", b"\x01" * 32, 1.5, None, 7, ("", "a/"))


def test_a_mac_checks_with_its_own_fields_and_key_only() -> None:
    keys = rowmac.RowKeys(ROOT)
    tag = keys.mac("node", *FIELDS)
    assert len(tag) == rowmac.MAC_SIZE
    assert keys.check("node", tag, *FIELDS)
    assert not keys.check("stage", tag, *FIELDS)  # another purpose: another key and label
    assert not rowmac.RowKeys(bytes(32)).check("node", tag, *FIELDS)  # another root key
    assert not keys.check("node", None, *FIELDS)
    assert not keys.check("node", tag[:-1], *FIELDS)


@pytest.mark.parametrize(
    "i,edit",
    [
        (0, "n-fedcba9876543210"),
        (1, "us"),
        (2, b"\x02" * 32),
        (3, 1.5000001),
        (4, 0.0),
        (5, 8),
        (6, ("",)),
        (6, ("a/", "")),
        (4, ""),
        (5, "7"),
    ],
)
def test_any_edited_field_fails(i: int, edit: rowmac.Field) -> None:
    keys = rowmac.RowKeys(ROOT)
    tag = keys.mac("node", *FIELDS)
    edited = list(FIELDS)
    edited[i] = edit
    assert not keys.check("node", tag, *edited)


@pytest.mark.parametrize(
    "a,b",
    [
        (("ab", "c"), ("a", "bc")),  # boundaries
        ((1,), ("1",)),  # types
        ((None,), ("",)),
        ((("a", "b"),), (("a,b",),)),
        ((1.0,), (1,)),
        ((b"x",), ("x",)),
    ],
)
def test_the_encoding_is_unambiguous(a: tuple[rowmac.Field, ...], b: tuple[rowmac.Field, ...]) -> None:
    assert rowmac.encode("p", a) != rowmac.encode("p", b)


def test_fields_of_other_types_are_refused() -> None:
    with pytest.raises(TypeError):
        rowmac.encode("p", (True,))
    with pytest.raises(TypeError):
        rowmac.encode("p", ([1],))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        rowmac.row_key(ROOT, "no-such-purpose")


def test_token_digests_are_keyed() -> None:
    import hashlib

    keys = rowmac.RowKeys(ROOT)
    d = keys.token_digest("vet_abc")
    assert d == keys.token_digest("vet_abc") != rowmac.RowKeys(bytes(32)).token_digest("vet_abc")
    assert d != hashlib.sha256(b"vet_abc").digest()  # a writer cannot compute it for a token it picks


def test_row_keys_do_not_leak() -> None:
    keys = rowmac.RowKeys(ROOT)
    assert "redacted" in repr(keys)
    with pytest.raises(TypeError):
        pickle.dumps(keys)


def test_known_vector() -> None:
    """Pinned so that a change of encoding (which would orphan every stored MAC) fails loudly."""
    assert rowmac.mac(bytes(32), "node", "x", 1, None).hex() == VECTOR


VECTOR = "2e029616e3c6de0369ae2b3b3fdd1a2d0def61b38b423d53cd6a2306e16e084f"  # HMAC-SHA256 of the documented encoding
