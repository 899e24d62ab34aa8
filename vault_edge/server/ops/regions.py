"""Regions: create, list, rekey. A region key wraps the data keys of the secrets allowed there."""

from __future__ import annotations

from typing import Any

from vault_edge import wire
from vault_edge.crypto import envelope, signing
from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.errors import bad_request, conflict, not_found
from vault_edge.server.ops import keyring
from vault_edge.server.storage.repo import Tx


def create(ctx: Context, who: Principal, name: str) -> dict[str, Any]:
    who.require_global_admin()
    try:
        wire.check_region(name)
    except wire.WireError as exc:
        raise bad_request(str(exc)) from None
    ctx.barrier.require_unsealed()
    now = ctx.clock()
    with ctx.store.write() as tx:
        rev = tx.next_revision()
        if not tx.insert_region(name, rev, now):
            raise conflict(f"region {name!r} already exists")
        region_key = keyring.new_region_key(tx, ctx.barrier, name, 1, now)
        # Secrets allowed everywhere ("*") are allowed here from now on: wrap their data keys.
        for secret in tx.every_region_secrets():
            for version in keyring.live_versions(tx, secret):
                dek = keyring.data_key_of(tx, ctx.barrier, secret, version)
                tx.put_wrap(
                    secret.id, version, name, 1, envelope.wrap_data_key(region_key, secret.name, version, name, 1, dek)
                )
        tx.touch_regions([name], rev)
        ctx.auditor.record(tx, who.actor, "region.create", name)
    return {"name": name, "key_version": 1, "revision": rev}


def list_regions(ctx: Context, who: Principal) -> dict[str, Any]:
    who.require_global("list")  # every region, with node and secret counts: belongs to no name
    with ctx.store.read() as tx:
        regions = tx.list_regions()
        counts = tx.region_counts()
    return {
        "regions": [
            {
                "name": r.name,
                "key_version": r.key_version,
                "revision": r.data_rev,
                "created_at": r.created_at,
                "nodes": counts.get(r.name, (0, 0))[0],
                "secrets": counts.get(r.name, (0, 0))[1],
            }
            for r in regions
        ]
    }


def rekey(ctx: Context, who: Principal, name: str) -> dict[str, Any]:
    who.require_global_admin()
    ctx.barrier.require_unsealed()
    with ctx.store.write() as tx:
        if tx.get_region(name) is None:
            raise not_found(f"no region {name!r}")
        rev, version = rekey_in(ctx, tx, name)
        ctx.auditor.record(tx, who.actor, "region.rekey", name, key_version=version)
    return {"name": name, "key_version": version, "revision": rev}


def rekey_in(ctx: Context, tx: Tx, name: str) -> tuple[int, int]:
    """Inside ``tx``: a new key version for region ``name``; every data key wrapped for the region is
    re-wrapped under it (no value is re-encrypted); every active node of the region gets a grant of
    the new key; the old key version and its grants are deleted, so a holder of the old key (a
    revoked node) can open nothing made or re-wrapped from now on."""
    region = tx.get_region(name)
    assert region is not None
    rev, now = tx.next_revision(), ctx.clock()
    new_v = region.key_version + 1
    new_key = keyring.new_region_key(tx, ctx.barrier, name, new_v, now)
    for secret_name, wrap in tx.wraps_in_region(name):
        dek = keyring.data_key(tx, ctx.barrier, secret_name, wrap)
        tx.put_wrap(
            wrap.secret_id,
            wrap.version,
            name,
            new_v,
            envelope.wrap_data_key(new_key, secret_name, wrap.version, name, new_v, dek),
        )
    tx.set_region_key_version(name, new_v)
    tx.delete_region_keys_before(name, new_v)
    tx.delete_grants(name, before_version=new_v)
    for node in tx.list_nodes(region=name, status="active"):
        sealed = signing.seal_grant(node.box_public, node.id, name, new_v, new_key)
        tx.put_grant(node.id, name, new_v, sealed, rev)
    tx.touch_regions([name], rev)
    return rev, new_v
