"""Region keys and data keys inside a transaction: unwrap, wrap, re-wrap."""

from __future__ import annotations

from vault_edge.crypto import aead, envelope
from vault_edge.server.barrier import Barrier
from vault_edge.server.errors import ApiError, bad_request
from vault_edge.server.storage.records import Secret, Wrap
from vault_edge.server.storage.repo import Tx

# The pseudo-region of the control plane: a secret in no region (a rotator's admin credential) has
# its data key wrapped here, under a key derived from the root key, with the same associated data
# as a region's wrap (name, version, region "", key version 0). No node is ever of this region (region
# names are never empty), so no sync answer ever carries it.
CONTROL_PLANE = ""


def control_plane_only(secret: Secret) -> bool:
    return secret.regions == ()


def effective_regions(tx: Tx, secret: Secret) -> list[str]:
    if secret.every_region:
        return [r.name for r in tx.list_regions()]
    return list(secret.regions)


def region_key(tx: Tx, barrier: Barrier, region: str, version: int) -> bytes:
    row = tx.get_region_key_row(region, version)
    if row is None:
        raise ApiError(500, "internal", f"region key {region} v{version} is missing")
    wrapped, root_version = row
    return barrier.region_key(region, version, wrapped, root_version, tx.root_key_versions)


def current_region_key(tx: Tx, barrier: Barrier, region: str) -> tuple[int, bytes]:
    r = tx.get_region(region)
    if r is None:
        raise bad_request(f"no region {region!r}")
    return r.key_version, region_key(tx, barrier, region, r.key_version)


def new_region_key(tx: Tx, barrier: Barrier, region: str, version: int, at: float) -> bytes:
    key = aead.new_key()
    root_version = tx.current_root_version()  # read in this transaction: a rotation elsewhere is seen
    wrap_key = barrier.wrap_key(root_version, tx.root_key_versions)
    tx.insert_region_key(region, version, envelope.wrap_region_key(wrap_key, region, version, key), at, root_version)
    return key


def _control_plane_key(barrier: Barrier) -> bytes:
    return envelope.control_plane_wrap_key(barrier.keys().root.reveal())


def data_key(tx: Tx, barrier: Barrier, name: str, wrap: Wrap) -> bytes:
    if wrap.region == CONTROL_PLANE:
        rk = _control_plane_key(barrier)
    else:
        rk = region_key(tx, barrier, wrap.region, wrap.key_version)
    return envelope.unwrap_data_key(rk, name, wrap.version, wrap.region, wrap.key_version, wrap.wrapped)


def data_key_of(tx: Tx, barrier: Barrier, secret: Secret, version: int) -> bytes:
    """The data key of one version, through any region's wrap (the control plane holds them all)."""
    wraps = tx.get_wraps(secret.id, version)
    if not wraps:
        raise ApiError(500, "internal", f"{secret.name} v{version} has no wrapped data key")
    return data_key(tx, barrier, secret.name, wraps[0])


def wrap_version(tx: Tx, barrier: Barrier, secret: Secret, version: int, dek: bytes, regions: list[str]) -> None:
    for region in regions:
        if region == CONTROL_PLANE:
            kv, rk = 0, _control_plane_key(barrier)
        else:
            kv, rk = current_region_key(tx, barrier, region)
        tx.put_wrap(secret.id, version, region, kv, envelope.wrap_data_key(rk, secret.name, version, region, kv, dek))


def live_versions(tx: Tx, secret: Secret) -> list[int]:
    """Versions whose ciphertext still exists (every one but destroyed ones)."""
    return [v.version for v in tx.list_versions(secret.id) if v.ciphertext is not None]
