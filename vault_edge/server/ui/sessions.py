"""Console sessions: a random id in an HttpOnly cookie, mapped in this process to a token's *id*.

Why server-side, not a sealed cookie: signing out, and revoking the token, must end a session at
once, even for someone who copied the cookie. A cookie sealed under a key derived from the root key
would survive both (there would be nothing to refuse it with but a server-side deny list, which is
this table by another name), and a cookie that holds the token itself would put the token in every
request's headers and in whatever reads the browser's cookie store. Here the browser holds 256
random bits that name a row of this table; the table holds the token's id (which grants nothing by
itself: the principal is read afresh from its MAC'd row at every request, so a revoked or expired
token, or a narrowed scope, takes effect at once), a CSRF secret, and times. Only the SHA-256 of a
session id is kept, so this table alone cannot be replayed as cookies.

Costs, stated: sessions live in one process's memory, so a restart or a seal signs everyone out (a
sealed vault cannot check a token anyway), and with several replicas behind one address the console
needs sticky routing (or a sign-in per replica). The table is bounded: a token holds at most
``MAX_PER_TOKEN`` sessions (its oldest go first, so no token can sign everyone else out by signing in
over and over), and past ``MAX_SESSIONS`` the oldest of all go.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

IDLE_S = 30 * 60  # a session unused this long ends
ABSOLUTE_S = 12 * 3600  # and none outlives this, however busy
MAX_SESSIONS = 10_000
MAX_PER_TOKEN = 16  # a token's own oldest sessions go first: no token can push out everyone else's


@dataclass
class Session:
    token_id: str
    csrf: str = ""
    created: float = 0.0
    last_used: float = 0.0
    not_after: float = 0.0  # the absolute end (and never past the token's own expiry)

    def __repr__(self) -> str:  # the CSRF secret stays out of logs and tracebacks
        return f"Session(token_id={self.token_id!r})"


def _key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


class SessionStore:
    def __init__(self, clock: Callable[[], float] = time.time, max_sessions: int = MAX_SESSIONS) -> None:
        self.clock, self.max_sessions = clock, max_sessions
        self._lock = threading.Lock()
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()

    def create(self, token_id: str, token_expires_at: float | None) -> tuple[str, Session]:
        """A new session for ``token_id``; its id (for the cookie, never stored) and the session."""
        now = self.clock()
        not_after = now + ABSOLUTE_S
        if token_expires_at is not None:
            not_after = min(not_after, token_expires_at)
        session_id = secrets.token_urlsafe(32)
        session = Session(token_id, secrets.token_urlsafe(32), now, now, not_after)
        with self._lock:
            mine = [k for k, s in self._sessions.items() if s.token_id == token_id]
            for k in mine[: max(0, len(mine) - MAX_PER_TOKEN + 1)]:
                del self._sessions[k]
            self._sessions[_key(session_id)] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return session_id, session

    def get(self, session_id: str | None, touch: bool = True) -> Session | None:
        """The live session this id names (its idle timer restarted, unless ``touch`` is False: a
        page's live view polling is not someone using the console), or None."""
        if not session_id or len(session_id) > 128:
            return None
        now = self.clock()
        key = _key(session_id)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return None
            if now >= session.not_after or now - session.last_used >= IDLE_S:
                del self._sessions[key]
                return None
            if touch:
                session.last_used = now
            return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            with self._lock:
                self._sessions.pop(_key(session_id), None)

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()

    def __len__(self) -> int:
        return len(self._sessions)


def same(a: str, b: str) -> bool:
    """Compare two CSRF values in constant time, as bytes."""
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())
