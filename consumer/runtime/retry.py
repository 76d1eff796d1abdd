"""Retry helpers shared by every HTTP caller: ``Retry-After`` parsing and a tenacity wait
that honours it.

An exception carrying a ``retry_after`` attribute (seconds, or None) tells the wait how long
the server asked us to hold off; without one the fallback (jittered exponential) applies.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from datetime import UTC, datetime

from tenacity import RetryCallState

# HTTP answers worth another try (OHIP's token endpoint and REST API).
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def retry_after_seconds(value: str | None, *, cap: float = 300.0) -> float | None:
    """Parse ``Retry-After`` (delta-seconds or HTTP-date), capped at ``cap``."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(max(seconds, 0.0), cap)


class WaitRetryAfter:
    """A tenacity ``wait``: the failed attempt's ``retry_after`` if it has one, else fallback."""

    def __init__(self, fallback: Callable[[RetryCallState], float]) -> None:
        self._fallback = fallback

    def __call__(self, rs: RetryCallState) -> float:
        exc = rs.outcome.exception() if rs.outcome else None
        after = getattr(exc, "retry_after", None)
        if isinstance(after, (int, float)):
            return float(after)
        return self._fallback(rs)
