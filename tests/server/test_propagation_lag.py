"""The propagation-lag histogram: a node's report observes the age of the oldest change it had not applied."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from vault_edge.server.metrics import _COMMITS_KEPT, PropagationLag


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _observed(registry: CollectorRegistry) -> tuple[float, float]:
    count = registry.get_sample_value("vault_edge_propagation_lag_seconds_count") or 0.0
    total = registry.get_sample_value("vault_edge_propagation_lag_seconds_sum") or 0.0
    return count, total


def test_a_report_observes_the_oldest_change_it_had_not_applied() -> None:
    reg, clock = CollectorRegistry(), Clock()
    lag = PropagationLag(reg, clock)
    for rev, at in ((5, 1000.0), (7, 1002.0), (9, 1004.0)):
        clock.now = at
        lag.committed(rev, frozenset({"eu"}))
    clock.now = 1010.0
    lag.applied({"n1": 4})  # first report: no baseline, nothing observed
    assert _observed(reg) == (0, 0)
    lag.applied({"n1": 8})  # had 4, now 8: revisions 5 and 7 reached it; the oldest (5) was 10 s ago
    assert _observed(reg) == (1, 10.0)
    lag.applied({"n1": 8})  # the same revision again: nothing new
    lag.applied({"n1": 6})  # an older one (another replica's view of it): nothing
    assert _observed(reg) == (1, 10.0)
    clock.now = 1011.0
    lag.applied({"n1": 9})  # 9, committed at 1004
    assert _observed(reg) == (2, 17.0)
    lag.applied({"n1": 12})  # past every change of this replica: nothing to observe
    assert _observed(reg) == (2, 17.0)


def test_commits_out_of_order_and_the_bound_on_what_is_kept() -> None:
    reg, clock = CollectorRegistry(), Clock()
    lag = PropagationLag(reg, clock)
    lag.committed(3, frozenset())
    clock.now = 1001.0
    lag.committed(2, frozenset())  # a listener that ran late
    lag.applied({"n": 1})
    clock.now = 1005.0
    lag.applied({"n": 3})
    assert _observed(reg) == (1, 4.0)  # revision 2's commit, the oldest after 1
    for rev in range(10, 10 + 3 * _COMMITS_KEPT):
        lag.committed(rev, frozenset())
    assert len(lag._revs) <= 2 * _COMMITS_KEPT and lag._revs == sorted(lag._revs)
