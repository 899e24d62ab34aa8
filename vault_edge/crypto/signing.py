"""Ed25519 signatures (PyNaCl) and X25519 sealed-box grants of region keys to nodes.

A node makes its own key pairs; the private halves never leave it. A region key reaches a node only
as a SealedBox to the node's X25519 public key. A SealedBox carries no associated data, so the
binding travels inside the box: the plaintext is ``ad("region-grant", node, region, key_version)``
followed by the 32-byte key, and the opener recomputes the binding from what it expects and compares
it in constant time. A grant moved to another node, region or key version does not open.

Enrolment requests travel the other way, sealed to the control plane's Ed25519 key converted to
X25519 (libsodium's ``crypto_sign_ed25519_pk_to_curve25519``): a join token read off the wire, or
relayed by a man in the middle, is of no use to anyone else, and the node's public keys inside
cannot be swapped.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

from vault_edge.crypto import aead
from vault_edge.crypto.errors import DecryptionError
from vault_edge.crypto.secret import SecretBytes

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64


@dataclass(frozen=True)
class KeyPair:
    """A node's identity: X25519 to receive grants, Ed25519 to sign requests."""

    box_private: SecretBytes = field(repr=False)
    sign_seed: SecretBytes = field(repr=False)

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(
            SecretBytes(bytes(PrivateKey.generate())),
            SecretBytes(bytes(SigningKey.generate())),
        )

    @property
    def box_public(self) -> bytes:
        return bytes(PrivateKey(self.box_private.reveal()).public_key)

    @property
    def sign_public(self) -> bytes:
        return bytes(SigningKey(self.sign_seed.reveal()).verify_key)

    def signer(self) -> SigningKey:
        return SigningKey(self.sign_seed.reveal())


def signing_key_from_seed(seed: bytes) -> SigningKey:
    return SigningKey(seed)


def public_of(seed: bytes) -> bytes:
    return bytes(SigningKey(seed).verify_key)


def sign(key: SigningKey, message: bytes) -> bytes:
    return key.sign(message).signature


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        VerifyKey(public_key).verify(message, signature)
    except (BadSignatureError, CryptoError, ValueError):
        return False
    return True


def _grant_binding(node_id: str, region: str, key_version: int) -> bytes:
    return aead.ad("region-grant", node_id, region, key_version)


def seal_grant(node_box_public: bytes, node_id: str, region: str, key_version: int, region_key: bytes) -> bytes:
    if len(node_box_public) != PUBLIC_KEY_SIZE:
        raise ValueError("a node's X25519 public key is 32 bytes")
    plaintext = _grant_binding(node_id, region, key_version) + region_key
    return SealedBox(PublicKey(node_box_public)).encrypt(plaintext)


def open_grant(node_box_private: bytes, sealed: bytes, node_id: str, region: str, key_version: int) -> bytes:
    """The region key inside a grant, if the grant was made for exactly this node/region/version."""
    try:
        plaintext = SealedBox(PrivateKey(node_box_private)).decrypt(sealed)
    except (CryptoError, ValueError, TypeError) as exc:
        raise DecryptionError() from exc
    binding, key = plaintext[: -aead.KEY_SIZE], plaintext[-aead.KEY_SIZE :]
    if len(plaintext) <= aead.KEY_SIZE or not hmac.compare_digest(
        binding, _grant_binding(node_id, region, key_version)
    ):
        raise DecryptionError()
    return key


_ENROLMENT = aead.ad("enrolment-request")


def seal_to_server(server_sign_public: bytes, plaintext: bytes) -> bytes:
    if len(server_sign_public) != PUBLIC_KEY_SIZE:
        raise ValueError("the control plane's Ed25519 public key is 32 bytes")
    return SealedBox(VerifyKey(server_sign_public).to_curve25519_public_key()).encrypt(_ENROLMENT + plaintext)


def open_for_server(server_signer: SigningKey, sealed: bytes) -> bytes:
    """What a node sealed to this control plane's key, or DecryptionError."""
    try:
        plaintext = SealedBox(server_signer.to_curve25519_private_key()).decrypt(sealed)
    except (CryptoError, ValueError, TypeError) as exc:
        raise DecryptionError() from exc
    if not hmac.compare_digest(plaintext[: len(_ENROLMENT)], _ENROLMENT):
        raise DecryptionError()
    return plaintext[len(_ENROLMENT) :]
