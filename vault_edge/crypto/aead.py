"""Authenticated encryption with associated data: AES-256-GCM from ``cryptography``.

Ciphertext layout (version 1), self-describing so that a future algorithm can coexist::

    0x01 | nonce (12 bytes, random) | ciphertext | tag (16 bytes)

Every key in vault-edge encrypts few messages (a data key exactly one, a region key one wrap per
secret version and region), so random 96-bit nonces stay far below GCM's 2^32-messages bound.
Associated data is a required argument: it binds the bytes to where they belong (see ``ad``).
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vault_edge.crypto.errors import DecryptionError

VERSION = 1
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE
_AD_PREFIX = b"vault-edge/v1/"


def new_key(random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> bytes:
    return random_bytes(KEY_SIZE)


def encrypt(
    key: bytes,
    plaintext: bytes,
    associated_data: bytes,
    *,
    random_bytes: Callable[[int], bytes] = secrets.token_bytes,
) -> bytes:
    if len(key) != KEY_SIZE:
        raise ValueError("AES-256-GCM takes a 32-byte key")
    nonce = random_bytes(NONCE_SIZE)
    return bytes([VERSION]) + nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Open ``ciphertext``; any failure (layout, key, associated data, tamper) is DecryptionError."""
    if len(key) != KEY_SIZE or len(ciphertext) < OVERHEAD or ciphertext[0] != VERSION:
        raise DecryptionError()
    nonce = ciphertext[1 : 1 + NONCE_SIZE]
    try:
        return AESGCM(key).decrypt(nonce, ciphertext[1 + NONCE_SIZE :], associated_data)
    except InvalidTag as exc:
        raise DecryptionError() from exc


def ad(purpose: str, *fields: str | int | bytes) -> bytes:
    """Canonical associated data: a purpose label, then each field typed and length-prefixed.

    Unambiguous by construction: ("a/b", 1) and ("a", "b/1") never encode alike, nor do the
    string "1" and the integer 1.
    """
    if "\x00" in purpose:
        raise ValueError("an associated-data purpose cannot contain NUL")
    parts = [_AD_PREFIX, purpose.encode("utf-8", "surrogatepass"), b"\x00"]
    for field in fields:
        if isinstance(field, bool):
            raise TypeError("associated data fields are str, int or bytes")
        if isinstance(field, int):
            raw, tag = str(field).encode(), b"i"
        elif isinstance(field, str):
            raw, tag = field.encode("utf-8", "surrogatepass"), b"s"
        elif isinstance(field, bytes):
            raw, tag = field, b"b"
        else:
            raise TypeError("associated data fields are str, int or bytes")
        parts += [tag, struct.pack(">I", len(raw)), raw]
    return b"".join(parts)
