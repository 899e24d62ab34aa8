"""A node's proof that it was revoked. Pure.

A revoked node that signs its sync request correctly is answered 403 with a body in the JSON error
shape that also names the node and echoes its request's nonce, signed with the control plane's key
over ``"vault-edge/v1/revoked" LF BODY``. The agent wipes its state only on that proof (:func:`proves`),
never on a bare 403 that anyone on its path could forge or replay.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from vault_edge.wire import PROTOCOL_VERSION, WireError, response_message, valid_node_id

KIND: Final = "revoked"
MAX_BODY: Final = 4096


@dataclass(frozen=True, slots=True)
class Revocation:
    node: str
    nonce: str

    def encode(self) -> bytes:
        return json.dumps(
            {
                "error": {"code": "revoked", "message": "node revoked"},
                "v": PROTOCOL_VERSION,
                "kind": KIND,
                "node": self.node,
                "nonce": self.nonce,
            },
            separators=(",", ":"),
        ).encode()

    @staticmethod
    def decode(raw: bytes) -> Revocation:
        if len(raw) > MAX_BODY:
            raise WireError("a revocation over its size")
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise WireError("a revocation that is not JSON") from None
        if not isinstance(doc, dict) or doc.get("kind") != KIND or not valid_node_id(doc.get("node")):
            raise WireError("not a revocation")
        nonce = doc.get("nonce")
        if not isinstance(nonce, str):
            raise WireError("a revocation without its request's nonce")
        return Revocation(doc["node"], nonce)


def signed_message(body: bytes) -> bytes:
    return response_message(KIND, body)


def proves(body: bytes, node: str, nonce: str) -> bool:
    """True if ``body`` (its signature already checked) revokes ``node`` in answer to the request
    with ``nonce``."""
    try:
        r = Revocation.decode(body)
    except WireError:
        return False
    return r.node == node and r.nonce == nonce
