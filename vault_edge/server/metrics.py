"""The control plane's fleet metrics, beside the request metrics of ``app.py``.

- **Fleet gauges**, read from the database when Prometheus scrapes (a scrape every 15-60 s costs one
  read of the nodes and regions): nodes by region and state (ok, lagging, down, revoked: the
  console's classes), regions' key versions. Row MACs are checked on that read, so they need the
  unsealed barrier: while sealed the fleet families are empty and ``vault_edge_sealed`` says why.
- **Propagation lag**: a histogram of the seconds from a change's commit on this replica to each
  node reporting (on its next long-poll) a revision that includes it. Commits made through other
  replicas are measured by those replicas.
- **Counters**: audit entries by action and outcome (after commit), rotations (manual and
  scheduled) and scheduler failures, since this replica started.

Labels carry region names, node states, audit actions and outcomes: never a secret's name or value.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("vault_edge.server")

LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
_COMMITS_KEPT = 4096
_NODES_KEPT = 100_000


class PropagationLag:
    """Commit times of this replica's changes, and each node's last reported revision; a node
    reporting a revision past changes it had not yet applied observes the oldest such change's age."""

    def __init__(self, registry: CollectorRegistry, clock: Any = time.time) -> None:
        self.clock = clock
        self.histogram = Histogram(
            "vault_edge_propagation_lag_seconds",
            "from a change's commit (on this replica) to a node reporting it applied",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self._lock = threading.Lock()
        # Commit revisions in order, and their times: a node's report finds the oldest change it had not
        # applied by bisection (every long-poll reports, so a scan per report grew with the changes kept).
        self._revs: list[int] = []
        self._times: list[float] = []
        self._applied: dict[str, int] = {}

    def committed(self, revision: int, regions: frozenset[str]) -> None:
        """A Store listener: runs after each local commit that changed something nodes see."""
        with self._lock:
            at = bisect.bisect_right(self._revs, revision)  # in order, even if listeners ran out of it
            self._revs.insert(at, revision)
            self._times.insert(at, self.clock())
            if len(self._revs) > 2 * _COMMITS_KEPT:
                del self._revs[:_COMMITS_KEPT], self._times[:_COMMITS_KEPT]

    def applied(self, reports: dict[str, int]) -> None:
        """Nodes' applied revisions, as their signed requests report them (ContactLog, after commit)."""
        now = self.clock()
        with self._lock:
            for node, revision in reports.items():
                before = self._applied.get(node)
                if before is not None and revision <= before:
                    continue
                if len(self._applied) >= _NODES_KEPT and before is None:
                    self._applied.clear()
                self._applied[node] = revision
                if before is None:
                    continue  # first report since this replica started: no baseline
                at = bisect.bisect_right(self._revs, before)  # the first change after what it had
                if at < len(self._revs) and self._revs[at] <= revision:
                    self.histogram.observe(max(0.0, now - self._times[at]))


class FleetCollector(Collector):
    def __init__(self, ctx: Any, scheduler: Any) -> None:
        self.ctx, self.scheduler = ctx, scheduler

    def describe(self) -> Iterator[Any]:
        """The families' names, without samples: a scrape restricted to other names (``/metrics?name[]=``,
        Prometheus' convention) then skips this collector and its read of the database."""
        yield CounterMetricFamily("vault_edge_audit_entries", "", labels=["action", "outcome"])
        yield CounterMetricFamily("vault_edge_rotations", "")
        yield CounterMetricFamily("vault_edge_scheduler_failures", "")
        yield GaugeMetricFamily("vault_edge_nodes", "", labels=["region", "state"])
        yield GaugeMetricFamily("vault_edge_region_key_version", "", labels=["region"])
        yield GaugeMetricFamily("vault_edge_fleet_scrape_ok", "")

    def collect(self) -> Iterator[Any]:
        counts = self.ctx.auditor.counts
        entries = CounterMetricFamily(
            "vault_edge_audit_entries", "audit entries committed since start", labels=["action", "outcome"]
        )
        for (action, outcome), n in sorted(counts.items()):
            entries.add_metric([action, outcome], n)
        yield entries
        yield CounterMetricFamily(
            "vault_edge_rotations",
            "secrets rotated (by operators and the scheduler) since start",
            value=counts.get(("secret.rotate", "ok"), 0),
        )
        yield CounterMetricFamily(
            "vault_edge_scheduler_failures",
            "scheduler failures (a scheduled rotation, a tick) since start",
            value=getattr(self.scheduler, "failed", 0),
        )
        nodes = GaugeMetricFamily(
            "vault_edge_nodes", "nodes by region and state (ok, lagging, down, revoked)", labels=["region", "state"]
        )
        keys = GaugeMetricFamily(
            "vault_edge_region_key_version", "each region's current key version", labels=["region"]
        )
        ok = 1.0
        if not self.ctx.barrier.sealed:
            try:
                self._fleet(nodes, keys)
            except Exception as exc:  # a tampered row, the database away: say so, keep the rest
                ok = 0.0
                log.warning("metrics: fleet gauges unavailable (%s)", type(exc).__name__)
        yield nodes
        yield keys
        yield GaugeMetricFamily(
            "vault_edge_fleet_scrape_ok", "0 when the fleet could not be read at this scrape", value=ok
        )

    def _fleet(self, nodes: GaugeMetricFamily, keys: GaugeMetricFamily) -> None:
        from vault_edge.server.scheduler import SCHEDULER
        from vault_edge.server.ui.views import fleet

        doc = fleet(self.ctx, SCHEDULER)
        states = ("ok", "lagging", "down", "revoked")
        for region in doc["regions"]:
            per = dict.fromkeys(states, 0)
            for n in region["node_list"]:
                per[n["state"]] += 1
            for state in states:
                nodes.add_metric([region["name"], state], per[state])
            keys.add_metric([region["name"]], region["key_version"])


def install(registry: CollectorRegistry, ctx: Any, scheduler: Any, contacts: Any) -> PropagationLag:
    """Add the fleet collector and the propagation-lag histogram to ``registry``, fed by the store's
    commits and the contact log's reports."""
    registry.register(FleetCollector(ctx, scheduler))
    lag = PropagationLag(registry, ctx.clock)
    ctx.store.add_listener(lag.committed)
    contacts.on_applied = lag.applied
    return lag


def authorized(header: str | None, token: str | None) -> bool:
    """``Authorization: Bearer TOKEN`` when a metrics token is set (constant-time), else always."""
    import hmac

    if not token:
        return True
    return hmac.compare_digest((header or "").encode(), f"Bearer {token}".encode())
