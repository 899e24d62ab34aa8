"""Authenticated encryption with associated data: AES-256-GCM, from libsodium (``pynacl``) where the
CPU accelerates it (x86 AES-NI, ARMv8 crypto extensions), else from ``cryptography``.

One algorithm and one layout whichever library computes it (the tests cross them both ways). The
choice matters for the agent: on a PoP it needs AES-GCM only to open values, and ``cryptography``'s
extension alone is ~8 MiB resident in every agent; libsodium is loaded anyway (signatures, sealed
boxes). ``cryptography`` is imported only where libsodium cannot do it.

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

from nacl import bindings as sodium
from nacl.exceptions import CryptoError, UnavailableError

from vault_edge.crypto.errors import DecryptionError

VERSION = 1
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE
_AD_PREFIX = b"vault-edge/v1/"


def _sodium_available() -> bool:
    try:
        sodium.crypto_aead_aes256gcm_encrypt(b"", None, bytes(NONCE_SIZE), bytes(KEY_SIZE))
    except UnavailableError:  # no hardware AES on this CPU: libsodium does not offer it
        return False
    return True


SODIUM = _sodium_available()  # which library computes AES-256-GCM here (tests switch it)


def _seal(key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    if SODIUM:
        return sodium.crypto_aead_aes256gcm_encrypt(plaintext, associated_data, nonce, key)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key).encrypt(nonce, plaintext, associated_data)


def _open(key: bytes, nonce: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """The plaintext, or DecryptionError (wrong key, associated data or nonce; any tampering)."""
    if SODIUM:
        try:
            return sodium.crypto_aead_aes256gcm_decrypt(sealed, associated_data, nonce, key)
        except CryptoError:
            raise DecryptionError() from None
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(key).decrypt(nonce, sealed, associated_data)
    except InvalidTag:
        raise DecryptionError() from None


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
    return bytes([VERSION]) + nonce + _seal(key, nonce, plaintext, associated_data)


def decrypt(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Open ``ciphertext``; any failure (layout, key, associated data, tamper) is DecryptionError."""
    if len(key) != KEY_SIZE or len(ciphertext) < OVERHEAD or ciphertext[0] != VERSION:
        raise DecryptionError()
    return _open(key, ciphertext[1 : 1 + NONCE_SIZE], ciphertext[1 + NONCE_SIZE :], associated_data)


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
