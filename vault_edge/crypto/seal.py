"""The seal's key layers, as pure functions: bytes in, bytes out.

    unseal key (32 B: what the SLIP-39 shares split; with auto-unseal, the recovery key)
      └─ AES-256-GCM ─▶ root key            stored wrapped ("root_shamir")
    HSM key (AES-256, non-extractable, in the PKCS#11 token)
      └─ CKM_AES_GCM ─▶ root key            stored wrapped ("root_pkcs11"; the HSM does that AEAD)
    root key (stable: row MACs, token digests, the audit MAC, the control plane's signing identity)
      └─ HKDF "root-keyring" ─▶ keyring key ─ wraps ─▶ root key version v ≥ 2 (the region-wrap key)
         root key version 1 is HKDF(root, "region-key-wrap"), as before versions existed.

Associated data binds the vault's identity (the control plane's Ed25519 public key, which the root
key determines and every agent pins) and, for the HSM, the key's label: a wrapped root key copied
from another vault or meant for another HSM key does not open, and one that opens must still open
the stored canary before anything is served.

A vault made before the unseal key existed split the root key itself: its shares give the root key
directly (no "root_shamir" row). ``rekey`` moves it to the layered form, so its old shares stop
opening anything.

Backups (``backup_*``): the snapshot is cut into chunks, each sealed under a per-backup key derived
from the root key, with associated data binding the backup's header digest, the chunk's index and
whether it is the last (the STREAM construction): a chunk altered, moved, dropped or cut off at the
end fails to open, so a damaged or truncated file is refused whole.
"""

from __future__ import annotations

from vault_edge.crypto import aead, envelope

SEAL_SHAMIR = "shamir"
SEAL_PKCS11 = "pkcs11"


def root_ad(kind: str, vault_id: bytes, key_label: str = "") -> bytes:
    """The associated data of a wrapped root key: the seal kind, the vault, the HSM key's label."""
    return aead.ad("root-key", kind, vault_id, key_label)


def wrap_root(unseal_key: bytes, vault_id: bytes, root_key: bytes) -> bytes:
    return aead.encrypt(unseal_key, root_key, root_ad(SEAL_SHAMIR, vault_id))


def unwrap_root(unseal_key: bytes, vault_id: bytes, wrapped: bytes) -> bytes:
    """The root key; DecryptionError when ``unseal_key`` is not the one that wrapped it."""
    return aead.decrypt(unseal_key, wrapped, root_ad(SEAL_SHAMIR, vault_id))


def root_from_unseal_key(unseal_key: bytes, vault_id: bytes, wrapped: bytes | None) -> bytes:
    """What a complete set of shares gives: the root key (a vault from before the unseal key: the key
    the shares hold is the root key itself)."""
    return unwrap_root(unseal_key, vault_id, wrapped) if wrapped is not None else unseal_key


def keyring_key(root_key: bytes) -> bytes:
    return envelope.derive(root_key, "root-keyring")


def wrap_root_version(root_key: bytes, version: int, key: bytes) -> bytes:
    if version < 2:
        raise ValueError("root key version 1 is derived, not stored")
    return aead.encrypt(keyring_key(root_key), key, aead.ad("root-key-version", version))


def unwrap_root_version(root_key: bytes, version: int, wrapped: bytes) -> bytes:
    return aead.decrypt(keyring_key(root_key), wrapped, aead.ad("root-key-version", version))


def region_wrap_key(root_key: bytes, version: int, versions: dict[int, bytes]) -> bytes:
    """The key that wraps region keys under root key version ``version`` (1: derived from the root key;
    later: the stored version's key, ``versions`` unwrapped)."""
    if version == 1:
        return envelope.region_wrap_key(root_key)
    return versions[version]


# -- backups -----------------------------------------------------------------------------------------
BACKUP_MAGIC = b"VEBACKUP1\n"
CHUNK_SIZE = 1 << 20


def backup_key(root_key: bytes, backup_id: bytes) -> bytes:
    if len(backup_id) != 16:
        raise ValueError("a backup id is 16 bytes")
    return envelope.derive(root_key, "backup/" + backup_id.hex())


def seal_chunk(key: bytes, header_digest: bytes, index: int, last: bool, chunk: bytes) -> bytes:
    return aead.encrypt(key, chunk, aead.ad("backup-chunk", header_digest, index, int(last)))


def open_chunk(key: bytes, header_digest: bytes, index: int, last: bool, sealed: bytes) -> bytes:
    return aead.decrypt(key, sealed, aead.ad("backup-chunk", header_digest, index, int(last)))
