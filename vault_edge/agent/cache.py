"""The persistent cache: the last full sync answer and the deltas applied on top of it, exactly as
received, and the anti-rollback floor.

Three files in the state dir:

* ``cache.json``: the base, a full answer (its envelope, the control plane's signature over it, its
  body), the floor at the time, and a random ``chain`` id; written atomically (temp file, fsync,
  rename), so it is the old one or the new one, never a mix.
* ``cache.log``: the deltas applied since the base, appended one line each and fsync'd before the
  delta is served. Its first line names the chain it belongs to, so deltas are never replayed on top
  of another base (a kill between writing a new base and resetting the log leaves an old log that is
  ignored). A torn last line (a kill mid-append) is a delta that was never served: it is cut off.
* ``cache.contact``: the wall time of the last contact (an ``unchanged`` answer), small, atomic.

Everything in them is ciphertext (values under data keys, wrapped under region keys, which reach the
node only inside grants sealed to its X25519 key) and signed: loading replays every answer through
the same checks as a live one, so a file altered on disk is refused like a tampered answer. Writing
the log costs one delta per change, not the whole view.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from vault_edge import wire
from vault_edge.agent.bundle import Piece
from vault_edge.agent.files import write_atomic
from vault_edge.wire import sync as wsync

log = logging.getLogger("vault_edge.agent.cache")

FORMAT = 2


@dataclass(frozen=True)
class Cached:
    base: Piece
    deltas: tuple[Piece, ...]
    received_at: float  # wall clock of the last contact with the control plane
    floor: dict[str, int] = field(default_factory=dict)  # each name's highest current version served (at the base)

    @property
    def revision(self) -> int:
        """The revision the chain reaches, as its last envelope says (not verified: for diagnostics)."""
        return wsync.Envelope.decode((self.deltas[-1] if self.deltas else self.base).envelope).revision


def _piece_json(p: Piece) -> dict[str, str]:
    return {"envelope": wire.b64e(p.envelope), "signature": p.signature, "body": wire.b64e(p.body)}


def _piece(doc: object) -> Piece:
    if not isinstance(doc, dict):
        raise ValueError("not a piece")
    return Piece(
        wire.b64d(doc["envelope"], max_len=1 << 20), str(doc["signature"]), wire.b64d(doc["body"], max_len=1 << 30)
    )


class DiskCache:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / "cache.json"
        self.log_path = self.dir / "cache.log"
        self.contact_path = self.dir / "cache.contact"
        self.chain = ""
        self.log_bytes = 0  # bytes of deltas in the log: the agent asks for a full view when it grows
        self.base_bytes = 0

    def save_base(self, base: Piece, floor: dict[str, int], received_at: float | None = None) -> None:
        """A full answer becomes the base; the log starts afresh (after the base is on disk)."""
        chain = secrets.token_hex(8)
        doc = {"format": FORMAT, "chain": chain, "base": _piece_json(base), "floor": floor}
        write_atomic(self.path, json.dumps(doc).encode())
        write_atomic(self.log_path, chain.encode() + b"\n")
        self.chain, self.log_bytes, self.base_bytes = chain, 0, len(base.body)
        self.touch(time.time() if received_at is None else received_at)

    def append(self, delta: Piece, received_at: float | None = None) -> None:
        """A delta, appended and fsync'd: on disk before it is served."""
        if not self.chain:
            raise OSError("no base to append a delta to")
        line = json.dumps(_piece_json(delta)).encode() + b"\n"
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.log_bytes += len(delta.body)
        self.touch(time.time() if received_at is None else received_at)

    def touch(self, received_at: float) -> None:
        """Record the last contact (also from an ``unchanged`` answer) without rewriting the view."""
        write_atomic(self.contact_path, repr(float(received_at)).encode())

    def load(self) -> Cached | None:
        if not self.path.exists():
            return None
        try:
            doc = json.loads(self.path.read_bytes())
            floor = {str(k): int(v) for k, v in dict(doc.get("floor") or {}).items()}
            if doc.get("format") != FORMAT:  # an agent from before deltas: its view is re-synced, its floor kept
                raise ValueError("a cache of an older format")
            base, chain = _piece(doc["base"]), str(doc["chain"])
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, wire.WireError, OSError) as exc:
            log.warning(
                "ignoring an unreadable cache file %s (%s)",
                self.path,
                exc if isinstance(exc, ValueError) and "older format" in str(exc) else type(exc).__name__,
            )
            return None
        deltas = self._read_log(chain)
        try:
            received_at = float(self.contact_path.read_bytes())
        except (OSError, ValueError):
            received_at = 0.0
        if not 0.0 <= received_at < float("inf"):  # (nan, inf: none; one yet to come: see load_cached)
            received_at = 0.0
        self.chain, self.base_bytes = chain, len(base.body)
        self.log_bytes = sum(len(d.body) for d in deltas)
        return Cached(base, tuple(deltas), received_at, floor)

    def floor(self) -> dict[str, int]:
        """The floor kept in the cache file, even when its view cannot be used."""
        try:
            return {str(k): int(v) for k, v in dict(json.loads(self.path.read_bytes()).get("floor") or {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OSError):
            return {}

    def _read_log(self, chain: str) -> list[Piece]:
        """The deltas of ``chain``; a torn or unreadable tail is cut off (it was never served)."""
        try:
            raw = self.log_path.read_bytes()
        except OSError:
            return []
        lines = raw.split(b"\n")
        if not lines or lines[0].decode(errors="replace") != chain:
            return []  # the log of another base, or none
        deltas, good = [], len(lines[0]) + 1
        for line in lines[1:-1]:  # the last element follows the last newline: empty, or a torn line
            try:
                deltas.append(_piece(json.loads(line)))
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError, wire.WireError):
                break
            good += len(line) + 1
        if good < len(raw):
            log.warning("cut a torn tail off the cache log (%d bytes, never served)", len(raw) - good)
            with contextlib.suppress(OSError):
                os.truncate(self.log_path, good)
        return deltas
