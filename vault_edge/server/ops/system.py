"""init, unseal, seal, status."""

from __future__ import annotations

import json
import logging
from typing import Any

from vault_edge import wire
from vault_edge.crypto import aead, envelope, shares, signing
from vault_edge.crypto.rowmac import RowKeys
from vault_edge.server import auth
from vault_edge.server.audit import entry_mac
from vault_edge.server.auth import Principal
from vault_edge.server.barrier import UnsealRefused
from vault_edge.server.context import Context
from vault_edge.server.errors import ApiError, bad_request, conflict, not_initialized
from vault_edge.server.storage.repo import BASE_TARGET

log = logging.getLogger("vault_edge.system")


def _meta(ctx: Context) -> dict[str, str]:
    with ctx.store.read() as tx:
        return tx.get_meta()


def status(ctx: Context) -> dict[str, Any]:
    with ctx.store.read() as tx:
        meta = tx.get_meta()
        revision = tx.current_revision()
    initialized = "canary" in meta
    out: dict[str, Any] = {
        "initialized": initialized,
        "sealed": ctx.barrier.sealed,
        "progress": ctx.barrier.progress,
        "threshold": 0,
        "shares": 0,
        "revision": revision,
        # the vault's seal; with pkcs11 the shares are recovery shares (they still unseal without the HSM)
        "seal": meta.get("seal", "shamir"),
        "recovery_shares": meta.get("seal") == "pkcs11",
        "seal_error": ctx.seal_error,
    }
    if initialized:
        raw = json.loads(meta["scheme"])
        scheme = shares.ShareScheme(tuple(tuple(g) for g in raw["groups"]), raw["group_threshold"])
        out.update(
            threshold=scheme.min_shares,
            shares=sum(c for _, c in scheme.groups),
            groups=[{"threshold": t, "shares": c} for t, c in scheme.groups],
            group_threshold=scheme.group_threshold,
            passphrase=meta.get("passphrase") == "1",
            server_key=meta["server_key"],
            server_pin=wire.server_pin(wire.b64d(meta["server_key"])),
        )
    return out


def initialize(
    ctx: Context, scheme: shares.ShareScheme, passphrase: str = "", root_token: str | None = None
) -> dict[str, Any]:
    """Make the root key and an unseal key; split the unseal key into shares and store the root key
    wrapped under it (and, with --seal pkcs11, wrapped by the HSM too, then unseal at once: the shares
    are recovery shares). Return the shares and the root token."""
    from vault_edge.server.hsm import SealError
    from vault_edge.server.ops import seal as seal_ops

    root = aead.new_key()
    server_public = signing.public_of(envelope.signing_seed(root))
    now = ctx.clock()
    with ctx.store.write() as tx:
        tx.use_keys(RowKeys(root))  # the root token's digest and row MAC, before any unseal
        if not tx.add_meta("initialized_at", repr(now)):
            raise conflict("the vault is already initialized")
        tx.add_meta("canary", wire.b64e(envelope.make_canary(root)))
        tx.add_meta("server_key", wire.b64e(server_public))
        groups = seal_ops.store_shamir(tx, root, server_public, scheme, passphrase)
        tx.add_meta("seal", "shamir")
        if ctx.hsm is not None:
            try:
                seal_ops.store_hsm(ctx, tx, {"server_key": wire.b64e(server_public)}, root)
            except SealError as exc:
                raise ApiError(503, "seal_unavailable", f"init needs the HSM: {exc}") from None
        token, _ = auth.create_token(tx, "root", ("",), auth.VERBS, now, secret=root_token)
        tx.record_change(0, BASE_TARGET)  # the change log is whole from the start
        ctx.auditor.record(
            tx,
            "operator",
            "sys.init",
            outcome="ok",
            shares=sum(c for _, c in scheme.groups),
            threshold=scheme.min_shares,
        )
    if ctx.hsm is not None:
        seal_ops.auto_unseal(ctx)
    del root
    flat = [m for group in groups for m in group]
    out: dict[str, Any] = {"shares": flat, "root_token": token, "threshold": scheme.min_shares}
    if len(groups) > 1:
        out["groups"] = groups
    return out


def unseal(ctx: Context, share: str | None, passphrase: str | None, reset: bool = False) -> dict[str, Any]:
    meta = _meta(ctx)
    if "canary" not in meta:
        raise not_initialized()
    if reset:
        ctx.barrier.reset()
        return status(ctx)
    if not share and not passphrase:
        raise bad_request("give a share (and, with the share that completes the unseal, the passphrase)")
    try:
        result = ctx.barrier.add_share(
            share,
            passphrase,
            identifier=int(meta["share_identifier"]),
            canary=wire.b64d(meta["canary"]),
            has_passphrase=meta.get("passphrase") == "1",
            wrapped_root=wire.b64d(meta["root_shamir"]) if meta.get("root_shamir") else None,
            vault_id=wire.b64d(meta["server_key"]),
        )
    except UnsealRefused as exc:
        ctx.auditor.record_alone("operator", "sys.unseal", outcome="refused", reason=exc.code)
        raise
    if not result.sealed and result.message == "unsealed":
        _adopt_legacy(ctx)  # first: nothing is chained onto the log before its old entries are MAC'd
        ctx.seal_error = None
        with ctx.store.write() as tx:
            ctx.auditor.record(tx, "operator", "sys.unseal", outcome="ok")
        check_change_log(ctx)
    return {**status(ctx), "message": result.message}


def check_change_log(ctx: Context) -> bool:
    """Is the change log whole (no revision missing)? If not, a database writer removed rows from it
    (perhaps to hide one secret's rollback): serve no secret from now on (fail closed), log and audit
    it; agents keep serving what they hold. True when whole. Runs at unseal and every minute."""
    with ctx.store.read() as tx:
        gap = tx.change_log_gap()
    if gap is None:
        return True
    if ctx.store.integrity_failure is None:
        ctx.store.integrity_failure = gap
        log.error("integrity: %s; serving no secret until the database is restored", gap)
        ctx.auditor.record_alone("system", "integrity", "changes:log", "refused", throttle=None, reason=gap)
    return False


def _adopt_legacy(ctx: Context) -> None:
    """A vault made before row MACs (its canary in the old format, which only the root key can make):
    MAC its rows once, then re-make the canary in the new format, in one transaction."""
    keys = ctx.barrier.keys()
    if keys.canary_format == envelope.CANARY_FORMAT:
        return
    audit_key = keys.audit.reveal()
    with ctx.store.write() as tx:
        counts = tx.adopt_legacy_rows(lambda digest: entry_mac(audit_key, digest), ctx.clock())
        tx.set_meta("canary", wire.b64e(envelope.make_canary(keys.root.reveal())))
        ctx.auditor.record(tx, "operator", "sys.adopt_rows", outcome="ok", **counts)
    ctx.barrier.adopted()


def seal(ctx: Context, who: Principal) -> dict[str, Any]:
    who.require_global_admin()
    with ctx.store.write() as tx:
        ctx.auditor.record(tx, who.actor, "sys.seal")
    ctx.barrier.seal()
    return status(ctx)
