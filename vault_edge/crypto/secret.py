"""A holder for key material that does not leak through repr, logs, pickling or timing."""

from __future__ import annotations

import hmac
from typing import NoReturn


class SecretBytes:
    """Immutable bytes that print as ``SecretBytes(<redacted, N bytes>)`` and refuse pickling.

    Compare with ``==`` in constant time. Read the bytes with :meth:`reveal`, at the point of use.
    """

    __slots__ = ("_b",)

    def __init__(self, value: bytes) -> None:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError("SecretBytes takes bytes")
        self._b = bytes(value)

    def reveal(self) -> bytes:
        return self._b

    def __len__(self) -> int:
        return len(self._b)

    def __repr__(self) -> str:
        return f"SecretBytes(<redacted, {len(self._b)} bytes>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SecretBytes):
            return hmac.compare_digest(self._b, other._b)
        return NotImplemented

    def __hash__(self) -> int:
        raise TypeError("SecretBytes is not hashable")

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretBytes cannot be pickled")
