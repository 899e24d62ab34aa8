"""The agent's sync loop after a failed poll: the wait is the back-off or a 503's Retry-After, never
a tight loop. (The exchange itself, against hostile answers on real sockets: test_http1.py.)"""

from __future__ import annotations

import random
from pathlib import Path

from vault_edge.agent import identity as ident
from vault_edge.agent.cache import DiskCache
from vault_edge.agent.sync import MIN_POLL_GAP_S, RETRY_AFTER_CAP_S, Backoff, PathFailure, Syncer
from vault_edge.agent.view import AgentState


# -- the wait after a failed poll ---------------------------------------------------------------
def _syncer(tmp_path: Path) -> Syncer:
    syncer = Syncer(ident.load_or_create(tmp_path / "state"), AgentState(), DiskCache(tmp_path / "state"), "http://cp")
    syncer.backoff = Backoff(rng=random.Random(7))
    return syncer


def test_without_a_hint_the_back_off_grows_to_its_cap(tmp_path: Path) -> None:
    s = _syncer(tmp_path)
    delays = [s._sync_delay(PathFailure("ConnectError"), 0.01) for _ in range(40)]
    assert all(0 <= d <= 30 for d in delays) and max(delays[20:]) > 8  # the back-off reached its tens of seconds


def test_a_503_retry_after_replaces_the_back_off_spread_and_capped(tmp_path: Path) -> None:
    s = _syncer(tmp_path)
    for _ in range(10):
        s._sync_delay(PathFailure("ConnectError"), 0.01)  # a long outage: the back-off is at its cap
    held = [s._sync_delay(PathFailure("503: sealed", retry_after=0.0), 2.1) for _ in range(20)]
    assert held == [0.0] * 20  # held by a sealed server for its wait: back in a held poll at once
    shed = [s._sync_delay(PathFailure("503: sealed", retry_after=10.0), 0.01) for _ in range(20)]
    assert all(10 <= d <= 20 for d in shed) and len(set(shed)) > 1  # honoured, spread over [hint, 2 * hint]
    huge = s._sync_delay(PathFailure("503", retry_after=RETRY_AFTER_CAP_S), 0.01)
    assert huge == s.backoff.cap  # a relay's huge hint waits no longer than the back-off ever would


def test_no_answer_makes_the_poll_loop_spin(tmp_path: Path) -> None:
    """A relay answering every poll at once with ``503 Retry-After: 0``: polls start at least
    MIN_POLL_GAP_S apart, jittered (a fleet behind that relay does not poll in lockstep)."""
    s = _syncer(tmp_path)
    gaps = [elapsed + s._sync_delay(PathFailure("503", retry_after=0.0), elapsed) for elapsed in (0.0, 0.001, 0.3)]
    gaps += [0.0 + s._sync_delay(PathFailure("503", retry_after=0.0), 0.0) for _ in range(20)]
    assert all(MIN_POLL_GAP_S <= g <= 2 * MIN_POLL_GAP_S for g in gaps), gaps
    assert len(set(gaps)) > 1
