"""Enrolment: a node's first exchange with the control plane. Pure (sealing and signing are the
callers', with ``crypto.signing``).

The request is ``{"sealed": SEALED}``: :class:`Request` (the join token, the node's X25519 and Ed25519
public keys, its hostname) sealed to the control plane's pinned key, so nobody on the path can read
the token or swap the keys; the HTTP request is signed with the node's new Ed25519 key (node id ``-``).
The answer, :class:`Answer`, names the node, its region and the control plane's key, and echoes the
node's signing key and the request's nonce; it is signed over ``"vault-edge/v1/enroll" LF BODY``, so
it cannot be moved to another request. A refusal is signed over the request's nonce and body digest
(``wire.refusal_message``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from vault_edge.wire import PROTOCOL_VERSION, WireError, b64d, b64e, parse_join_token, valid_node_id, valid_region

KIND: Final = "enroll"
MAX_SEALED: Final = 8192
HOSTNAME_MAX: Final = 255


@dataclass(frozen=True, slots=True)
class Request:
    token: str = ""  # a join token: never in a repr (see __repr__)
    box_public: bytes = b""
    sign_public: bytes = b""
    hostname: str = ""

    def __repr__(self) -> str:
        return f"Request(hostname={self.hostname!r})"

    def encode(self) -> bytes:
        """The plaintext to seal to the control plane."""
        return json.dumps(
            {
                "token": self.token,
                "box_public": b64e(self.box_public),
                "sign_public": b64e(self.sign_public),
                "hostname": self.hostname,
            }
        ).encode()

    @staticmethod
    def decode(raw: bytes) -> Request:
        """The opened request; WireError (a message safe to show) when it is not one."""
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise WireError("enrolment needs {token, box_public, sign_public, hostname}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("token"), str):
            raise WireError("enrolment needs {token, box_public, sign_public, hostname}")
        parse_join_token(doc["token"])  # WireError if it is not one
        box, sign = b64d(_str(doc, "box_public"), max_len=64), b64d(_str(doc, "sign_public"), max_len=64)
        if len(box) != 32 or len(sign) != 32:
            raise WireError("enrolment needs 32-byte X25519 and Ed25519 public keys")
        hostname = "".join(c for c in str(doc.get("hostname") or "") if c.isprintable())[:HOSTNAME_MAX]
        return Request(doc["token"], box, sign, hostname)


def seal_envelope(sealed: bytes) -> bytes:
    """The HTTP body carrying the sealed request."""
    return json.dumps({"sealed": b64e(sealed)}).encode()


def open_envelope(body: bytes) -> bytes:
    """The sealed request inside an HTTP body; WireError otherwise."""
    try:
        return b64d(json.loads(body)["sealed"], max_len=MAX_SEALED)
    except (ValueError, KeyError, TypeError, RecursionError):
        raise WireError("enrolment needs {sealed}: the request sealed to the control plane's key") from None


@dataclass(frozen=True, slots=True)
class Answer:
    node: str
    region: str
    server_key: bytes
    revision: int
    sign_public: bytes  # the enrolling node's, echoed
    nonce: str  # the request's, echoed

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": PROTOCOL_VERSION,
                "node": self.node,
                "region": self.region,
                "server_key": b64e(self.server_key),
                "revision": self.revision,
                "sign_public": b64e(self.sign_public),
                "nonce": self.nonce,
            }
        ).encode()

    @staticmethod
    def decode(raw: bytes) -> Answer:
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise WireError("enrolment answer is malformed") from None
        if not isinstance(doc, dict) or not valid_node_id(doc.get("node")) or not valid_region(doc.get("region")):
            raise WireError("enrolment answer is malformed")
        revision = doc.get("revision")
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
            raise WireError("enrolment answer is malformed")
        return Answer(
            doc["node"],
            doc["region"],
            b64d(_str(doc, "server_key"), max_len=64),
            revision,
            b64d(_str(doc, "sign_public"), max_len=64),
            _str(doc, "nonce"),
        )


def refusal(code: str, message: str) -> bytes:
    """A refusal's body: the API's error shape (signed by the caller with ``wire.refusal_message``)."""
    return json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()


def _str(doc: dict[str, Any], key: str) -> str:
    v = doc.get(key)
    if not isinstance(v, str):
        raise WireError(f"enrolment message without {key}")
    return v
