"""Password verifiers as services store them, so a rotator sends the verifier, never the password.

A rotator that ran ``ALTER ROLE ... PASSWORD 'plaintext'`` would put the new password in the
service's statement log (``log_statement``, the slow log, ``MONITOR``), as psql's ``\\password``
avoids by hashing on the client. These build the verifier each service accepts in place of the
password. Pure: bytes and strings in and out; the salt is a parameter (random by default).

- PostgreSQL ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (RFC 5802/7677, as
  ``pg_fe_scram_build_secret`` makes it; the password is used as UTF-8, which equals its SASLprep for
  the ASCII passwords the rotators generate).
- MariaDB/MySQL ``mysql_native_password``: ``*`` + upper-case hex of SHA1(SHA1(password)).
- Redis ACL: ``#`` + hex of SHA-256(password) (``ACL SETUSER u #<hash>``, and ``!<hash>`` removes it).
"""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

SCRAM_ITERATIONS = 4096  # PostgreSQL's default scram_iterations


def _hmac256(key: bytes, msg: bytes) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(msg)
    return h.finalize()


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def scram_sha256(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    if not password.isascii():
        raise ValueError("SCRAM verifiers here are for ASCII passwords (no SASLprep)")
    salt = os.urandom(16) if salt is None else salt
    salted = PBKDF2HMAC(hashes.SHA256(), 32, salt, iterations).derive(password.encode())
    stored = _digest(hashes.SHA256(), _hmac256(salted, b"Client Key"))
    server = _hmac256(salted, b"Server Key")
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored).decode()}:{b64(server).decode()}"


def mysql_native(password: str) -> str:
    inner = _digest(hashes.SHA1(), password.encode())  # noqa: S303 - the protocol's own hash, not our choice
    return "*" + _digest(hashes.SHA1(), inner).hex().upper()  # noqa: S303


def redis_acl(password: str) -> str:
    return _digest(hashes.SHA256(), password.encode()).hex()
