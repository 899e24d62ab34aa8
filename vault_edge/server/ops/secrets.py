"""Secrets: put, get, list, history, rotate, promote, rollback, delete, and propagation status.

Versions are append-only. Each version's value is encrypted once under a fresh data key, whose wraps
(one per allowed region) are what nodes can open. Stages follow AWS Secrets Manager: ``current``,
``previous`` (readable until its grace period ends), ``pending`` (staged, promoted later).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vault_edge import wire
from vault_edge.crypto import aead, envelope
from vault_edge.server import generate as gen
from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.errors import ApiError, bad_request, conflict, not_found
from vault_edge.server.ops import keyring
from vault_edge.server.storage.records import Secret, Stage
from vault_edge.server.storage.repo import Tx


def check_name(name: str) -> str:
    """``name`` if it is a valid secret name, else a 400 (``ops.rotation`` uses it too)."""
    try:
        return wire.check_name(name)
    except wire.WireError as exc:
        raise bad_request(str(exc)) from None


def _check_value(ctx: Context, value: bytes) -> bytes:
    if not value:
        raise bad_request("a secret value cannot be empty")
    if len(value) > ctx.settings.max_value_bytes:
        raise ApiError(413, "too_large", f"a secret value is at most {ctx.settings.max_value_bytes} bytes")
    return value


def _check_spec(spec: str) -> str:
    try:
        gen.parse_spec(spec)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    return spec


def _not_mid_rotation(tx: Tx, secret: Secret) -> None:
    """A secret kept by a rotator takes no other change of its stages while a rotation at its source
    runs: the rotation publishes and retires by what it made, and would retire the credential a
    promote or rollback had just made current (409, as a second ``rotate`` gets)."""
    if secret.rotator and any(r.active for r in tx.rotations_of(secret.name, 1)):
        raise conflict(
            f"a rotation of {secret.name!r} at its source is running: see `vault-edge rotation status "
            f"{secret.name}`; promote or roll back once it ends"
        )


def live(tx: Tx, name: str) -> Secret:
    """The secret ``name``, unless it does not exist or is deleted (a 404)."""
    secret = tx.get_secret(name)
    if secret is None or secret.deleted_at is not None:
        raise not_found(f"no secret {name!r}")
    return secret


def _check_rotate_every(ctx: Context, rotate_every_s: int | None) -> None:
    floor = ctx.settings.min_rotate_every_s
    if rotate_every_s is not None and rotate_every_s != 0 and rotate_every_s < floor:
        raise bad_request(f"rotate_every: at least {floor} seconds (or 0 to stop scheduled rotation)")


def _parse_regions(tx: Tx, regions: list[str] | None) -> tuple[str, ...] | None:
    if regions is None:
        return None
    names = tuple(dict.fromkeys(r.strip() for r in regions if r.strip()))
    if names == ("*",):
        return names
    if not names or "*" in names:
        raise bad_request("regions: a list of region names, or '*' alone for every region")
    for r in names:
        if not wire.valid_region(r) or tx.get_region(r) is None:
            raise bad_request(f"no region {r!r}: create it with `vault-edge region create {r}`")
    return names


def value_of(
    ctx: Context, tx: Tx, secret: Secret, version: int, destroyed: Callable[[str], ApiError] = conflict
) -> bytes:
    row = tx.get_version(secret.id, version)
    if row is None:
        raise not_found(f"{secret.name!r} has no version {version}")
    if row.ciphertext is None:
        raise destroyed(f"{secret.name!r} version {version} was destroyed")
    dek = keyring.data_key_of(tx, ctx.barrier, secret, version)
    return envelope.decrypt_value(dek, secret.name, version, row.ciphertext)


def grace_of(ctx: Context, secret: Secret, grace_s: int | None) -> int:
    if grace_s is not None:
        return grace_s
    return secret.grace_s if secret.grace_s is not None else ctx.settings.default_grace_s


def _make_current(
    tx: Tx, secret: Secret, version: int, stages: dict[str, Stage], grace_s: int, rev: int, now: float
) -> None:
    current = stages.get("current")
    if current and current.version > version:  # agents refuse to go back (anti-rollback): never do
        raise conflict(f"{secret.name!r}: version {version} is older than the current {current.version}")
    if current and current.version != version:
        if grace_s > 0:
            tx.set_stage(secret.id, "previous", current.version, rev, now, expires_at=now + grace_s)
        elif "previous" in stages:
            tx.set_stage(secret.id, "previous", None, rev, now)
    tx.set_stage(secret.id, "current", version, rev, now)
    pending = stages.get("pending")
    if pending and pending.version == version:
        tx.set_stage(secret.id, "pending", None, rev, now)


def add_version(
    ctx: Context, tx: Tx, secret: Secret, value: bytes, origin: str, stage: str, grace_s: int
) -> tuple[int, int]:
    rev, now = tx.next_revision(), ctx.clock()
    version = secret.latest_version + 1
    regions = keyring.effective_regions(tx, secret)
    local = keyring.control_plane_only(secret)
    if not regions and not local:
        raise bad_request("no region exists yet: create one with `vault-edge region create NAME`")
    dek = aead.new_key()
    tx.insert_version(secret.id, version, envelope.encrypt_value(dek, secret.name, version, value), now, rev, origin)
    keyring.wrap_version(tx, ctx.barrier, secret, version, dek, [keyring.CONTROL_PLANE] if local else regions)
    stages = tx.get_stages(secret.id)
    if stage == "current":
        _make_current(tx, secret, version, stages, grace_s, rev, now)
    else:
        tx.set_stage(secret.id, "pending", version, rev, now)
    fields: dict[str, Any] = {"latest_version": version, "updated_at": now, "revision": rev}
    if secret.rotate_every_s and stage == "current":
        fields["next_rotation_at"] = now + secret.rotate_every_s
    tx.update_secret(secret.id, **fields)
    tx.touch_regions(regions, rev)
    return version, rev


def _set_regions(ctx: Context, tx: Tx, secret: Secret, regions: tuple[str, ...]) -> Secret:
    """Change where a secret may be decrypted: wrap its live versions for added regions, delete the
    wraps of removed ones (nodes there drop it at their next sync)."""
    rev = tx.next_revision()
    tx.update_secret(secret.id, regions=regions, revision=rev)  # a change of the secret: in the log
    updated = tx.get_secret(secret.name)
    assert updated is not None
    want = set(keyring.effective_regions(tx, updated))
    have = tx.wrapped_regions(secret.id)
    if want - have:  # wrap for the new regions first: the old wraps are how the data keys open
        for version in keyring.live_versions(tx, secret):
            dek = keyring.data_key_of(tx, ctx.barrier, secret, version)
            keyring.wrap_version(tx, ctx.barrier, secret, version, dek, sorted(want - have))
    if have - want:
        tx.delete_wraps(secret.id, have - want)
    tx.touch_regions(have ^ want, rev)
    return updated


def _schedule(now: float, rotate_every_s: int | None, grace_s: int | None, **given: Any) -> dict[str, Any]:
    """The schedule fields a put sets: those given (None leaves a field as it is; a ``rotate_every_s``
    of 0 stops scheduled rotation), and ``given`` (``generate``, ``rotator``) when not None."""
    fields = {k: v for k, v in given.items() if v is not None}
    if rotate_every_s is not None:
        fields["rotate_every_s"] = rotate_every_s or None
        fields["next_rotation_at"] = now + rotate_every_s if rotate_every_s else None
    if grace_s is not None:
        fields["grace_s"] = grace_s
    return fields


# What a deleted secret put again starts from: nothing of its old life stays scheduled.
_NEW_LIFE = {"generate": None, "rotate_every_s": None, "next_rotation_at": None, "grace_s": None}


def _upsert(
    ctx: Context,
    tx: Tx,
    name: str,
    secret: Secret | None,
    wanted: tuple[str, ...] | None,
    schedule: dict[str, Any],
    now: float,
) -> Secret:
    """The put side of ``put`` and of ``put --rotator``: make ``name`` (in ``wanted``, default every
    region) with ``schedule``, or update it (a deleted one starts a new life), and move it to the
    regions ``wanted`` when given."""
    if secret is None:
        return tx.insert_secret(name, wanted or ("*",), now, tx.next_revision(), **schedule)
    if secret.deleted_at is not None:
        # A new life: nothing of the deleted one stays staged or scheduled (its old schedule would
        # otherwise replace the value put now, its old stages serve its old value). Its regions
        # stay: never wider by surprise.
        tx.clear_stages(secret.id, tx.next_revision(), now)
        schedule = {**_NEW_LIFE, **schedule}
    if schedule or secret.deleted_at is not None:
        tx.update_secret(secret.id, deleted_at=None, destroyed=False, **schedule)
    if wanted is not None and wanted != secret.regions:
        if keyring.control_plane_only(secret):
            raise conflict(
                f"{name!r} belongs to no region (a rotator's admin credential): it stays on the control plane"
            )
        _set_regions(ctx, tx, secret, wanted)
    return tx.get_secret(name) or secret


def put(
    ctx: Context,
    who: Principal,
    name: str,
    value: bytes | None,
    generate: str | None = None,
    regions: list[str] | None = None,
    rotate_every_s: int | None = None,
    grace_s: int | None = None,
    rotator: str | None = None,
) -> dict[str, Any]:
    check_name(name)
    who.require("write", name)
    if rotator is not None:
        return _bind_rotator(ctx, who, name, value, regions, rotator, rotate_every_s, grace_s)
    if (value is None) == (generate is None):
        raise bad_request("give exactly one of a value or a generate spec")
    if generate is not None:
        _check_spec(generate)
    _check_rotate_every(ctx, rotate_every_s)
    ctx.barrier.require_unsealed()
    now = ctx.clock()
    with ctx.store.write() as tx:
        wanted = _parse_regions(tx, regions)
        secret = tx.get_secret(name)
        if secret is not None and secret.deleted_at is None and secret.rotator:
            raise conflict(
                f"{name!r} is kept by rotator {secret.rotator!r}: its values come from rotations "
                f"(`rotate {name}`); change its settings with `put {name} --rotator {secret.rotator}`"
            )
        secret = _upsert(ctx, tx, name, secret, wanted, _schedule(now, rotate_every_s, grace_s, generate=generate), now)
        if (secret.rotate_every_s or 0) and not secret.generate and not secret.rotator:
            raise bad_request("scheduled rotation needs a generate spec (--generate SPEC)")
        data = _check_value(ctx, value) if value is not None else gen.generate(generate or "")
        version, rev = add_version(
            ctx,
            tx,
            secret,
            data,
            "put" if value is not None else "generated",
            "current",
            grace_of(ctx, secret, grace_s),
        )
        ctx.auditor.record(tx, who.actor, "secret.put", name, version=version, regions=list(secret.regions))
    return {"name": name, "version": version, "revision": rev, "regions": list(secret.regions)}


def _bind_rotator(
    ctx: Context,
    who: Principal,
    name: str,
    value: bytes | None,
    regions: list[str] | None,
    rotator: str,
    rotate_every_s: int | None,
    grace_s: int | None,
) -> dict[str, Any]:
    """``put NAME --rotator R``: the secret's value is the credential R keeps at its source. Its first
    value comes from a rotation (``rotate NAME``, or the schedule), or, when given, is the credential
    as it stands now (a JSON object, e.g. the role in use before vault-edge rotated it)."""
    _check_rotate_every(ctx, rotate_every_s)
    if value is not None:
        _credential(value)
    ctx.barrier.require_unsealed()
    now = ctx.clock()
    with ctx.store.write() as tx:
        if tx.get_rotator(rotator) is None:
            raise not_found(f"no rotator {rotator!r}: make it with `vault-edge rotator create {rotator} ...`")
        for other in tx.secret_names_with_rotator(rotator):
            if other != name:
                raise conflict(f"rotator {rotator!r} already keeps {other!r}: one secret per rotator")
        wanted = _parse_regions(tx, regions)
        secret = tx.get_secret(name)
        if secret is not None and keyring.control_plane_only(secret):
            raise conflict(f"{name!r} belongs to no region: a rotator's own credential cannot be rotated here")
        secret = _upsert(ctx, tx, name, secret, wanted, _schedule(now, rotate_every_s, grace_s, rotator=rotator), now)
        version = rev = None
        if value is not None:
            _not_mid_rotation(tx, secret)
            version, rev = add_version(ctx, tx, secret, value, "put", "current", grace_of(ctx, secret, grace_s))
        ctx.auditor.record(
            tx,
            who.actor,
            "secret.bind_rotator",
            name,
            rotator=rotator,
            version=version,
            regions=list(secret.regions),
            rotate_every_s=secret.rotate_every_s,
        )
    return {"name": name, "version": version, "revision": rev, "regions": list(secret.regions), "rotator": rotator}


def _credential(value: bytes) -> dict[str, Any]:
    import json

    try:
        doc = json.loads(value)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not doc:
        raise bad_request("a rotated credential is a JSON object (username, password, host, ...)")
    return doc


def rotate(
    ctx: Context,
    who: Principal,
    name: str,
    value: bytes | None,
    generate: str | None = None,
    grace_s: int | None = None,
    stage: str = "current",
    origin: str | None = None,
) -> dict[str, Any]:
    """A new version: the value given, or one generated from the spec given or the secret's own."""
    out = _rotate(ctx, who, name, value, generate, grace_s, stage, origin)
    assert out is not None
    return out


def rotate_if_due(ctx: Context, who: Principal, name: str, claim: tuple[int, float, float]) -> bool:
    """The scheduler's rotation: only if this replica wins the due slot ``claim`` (secret id, due at,
    next due at), in the same transaction as the rotation, so a failed rotation stays due."""
    return _rotate(ctx, who, name, None, origin="scheduled", claim=claim) is not None


def _rotate(
    ctx: Context,
    who: Principal,
    name: str,
    value: bytes | None,
    generate: str | None = None,
    grace_s: int | None = None,
    stage: str = "current",
    origin: str | None = None,
    claim: tuple[int, float, float] | None = None,
) -> dict[str, Any] | None:
    check_name(name)
    who.require("write", name)
    if stage not in ("current", "pending"):
        raise bad_request("stage: current or pending")
    if value is not None and generate is not None:
        raise bad_request("give a value or a generate spec, not both")
    if generate is not None:
        _check_spec(generate)
    ctx.barrier.require_unsealed()
    with ctx.store.write() as tx:
        if claim is not None and not tx.claim_rotation(*claim):
            return None
        secret = live(tx, name)
        spec = generate or (secret.generate if value is None else None)
        if value is None and spec is None:
            raise bad_request(f"{name!r} has no generate spec: give a value, or --generate SPEC")
        data = _check_value(ctx, value) if value is not None else gen.generate(spec or "")
        version, rev = add_version(
            ctx,
            tx,
            secret,
            data,
            origin or ("rotate" if value is not None else "generated"),
            stage,
            grace_of(ctx, secret, grace_s),
        )
        slot = {"due": claim[1]} if claim is not None else {}  # the scheduled slot it ran (each runs once)
        ctx.auditor.record(tx, who.actor, "secret.rotate", name, version=version, stage=stage, **slot)
    return {"name": name, "version": version, "revision": rev, "stage": stage}


def promote(ctx: Context, who: Principal, name: str, grace_s: int | None = None) -> dict[str, Any]:
    check_name(name)
    who.require("write", name)
    ctx.barrier.require_unsealed()
    with ctx.store.write() as tx:
        secret = live(tx, name)
        _not_mid_rotation(tx, secret)
        version, rev, pending = promote_in(ctx, tx, secret, grace_s)
        ctx.auditor.record(tx, who.actor, "secret.promote", name, version=version, pending=pending)
    return {"name": name, "version": version, "revision": rev, "stage": "current"}


def promote_in(ctx: Context, tx: Tx, secret: Secret, grace_s: int | None = None) -> tuple[int, int, int]:
    """Make the pending version current inside ``tx`` (a rotation's publish step uses it too):
    (version now current, revision, the pending version it came from)."""
    stages = tx.get_stages(secret.id)
    if "pending" not in stages:
        raise conflict(f"{secret.name!r} has no pending version to promote")
    pending, grace = stages["pending"].version, grace_of(ctx, secret, grace_s)
    current = stages.get("current")
    if current is not None and current.version > pending:
        # A newer version became current after this one was staged. Versions only move forward
        # (agents refuse to go back), so the staged value becomes current as a new version.
        tx.set_stage(secret.id, "pending", None, tx.next_revision(), ctx.clock())
        version, rev = add_version(
            ctx, tx, secret, value_of(ctx, tx, secret, pending), f"promote:{pending}", "current", grace
        )
    else:
        version, rev, now = pending, tx.next_revision(), ctx.clock()
        _make_current(tx, secret, version, stages, grace, rev, now)
        tx.update_secret(secret.id, updated_at=now, revision=rev)
        tx.touch_regions(keyring.effective_regions(tx, secret), rev)
    return version, rev, pending


def rollback(ctx: Context, who: Principal, name: str, to: int, grace_s: int | None = None) -> dict[str, Any]:
    check_name(name)
    who.require("write", name)
    ctx.barrier.require_unsealed()
    with ctx.store.write() as tx:
        secret = live(tx, name)
        _not_mid_rotation(tx, secret)
        value = value_of(ctx, tx, secret, to)
        version, rev = add_version(ctx, tx, secret, value, f"rollback:{to}", "current", grace_of(ctx, secret, grace_s))
        ctx.auditor.record(tx, who.actor, "secret.rollback", name, version=version, to=to)
    return {"name": name, "version": version, "revision": rev, "rolled_back_to": to}


def delete(ctx: Context, who: Principal, name: str, destroy: bool = False) -> dict[str, Any]:
    check_name(name)
    who.require("delete", name)
    with ctx.store.write() as tx:
        secret = tx.get_secret(name)
        if secret is None or (secret.deleted_at is not None and (not destroy or secret.destroyed)):
            raise not_found(f"no secret {name!r}")
        rev, now = tx.next_revision(), ctx.clock()
        regions = tx.wrapped_regions(secret.id)
        if destroy:
            tx.destroy_versions(secret.id)
            tx.clear_stages(secret.id, rev, now)
        tx.update_secret(
            secret.id, deleted_at=secret.deleted_at or now, destroyed=destroy, revision=rev, next_rotation_at=None
        )
        tx.touch_regions(regions, rev)
        ctx.auditor.record(tx, who.actor, "secret.destroy" if destroy else "secret.delete", name)
    return {"name": name, "deleted": True, "destroyed": destroy, "revision": rev}


def get(
    ctx: Context, who: Principal, name: str, version: int | None = None, stage: str | None = None
) -> dict[str, Any]:
    check_name(name)
    who.require("read", name)
    if version is not None and stage is not None:
        raise bad_request("give a version or a stage, not both")
    if stage is not None and stage not in wire.STAGES:
        raise bad_request(f"stage: one of {', '.join(wire.STAGES)}")
    ctx.barrier.require_unsealed()
    now = ctx.clock()
    with ctx.store.read() as tx:
        secret = live(tx, name)
        stages = {k: s for k, s in tx.get_stages(secret.id).items() if s.expires_at is None or s.expires_at > now}
        if version is None:
            staged = stages.get(stage or "current")
            if staged is None:
                raise not_found(f"{name!r} has no {stage or 'current'} version")
            version = staged.version
        value = value_of(ctx, tx, secret, version, destroyed=not_found)
    with ctx.store.write(serialize=False) as tx:
        ctx.auditor.record(tx, who.actor, "secret.read", name, version=version)
    stage_of = next((k for k, s in stages.items() if s.version == version), None)
    return {
        "name": name,
        **wire.value_fields(value),
        "version": version,
        "stage": stage_of,
        "revision": secret.revision,
    }


def list_secrets(ctx: Context, who: Principal, prefix: str = "") -> dict[str, Any]:
    who.require("list")
    with ctx.store.read() as tx:
        rows = tx.list_secrets(prefix)
    return {
        "secrets": [
            {
                "name": s.name,
                "version": s.latest_version,
                "regions": list(s.regions),
                "updated_at": s.updated_at,
                "rotate_every_s": s.rotate_every_s,
                "next_rotation_at": s.next_rotation_at,
            }
            for s in rows
            if who.covers(s.name)
        ]
    }


def history(ctx: Context, who: Principal, name: str) -> dict[str, Any]:
    check_name(name)
    who.require("list", name)
    now = ctx.clock()
    with ctx.store.read() as tx:
        secret = tx.get_secret(name)
        if secret is None:
            raise not_found(f"no secret {name!r}")
        stages = tx.get_stages(secret.id)
        versions = tx.list_versions(secret.id)
    by_version: dict[int, list[dict[str, Any]]] = {}
    for s in stages.values():
        expired = s.expires_at is not None and s.expires_at <= now
        by_version.setdefault(s.version, []).append({"stage": s.stage, "expires_at": s.expires_at, "expired": expired})
    return {
        "name": name,
        "regions": list(secret.regions),
        "deleted": secret.deleted_at is not None,
        "rotate_every_s": secret.rotate_every_s,
        "next_rotation_at": secret.next_rotation_at,
        "generate": secret.generate,
        "rotator": secret.rotator,
        "versions": [
            {
                "version": v.version,
                "created_at": v.created_at,
                "revision": v.revision,
                "origin": v.origin,
                "destroyed": v.ciphertext is None,
                "stages": by_version.get(v.version, []),
            }
            for v in versions
        ],
    }


def served_version(log: list[tuple[int, int | None]], applied: int) -> int | None:
    """The ``current`` version a node that applied revision ``applied`` serves."""
    served = None
    for rev, version in log:
        if rev > applied:
            break
        served = version
    return served


def propagation(ctx: Context, who: Principal, name: str, revision: int | None = None) -> dict[str, Any]:
    """Per region and node: the version served, the lag, up or down. ``complete`` when every up node
    of the secret's regions has applied ``revision`` (default: the secret's last change)."""
    check_name(name)
    who.require("list", name)
    now = ctx.clock()
    with ctx.store.read() as tx:
        secret = live(tx, name)
        stages = tx.get_stages(secret.id)
        log = tx.stage_log(secret.id, "current")
        regions = keyring.effective_regions(tx, secret)
        nodes = tx.nodes_in_regions(regions)
    target = revision if revision is not None else secret.revision
    current = stages["current"].version if "current" in stages else None
    down_after = ctx.settings.node_down_after_s
    # Hostnames name the fleet's machines, which belong to no name: a token scoped to prefixes may
    # follow its secret's propagation (node ids, regions, versions served) but not map the hosts
    # behind it, which `node list` keeps for tokens that may list every name.
    fleet = who.unlimited
    out_nodes, lagging, down = [], [], []
    for n in nodes:
        if n.status != "active":
            continue
        is_down = n.last_seen is None or now - n.last_seen > down_after
        done = n.applied_revision >= target
        entry = {
            "id": n.id,
            "region": n.region,
            "applied_revision": n.applied_revision,
            "serving": served_version(log, n.applied_revision),
            "last_seen": n.last_seen,
            "state": "down" if is_down else ("in_sync" if done else "lagging"),
            "done": done,
        }
        if fleet:
            entry["hostname"] = n.hostname
        out_nodes.append(entry)
        if is_down:
            down.append(n.id)
        elif not done:
            lagging.append(n.id)
    return {
        "name": name,
        "current": current,
        "revision": target,
        "regions": regions,
        "nodes": out_nodes,
        "complete": not lagging,
        "lagging": lagging,
        "down": down,
    }
