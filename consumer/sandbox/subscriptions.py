"""The single-consumer rule of the ``/subscriptions`` WebSocket: which session holds each
chain's subscription (a second subscriber gets 4409), the hold after a subscriber dropped
without ``complete`` (``stale_hold_s``), where each chain's last stream stopped (a subscribe
without an offset resumes there), and the set of open sessions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .options import SandboxStats

Session = TypeVar("Session")  # a WebSocket session: only its identity matters here


class Subscriptions(Generic[Session]):
    """Shared by the sessions of one gateway."""

    def __init__(
        self, stale_hold_s: float, stats: SandboxStats, clock: Callable[[], float]
    ) -> None:
        self.sessions: set[Session] = set()
        self._stale_hold_s = stale_hold_s
        self._stats = stats
        self._clock = clock
        self._active: dict[str, Session] = {}
        self._stale_until: dict[str, float] = {}
        self._delivered: dict[str, int] = {}

    def any_active(self) -> bool:
        return bool(self._active)

    def claim(self, chain: str, session: Session) -> bool:
        """Make ``session`` the chain's subscriber; False if another one (or the hold of a
        dropped one) has it."""
        holder = self._active.get(chain)
        stale = self._stale_until.get(chain, 0.0) > self._clock()
        if (holder is not None and holder is not session) or stale:
            return False
        self._active[chain] = session
        self._stats.active_subscriptions[chain] = self._stats.active_subscriptions.get(chain, 0) + 1
        return True

    def release(self, chain: str, session: Session, *, completed: bool) -> None:
        if self._active.get(chain) is session:
            del self._active[chain]
            self._stats.active_subscriptions[chain] -= 1
            if not completed and self._stale_hold_s > 0:
                self._stale_until[chain] = self._clock() + self._stale_hold_s

    def resume_index(self, chain: str) -> int:
        return self._delivered.get(chain, 0)

    def delivered(self, chain: str, index: int) -> None:
        self._delivered[chain] = index
