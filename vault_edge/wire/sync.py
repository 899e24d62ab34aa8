"""The sync protocol, version 2: what a node's signed long-poll gets back. Pure: bytes in, bytes out.

An answer is two JSON documents on one body, the envelope, a newline, then the region body::

    ENVELOPE LF BODY

* The **region body** (:class:`RegionBody`) is the same for every node of a region at a revision: a
  ``full`` body holds every staged version of the region's secrets (ciphertext, data key wrapped
  under a region key); a ``delta`` body holds, for every secret changed after its ``base`` revision,
  all its staged versions now (a name listed in ``names`` with no version left is gone from the
  region). The control plane encodes it once per region and revision and shares it among nodes.
* The **envelope** (:class:`Envelope`) is per node and per request, and small: the node, the
  request's nonce, the revision the node had (``since``) and the one it reaches, the node's grants
  (its region keys, sealed to its X25519 key), and the SHA-256 of the body. It alone is signed, with
  the control plane's Ed25519 key, over ``"vault-edge/v1/sync/2" LF ENVELOPE``; the digest extends
  the signature to the body. So an answer cannot be moved to another node (``node``) or request
  (``nonce``), and a delta cannot be applied on top of any state but the one it was made for
  (``since`` must be the revision the node holds; ``base <= since``).

Egress routes (``wire/egress.py``) ride in the region body, under the same digest and signature: a
``full`` body lists the region's routes under ``egress`` (absent: none); a ``delta`` body carries
``egress``, the region's whole list of routes now, only when it changed after ``base`` (absent: as
held). Bodies without routes are byte for byte what they were before routes existed, and agents that
know nothing of routes ignore the key. A route this agent cannot parse (made by a newer control
plane) is left out: its calls are refused, the rest of the answer applies.

``unchanged`` answers are an envelope alone (``since == revision``), still signed: silence from an
impostor is never mistaken for contact.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from vault_edge.wire import STAGES, WireError, b64d, b64e, response_message, valid_name, valid_node_id, valid_region
from vault_edge.wire import egress as wegress

PROTOCOL: Final = 2
FULL: Final = "full"
DELTA: Final = "delta"
UNCHANGED: Final = "unchanged"
SIGNED_KIND: Final = "sync/2"  # what the envelope's signature is domain-separated by
MAX_ENVELOPE: Final = 64 * 1024
MAX_CIPHERTEXT: Final = 2 << 20  # base64 characters of one value's ciphertext (values are ≤ 1 MiB)
MAX_ROUTES: Final = 1024  # egress routes in one region body


@dataclass(frozen=True, slots=True)
class Grant:
    """A region key version, sealed to one node's X25519 key (``crypto.signing.seal_grant``)."""

    region: str
    key_version: int
    sealed: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {"region": self.region, "kv": self.key_version, "box": b64e(self.sealed)}

    @staticmethod
    def from_json(doc: Any) -> Grant:
        d = _obj(doc, "grant")
        return Grant(_region(d.get("region")), _int(d.get("kv"), "kv"), b64d(_str(d.get("box"), "box"), max_len=512))


@dataclass(frozen=True, slots=True)
class SealedVersion:
    """One staged version of a secret as a region's nodes get it: opened only with a grant."""

    name: str
    version: int
    stage: str
    key_version: int
    wrapped_dek: bytes = b""
    ciphertext: bytes = b""
    created_at: float = 0.0
    expires_at: float | None = None  # the end of a `previous` version's grace

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "stage": self.stage,
            "kv": self.key_version,
            "dek": b64e(self.wrapped_dek),
            "ct": b64e(self.ciphertext),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }

    @staticmethod
    def from_json(doc: Any) -> SealedVersion:
        d = _obj(doc, "secret")
        name, stage = d.get("name"), d.get("stage")
        if not valid_name(name):
            raise WireError("a secret with an invalid name")
        if stage not in STAGES or not isinstance(stage, str):
            raise WireError("a secret with an unknown stage")
        expires = d.get("expires_at")
        return SealedVersion(
            name,
            _int(d.get("version"), "version"),
            stage,
            _int(d.get("kv"), "kv"),
            b64d(_str(d.get("dek"), "dek"), max_len=1024),
            b64d(_str(d.get("ct"), "ct"), max_len=MAX_CIPHERTEXT),
            _num(d.get("created_at"), "created_at"),
            None if expires is None else _num(expires, "expires_at"),
        )


@dataclass(frozen=True, slots=True)
class RegionBody:
    """What a region's nodes are sent, shared by all of them: see the module docstring."""

    kind: str  # FULL or DELTA
    region: str
    base: int  # DELTA: applies on top of any revision in [base, revision); FULL: 0
    revision: int  # the region's data revision the body brings a node to
    names: tuple[str, ...]  # DELTA: every name changed after base; FULL: ()
    secrets: tuple[SealedVersion, ...]
    egress: tuple[wegress.Route, ...] | None = None  # the region's routes; None: none (FULL), as held (DELTA)

    def encode(self) -> bytes:
        doc = {
            "v": PROTOCOL,
            "kind": self.kind,
            "region": self.region,
            "base": self.base,
            "revision": self.revision,
            "names": list(self.names),
            "secrets": [s.to_json() for s in self.secrets],
        }
        if self.egress is not None:
            doc["egress"] = [r.to_json() for r in self.egress]
        return _dumps(doc)

    @staticmethod
    def decode(raw: bytes, limit: int) -> RegionBody:
        d = _load(raw, limit, "region body")
        kind = d.get("kind")
        if kind not in (FULL, DELTA) or not isinstance(kind, str):
            raise WireError("a region body of an unknown kind")
        names = d.get("names")
        if not isinstance(names, list) or not all(valid_name(n) for n in names):
            raise WireError("a region body with invalid names")
        secrets = d.get("secrets")
        if not isinstance(secrets, list):
            raise WireError("a region body without secrets")
        body = RegionBody(
            kind,
            _region(d.get("region")),
            _int(d.get("base"), "base"),
            _int(d.get("revision"), "revision"),
            tuple(names),
            tuple(SealedVersion.from_json(s) for s in secrets),
            _routes(d.get("egress")),
        )
        if body.base > body.revision:
            raise WireError("a region body whose base is after its revision")
        if kind == DELTA and not {s.name for s in body.secrets} <= set(body.names):
            raise WireError("a delta with a secret it does not name")
        return body


@dataclass(frozen=True, slots=True)
class Envelope:
    """The signed, per-node part of an answer: see the module docstring."""

    kind: str  # FULL, DELTA or UNCHANGED
    node: str
    nonce: str
    issued_at: int
    region: str  # "" in an UNCHANGED answer made without the region's view (a hold that timed out)
    since: int  # the revision the node said it holds (the request's ``since``)
    revision: int  # the revision the node holds once it applied the answer
    body_sha256: bytes = b""  # the digest of the region body (empty for UNCHANGED)
    grants: tuple[Grant, ...] = ()

    def encode(self) -> bytes:
        return _dumps(
            {
                "v": PROTOCOL,
                "kind": self.kind,
                "node": self.node,
                "nonce": self.nonce,
                "issued_at": self.issued_at,
                "region": self.region,
                "since": self.since,
                "revision": self.revision,
                "body": b64e(self.body_sha256),
                "grants": [g.to_json() for g in self.grants],
            }
        )

    @staticmethod
    def decode(raw: bytes) -> Envelope:
        d = _load(raw, MAX_ENVELOPE, "envelope")
        kind, node, grants = d.get("kind"), d.get("node"), d.get("grants")
        if kind not in (FULL, DELTA, UNCHANGED) or not isinstance(kind, str):
            raise WireError("an envelope of an unknown kind")
        if not valid_node_id(node):
            raise WireError("an envelope without a valid node")
        if not isinstance(grants, list) or len(grants) > 64:
            raise WireError("an envelope with invalid grants")
        region = "" if kind == UNCHANGED and d.get("region") == "" else _region(d.get("region"))
        env = Envelope(
            kind,
            node,
            _str(d.get("nonce"), "nonce"),
            _int(d.get("issued_at"), "issued_at"),
            region,
            _int(d.get("since"), "since"),
            _int(d.get("revision"), "revision"),
            b64d(_str(d.get("body"), "body"), max_len=64),
            tuple(Grant.from_json(g) for g in grants),
        )
        if env.revision < env.since and kind != FULL:
            raise WireError("an envelope whose revision is before its since")
        if kind != UNCHANGED and len(env.body_sha256) != 32:
            raise WireError("an envelope without its body's digest")
        return env


def _routes(doc: Any) -> tuple[wegress.Route, ...] | None:
    if doc is None:
        return None
    if not isinstance(doc, list) or len(doc) > MAX_ROUTES:
        raise WireError("a region body with invalid egress routes")
    routes = []
    for r in doc:
        try:
            routes.append(wegress.route_from_json(r).route)
        except WireError:
            continue  # a route this agent cannot use is refused when called, never applied half-understood
    return tuple(routes)


def digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def signed_message(envelope: bytes) -> bytes:
    """What the control plane's signature on an answer covers."""
    return response_message(SIGNED_KIND, envelope)


def join(envelope: bytes, body: bytes = b"") -> bytes:
    return envelope + b"\n" + body


def split(raw: bytes) -> tuple[bytes, bytes]:
    """(envelope, body) of an answer; WireError when it has no envelope line."""
    cut = raw.find(b"\n", 0, MAX_ENVELOPE + 1)
    if cut < 0:
        raise WireError("a sync answer without its envelope line")
    return raw[:cut], raw[cut + 1 :]


# -- protocol 1, for agents from before deltas (the control plane still answers them) ----------------
V1_KIND: Final = "sync"  # what a protocol-1 answer's signature is domain-separated by


def v1_secrets(versions: Iterable[SealedVersion]) -> bytes:
    """A protocol-1 answer's secrets list (the whole view), encoded once per region and revision."""
    return json.dumps(
        [
            {
                "name": v.name,
                "version": v.version,
                "stage": v.stage,
                "expires_at": v.expires_at,
                "created_at": v.created_at,
                "ct": b64e(v.ciphertext),
                "kv": v.key_version,
                "dek": b64e(v.wrapped_dek),
            }
            for v in versions
        ],
        separators=(",", ":"),
    ).encode()


def v1_answer(
    node: str,
    nonce: str,
    issued_at: int,
    revision: int,
    region: str | None = None,
    grants: Iterable[Grant] = (),
    secrets_json: bytes | None = None,
) -> bytes:
    """A protocol-1 answer: ``unchanged`` when ``secrets_json`` is None, else the node's whole view."""
    head: dict[str, Any] = {"v": 1, "node": node, "nonce": nonce, "issued_at": issued_at}
    if secrets_json is None:
        return _dumps({**head, "kind": "unchanged", "revision": revision})
    prefix = _dumps({**head, "kind": "sync", "region": region, "revision": revision})
    grants_json = json.dumps([g.to_json() for g in grants], separators=(",", ":")).encode()
    return b"".join([prefix[:-1], b',"grants":', grants_json, b',"secrets":', secrets_json, b"}"])


# -- strict field readers -------------------------------------------------------------------------
def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _load(raw: bytes, limit: int, what: str) -> dict[str, Any]:
    if len(raw) > limit:
        raise WireError(f"the {what} is over its {limit} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise WireError(f"the {what} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("v") != PROTOCOL:
        raise WireError(f"the {what} is not sync protocol {PROTOCOL}")
    return doc


def _obj(doc: Any, what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise WireError(f"a {what} that is not an object")
    return doc


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
        raise WireError(f"an invalid {what}")
    return v


def _num(v: Any, what: str) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or abs(v) > 1e13:
        raise WireError(f"an invalid {what}")
    return float(v)


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise WireError(f"an invalid {what}")
    return v


def _region(v: Any) -> str:
    if not valid_region(v):
        raise WireError("an invalid region")
    return str(v)
