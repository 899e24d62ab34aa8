"""Rotation at the source: a persisted state machine, create → test → publish → retire → done.

Each step is its own transaction and its own audit entry; the rotation's row (MAC'd) says which
step it is at, so a control plane killed at any moment resumes at that step. A step with an outside
call (create, test, retire) runs in three moves: a transaction that leases the step to this process
(a compare-and-set, so of several replicas one runs it), the call, outside any transaction, and a
transaction that moves the step on (a compare-and-set on the step). Every call is idempotent, so a
step run again after a crash mid-call does no harm:

- create: the new credential is sealed as the secret's ``pending`` version *before* the source is
  touched (at the start, for credentials made here; the webhook's provider makes its own, asked
  with an Idempotency-Key so a resumed create gets the same key back);
- test: log in with it; a refusal aborts (the new credential is undone at the source as far as
  the rotator can, ``pending`` is dropped, the current credential never moved);
- publish: no outside call; ``pending`` becomes ``current``, the old version stays readable as
  ``previous`` through the grace;
- retire: only once every live node of the secret's regions has applied the publish revision *and*
  the grace has passed; a node silent longer than ``node_down_after_s`` does not block it, and is
  named in the audit entry and in ``rotation status``.

A failed step is retried with exponential back-off (1 s to 60 s); a test that keeps failing for
reasons other than a refusal aborts after ``TEST_ATTEMPTS``. A retire that fails keeps two
credentials live past the grace: ``rotation status`` says so (``two_live_past_grace``), and the first
failure of each step is audited. Messages come from the rotators (never a driver's text, which could
quote a password).
"""

from __future__ import annotations

import json
import logging
import re
import secrets as pysecrets
import socket
from dataclasses import dataclass
from typing import Any

from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.errors import ApiError, bad_request, conflict, not_found
from vault_edge.server.ops import keyring
from vault_edge.server.ops import secrets as secret_ops
from vault_edge.server.rotators import TYPES, Credential, Driver, Refused, RotatorError, driver
from vault_edge.server.storage.records import Rotation, Rotator, Secret
from vault_edge.server.storage.repo import Tx

log = logging.getLogger("vault_edge.rotation")

LEASE_S = 15.0  # a step leased by a process that died is taken over by another replica after this


_PROCESS = pysecrets.token_hex(4)


def replica(ctx: Context) -> str:
    return f"{socket.gethostname()[:40]}:{ctx.settings.host}:{ctx.settings.port}"


def owner(ctx: Context) -> str:
    """Who holds a lease: this replica (host and port) and this process. Two live processes cannot
    listen on one host and port, so a control plane restarted in place releases the leases its dead
    predecessor held (``_release_stale``) and resumes at once; another replica waits for the lease to
    end. (A process that loses the race for the port may run one tick before it exits: steps are
    idempotent and move on by compare-and-set, so the worst is a call made twice, or failed and
    retried.)"""
    return f"{replica(ctx)}:{_PROCESS}"


_released: set[str] = set()


def _release_stale(ctx: Context) -> None:
    me = owner(ctx)
    if me in _released:
        return
    with ctx.store.write(serialize=False) as tx:
        n = tx.release_leases(replica(ctx) + ":", me)
    if n:
        log.info("released %d rotation lease(s) held by this replica's previous process", n)
    _released.add(me)


BACKOFF_MAX_S = 60.0
TEST_ATTEMPTS = 5
_NAME = re.compile(r"[a-z][a-z0-9_\-]{0,62}")


def _dump(cred: Credential) -> bytes:
    return json.dumps(cred, sort_keys=True, separators=(",", ":")).encode()


def _cred(ctx: Context, tx: Tx, secret: Secret, version: int | None) -> Credential | None:
    """A version's value as a credential (a JSON object), or None (no version, or not an object)."""
    if version is None:
        return None
    try:
        doc = json.loads(secret_ops.value_of(ctx, tx, secret, version))
    except (ApiError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


# -- rotators ------------------------------------------------------------------------------------
def _rotator_doc(r: Rotator) -> dict[str, Any]:
    return {
        "name": r.name,
        "type": r.type,
        "admin_secret": r.admin_secret,
        "config": r.config,
        "created_at": r.created_at,
    }


def create_rotator(
    ctx: Context,
    who: Principal,
    name: str,
    kind: str,
    admin_secret: str,
    config: dict[str, Any],
    admin_value: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Make (or replace) a rotator. Its admin credential is the secret ``admin_secret``, which belongs
    to no region: given ``admin_value`` it is stored there (a new version), else it must exist so."""
    who.require_global_admin()
    if not _NAME.fullmatch(name):
        raise bad_request("a rotator name: a lowercase letter, then letters, digits, '_' or '-' (at most 63)")
    secret_ops.check_name(admin_secret)
    if kind not in TYPES:
        raise bad_request(f"type: one of {', '.join(TYPES)}")
    try:
        config = driver(kind).validate(config)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    except RotatorError as exc:
        raise ApiError(501, "not_available", str(exc)) from None
    if admin_value is not None:
        _check_admin(kind, admin_value)
    ctx.barrier.require_unsealed()
    now = ctx.clock()
    with ctx.store.write() as tx:
        secret = tx.get_secret(admin_secret)
        if secret is not None and secret.deleted_at is None and not keyring.control_plane_only(secret):
            raise conflict(
                f"{admin_secret!r} has regions: an admin credential must belong to none (it would "
                "reach agents); give another name"
            )
        if admin_value is not None:
            if secret is None:
                secret = tx.insert_secret(admin_secret, (), now, tx.next_revision())
            elif secret.deleted_at is not None:
                raise conflict(f"{admin_secret!r} was deleted: give another name")
            secret_ops.add_version(ctx, tx, secret, _dump(admin_value), "put", "current", 0)
        elif secret is None or secret.deleted_at is not None:
            raise bad_request(f"no secret {admin_secret!r}: give the admin credential (admin_value)")
        rotator = Rotator(name, kind, admin_secret, config, now)
        tx.put_rotator(rotator)
        ctx.auditor.record(
            tx,
            who.actor,
            "rotator.create",
            name,
            type=kind,
            admin_secret=admin_secret,
            admin_value_given=admin_value is not None,
        )
    return _rotator_doc(rotator)


# The admin credential's fields, per type: (required, optional); each a string.
_ADMIN_FIELDS = {
    "postgres": ({"username", "password"}, set()),
    "mysql": ({"username", "password"}, set()),
    "redis": ({"password"}, {"username"}),
    "webhook": ({"token"}, set()),
}


def _check_admin(kind: str, value: dict[str, Any]) -> None:
    required, optional = _ADMIN_FIELDS[kind]
    if not required <= set(value) <= required | optional or not all(isinstance(v, str) for v in value.values()):
        fields = ", ".join(sorted(required)) + (f" (and optionally {', '.join(sorted(optional))})" if optional else "")
        raise bad_request(f"admin_value for {kind}: a JSON object of strings: {fields}")


def list_rotators(ctx: Context, who: Principal) -> dict[str, Any]:
    who.require_global("list")
    with ctx.store.read() as tx:
        return {"rotators": [_rotator_doc(r) for r in tx.list_rotators()]}


def delete_rotator(ctx: Context, who: Principal, name: str) -> dict[str, Any]:
    who.require_global_admin()
    with ctx.store.write() as tx:
        if tx.get_rotator(name) is None:
            raise not_found(f"no rotator {name!r}")
        bound = tx.secret_names_with_rotator(name)
        if bound:
            raise conflict(f"rotator {name!r} keeps {bound[0]!r}: delete that secret first")
        tx.delete_rotator(name)
        ctx.auditor.record(tx, who.actor, "rotator.delete", name)
    return {"name": name, "deleted": True}


# -- starting a rotation ------------------------------------------------------------------------
def rotate(
    ctx: Context,
    who: Principal,
    name: str,
    value: bytes | None,
    generate: str | None = None,
    grace_s: int | None = None,
    stage: str = "current",
) -> dict[str, Any]:
    """``rotate NAME``: a secret kept by a rotator starts a rotation at the source; any other gets a new
    version (``ops.secrets.rotate``)."""
    secret_ops.check_name(name)
    with ctx.store.read() as tx:
        secret = tx.get_secret(name)
    if secret is None or secret.deleted_at is not None or not secret.rotator:
        return secret_ops.rotate(ctx, who, name, value, generate, grace_s, stage)
    who.require("write", name)
    if value is not None or generate is not None or stage != "current" or grace_s is not None:
        raise conflict(
            f"{name!r} is kept by rotator {secret.rotator!r}: `rotate {name}` (no value, no "
            "stage, no grace: set --grace with put) runs it at the source"
        )
    out = start(ctx, who, name)
    assert out is not None
    return out


def start(
    ctx: Context,
    who: Principal,
    name: str,
    origin: str = "operator",
    claim: tuple[int, float, float] | None = None,
) -> dict[str, Any] | None:
    """Begin a rotation (step ``create``), in one transaction with, for credentials made here, the new
    credential sealed as the ``pending`` version. The scheduler's start passes its ``claim`` (secret id,
    due at, next due at): only the replica that wins it starts, and a secret mid-rotation is skipped."""
    who.require("write", name)
    ctx.barrier.require_unsealed()
    now = ctx.clock()
    with ctx.store.write() as tx:
        if claim is not None and not tx.claim_rotation(*claim):
            return None
        secret = secret_ops.live(tx, name)
        if not secret.rotator:
            raise bad_request(f"{name!r} has no rotator: put it with --rotator NAME")
        running = [r for r in tx.rotations_of(name, 1) if r.active]
        if running:
            if claim is not None:
                return None  # the claim moved the schedule on; this rotation is still running
            raise conflict(
                f"rotation {running[0].id} of {name!r} is at step {running[0].step}: "
                f"see `vault-edge rotation status {name}`"
            )
        rotator = tx.get_rotator(secret.rotator)
        if rotator is None:
            raise conflict(f"{name!r} names rotator {secret.rotator!r}, which no longer exists")
        drv = _driver(rotator)
        stages = tx.get_stages(secret.id)
        previous = stages["current"].version if "current" in stages else None
        rotation = tx.insert_rotation(name, rotator.name, now, origin)
        new = drv.plan(rotator.config, _cred(ctx, tx, secret, previous))
        fields: dict[str, Any] = {"previous_version": previous}
        if new is not None:
            fields["version"], _ = secret_ops.add_version(ctx, tx, secret, _dump(new), "rotation", "pending", 0)
        moved = tx.update_rotation(rotation, "create", **fields)
        assert moved is not None
        ctx.auditor.record(
            tx,
            who.actor,
            "rotation.start",
            name,
            rotation=rotation.id,
            rotator=rotator.name,
            type=rotator.type,
            version=moved.version,
            previous_version=previous,
            origin=origin,
        )
    return {"name": name, **_doc(moved, None, now)}


def _driver(rotator: Rotator) -> Driver:
    try:
        return driver(rotator.type)
    except RotatorError as exc:
        raise ApiError(501, "not_available", str(exc)) from None


# -- running the steps --------------------------------------------------------------------------
@dataclass
class _Inputs:
    rotator: Rotator
    driver: Driver
    admin: Credential
    new: Credential | None
    old: Credential | None
    current: Credential | None = None  # what the secret's current stage holds now (never retired)


def _admin(ctx: Context, tx: Tx, rotator: Rotator) -> Credential:
    secret = tx.get_secret(rotator.admin_secret)
    if secret is None or secret.deleted_at is not None:
        raise RotatorError(f"the admin secret {rotator.admin_secret!r} is gone")
    if not keyring.control_plane_only(secret):  # a rotator never logs in with a credential agents hold
        raise RotatorError(f"the admin secret {rotator.admin_secret!r} has regions: refused")
    stages = tx.get_stages(secret.id)
    cred = _cred(ctx, tx, secret, stages["current"].version if "current" in stages else None)
    if cred is None:
        raise RotatorError(f"the admin secret {rotator.admin_secret!r} is not a JSON object")
    return cred


def _inputs(ctx: Context, tx: Tx, r: Rotation) -> _Inputs:
    rotator = tx.get_rotator(r.rotator)
    if rotator is None:
        raise RotatorError(f"rotator {r.rotator!r} no longer exists")
    secret = tx.get_secret(r.secret)
    if secret is None or secret.deleted_at is not None:
        raise _Gone(f"the secret {r.secret!r} was deleted")
    current = tx.get_stages(secret.id).get("current")
    return _Inputs(
        rotator,
        driver(rotator.type),
        _admin(ctx, tx, rotator),
        _cred(ctx, tx, secret, r.version),
        _cred(ctx, tx, secret, r.previous_version),
        _cred(ctx, tx, secret, current.version) if current is not None else None,
    )


class _Gone(Exception):
    """The rotation's secret was deleted under it: the rotation ends (aborted)."""


def gate(ctx: Context, tx: Tx, r: Rotation, now: float) -> dict[str, Any]:
    """Whether retire may run: every live node of the secret's regions has applied the publish
    revision and the grace has passed. ``waiting``: live nodes still behind; ``down``: nodes behind
    but silent longer than the down-after threshold, which do not block."""
    secret = tx.get_secret(r.secret)
    waiting: list[str] = []
    down: list[str] = []
    if secret is not None and r.published_rev is not None:
        for n in tx.nodes_in_regions(keyring.effective_regions(tx, secret)):
            if n.status != "active" or n.applied_revision >= r.published_rev:
                continue
            silent = n.last_seen is None or now - n.last_seen > ctx.settings.node_down_after_s
            (down if silent else waiting).append(n.id)
    grace_until = r.retire_after or 0.0
    return {"waiting": waiting, "down": down, "grace_until": grace_until, "ready": not waiting and now >= grace_until}


def advance(ctx: Context, rotation_id: int, max_steps: int = 8) -> str | None:
    """Run the rotation's steps as far as they go now; the step it is at afterwards."""
    step = None
    for _ in range(max_steps):
        moved, step = _step(ctx, rotation_id)
        if not moved:
            break
    return step


def _step(ctx: Context, rotation_id: int) -> tuple[bool, str | None]:
    now = ctx.clock()
    gated: dict[str, Any] | None = None
    with ctx.store.read() as tx:  # a retire waiting on the fleet or the grace costs only a read
        r = tx.get_rotation(rotation_id)
        if r is None or not r.active:
            return False, r.step if r else None
        if r.step == "retire":
            gated = gate(ctx, tx, r, now)
            report = {k: gated[k] for k in ("waiting", "down", "grace_until")}
            if not gated["ready"] and r.waiting_for == report:
                return False, r.step
    with ctx.store.write() as tx:
        if gated is not None and not gated["ready"]:
            tx.note_rotation(r.id, waiting_for=report)
            return False, r.step
        if not tx.lease_rotation(r.id, r.step, owner(ctx), now, now + LEASE_S):
            return False, r.step
        gone = None
        try:
            inputs = _inputs(ctx, tx, r) if r.step != "publish" else None
        except _Gone as exc:  # nothing left to rotate: it ends, said so (it was retried for ever)
            inputs, failure, gone = None, None, str(exc)
        except (RotatorError, ApiError) as exc:  # retried, reported
            inputs, failure = None, f"{r.step}: {exc}"
        else:
            failure = None
    if gone is not None:
        _abort(ctx, r, None, gone)
        return False, "aborted"
    if failure is not None:
        _failed(ctx, r, failure)
        return False, r.step
    try:
        made = _act(r, inputs)
    except Refused as exc:
        if r.step == "test":
            _abort(ctx, r, inputs, str(exc))
            return False, "aborted"
        _failed(ctx, r, str(exc))
        return False, r.step
    except RotatorError as exc:
        _failed(ctx, r, str(exc))
        return False, r.step
    except Exception as exc:  # a driver's own exception: its text may quote a value, so only its type
        log.error("rotation %d of %s: step %s raised %s", r.id, r.secret, r.step, type(exc).__name__)
        _failed(ctx, r, f"{r.step}: unexpected {type(exc).__name__}")
        return False, r.step
    return _finish(ctx, r, made, gated)


def _act(r: Rotation, inp: _Inputs | None) -> Credential | None:
    """The step's outside call (none for publish)."""
    if inp is None:
        return None
    config = inp.rotator.config
    if r.step == "create":
        return inp.driver.create(config, inp.admin, inp.new, f"vault-edge-rotation-{r.id}-{r.started_at!r}")
    if r.step == "test":
        if inp.new is None:
            raise Refused("the new credential is not a JSON object")
        inp.driver.test(config, inp.new)
    elif r.step == "retire" and inp.driver.overlaps(config):
        # the credential current *now* is the one never retired (the drivers refuse to), whatever the
        # rotation began with: a rollback meanwhile, or a late call from a replica whose lease ended
        inp.driver.retire(config, inp.admin, inp.old or {}, inp.current or inp.new)
    return None


def _finish(ctx: Context, r: Rotation, made: Credential | None, gated: dict[str, Any] | None) -> tuple[bool, str]:
    now = ctx.clock()
    with ctx.store.write() as tx:
        cur = tx.get_rotation(r.id)
        if cur is None or cur.step != r.step:
            return False, cur.step if cur else r.step
        detail: dict[str, Any] = {"rotation": r.id, "version": cur.version}
        if r.step == "create":
            fields: dict[str, Any] = {"step": "test", "since": now}
            if cur.version is None:  # the source made it (webhook): sealed now, as pending
                assert made is not None
                secret = secret_ops.live(tx, r.secret)
                fields["version"], _ = secret_ops.add_version(ctx, tx, secret, _dump(made), "rotation", "pending", 0)
                detail["version"] = fields["version"]
        elif r.step == "test":
            fields = {"step": "publish", "since": now}
        elif r.step == "publish":
            secret = secret_ops.live(tx, r.secret)
            pending = tx.get_stages(secret.id).get("pending")
            if pending is None or pending.version != cur.version:
                reason = "the pending version changed under the rotation"
                tx.update_rotation(cur, r.step, step="aborted", since=now)
                ctx.auditor.record(
                    tx, "rotation", "rotation.abort", r.secret, outcome="failed", reason=reason, **detail
                )
                return False, "aborted"
            version, rev, _ = secret_ops.promote_in(ctx, tx, secret)
            grace = secret_ops.grace_of(ctx, secret, None)
            fields = {
                "step": "retire",
                "since": now,
                "version": version,
                "published_rev": rev,
                "retire_after": now + grace,
            }
            detail.update(version=version, revision=rev, grace_s=grace)
        else:  # retire
            fields = {"step": "done", "since": now}
            detail.update(
                previous_version=cur.previous_version, down=(gated or {}).get("down", []), retired=_overlaps(tx, cur)
            )
        moved = tx.update_rotation(cur, r.step, **fields)
        if moved is None:
            return False, r.step
        ctx.auditor.record(tx, "rotation", f"rotation.{r.step}", r.secret, **detail)
    return True, moved.step


def _overlaps(tx: Tx, r: Rotation) -> bool:
    rotator = tx.get_rotator(r.rotator)
    try:
        return rotator is not None and driver(rotator.type).overlaps(rotator.config)
    except RotatorError:
        return False


def _failed(ctx: Context, r: Rotation, message: str) -> None:
    now = ctx.clock()
    log.warning("rotation %d of %s: step %s failed: %s", r.id, r.secret, r.step, message)
    with ctx.store.write() as tx:  # serialized: the step read is the step written against
        cur = tx.get_rotation(r.id)
        if cur is None or cur.step != r.step:
            return
        if cur.lease_owner is not None and cur.lease_owner != owner(ctx):
            return  # another replica took the step over (our lease ended): its attempt, not ours, counts
        attempts = cur.attempts + 1
        if r.step != "test" or attempts < TEST_ATTEMPTS:
            tx.note_rotation(
                r.id,
                attempts=attempts,
                next_try_at=now + min(BACKOFF_MAX_S, 2.0 ** min(attempts, 6)),
                last_error=message[:500],
                lease_owner=None,
                lease_until=None,
            )
            if attempts == 1:  # the first failure of each step is audited; status tells the rest
                ctx.auditor.record(
                    tx,
                    "rotation",
                    "rotation.step_failed",
                    r.secret,
                    outcome="failed",
                    rotation=r.id,
                    step=r.step,
                    error=message[:500],
                )
            return
    _abort(ctx, r, None, f"test failed {attempts} times: {message}")


def _abort(ctx: Context, r: Rotation, inp: _Inputs | None, reason: str) -> None:
    """The new credential failed its test: undo it at the source (best effort), drop ``pending``; the
    current credential never moved."""
    cleanup = "none"
    try:
        if inp is None:
            with ctx.store.read() as tx:
                inp = _inputs(ctx, tx, r)
        if inp.new is not None and inp.driver.overlaps(inp.rotator.config):
            inp.driver.retire(inp.rotator.config, inp.admin, inp.new, inp.current or inp.old)
            cleanup = "undone"
        elif inp.new is not None and inp.old is not None and r.step != "create":
            # one credential (``single``): create changed it at the source already; put the one still
            # current back, or every node would serve a password the source refuses
            inp.driver.create(inp.rotator.config, inp.admin, inp.old, f"vault-edge-rotation-{r.id}-restore")
            cleanup = "restored"
    except _Gone:
        cleanup = "none (the secret was deleted)"
    except Exception as exc:  # best effort; the type only (a driver's text may quote a value)
        cleanup = f"failed ({type(exc).__name__})"
    now = ctx.clock()
    with ctx.store.write() as tx:
        cur = tx.get_rotation(r.id)
        if cur is None or cur.step != r.step:
            return
        secret = tx.get_secret(r.secret)
        if secret is not None and cur.version is not None:
            pending = tx.get_stages(secret.id).get("pending")
            if pending is not None and pending.version == cur.version:
                rev = tx.next_revision()
                tx.set_stage(secret.id, "pending", None, rev, now)
                tx.touch_regions(keyring.effective_regions(tx, secret), rev)
        tx.update_rotation(cur, r.step, step="aborted", since=now)
        ctx.auditor.record(
            tx,
            "rotation",
            "rotation.abort",
            r.secret,
            outcome="failed",
            rotation=r.id,
            step=r.step,
            version=cur.version,
            reason=reason[:500],
            cleanup=cleanup,
        )


def run_active(ctx: Context) -> int:
    """The scheduler's pass: advance every active rotation as far as it goes now."""
    with ctx.store.read() as tx:
        active = tx.active_rotations()
    if active:
        _release_stale(ctx)
    moved = 0
    for r in active:
        try:
            step = advance(ctx, r.id)
            moved += step != r.step
        except Exception as exc:  # one rotation's failure must not stop the others
            log.error("rotation %d of %s: %s", r.id, r.secret, type(exc).__name__)
    return moved


# -- status --------------------------------------------------------------------------------------
def _doc(r: Rotation, gated: dict[str, Any] | None, now: float) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "rotation": r.id,
        "step": r.step,
        "since": r.since,
        "started_at": r.started_at,
        "origin": r.origin,
        "version": r.version,
        "previous_version": r.previous_version,
        "published_revision": r.published_rev,
        "retire_after": r.retire_after,
        "attempts": r.attempts,
        "next_try_at": r.next_try_at,
        "last_error": r.last_error,
    }
    if r.step == "retire":
        g = gated or r.waiting_for or {}
        doc["waiting_for"] = g.get("waiting", [])
        doc["down"] = g.get("down", [])
        doc["two_live_past_grace"] = r.retire_after is not None and now > r.retire_after + LEASE_S
    return doc


def status(ctx: Context, who: Principal, name: str, limit: int = 10) -> dict[str, Any]:
    """``rotation status NAME``: the rotator, the schedule, and the last rotations (step, since when,
    which nodes a retire waits for and which it counts down)."""
    secret_ops.check_name(name)
    who.require("list", name)
    if not 1 <= limit <= 100:
        raise bad_request("limit: 1 to 100")
    now = ctx.clock()
    with ctx.store.read() as tx:
        secret = secret_ops.live(tx, name)
        if not secret.rotator:
            raise not_found(f"{name!r} has no rotator")
        rotator = tx.get_rotator(secret.rotator)
        rows = tx.rotations_of(name, limit)
        gates = {r.id: gate(ctx, tx, r, now) for r in rows if r.step == "retire"}
    return {
        "name": name,
        "rotator": None
        if rotator is None
        else {
            "name": rotator.name,
            "type": rotator.type,
            "strategy": rotator.config.get("strategy"),
        },
        "rotate_every_s": secret.rotate_every_s,
        "next_rotation_at": secret.next_rotation_at,
        "rotations": [_doc(r, gates.get(r.id), now) for r in rows],
    }


def check_rotator_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise not_found(f"no rotator {name!r}")
    return name
