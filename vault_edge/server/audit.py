"""The audit log: every operator action and every refusal, hash-chained and MAC'd.

Entries never carry a secret value: only names, versions, regions, node ids and outcomes.
Each entry's hash covers the previous hash, so no entry can be edited, removed or reordered without
breaking every later hash, and each hash is MAC'd with a key derived from the root key, so someone
with write access to the database alone cannot forge a consistent chain. Every entry of the chain
must carry a valid MAC (``verify`` refuses one without), and a new entry is chained only onto a head
whose MAC verifies: nothing is ever MAC'd onto a forged tail. Events while sealed (refused unseal
attempts), which nothing can MAC, go to a table of their own, outside the chain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from vault_edge.server.barrier import Barrier
from vault_edge.server.storage.records import AuditEntry
from vault_edge.server.storage.repo import Store, TamperedRow, Tx

log = logging.getLogger("vault_edge.audit")
REFUSALS_PER_WINDOW = 20
# The address of the HTTP caller whose request is being served (set per request by the app's
# ``app.ControlPlane``): every entry a request makes, accepted or refused, names it.
REMOTE: ContextVar[str | None] = ContextVar("vault_edge_audit_remote", default=None)
REFUSAL_WINDOW_S = 60


def entry_mac(key: bytes, digest: bytes) -> bytes:
    h = crypto_hmac.HMAC(key, hashes.SHA256())
    h.update(digest)
    return h.finalize()


def _mac_ok(key: bytes, entry: AuditEntry) -> bool:
    return entry.mac is not None and hmac.compare_digest(entry_mac(key, bytes(entry.hash)), bytes(entry.mac))


def _entry_bytes(seq: int, at: float, actor: str, action: str, target: str, outcome: str, detail: str) -> bytes:
    return json.dumps([seq, repr(at), actor, action, target, outcome, detail], separators=(",", ":")).encode()


@dataclass(frozen=True)
class Verification:
    entries: int
    ok: bool
    sealed_events: int  # events while sealed: outside the chain, never counted as entries
    first_bad: int | None
    reason: str


Kind = tuple[str, str, str, str]  # (action, outcome, reason, scope: a target or "*")


class RefusalThrottle:
    """At most ``per_window`` audit entries per kind of refusal per window; the rest are counted, and
    the count goes into the next entry of that kind, or, if none comes, into an ``audit.suppressed``
    entry once the window has ended (``ended``). The table of per-target kinds is bounded: when
    full, new targets share their action's and reason's ``*`` budget (those few shared kinds are
    always admitted)."""

    def __init__(
        self, per_window: int = REFUSALS_PER_WINDOW, window_s: float = REFUSAL_WINDOW_S, max_kinds: int = 4096
    ) -> None:
        self.per_window, self.window_s, self.max_kinds = per_window, window_s, max_kinds
        self._lock = threading.Lock()
        self._windows: dict[Kind, list[float]] = {}  # kind → [start, written, suppressed]

    def admit(self, action: str, outcome: str, reason: str, scope: str, now: float) -> int | None:
        """None: throttled (counted). Else the count throttled before, to record with this entry."""
        with self._lock:
            kind = (action, outcome, reason, scope)
            if kind not in self._windows and len(self._windows) >= self.max_kinds:
                for k in [k for k, w in self._windows.items() if now - w[0] >= self.window_s and not w[2]]:
                    del self._windows[k]  # ended, nothing to report: room without waiting for a flush
                if len(self._windows) >= self.max_kinds:
                    kind = (action, outcome, reason, "*")
            window = self._windows.get(kind)
            carried = 0
            if window is None or now - window[0] >= self.window_s:
                carried = int(window[2]) if window else 0
                window = self._windows[kind] = [now, 0, 0]
            if window[1] >= self.per_window:
                window[2] += 1
                if window[2] == 1:
                    log.warning(
                        "audit: over %d %s refusals (%s, %s) in %ds: counting the rest",
                        self.per_window,
                        action,
                        reason,
                        scope,
                        self.window_s,
                    )
                return None
            window[1] += 1
            return carried

    def ended(self, now: float) -> list[tuple[Kind, int]]:
        """Forget the windows that have ended; (kind, count) of those that throttled anything."""
        with self._lock:
            done = [k for k, w in self._windows.items() if now - w[0] >= self.window_s]
            out = [(k, int(self._windows[k][2])) for k in done if self._windows[k][2]]
            for k in done:
                del self._windows[k]
            return out


def chain_head(entries: Iterable[Any]) -> tuple[int, bytes, str | None]:
    """Walk the hash chain (no key needed: the links, not the MACs): (entries, last hash, the first
    problem or None). ``migrate`` checks a copy with it."""
    prev, count, expected = b"", 0, 1
    for e in entries:
        if e.seq != expected:
            return count, prev, f"entry {expected} missing"
        want = hashlib.sha256(
            prev + _entry_bytes(e.seq, e.at, e.actor, e.action, e.target, e.outcome, e.detail)
        ).digest()
        if not hmac.compare_digest(want, bytes(e.hash)):
            return count, prev, f"entry {e.seq} does not match its hash"
        prev, count, expected = bytes(e.hash), count + 1, e.seq + 1
    return count, prev, None


def sink_line(
    seq: int | None, at: float, actor: str, action: str, target: str, outcome: str, detail: str, digest: bytes | None
) -> bytes:
    """An entry as one JSON line for a sink: what the database holds (``detail`` parsed back to an
    object), with ``hash`` (hex) so a line can be matched against ``audit verify``'s chain. ``seq`` and
    ``hash`` are null for events while sealed (kept outside the chain)."""
    doc = {
        "type": "audit",
        "seq": seq,
        "time": round(at, 6),
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z",
        "actor": actor,
        "action": action,
        "target": target,
        "outcome": outcome,
        "detail": json.loads(detail) if detail else {},
        "hash": digest.hex() if digest is not None else None,
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class FileSink:
    """Appends each committed entry to a JSON-lines file (created 0600), fsync'd before the request
    that made it returns, so a SIEM tailing it loses nothing the database kept. A failed write is
    logged (once per failure streak) and never fails the request: the database stays the record."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._failing = False
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def __call__(self, line: bytes) -> None:
        with self._lock:
            try:
                os.write(self._fd, line)
                os.fsync(self._fd)
                self._failing = False
            except OSError as exc:
                if not self._failing:
                    log.error(
                        "audit file sink %s: write failed (%s); entries stay in the database",
                        self.path,
                        exc.strerror or exc,
                    )
                self._failing = True

    def close(self) -> None:
        os.close(self._fd)


class StdoutSink:
    """Writes each committed entry to stdout as one JSON line (logs go to stderr), for a collector that
    reads the process's output (journald, a Kubernetes log agent)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, line: bytes) -> None:
        with self._lock:
            try:
                sys.stdout.buffer.write(line)
                sys.stdout.buffer.flush()
            except (OSError, ValueError):
                pass


class Auditor:
    def __init__(self, store: Store, barrier: Barrier, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.barrier = barrier
        self.clock = clock
        self.throttle = RefusalThrottle()
        # Beside the database: each committed entry, as a JSON line (FileSink, StdoutSink). Counted by
        # action and outcome for the metrics (``counts``), after commit too.
        self.sinks: list[Callable[[bytes], None]] = []
        self.counts: dict[tuple[str, str], int] = {}
        self._count_lock = threading.Lock()

    def _committed(
        self,
        seq: int | None,
        at: float,
        actor: str,
        action: str,
        target: str,
        outcome: str,
        detail: str,
        digest: bytes | None,
    ) -> None:
        key = (action, outcome)
        with self._count_lock:  # commits come from many threads
            self.counts[key] = self.counts.get(key, 0) + 1
        if self.sinks:
            line = sink_line(seq, at, actor, action, target, outcome, detail, digest)
            for sink in self.sinks:
                sink(line)

    def record(self, tx: Tx, actor: str, action: str, target: str = "", outcome: str = "ok", **detail: Any) -> None:
        """Append an entry in ``tx``: it commits, or rolls back, with the change it describes. Made
        while serving a request, it names the caller's address (``remote``) unless given."""
        at = self.clock()
        remote = REMOTE.get()
        if remote is not None and "remote" not in detail:
            detail["remote"] = remote
        detail_s = json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)
        keys = self.barrier.keys_or_none()
        if keys is None:  # sealed: nothing can MAC it, so it stays out of the chain
            tx.insert_sealed_event(at, actor[:128], action, outcome, detail_s)
            tx.after_commit.append(lambda: self._committed(None, at, actor[:128], action, "", outcome, detail_s, None))
            log.info("audit (sealed) %s %s %s", actor, action, outcome)
            return
        seq, prev = tx.next_audit_seq()
        if (prev is None and seq > 1) or (prev is not None and not _mac_ok(keys.audit.reveal(), prev)):
            raise TamperedRow("audit", str(seq - 1))
        actor, target = actor[:128], target[:300]
        entry = _entry_bytes(seq, at, actor, action, target, outcome, detail_s)
        digest = hashlib.sha256((bytes(prev.hash) if prev else b"") + entry).digest()
        mac = entry_mac(keys.audit.reveal(), digest)
        tx.insert_audit(AuditEntry(seq, at, actor, action, target, outcome, detail_s, digest, mac))
        tx.after_commit.append(lambda: self._committed(seq, at, actor, action, target, outcome, detail_s, digest))
        log.info("audit %s %s %s %s", actor, action, target, outcome)

    def record_alone(
        self,
        actor: str,
        action: str,
        target: str = "",
        outcome: str = "refused",
        *,
        throttle: str | None = "kind",
        **detail: Any,
    ) -> None:
        """Append an entry in a transaction of its own (for refusals, whose request changed nothing).

        Refusals come from callers not yet authenticated, so anyone could flood the log with them:
        see ``RefusalThrottle``. ``throttle``: ``"kind"`` (one budget per action and reason: for
        targets the caller chooses), ``"target"`` (one budget per action, reason and target: for
        targets that exist, so a flood against one hides nothing about another), or None (always)."""
        if throttle is not None:
            scope = target if throttle == "target" else "*"
            carried = self.throttle.admit(action, outcome, str(detail.get("reason", "")), scope, self.clock())
            if carried is None:
                log.info(
                    "refused (throttled, counted, not audited): %s %s %s %s",
                    actor,
                    action,
                    target,
                    detail.get("reason", ""),
                )
                return
            if carried:
                detail["suppressed_before"] = carried
        self._write_alone(actor, action, target, outcome, **detail)

    def flush_suppressed(self) -> int:
        """Record the counts of refusals throttled in windows that have ended with no later entry of
        their kind to carry them (the scheduler calls this). Returns the entries written."""
        ended = self.throttle.ended(self.clock())
        for (action, outcome, reason, scope), count in ended:
            self._write_alone(
                "audit",
                "audit.suppressed",
                action,
                "ok",
                reason=reason,
                scope=scope,
                outcome_counted=outcome,
                count=count,
            )
        return len(ended)

    def _write_alone(self, actor: str, action: str, target: str, outcome: str, **detail: Any) -> None:
        try:
            with self.store.write(serialize=False) as tx:
                self.record(tx, actor, action, target, outcome, **detail)
        except Exception:  # the refusal itself must still reach the caller
            log.exception("could not write an audit entry for %s %s", action, target)

    def verify(self) -> Verification:
        keys = self.barrier.keys()
        prev: bytes | None = None
        count = 0
        with self.store.read() as tx:
            sealed_events = tx.count_sealed_events()
        after = 0
        expected_seq = 1
        while True:
            with self.store.read() as tx:
                batch = tx.list_audit(after=after, limit=1000)
                last = tx.last_audit_seq() if not batch else None
            if not batch:
                if last is not None and last != expected_seq - 1:
                    return Verification(count, False, sealed_events, expected_seq, "entries missing at the end")
                return Verification(count, True, sealed_events, None, "chain intact")
            for e in batch:
                if e.seq != expected_seq:
                    return Verification(count, False, sealed_events, expected_seq, "entry missing")
                want = hashlib.sha256(
                    (prev or b"") + _entry_bytes(e.seq, e.at, e.actor, e.action, e.target, e.outcome, e.detail)
                ).digest()
                if not hmac.compare_digest(want, bytes(e.hash)):
                    return Verification(count, False, sealed_events, e.seq, "hash mismatch (entry altered)")
                if e.mac is None:
                    return Verification(count, False, sealed_events, e.seq, "entry without a MAC (forged)")
                if not _mac_ok(keys.audit.reveal(), e):
                    return Verification(count, False, sealed_events, e.seq, "MAC mismatch (entry forged)")
                prev, count, expected_seq, after = bytes(e.hash), count + 1, e.seq + 1, e.seq
