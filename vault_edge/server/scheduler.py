"""Background duties of the control plane, in one thread, each safe with several replicas:

- rotate secrets whose ``--rotate-every`` is due (a compare-and-set on ``next_rotation_at`` lets
  exactly one replica win each due rotation; the schedule lives in the database, so it survives
  restarts); a secret kept by a rotator starts a rotation at the source instead;
- run the steps of rotations at the source (``ops.rotation``: each step leased to one replica);
- end the grace of ``previous`` versions whose time is up (a new revision, so nodes drop them);
- forget spent request nonces once they are past the clock-skew window;
- record how many refusals the audit throttle counted in windows that have ended;
- check, once a minute, that the change log has no gap (see ``ops.system.check_change_log``).
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from vault_edge.server.auth import VERBS, Principal
from vault_edge.server.context import Context
from vault_edge.server.ops import keyring, rotation, secrets, system

log = logging.getLogger("vault_edge.scheduler")
SCHEDULER = Principal("scheduler", "scheduler", ("",), VERBS, kind="system")
CHANGE_LOG_CHECK_S = 60  # how often the change log is checked for gaps (and at every unseal)
RETRY_AFTER_S = 60  # a scheduled rotation that failed is tried again after this (or its period, if shorter)


class Scheduler:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_log_check = 0.0
        # The last failures (at, what, secret name, error class), for the console; never a message,
        # which could quote anything.
        self.failures: deque[tuple[float, str, str, str]] = deque(maxlen=50)
        self.failed = 0  # failures since start (the metrics' counter; the deque keeps only the last)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vault-edge-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.ctx.settings.scheduler_interval_s):
            if self.ctx.barrier.sealed:
                continue
            try:
                self.tick()
            except Exception as exc:
                log.exception("scheduler tick failed")
                self.failed += 1
                self.failures.append((self.ctx.clock(), "tick", "", type(exc).__name__))

    def tick(self) -> None:
        now = self.ctx.clock()
        if now >= self._next_log_check:  # a whole-log count: once a minute is enough
            self._next_log_check = now + CHANGE_LOG_CHECK_S
            system.check_change_log(self.ctx)
        self.rotate_due()
        rotation.run_active(self.ctx)
        self.expire_stages()
        with self.ctx.store.write(serialize=False) as tx:
            tx.purge_nonces(self.ctx.clock())
        self.ctx.auditor.flush_suppressed()

    def rotate_due(self) -> int:
        now, done = self.ctx.clock(), 0
        with self.ctx.store.read() as tx:
            due = tx.secrets_due(now)
        for s in due:
            if not s.rotate_every_s or s.next_rotation_at is None:
                continue
            try:  # the claim and the rotation commit together: a failed rotation stays due
                claim = (s.id, s.next_rotation_at, now + s.rotate_every_s)
                if s.rotator:  # kept by a rotator: start a rotation at the source (skipped mid-rotation)
                    done += rotation.start(self.ctx, SCHEDULER, s.name, "scheduled", claim) is not None
                else:
                    done += secrets.rotate_if_due(self.ctx, SCHEDULER, s.name, claim)
            except Exception as exc:  # one secret's failure must not stop the others' rotations
                self.failures.append((now, "rotation", s.name, type(exc).__name__))
                self.failed += 1
                retry_at = now + min(RETRY_AFTER_S, s.rotate_every_s)
                log.exception("scheduled rotation of %s failed; retrying in %ds", s.name, retry_at - now)
                try:  # back off, so a secret that always fails cannot hog every tick
                    with self.ctx.store.write() as tx:
                        tx.claim_rotation(s.id, s.next_rotation_at, retry_at)
                except Exception:  # the database itself failing: the next tick tries again
                    log.exception("could not defer the rotation of %s", s.name)
        return done

    def expire_stages(self) -> int:
        now = self.ctx.clock()
        with self.ctx.store.read() as tx:
            if not tx.expired_stages(now):
                return 0
        with self.ctx.store.write() as tx:
            expired = tx.expired_stages(now)
            if not expired:
                return 0
            rev = tx.next_revision()
            for secret, stage in expired:
                tx.set_stage(secret.id, stage, None, rev, now)
                tx.touch_regions(keyring.effective_regions(tx, secret), rev)
                self.ctx.auditor.record(tx, "scheduler", "secret.grace_end", secret.name, stage=stage)
        return len(expired)
