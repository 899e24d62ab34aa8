"""An agent that was backing off comes back within a round trip of the unseal (``server/sealhold.py``):
real processes (a control plane restarted sealed, `vault-edge agent run`), real shares. Run with
``pytest -s`` to see the figure."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.e2e.conftest import ControlPlane, wait_until

pytestmark = pytest.mark.e2e
SEALED_FOR_S = 16.0  # long enough for the agent's failed polls to take the old back-off to ≥ 8 s


def test_a_rotation_reaches_the_agent_right_after_the_unseal(control_plane: ControlPlane, start_agent: Any) -> None:
    op = control_plane.op
    op.put("eu/db", value="before", regions=["eu"])
    agent = start_agent("eu1", "eu")  # --wait 2s
    wait_until(lambda: agent.get("eu/db") == "before", 15, "the first value")

    control_plane.restart(unseal=False)
    failed_before = agent.log().count("sync failed")
    sealed_at = time.monotonic()
    time.sleep(SEALED_FOR_S)
    failures = agent.log().count("sync failed") - failed_before
    sealed_for = time.monotonic() - sealed_at
    assert agent.get("eu/db") == "before"  # served all along
    assert agent.health()["status"] == "stale"
    # Under the old exponential back-off (base 0.5 s, doubling), the wait after the k-th failure in a
    # row is drawn from [0, 0.5 * 2^(k-1)]: from the 5th on, up to 8 s and more.
    assert failures >= 5, agent.log()[-3000:]
    # ... and no hammering: a sealed server held each poll for its wait (2 s), so about one a wait.
    assert failures <= sealed_for / 1.0 + 2, agent.log()[-3000:]

    t0 = time.monotonic()
    control_plane.unseal()
    unsealed = time.monotonic()
    op.rotate("eu/db", value="after")
    rotated = time.monotonic()
    wait_until(lambda: agent.get("eu/db") == "after", 5, "the rotation at the agent within 5 s of the unseal")
    served = time.monotonic()
    print(
        f"\nreconnect after unseal: sealed {sealed_for:.1f}s ({failures} failed polls); unseal took "
        f"{(unsealed - t0) * 1000:.0f} ms; rotation made {(rotated - unsealed) * 1000:.0f} ms after it; new value "
        f"served {(served - unsealed) * 1000:.0f} ms after the unseal ({(served - rotated) * 1000:.0f} ms after "
        f"the rotation)"
    )
    assert served - unsealed < 5.0
    assert agent.health()["status"] == "ok"
    assert agent.alive()
