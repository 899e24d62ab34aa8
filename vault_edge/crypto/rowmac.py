"""MACs over database rows, and keyed token digests. Pure: bytes in, bytes out.

The database is untrusted (as Vault's storage backend is): a row that grants authority or sets order
(an operator token, a join token, a node, a stage pointer, a revocation, a secret's own record)
carries ``mac(key, purpose, *fields)``, an HMAC-SHA256 under a key of its own derived from the root
key (``envelope.derive(root, "row-mac/<purpose>")``), over a canonical encoding of the row's fields.
Someone who can write to the database but does not hold the root key can delete such rows or copy old
ones back, but cannot make or edit one: the control plane checks the MAC on every use.

Tokens are stored as ``token_digest(key, secret)``, an HMAC under the "token-digest" key, so a row
inserted with the SHA-256 of a token of the writer's choosing matches nothing.

Encoding (``encode``): a purpose label, then each field as a one-byte type tag, a 4-byte big-endian
length and the bytes: ``n`` None, ``i`` int (decimal), ``f`` float (``repr``, exact round trip),
``s`` str (UTF-8), ``b`` bytes, ``t`` a tuple of str (JSON). Unambiguous by construction: no two
different field lists encode alike.
"""

from __future__ import annotations

import json
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

from vault_edge.crypto import envelope

MAC_SIZE = 32
Field = str | int | float | bytes | tuple[str, ...] | None

# The purposes that have a key; each is its own HKDF label, so one key never checks another's rows.
PURPOSES = (
    "operator-token",
    "join-token",
    "node",
    "stage",
    "secret",
    "revocation",
    "change",
    "token-digest",
    "rotator",
    "rotation",
    "egress",
)
_PREFIX = b"vault-edge/v1/row/"


def row_key(root_key: bytes, purpose: str) -> bytes:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown row-MAC purpose {purpose!r}")
    return envelope.derive(root_key, "row-mac/" + purpose)


def encode(purpose: str, fields: tuple[Field, ...]) -> bytes:
    parts = [_PREFIX, purpose.encode(), b"\x00"]
    for f in fields:
        if f is None:
            tag, raw = b"n", b""
        elif isinstance(f, bool):
            raise TypeError("row fields are None, int, float, str, bytes or a tuple of str")
        elif isinstance(f, int):
            tag, raw = b"i", str(f).encode()
        elif isinstance(f, float):
            tag, raw = b"f", repr(f).encode()
        elif isinstance(f, str):
            tag, raw = b"s", f.encode("utf-8", "surrogatepass")
        elif isinstance(f, bytes):
            tag, raw = b"b", f
        elif isinstance(f, tuple) and all(isinstance(x, str) for x in f):
            tag, raw = b"t", json.dumps(list(f), separators=(",", ":")).encode()
        else:
            raise TypeError("row fields are None, int, float, str, bytes or a tuple of str")
        parts += [tag, struct.pack(">I", len(raw)), raw]
    return b"".join(parts)


def mac(key: bytes, purpose: str, *fields: Field) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(encode(purpose, fields))
    return h.finalize()


def check(key: bytes, purpose: str, tag: bytes | None, *fields: Field) -> bool:
    """True when ``tag`` is the MAC of these fields (constant-time); False for a missing tag."""
    if not isinstance(tag, bytes) or len(tag) != MAC_SIZE:
        return False
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(encode(purpose, fields))
    try:
        h.verify(tag)
    except InvalidSignature:
        return False
    return True


def token_digest(key: bytes, secret: str) -> bytes:
    """How a token is stored and looked up: HMAC-SHA256 under the token-digest key."""
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(b"vault-edge/v1/token\x00" + secret.encode("utf-8", "surrogatepass"))
    return h.finalize()


class RowKeys:
    """The row-MAC keys of one root key, one per purpose. Repr never shows key material.

    ``check`` remembers what it has verified (purpose, tag and fields together, up to ``MEMO_MAX``
    entries): the sync hub re-reads a region's thousand nodes on every change, and a row that has not
    changed since its MAC was checked needs no second HMAC. Only an exact match is remembered as
    good; a row with any field or its tag changed is checked again."""

    __slots__ = ("_keys", "_seen")
    MEMO_MAX = 65_536

    def __init__(self, root_key: bytes) -> None:
        self._keys = {p: row_key(root_key, p) for p in PURPOSES}
        self._seen: set[tuple[object, ...]] = set()

    def __repr__(self) -> str:
        return "RowKeys(<redacted>)"

    def __reduce__(self) -> None:  # type: ignore[override]
        raise TypeError("RowKeys cannot be pickled")

    def mac(self, purpose: str, *fields: Field) -> bytes:
        return mac(self._keys[purpose], purpose, *fields)

    def check(self, purpose: str, tag: bytes | None, *fields: Field) -> bool:
        if tag is not None and not isinstance(tag, bytes):
            tag = bytes(tag)
        memo = (purpose, tag, fields)
        if memo in self._seen:
            return True
        ok = check(self._keys[purpose], purpose, tag, *fields)
        if ok:
            if len(self._seen) >= self.MEMO_MAX:
                self._seen.clear()
            self._seen.add(memo)
        return ok

    def token_digest(self, secret: str) -> bytes:
        return token_digest(self._keys["token-digest"], secret)
