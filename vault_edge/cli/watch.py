"""Following the local agent's revision: the loop under ``agent exec --restart-on-change`` and
``agent render``.

Each call long-polls the agent's ``/v1/watch`` for at most ``WATCH_S`` (local, so one request a
second at most while nothing changes, and a stop flag set by a signal handler is seen within that).
An agent that goes away (no answer, or 503 ``not_ready``/``too_stale`` on a read) is said once, with
what stays as it is meanwhile, retried every ``WATCH_S``, and said again once it answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vault_edge.client import AgentClient, AgentError

WATCH_S = 1.0


def agent_away(exc: AgentError) -> bool:
    """True for the errors that mean "no agent to read from now" (retry later), not "this read is wrong"."""
    return exc.status in (0, 503)


class AgentWatch:
    def __init__(
        self,
        client: AgentClient,
        revision: int,
        say: Callable[[str], None],
        keeps: str,
        *,
        wait_s: float = WATCH_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client, self.revision, self.say, self.keeps = client, revision, say, keeps
        self.wait_s, self.sleep = wait_s, sleep
        self.down = False

    def next(self) -> int | None:
        """The revision the agent has moved to past ``self.revision``, or None (no change within
        ``WATCH_S``, or the agent is away). The caller reads at it, then sets ``self.revision``."""
        try:
            seen = int(self.client.watch(self.revision, self.wait_s)["revision"])
        except AgentError as exc:
            self.away(exc)
            return None
        if seen == self.revision:
            self.back()  # it answers, and there is nothing new to read
            return None
        return seen

    def away(self, exc: AgentError) -> None:
        """The agent did not answer (a watch, or the read after it): say so once, wait, retry."""
        if not self.down:
            self.down = True
            self.say(f"cannot reach the agent ({exc.message}); {self.keeps}; retrying")
        self.sleep(self.wait_s)

    def back(self) -> None:
        """The agent answered (a read after a change, or a watch with nothing new)."""
        if self.down:
            self.down = False
            self.say("the agent answers again")
