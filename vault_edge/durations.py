"""Durations as operators type them: ``90s``, ``15m``, ``1h30m``, ``7d``, or plain seconds."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"([0-9]{1,12})([smhdw])")
_DIGITS = re.compile(r"[0-9]{1,12}")
MAX_SECONDS = 10 * 365 * 86400


def parse_duration(text: str) -> int:
    """Seconds in ``text``; ValueError with a clear message otherwise."""
    s = str(text).strip().lower()
    if len(s) > 64:
        raise ValueError("invalid duration: too long")
    if _DIGITS.fullmatch(s):
        seconds = int(s)
    else:
        parts = _PART.findall(s)
        if not parts or "".join(n + u for n, u in parts) != s:
            raise ValueError(f"invalid duration {text!r}: use e.g. 30s, 15m, 1h30m, 7d")
        seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds > MAX_SECONDS:
        raise ValueError(f"invalid duration {text!r}: at most 10 years")
    return seconds


def format_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            out.append(f"{s // size}{unit}")
            s %= size
    return "".join(out[:2])
