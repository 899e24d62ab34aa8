"""The audit log: every operator action and every refusal, hash-chained and MAC'd.

Entries never carry a secret value: only names, versions, regions, node ids and outcomes.
Each entry's hash covers the previous hash, so no entry can be edited, removed or reordered without
breaking every later hash. While unsealed, each hash is also MAC'd with a key derived from the root
key, so someone with write access to the database alone cannot forge a consistent chain; entries
written while sealed (unseal attempts) carry no MAC, and ``verify`` reports them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vault_edge.server.barrier import Barrier
from vault_edge.server.storage.records import AuditEntry
from vault_edge.server.storage.repo import Store, Tx

log = logging.getLogger("vault_edge.audit")
REFUSALS_PER_WINDOW = 20
REFUSAL_WINDOW_S = 60


def _entry_bytes(seq: int, at: float, actor: str, action: str, target: str, outcome: str, detail: str) -> bytes:
    return json.dumps([seq, repr(at), actor, action, target, outcome, detail], separators=(",", ":")).encode()


@dataclass(frozen=True)
class Verification:
    entries: int
    ok: bool
    unmacked: int
    first_bad: int | None
    reason: str


class Auditor:
    def __init__(self, store: Store, barrier: Barrier, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.barrier = barrier
        self.clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str, str], list[Any]] = {}  # kind → [start, written, suppressed]

    def record(
        self, tx: Tx, actor: str, action: str, target: str = "", outcome: str = "ok", **detail: Any
    ) -> None:
        """Append an entry in ``tx``: it commits, or rolls back, with the change it describes."""
        seq, prev = tx.next_audit_seq()
        at = self.clock()
        detail_s = json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)
        digest = hashlib.sha256((prev or b"") + _entry_bytes(seq, at, actor, action, target, outcome, detail_s))
        keys = self.barrier.keys_or_none()
        mac = hmac.new(keys.audit.reveal(), digest.digest(), hashlib.sha256).digest() if keys else None
        tx.insert_audit(AuditEntry(seq, at, actor[:128], action, target[:300], outcome, detail_s, digest.digest(), mac))
        log.info("audit %s %s %s %s", actor, action, target, outcome)

    def record_alone(self, actor: str, action: str, target: str = "", outcome: str = "refused", **detail: Any) -> None:
        """Append an entry in a transaction of its own (for refusals, whose request changed nothing).

        Refusals come from callers not yet authenticated, so anyone could flood the log with them:
        each kind (action and reason) is recorded at most ``REFUSALS_PER_WINDOW`` times a window; the
        rest are counted, and the count is recorded with the next entry of that kind."""
        key = (action, outcome, str(detail.get("reason", "")))
        with self._lock:
            now = self.clock()
            window = self._windows.get(key)
            if window is None or now - window[0] >= REFUSAL_WINDOW_S:
                if len(self._windows) >= 1024:
                    self._windows.clear()
                carried = window[2] if window else 0
                window = self._windows[key] = [now, 0, 0]
            else:
                carried = 0
            if window[1] >= REFUSALS_PER_WINDOW:
                window[2] += 1
                if window[2] == 1:
                    log.warning("audit: over %d %s refusals (%s) in %ds: counting the rest",
                                REFUSALS_PER_WINDOW, action, key[2], REFUSAL_WINDOW_S)
                return
            window[1] += 1
        if carried:
            detail["suppressed_before"] = carried
        try:
            with self.store.write(serialize=False) as tx:
                self.record(tx, actor, action, target, outcome, **detail)
        except Exception:  # the refusal itself must still reach the caller
            log.exception("could not write an audit entry for %s %s", action, target)

    def verify(self) -> Verification:
        keys = self.barrier.keys()
        prev: bytes | None = None
        count = unmacked = 0
        after = 0
        expected_seq = 1
        while True:
            with self.store.read() as tx:
                batch = tx.list_audit(after=after, limit=1000)
                last = tx.last_audit_seq() if not batch else None
            if not batch:
                if last is not None and last != expected_seq - 1:
                    return Verification(count, False, unmacked, expected_seq, "entries missing at the end")
                return Verification(count, True, unmacked, None, "chain intact")
            for e in batch:
                if e.seq != expected_seq:
                    return Verification(count, False, unmacked, expected_seq, "entry missing")
                want = hashlib.sha256(
                    (prev or b"") + _entry_bytes(e.seq, e.at, e.actor, e.action, e.target, e.outcome, e.detail)
                ).digest()
                if not hmac.compare_digest(want, e.hash):
                    return Verification(count, False, unmacked, e.seq, "hash mismatch (entry altered)")
                if e.mac is None:
                    unmacked += 1
                elif not hmac.compare_digest(hmac.new(keys.audit.reveal(), e.hash, hashlib.sha256).digest(), e.mac):
                    return Verification(count, False, unmacked, e.seq, "MAC mismatch (entry forged)")
                prev, count, expected_seq, after = e.hash, count + 1, e.seq + 1, e.seq
