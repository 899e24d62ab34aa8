"""The persistent cache: the last verified sync answer, exactly as received, written atomically.

It holds only ciphertext (values under data keys, wrapped under region keys, which reach the node
only inside grants sealed to its X25519 key) and the control plane's signature over it; loading it
verifies the signature again, so a file altered on disk is refused like a tampered answer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from vault_edge import wire
from vault_edge.agent.files import write_atomic

log = logging.getLogger("vault_edge.agent.cache")


@dataclass(frozen=True)
class Cached:
    body: bytes
    signature: str
    received_at: float  # wall clock of the last contact with the control plane
    floor: dict[str, int] = field(default_factory=dict)  # the highest current version of each name ever served


class DiskCache:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "cache.json"

    def save(self, body: bytes, signature: str, received_at: float | None = None,
             floor: dict[str, int] | None = None) -> None:
        """Write the answer and the anti-rollback floor (each name's highest current version installed)
        together, atomically: a restart never serves a version below what was served before."""
        doc = {"body": wire.b64e(body), "signature": signature,
               "received_at": time.time() if received_at is None else received_at, "floor": floor or {}}
        write_atomic(self.path, json.dumps(doc).encode())

    def touch(self, received_at: float) -> None:
        """Record a later contact (an `unchanged` answer) without rewriting the view."""
        c = self.load()
        if c is not None:
            self.save(c.body, c.signature, received_at, c.floor)

    def load(self) -> Cached | None:
        if not self.path.exists():
            return None
        try:
            doc = json.loads(self.path.read_bytes())
            floor = {str(k): int(v) for k, v in dict(doc.get("floor") or {}).items()}
            return Cached(wire.b64d(doc["body"], max_len=1 << 30), str(doc["signature"]), float(doc["received_at"]),
                          floor)
        except (ValueError, KeyError, TypeError, wire.WireError, OSError) as exc:
            log.warning("ignoring an unreadable cache file %s (%s)", self.path, type(exc).__name__)
            return None
