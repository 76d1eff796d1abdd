"""A sliding-window budget for WebSocket upgrade requests.

OHIP answers HTTP 429 to more than 150 upgrade requests within 2 minutes from one application
(and then wants 2 minutes of quiet). Every stream of an application key books its attempts
here, so even when every attempt fails at once the process stays under the limit.
"""

from __future__ import annotations

from collections import deque


class UpgradeBudget:
    __slots__ = ("_times", "limit", "window_s")

    def __init__(self, limit: int = 140, window_s: float = 120.0) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError("limit must be >= 1 and window_s > 0")
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque()

    def reserve(self, now: float) -> float:
        """Book the next attempt; returns how long to wait before making it (0: at once)."""
        times = self._times
        while times and times[0] <= now - self.window_s:
            times.popleft()
        at = now
        if len(times) >= self.limit:
            # It may go once the oldest of the last `limit` attempts has left the window.
            at = max(now, times[-self.limit] + self.window_s)
        if times:
            at = max(at, times[-1])
        times.append(at)
        return at - now
