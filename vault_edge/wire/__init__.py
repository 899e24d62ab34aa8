"""What the control plane and the agent say to each other, and the names both accept.

Pure: no I/O, no clock, no logging. Imported by the server, the agent and the CLI alike.

Node requests are signed with the node's Ed25519 key over::

    "vault-edge/v1/node-request" LF METHOD LF TARGET LF NODE LF TIMESTAMP LF NONCE LF SHA256HEX(BODY)

carried in the ``X-Vault-Edge-Node/-Timestamp/-Nonce/-Signature`` headers; the control plane checks
them within ``CLOCK_SKEW_S`` and refuses a nonce it has seen. Its answers to nodes (enrolment, sync)
are JSON bodies signed with the control plane's Ed25519 key (derived from the root key, so every
unsealed replica holds it) over ``"vault-edge/v1/<kind>" LF BODY``, in
``X-Vault-Edge-Server-Signature``. A sync body names the node and echoes the request nonce, so an
answer made for another node or another request is refused.

Join tokens are ``vej1.<id>.<secret>.<pin>``: the pin is a digest of the control plane's public key,
so the agent can check it enrolled with the right control plane (as kubeadm's CA-cert hash).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Final, TypeGuard

CLOCK_SKEW_S: Final = 60
NONCE_BYTES: Final = 16
PROTOCOL_VERSION: Final = 1

H_NODE: Final = "x-vault-edge-node"
H_TIMESTAMP: Final = "x-vault-edge-timestamp"
H_NONCE: Final = "x-vault-edge-nonce"
H_SIGNATURE: Final = "x-vault-edge-signature"
H_SERVER_SIGNATURE: Final = "x-vault-edge-server-signature"
H_TOKEN: Final = "x-vault-edge-token"  # an operator's token (control plane), a worker's binding token (agent)
ENROLL_NODE: Final = "-"  # the node header while enrolling, before the node has an id
ENROLL_REFUSED: Final = "enroll-refused"  # the kind of a signed enrolment refusal (final for the agent)

NAME_MAX: Final = 256
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.\-/]*")
_REGION_RE = re.compile(r"[a-z0-9][a-z0-9\-]{0,62}")
_NODE_RE = re.compile(r"n-[0-9a-f]{16}")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
STAGES: Final = ("current", "previous", "pending")


class WireError(ValueError):
    """Malformed protocol input; the message is safe to show."""


def valid_name(name: object) -> TypeGuard[str]:
    """Secret names: segments of ``[A-Za-z0-9_.-]`` joined by ``/``, no ``.``/``..``, ≤ 256 chars."""
    # A segment starts with [A-Za-z0-9_]: "." and ".." (and any dot-first segment) never match.
    return isinstance(name, str) and 0 < len(name) <= NAME_MAX and _NAME_RE.fullmatch(name) is not None


def check_name(name: str) -> str:
    if not valid_name(name):
        raise WireError(
            "invalid secret name: use letters, digits, '_', '.', '-' in segments joined by '/' "
            f"(at most {NAME_MAX} characters)"
        )
    return name


def valid_region(region: object) -> TypeGuard[str]:
    return isinstance(region, str) and _REGION_RE.fullmatch(region) is not None


def check_region(region: str) -> str:
    if not valid_region(region):
        raise WireError("invalid region name: lowercase letters, digits and '-', at most 63 characters")
    return region


def valid_node_id(node_id: object) -> TypeGuard[str]:
    return isinstance(node_id, str) and _NODE_RE.fullmatch(node_id) is not None


def b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64d(text: str, *, max_len: int = 1 << 20) -> bytes:
    """Strict, canonical, unpadded base64url; WireError on anything else (padding, the +/ alphabet,
    whitespace, junk, a length no encoding has, non-zero trailing bits)."""
    if not isinstance(text, str) or len(text) > max_len or len(text) % 4 == 1 or not _B64URL.fullmatch(text):
        raise WireError("invalid base64url field")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise WireError("invalid base64url field") from exc
    if b64e(raw) != text:
        raise WireError("invalid base64url field")
    return raw


def request_message(method: str, target: str, node: str, timestamp: int, nonce: str, body: bytes) -> bytes:
    return "\n".join(
        [
            "vault-edge/v1/node-request",
            method.upper(),
            target,
            node,
            str(timestamp),
            nonce,
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()


def response_message(kind: str, body: bytes) -> bytes:
    return b"vault-edge/v1/" + kind.encode() + b"\n" + body


def refusal_message(nonce: str, request_body: bytes, body: bytes) -> bytes:
    """What a signed enrolment refusal's signature covers: the refused request's nonce and body digest,
    then the answer's body (the plain error shape), so it cannot be replayed for another request."""
    digest = hashlib.sha256(request_body).hexdigest().encode()
    return response_message(ENROLL_REFUSED, b"\n".join([nonce.encode(), digest, body]))


def server_pin(server_public_key: bytes) -> str:
    return b64e(hashlib.sha256(b"vault-edge/v1/server-key\n" + server_public_key).digest()[:16])


def make_join_token(token_id: str, secret: str, pin: str) -> str:
    return f"vej1.{token_id}.{secret}.{pin}"


def parse_join_token(token: str) -> tuple[str, str, str]:
    """(id, secret, pin) of a join token; WireError when it is not one."""
    parts = token.strip().split(".") if isinstance(token, str) and len(token) <= 200 else []
    if (
        len(parts) != 4
        or parts[0] != "vej1"
        or not _HEX16.fullmatch(parts[1])
        or not parts[2]
        or not _B64URL.fullmatch(parts[2])
        or not parts[3]
        or not _B64URL.fullmatch(parts[3])
    ):
        raise WireError("not a join token (expected vej1.<id>.<secret>.<pin>)")
    return parts[1], parts[2], parts[3]


def parse_timestamp(text: str) -> int:
    """A request timestamp: unix seconds, ASCII digits, at most 12 of them."""
    if not isinstance(text, str) or not _TIMESTAMP.fullmatch(text):
        raise WireError("invalid timestamp")
    return int(text)


def valid_token_id(token_id: str) -> bool:
    return isinstance(token_id, str) and _HEX16.fullmatch(token_id) is not None


def valid_prefix(prefix: str) -> bool:
    """A name prefix: what a name may start with (any prefix of a valid name, or empty)."""
    return isinstance(prefix, str) and len(prefix) <= NAME_MAX and _PREFIX_RE.fullmatch(prefix) is not None


def token_digest(secret: str) -> bytes:
    """The plain SHA-256 of a token: how tokens were stored before keyed digests (migration 0003). The
    control plane now stores keyed digests (``crypto/rowmac.token_digest``); this one finds only
    tokens adopted from an older database, whose row MAC says so. Tokens are 256-bit random, so no
    slow hash is needed either way."""
    return hashlib.sha256(secret.encode()).digest()


def value_fields(value: bytes) -> dict[str, str]:
    """A secret value in JSON, the same everywhere: ``{"value": text, "encoding": "utf-8"}`` when it is
    UTF-8, else ``{"value": base64url, "encoding": "base64"}``."""
    try:
        return {"value": value.decode("utf-8"), "encoding": "utf-8"}
    except UnicodeDecodeError:
        return {"value": b64e(value), "encoding": "base64"}
