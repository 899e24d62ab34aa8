"""Load shedding: a bound on the requests of one kind in flight; past it, refused at once with 503
and ``Retry-After`` instead of queued.

Why: enrolment runs on the default thread pool and its writes are serialized by the database, so an
enrolment storm (a fleet started at once) queued unboundedly waits longer than the 60 s window a
signed request's timestamp is good for, and longer than the agent's read timeout: the work is wasted
and the agent retries into the same queue. A bound keeps the wait of an admitted request at most
``limit`` times the time of one enrolment; the rest are told when to come back (the agent adds its own
jitter, so a refused fleet does not return in lockstep). Counted on the event loop only (acquired and
released by the route's coroutine), so a plain counter suffices; the slot is held until the worker
thread's answer is back (the app is not cancelled when a client goes away), so the count is the work
really in flight.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vault_edge.server.errors import ApiError


class InFlight:
    def __init__(self, what: str, limit: int, retry_after_s: int) -> None:
        if limit < 1 or retry_after_s < 1:
            raise ValueError("the in-flight limit and Retry-After are at least 1")
        self.what, self.limit, self.retry_after_s = what, limit, retry_after_s
        self.active = 0
        self.shed = 0  # refused since start, for metrics and tests

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a slot for the block; ApiError 503 ``overloaded`` with ``Retry-After`` when none is free."""
        if self.active >= self.limit:
            self.shed += 1
            raise ApiError(
                503,
                "overloaded",
                f"too many {self.what} in progress ({self.limit}); retry after {self.retry_after_s}s",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
