"""The agent's two clocks, injected: ``monotonic()`` for ages and timeouts, ``wall()`` for dates.

The agent measures the age of its last contact with the control plane, ``--max-stale``, head and
idle timeouts on the monotonic clock (it never goes back); grace periods (``expires_at``) and the
disk cache's ``received_at`` are wall-clock dates. Everything that reads the time takes a
:class:`Clock` (``AgentState``, the socket API, the endpoint), real by default (:data:`SYSTEM`), so
tests drive time with a fake one instead of sleeping. (As the control plane's ``Context.clock``.)
"""

from __future__ import annotations

import time
from typing import Final, Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (only differences mean anything)."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch."""
        ...


class SystemClock:
    """The real clocks. The methods are the C functions themselves: a read costs what ``monotonic()`` does."""

    __slots__ = ()
    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM: Final[Clock] = SystemClock()
