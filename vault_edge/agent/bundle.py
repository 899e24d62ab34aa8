"""Verify and open a sync answer (protocol 2, ``wire/sync.py``) into a :class:`View`. Pure: bytes and
keys in, a view out.

An answer is refused whole (``BundleError``), leaving the agent's view as it was, when: the control
plane's signature over its envelope does not verify, or the body is not the one the envelope's
digest names; it names another node; it does not echo this request's nonce (a replayed answer); its
revision is older than the one held; a delta was made for another revision than the one held (a
gap, or a delta replayed onto another state) or arrives with nothing held; or any grant, data key
or value fails to open (tampered or moved). A secret whose current version in the answer is older
than the one held (a rollback: a database restored from an old copy, or rows copied back) is
refused alone: the agent keeps serving what it holds of that secret, and takes the rest of the
answer (``Opened.refused`` names it), so one rolled-back secret never stops every other secret's
changes.

A full answer replaces the view; a delta replaces, for each name it lists, every version held with
the versions it brings (none: the secret left the region), and keeps the rest as held. Egress routes
likewise: a full answer's list (none when absent) replaces the held one, a delta's only when it
carries one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from vault_edge import wire
from vault_edge.agent.identity import Identity
from vault_edge.agent.view import Entry, View
from vault_edge.crypto import envelope, signing
from vault_edge.crypto.errors import DecryptionError
from vault_edge.wire import sync as wsync

MAX_BUNDLE = 64 << 20


class BundleError(Exception):
    """A sync answer refused; the message is safe to log (no values)."""


@dataclass(frozen=True)
class Piece:
    """An answer as received, for the disk cache: its envelope, the signature over it, its body."""

    envelope: bytes
    signature: str
    body: bytes


@dataclass(frozen=True)
class Opened:
    kind: str  # "full", "delta" or "unchanged"
    revision: int
    view: View | None  # None for "unchanged"
    issued_at: int
    refused: tuple[str, ...] = ()  # secrets the answer would have rolled back: kept as held, or not served
    floor: dict[str, int] = field(default_factory=dict)  # the highest current version of each name, ever
    piece: Piece | None = None  # the answer as received (None for "unchanged")


class GrantCache:
    """Opened grants, keyed by their sealed bytes: a grant opens once, not on every sync."""

    def __init__(self) -> None:
        self._keys: dict[bytes, bytes] = {}

    def open(self, identity: Identity, node: str, region: str, kv: int, sealed: bytes) -> bytes:
        key = self._keys.get(sealed)
        if key is None:
            key = signing.open_grant(identity.keys.box_private.reveal(), sealed, node, region, kv)
            if len(self._keys) > 64:
                self._keys.clear()
            self._keys[sealed] = key
        return key


def open_answer(
    identity: Identity,
    raw: bytes,
    signature_b64: str | None,
    *,
    nonce: str | None,
    held: View,
    grants: GrantCache | None = None,
    floor: Mapping[str, int] | None = None,
) -> Opened:
    """Verify, check freshness against ``nonce`` (None when loading the disk cache) and ``held``
    (anti-rollback, and the revision a delta applies to), and decrypt what is new. Nothing is
    installed here.

    ``floor`` is the highest current version of each name this agent ever installed (kept with its
    disk cache, so it survives restarts): a current version below it is a rollback even when nothing
    of that name is held any more (after a restart from a cache that holds the rolled-back answer)."""
    enrolment = identity.enrolment
    if enrolment is None:
        raise BundleError("not enrolled")
    if len(raw) > MAX_BUNDLE:
        raise BundleError("sync answer too large")
    try:
        env_raw, body = wsync.split(raw)
        signature = wire.b64d(signature_b64 or "", max_len=128)
    except wire.WireError:
        raise BundleError("sync answer without its envelope or a valid signature header") from None
    if not signing.verify(enrolment.server_key, wsync.signed_message(env_raw), signature):
        raise BundleError("bad control-plane signature on the sync answer")
    try:
        env = wsync.Envelope.decode(env_raw)
    except wire.WireError as exc:
        raise BundleError(f"malformed sync envelope ({exc})") from None
    node, region = enrolment.node, enrolment.region
    if env.node != node:
        raise BundleError("sync answer made for another node")
    if nonce is not None and env.nonce != nonce:
        raise BundleError("sync answer does not match this request (replayed?)")
    if env.revision < held.revision:
        raise BundleError(f"sync answer at revision {env.revision} is older than the held {held.revision} (rollback)")
    if env.kind == wsync.UNCHANGED:
        return Opened(env.kind, env.revision, None, env.issued_at)
    if env.region != region:
        raise BundleError("sync answer for another region")
    if wsync.digest(body) != env.body_sha256:
        raise BundleError("the sync answer's body is not the one its envelope was signed for")
    try:
        shared = wsync.RegionBody.decode(body, MAX_BUNDLE)
    except wire.WireError as exc:
        raise BundleError(f"malformed sync body ({exc})") from None
    if shared.kind != env.kind or shared.region != region or shared.revision > env.revision:
        raise BundleError("the sync answer's body does not match its envelope")
    if env.kind == wsync.DELTA:
        if held.revision == 0 or env.since != held.revision:
            raise BundleError(
                f"a delta from revision {env.since} does not apply to the held {held.revision} "
                "(a gap, or replayed onto another state)"
            )
        if shared.base > held.revision:
            raise BundleError(f"a delta from revision {shared.base} skips changes after the held {held.revision}")
    grants = grants or GrantCache()
    try:
        region_keys = {
            g.key_version: grants.open(identity, node, region, g.key_version, g.sealed)
            for g in env.grants
            if g.region == region
        }
        entries = []
        for s in shared.secrets:
            if s.key_version not in region_keys:
                raise BundleError(f"no grant for region key version {s.key_version}")
            dek = envelope.unwrap_data_key(
                region_keys[s.key_version], s.name, s.version, region, s.key_version, s.wrapped_dek
            )
            value = envelope.decrypt_value(dek, s.name, s.version, s.ciphertext)
            entries.append(Entry(s.name, s.version, s.stage, value, s.expires_at))
    except DecryptionError:
        raise BundleError("a grant, data key or value in the sync answer did not open (tampered or moved)") from None
    highest = dict(floor or {})
    for name, version in held.current_versions().items():
        highest[name] = max(highest.get(name, 0), version)
    rolled_back = sorted({e.name for e in entries if e.stage == "current" and e.version < highest.get(e.name, 0)})
    keep = set(rolled_back)  # that secret keeps what is held of it (or, with nothing held, is not served)
    if env.kind == wsync.DELTA:  # everything the delta does not name stays as held
        keep |= {e.name for e in held.by_stage.values()} - set(shared.names)
    entries = [e for e in entries if e.name not in keep]
    entries += [e for e in held.by_stage.values() if e.name in keep]
    egress = shared.egress if shared.egress is not None else held.egress if env.kind == wsync.DELTA else ()
    view = View(node, region, env.revision, entries, egress)
    for name, version in view.current_versions().items():
        highest[name] = max(highest.get(name, 0), version)
    return Opened(
        env.kind,
        env.revision,
        view,
        env.issued_at,
        tuple(rolled_back),
        highest,
        Piece(env_raw, signature_b64 or "", body),
    )
