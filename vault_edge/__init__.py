"""vault-edge: one sealed source of truth, a tiny agent in every point of presence."""

from __future__ import annotations

__version__ = "0.1.0"
