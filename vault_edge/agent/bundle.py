"""Verify and open a sync answer into a :class:`View`. Pure: bytes and keys in, a view out.

A bundle is refused whole (``BundleError``), leaving the agent's view as it was, when: the control
plane's signature does not verify; it names another node; it does not echo this request's nonce (a
replayed answer); its revision is older than the one held; or any grant, data key or value fails to
open (tampered or moved). A secret whose current version in the answer is older than the one held
(a rollback: a database restored from an old copy, or rows copied back) is refused alone: the agent
keeps serving what it holds of that secret, and takes the rest of the answer (``Opened.refused``
names it), so one rolled-back secret never stops every other secret's changes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vault_edge import wire
from vault_edge.agent.identity import Identity
from vault_edge.agent.view import Entry, View
from vault_edge.crypto import envelope, signing
from vault_edge.crypto.errors import DecryptionError

MAX_BUNDLE = 64 << 20


class BundleError(Exception):
    """A sync answer refused; the message is safe to log (no values)."""


@dataclass(frozen=True)
class Opened:
    kind: str  # "sync" or "unchanged"
    revision: int
    view: View | None  # None for "unchanged"
    issued_at: int
    refused: tuple[str, ...] = ()  # secrets the answer would have rolled back: kept as held, or not served
    floor: dict[str, int] = field(default_factory=dict)  # the highest current version of each name, ever


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


def verify(identity: Identity, body: bytes, signature_b64: str | None) -> dict[str, Any]:
    """The parsed body, if the control plane signed it for this node; else BundleError."""
    enrolment = identity.enrolment
    if enrolment is None:
        raise BundleError("not enrolled")
    if len(body) > MAX_BUNDLE:
        raise BundleError("sync answer too large")
    try:
        signature = wire.b64d(signature_b64 or "", max_len=128)
    except wire.WireError:
        raise BundleError("sync answer without a valid signature header") from None
    if not signing.verify(enrolment.server_key, wire.response_message("sync", body), signature):
        raise BundleError("bad control-plane signature on the sync answer")
    try:
        doc = json.loads(body)
    except ValueError:
        raise BundleError("sync answer is not JSON") from None
    if not isinstance(doc, dict) or doc.get("v") != wire.PROTOCOL_VERSION:
        raise BundleError("unknown sync protocol version")
    if doc.get("node") != enrolment.node:
        raise BundleError("sync answer made for another node")
    return doc


def open_bundle(
    identity: Identity, body: bytes, signature_b64: str | None, *, nonce: str | None, held: View,
    grants: GrantCache | None = None, floor: Mapping[str, int] | None = None,
) -> Opened:
    """Verify, check freshness against ``nonce`` (None when loading the disk cache) and ``held``
    (anti-rollback), and decrypt everything. Nothing is installed here.

    ``floor`` is the highest current version of each name this agent ever installed (kept in its disk
    cache, so it survives restarts): a current version below it is a rollback even when nothing of
    that name is held any more (after a restart from a cache that holds the rolled-back answer)."""
    doc = verify(identity, body, signature_b64)
    assert identity.enrolment is not None
    node, region = identity.enrolment.node, identity.enrolment.region
    if nonce is not None and doc.get("nonce") != nonce:
        raise BundleError("sync answer does not match this request (replayed?)")
    revision = doc.get("revision")
    if not isinstance(revision, int) or revision < 0:
        raise BundleError("sync answer without a revision")
    if revision < held.revision:
        raise BundleError(f"sync answer at revision {revision} is older than the held {held.revision} (rollback)")
    kind = doc.get("kind")
    issued_at = int(doc.get("issued_at") or 0)
    if kind == "unchanged":
        return Opened("unchanged", revision, None, issued_at)
    if kind != "sync" or doc.get("region") != region:
        raise BundleError("sync answer for another region")
    grants = grants or GrantCache()
    try:
        region_keys = {
            int(g["kv"]): grants.open(identity, node, region, int(g["kv"]), wire.b64d(g["box"]))
            for g in doc["grants"] if g.get("region") == region
        }
        entries = []
        for s in doc["secrets"]:
            name, version, kv = str(s["name"]), int(s["version"]), int(s["kv"])
            if kv not in region_keys:
                raise BundleError(f"no grant for region key version {kv}")
            dek = envelope.unwrap_data_key(region_keys[kv], name, version, region, kv, wire.b64d(s["dek"]))
            value = envelope.decrypt_value(dek, name, version, wire.b64d(s["ct"]))
            exp = s.get("expires_at")
            entries.append(Entry(name, version, str(s["stage"]), value, float(exp) if exp is not None else None))
    except DecryptionError:
        raise BundleError("a grant, data key or value in the sync answer did not open (tampered or moved)") from None
    except (KeyError, TypeError, ValueError, wire.WireError):
        raise BundleError("malformed sync answer") from None
    highest = dict(floor or {})
    for name, version in held.current_versions().items():
        highest[name] = max(highest.get(name, 0), version)
    rolled_back = sorted({
        e.name for e in entries if e.stage == "current" and e.version < highest.get(e.name, 0)
    })
    if rolled_back:  # that secret keeps what is held of it (or, with nothing held, is not served)
        keep = set(rolled_back)
        entries = [e for e in entries if e.name not in keep]
        entries += [e for e in held.by_stage.values() if e.name in keep]
    view = View(node, region, revision, entries)
    for name, version in view.current_versions().items():
        highest[name] = max(highest.get(name, 0), version)
    return Opened("sync", revision, view, issued_at, tuple(rolled_back), highest)
