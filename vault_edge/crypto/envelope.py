"""The key hierarchy of DESIGN.md, as pure functions: bytes in, bytes out.

    root key (32 B, from SLIP-39 shares, never stored)
      └─ HKDF-SHA256 ─▶ region-wrap key ─ wraps ─▶ region key (KEK) per (region, key version)
                    ─▶ canary key        (proves a reconstructed root key is the right one)
                    ─▶ signing seed      (the control plane's Ed25519 identity; see signing.py)
                    ─▶ audit key         (HMAC chain of the audit log)
    region key ─ wraps ─▶ data key (DEK), fresh per secret version ─ encrypts ─▶ the value

Associated data, exactly as DESIGN.md binds it:
    region key  ("region-key", region, key_version)
    value       ("secret-value", name, version)
    data key    ("data-key", name, version, region, key_version)
A ciphertext moved to another name, version, region or key version does not open.
"""

from __future__ import annotations

from vault_edge.crypto import aead
from vault_edge.crypto.errors import DecryptionError

ROOT_KEY_SIZE = 32
_HKDF_SALT = b"vault-edge root key v1"
_CANARY_PLAINTEXT = b"vault-edge canary: the root key is right"


def derive(root_key: bytes, purpose: str, length: int = 32) -> bytes:
    """A subkey of the root key for one purpose (HKDF-SHA256, RFC 5869). The control plane's alone:
    imported here so that an agent, which opens values and never holds the root key, loads nothing
    of ``cryptography`` (see ``aead``)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if len(root_key) != ROOT_KEY_SIZE:
        raise ValueError("the root key is 32 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_HKDF_SALT, info=purpose.encode()).derive(root_key)


def region_wrap_key(root_key: bytes) -> bytes:
    return derive(root_key, "region-key-wrap")


def audit_key(root_key: bytes) -> bytes:
    return derive(root_key, "audit-mac")


def control_plane_wrap_key(root_key: bytes) -> bytes:
    """Wraps the data keys of secrets that belong to no region (a rotator's admin credential): only
    the unsealed control plane can open them; no node ever holds this key."""
    return derive(root_key, "control-plane-data-key-wrap")


def signing_seed(root_key: bytes) -> bytes:
    return derive(root_key, "server-signing-ed25519")


# The canary's format says what the database's rows are: format 2 (this one) for a vault whose
# authority rows carry MACs from the start; format 1 for a vault made before row MACs, whose rows
# are adopted once at unseal. Only the root key can make either, so a database writer can neither
# fake an old vault (to have forged rows adopted) nor undo an adoption.
CANARY_FORMAT = 2


def _canary_ad(fmt: int) -> bytes:
    return aead.ad("canary") if fmt == 1 else aead.ad("canary", fmt)


def make_canary(root_key: bytes, fmt: int = CANARY_FORMAT) -> bytes:
    return aead.encrypt(derive(root_key, "canary"), _CANARY_PLAINTEXT, _canary_ad(fmt))


def canary_format(root_key: bytes, canary: bytes) -> int | None:
    """The format the canary was made in with ``root_key`` (2, or 1 for a pre-row-MAC vault), or None
    when ``root_key`` is not the key the canary was made with."""
    for fmt in (CANARY_FORMAT, 1):
        try:
            if aead.decrypt(derive(root_key, "canary"), canary, _canary_ad(fmt)) == _CANARY_PLAINTEXT:
                return fmt
        except DecryptionError:
            continue
    return None


def check_canary(root_key: bytes, canary: bytes) -> bool:
    """True when ``root_key`` is the key the canary was made with."""
    return canary_format(root_key, canary) is not None


def wrap_region_key(wrap_key: bytes, region: str, key_version: int, region_key: bytes) -> bytes:
    return aead.encrypt(wrap_key, region_key, aead.ad("region-key", region, key_version))


def unwrap_region_key(wrap_key: bytes, region: str, key_version: int, wrapped: bytes) -> bytes:
    return aead.decrypt(wrap_key, wrapped, aead.ad("region-key", region, key_version))


def encrypt_value(data_key: bytes, name: str, version: int, value: bytes) -> bytes:
    return aead.encrypt(data_key, value, aead.ad("secret-value", name, version))


def decrypt_value(data_key: bytes, name: str, version: int, ciphertext: bytes) -> bytes:
    return aead.decrypt(data_key, ciphertext, aead.ad("secret-value", name, version))


def wrap_data_key(region_key: bytes, name: str, version: int, region: str, key_version: int, data_key: bytes) -> bytes:
    return aead.encrypt(region_key, data_key, aead.ad("data-key", name, version, region, key_version))


def unwrap_data_key(region_key: bytes, name: str, version: int, region: str, key_version: int, wrapped: bytes) -> bytes:
    return aead.decrypt(region_key, wrapped, aead.ad("data-key", name, version, region, key_version))
