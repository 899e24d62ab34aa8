"""Generated secret values: ``LENGTH:ALPHABET``, e.g. ``32:base64url``, ``40:hex``, ``24:alnum``.

Characters are drawn independently and uniformly with ``secrets.choice`` (the OS CSPRNG).
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Callable, Sequence

ALPHABETS = {
    "hex": "0123456789abcdef",
    "alnum": string.ascii_letters + string.digits,
    "alpha": string.ascii_letters,
    "digits": string.digits,
    "base64url": string.ascii_letters + string.digits + "-_",
    "base64": string.ascii_letters + string.digits + "+/",
    "ascii": "".join(chr(c) for c in range(33, 127)),  # printable, no space
}
MAX_LENGTH = 4096


def parse_spec(spec: str) -> tuple[int, str]:
    length, _, alphabet = str(spec).partition(":")
    alphabet = alphabet or "base64url"
    if not re.fullmatch(r"[0-9]{1,4}", length) or not 1 <= int(length) <= MAX_LENGTH or alphabet not in ALPHABETS:
        raise ValueError(
            f"invalid --generate spec {spec!r}: LENGTH:ALPHABET with LENGTH 1..{MAX_LENGTH} and ALPHABET one of "
            + ", ".join(ALPHABETS)
        )
    return int(length), alphabet


def generate(spec: str, choice: Callable[[Sequence[str]], str] = secrets.choice) -> bytes:
    length, alphabet = parse_spec(spec)
    chars = ALPHABETS[alphabet]
    return "".join(choice(chars) for _ in range(length)).encode()
