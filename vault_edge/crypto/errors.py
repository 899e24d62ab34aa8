"""The crypto core's errors: few, and opaque on the secret path."""

from __future__ import annotations


class CryptoError(Exception):
    """Base of every error the crypto core raises."""


class DecryptionError(CryptoError):
    """A ciphertext did not open: wrong key, wrong associated data, or tampered bytes.

    Deliberately says nothing of which check failed (as Fernet's InvalidToken).
    """

    def __init__(self, message: str = "ciphertext did not open") -> None:
        super().__init__(message)


class ShareError(CryptoError, ValueError):
    """An unseal share was refused. The message is safe to show: it never quotes the share."""
