"""The seal's operations: auto-unseal through the HSM, recovery shares (generate-root, rekey,
seal-migrate) and root key rotation. One transaction each.

Shares authorise what they guard: ``generate-root``, ``rekey`` and ``seal-migrate`` take a threshold of
the current shares (the recovery shares, with auto-unseal) in one request, checked by what they give
opening the stored canary; a refusal changes nothing and is audited. None needs a token: holding the
shares is more authority than any token.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from vault_edge import wire
from vault_edge.crypto import aead, envelope, seal, shares
from vault_edge.crypto.errors import DecryptionError, ShareError
from vault_edge.crypto.rowmac import RowKeys
from vault_edge.server import auth
from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.errors import ApiError, bad_request, not_initialized
from vault_edge.server.ops import system
from vault_edge.server.storage.repo import Tx

log = logging.getLogger("vault_edge.seal")


def vault_id(meta: dict[str, str]) -> bytes:
    """The vault's identity in associated data: the control plane's public key (the root key makes it)."""
    return wire.b64d(meta["server_key"])


def wrapped_root(meta: dict[str, str]) -> bytes | None:
    raw = meta.get("root_shamir")
    return wire.b64d(raw) if raw else None


def hsm_ad(meta: dict[str, str], label: str) -> bytes:
    return seal.root_ad(seal.SEAL_PKCS11, vault_id(meta), label)


def store_shamir(
    tx: Tx, root: bytes, server_public: bytes, scheme: shares.ShareScheme, passphrase: str
) -> list[list[str]]:
    """A fresh unseal key, split into shares; the root key stored wrapped under it."""
    unseal_key = aead.new_key()
    groups = shares.split(unseal_key, scheme, passphrase)
    tx.put_meta("root_shamir", wire.b64e(seal.wrap_root(unseal_key, server_public, root)))
    tx.put_meta(
        "scheme", json.dumps({"groups": [list(g) for g in scheme.groups], "group_threshold": scheme.group_threshold})
    )
    tx.put_meta("share_identifier", str(shares.set_identifier(groups[0][0])))
    tx.put_meta("passphrase", "1" if passphrase else "0")
    return groups


def store_hsm(ctx: Context, tx: Tx, meta: dict[str, str], root: bytes) -> None:
    tx.put_meta("root_pkcs11", wire.b64e(ctx.hsm.encrypt(root, hsm_ad(meta, ctx.hsm.key_label))))
    tx.put_meta("pkcs11_key_label", ctx.hsm.key_label)
    tx.put_meta("seal", seal.SEAL_PKCS11)


def _hsm_error(exc: Exception) -> ApiError:
    return ApiError(503, "seal_unavailable", str(exc))


# -- auto-unseal --------------------------------------------------------------------------------------
def auto_unseal(ctx: Context) -> bool:
    """With --seal pkcs11: unwrap the root key through the HSM and unseal, no share needed. On failure
    the control plane stays sealed, ``ctx.seal_error`` says why (status shows it), the log too."""
    from vault_edge.server.hsm import SealError

    if ctx.hsm is None or not ctx.barrier.sealed:
        return not ctx.barrier.sealed
    with ctx.store.read() as tx:
        meta = tx.get_meta()
    if "canary" not in meta:
        ctx.seal_error = None  # nothing to unseal yet: init will
        return False
    if "root_pkcs11" not in meta:
        ctx.seal_error = (
            "this vault is sealed with Shamir shares, not the HSM: unseal it with its shares, or move "
            "it to the HSM with `vault-edge operator seal-migrate --to pkcs11`"
        )
        log.error("auto-unseal: %s", ctx.seal_error)
        return False
    try:
        root = ctx.hsm.decrypt(wire.b64d(meta["root_pkcs11"]), hsm_ad(meta, ctx.hsm.key_label))
    except SealError as exc:
        ctx.seal_error = f"auto-unseal failed: {exc}"
        log.error("%s; still sealed (the recovery shares unseal it too)", ctx.seal_error)
        return False
    if not ctx.barrier.unseal_with_root(root, wire.b64d(meta["canary"])):
        ctx.seal_error = "auto-unseal failed: the HSM gave a key that does not open this vault"
        log.error("%s; still sealed", ctx.seal_error)
        return False
    ctx.seal_error = None
    _after_unseal(ctx, "pkcs11")
    log.info("unsealed through the HSM (%s)", ctx.hsm.describe())
    return True


def _after_unseal(ctx: Context, how: str) -> None:
    system._adopt_legacy(ctx)
    with ctx.store.write() as tx:
        ctx.auditor.record(tx, "system" if how == "pkcs11" else "operator", "sys.unseal", outcome="ok", seal=how)
    system.check_change_log(ctx)


# -- recovery shares ---------------------------------------------------------------------------------
def root_from_shares(meta: dict[str, str], given: list[str], passphrase: str | None) -> bytes:
    """The root key from a complete set of (recovery) shares, checked against the canary in ``meta``.
    ShareError (a message that never quotes a share) when they do not give it."""
    try:
        progress = shares.UnsealProgress(int(meta["share_identifier"]))
        for s in given:
            progress.add(s)
        if not progress.complete:
            raise ShareError(f"not enough shares: {progress.entered} given, {_scheme(meta).min_shares} or more needed")
        if meta.get("passphrase") == "1" and not passphrase:
            raise ShareError("this vault has a passphrase: give it with the shares")
        root = seal.root_from_unseal_key(progress.recover(passphrase or ""), vault_id(meta), wrapped_root(meta))
    except DecryptionError:
        root = b""
    if not root or not envelope.check_canary(root, wire.b64d(meta["canary"])):
        raise ShareError("the shares and passphrase do not open this vault")
    return root


def recover_root(ctx: Context, given: list[str], passphrase: str | None, action: str) -> tuple[bytes, dict[str, str]]:
    """``root_from_shares`` for a request: a refusal (400) changes nothing and is audited."""
    with ctx.store.read() as tx:
        meta = tx.get_meta()
    if "canary" not in meta:
        raise not_initialized()
    try:
        return root_from_shares(meta, given, passphrase), meta
    except ShareError as exc:
        ctx.auditor.record_alone("operator", action, outcome="refused", reason="bad_shares")
        raise bad_request(f"shares refused: {exc}; nothing changed") from None


def _scheme(meta: dict[str, str]) -> shares.ShareScheme:
    raw = json.loads(meta["scheme"])
    return shares.ShareScheme(tuple(tuple(g) for g in raw["groups"]), raw["group_threshold"])


def _with_root(ctx: Context, tx: Tx, root: bytes) -> None:
    if ctx.barrier.sealed:
        tx.use_keys(RowKeys(root))  # MACs of new rows, before (or without) an unseal


def generate_root(ctx: Context, given: list[str], passphrase: str | None) -> dict[str, Any]:
    """A new root token (admin over every name), from a threshold of the (recovery) shares."""
    root, _ = recover_root(ctx, given, passphrase, "sys.generate_root")
    with ctx.store.write() as tx:
        _with_root(ctx, tx, root)
        token, record = auth.create_token(tx, "root", ("",), auth.VERBS, ctx.clock())
        ctx.auditor.record(tx, "operator", "sys.generate_root", outcome="ok", token_id=record.id)
    return {"root_token": token, "id": record.id}


def rekey(
    ctx: Context, given: list[str], passphrase: str | None, scheme: shares.ShareScheme, new_passphrase: str
) -> dict[str, Any]:
    """New shares (a new unseal key, the root key wrapped under it) from a threshold of the current
    ones: the old shares open nothing stored from now on."""
    root, meta = recover_root(ctx, given, passphrase, "sys.rekey")
    with ctx.store.write() as tx:
        _with_root(ctx, tx, root)
        groups = store_shamir(tx, root, vault_id(meta), scheme, new_passphrase)
        ctx.auditor.record(
            tx,
            "operator",
            "sys.rekey",
            outcome="ok",
            shares=sum(c for _, c in scheme.groups),
            threshold=scheme.min_shares,
        )
    out: dict[str, Any] = {"shares": [m for g in groups for m in g], "threshold": scheme.min_shares}
    if len(groups) > 1:
        out["groups"] = groups
    return out


def seal_migrate(ctx: Context, given: list[str], passphrase: str | None, to: str) -> dict[str, Any]:
    """Shamir → PKCS#11 (the root key wrapped by the HSM too; this server unseals) or PKCS#11 → Shamir
    (the HSM's wrap removed: starts need the shares again). The shares stay the same either way."""
    from vault_edge.server.hsm import SealError

    if to not in (seal.SEAL_SHAMIR, seal.SEAL_PKCS11):
        raise bad_request("to: shamir or pkcs11")
    if to == seal.SEAL_PKCS11 and ctx.hsm is None:
        raise bad_request("this control plane has no HSM: start it with --seal pkcs11 and the --pkcs11-* options")
    root, meta = recover_root(ctx, given, passphrase, "sys.seal_migrate")
    with ctx.store.write() as tx:
        _with_root(ctx, tx, root)
        if to == seal.SEAL_PKCS11:
            try:
                store_hsm(ctx, tx, meta, root)
            except SealError as exc:
                raise _hsm_error(exc) from None
        else:
            tx.delete_meta("root_pkcs11")
            tx.delete_meta("pkcs11_key_label")
            tx.put_meta("seal", seal.SEAL_SHAMIR)
        ctx.auditor.record(tx, "operator", "sys.seal_migrate", outcome="ok", to=to)
    if ctx.barrier.sealed and ctx.barrier.unseal_with_root(root, wire.b64d(meta["canary"])):
        ctx.seal_error = None
        _after_unseal(ctx, "shares")
    return {**system.status(ctx), "migrated_to": to}


# -- root key rotation ---------------------------------------------------------------------------------
def rotate(ctx: Context, who: Principal) -> dict[str, Any]:
    """A new root key version: every region key is re-wrapped under it (work grows with regions and
    their live key versions, not with secrets: the data keys and values are untouched), the older
    stored versions are deleted. Row MACs, token digests, the audit MAC and the signing identity keep
    coming from the root key itself (see crypto/seal.py and SECURITY.md)."""
    who.require_global_admin()
    keys = ctx.barrier.keys()
    now = ctx.clock()
    with ctx.store.write() as tx:
        tx.next_revision()  # serialises with every other writer, on every replica
        version = tx.current_root_version() + 1
        new_key = aead.new_key()
        tx.insert_root_version(version, seal.wrap_root_version(keys.root.reveal(), version, new_key), now)
        count = 0
        for region, key_version, wrapped, root_version in tx.list_region_keys():
            old = ctx.barrier.wrap_key(root_version, tx.root_key_versions)
            key = envelope.unwrap_region_key(old, region, key_version, wrapped)
            tx.rewrap_region_key(
                region, key_version, envelope.wrap_region_key(new_key, region, key_version, key), version
            )
            count += 1
        tx.delete_root_versions_before(version)
        ctx.auditor.record(tx, who.actor, "sys.rotate", outcome="ok", root_version=version, region_keys=count)
    return {"root_key_version": version, "region_keys_rewrapped": count}
