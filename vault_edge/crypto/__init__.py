"""The crypto core: pure functions over bytes, no I/O, no clock, no logging.

Primitives come only from ``cryptography`` (AES-256-GCM, HKDF-SHA256), ``pynacl`` (X25519 sealed
boxes, Ed25519) and ``shamir-mnemonic`` (SLIP-39). Nothing here is home-made.
"""

from vault_edge.crypto.errors import CryptoError, DecryptionError, ShareError
from vault_edge.crypto.secret import SecretBytes

__all__ = ["CryptoError", "DecryptionError", "SecretBytes", "ShareError"]
