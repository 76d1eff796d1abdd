"""The single-consumer rule of the ``/subscriptions`` WebSocket: which session holds each
chain's subscription (a second subscriber gets 4409), the hold after a subscriber dropped
without ``complete`` (``stale_hold_s``), the gap after a completed one
(``resubscribe_gap_s``), where each chain's last stream stopped (a subscribe
without an offset resumes there), the application key each subscription was made with (for
the ``connection`` query), and the set of open sessions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Literal, TypeVar

from .options import SandboxStats

Session = TypeVar("Session")  # a WebSocket session: only its identity matters here

# Another live session holds the chain; the stale hold; too soon after a completed one.
Refusal = Literal["held", "stale", "gap"]


class Subscriptions(Generic[Session]):
    """Shared by the sessions of one gateway."""

    def __init__(
        self,
        stale_hold_s: float,
        stats: SandboxStats,
        clock: Callable[[], float],
        *,
        gap_s: float = 0.0,
    ) -> None:
        self.sessions: set[Session] = set()
        self._stale_hold_s = stale_hold_s
        self._stats = stats
        self._clock = clock
        self._active: dict[str, tuple[Session, str]] = {}  # chain -> holder, its app key
        self._stale_until: dict[str, float] = {}
        self._gap_s = gap_s
        self._completed_at: dict[str, float] = {}  # chain -> when a completed one was released
        self._delivered: dict[str, int] = {}

    def any_active(self) -> bool:
        return bool(self._active)

    def active_for(self, app_key: str) -> bool:
        """Whether some chain is subscribed by a session initialized with ``app_key``."""
        return any(key == app_key for _, key in self._active.values())

    def claim(self, chain: str, session: Session, app_key: str = "") -> Refusal | None:
        """Make ``session`` (initialized with ``app_key``) the chain's subscriber; else why
        not: another live session holds it ("held"), or the hold of a dropped one ("stale")."""
        held = self._active.get(chain)
        if held is not None and held[0] is not session:
            return "held"
        if self._stale_until.get(chain, 0.0) > self._clock():
            return "stale"
        done = self._completed_at.get(chain)
        if done is not None and self._clock() - done < self._gap_s:
            return "gap"
        self._active[chain] = (session, app_key)
        self._stats.active_subscriptions[chain] = self._stats.active_subscriptions.get(chain, 0) + 1
        return None

    def release(self, chain: str, session: Session, *, completed: bool) -> None:
        held = self._active.get(chain)
        if held is not None and held[0] is session:
            del self._active[chain]
            self._stats.active_subscriptions[chain] -= 1
            if not completed and self._stale_hold_s > 0:
                self._stale_until[chain] = self._clock() + self._stale_hold_s
            if completed:
                self._completed_at[chain] = self._clock()

    def resume_index(self, chain: str) -> int:
        return self._delivered.get(chain, 0)

    def delivered(self, chain: str, index: int) -> None:
        self._delivered[chain] = index
