"""Retry helpers shared by every HTTP caller: ``Retry-After`` parsing and a tenacity wait
that honours it.

An exception carrying a ``retry_after`` attribute (seconds, or None) tells the wait how long
the server asked us to hold off; without one the fallback (jittered exponential) applies.
"""

from __future__ import annotations

from collections.abc import Callable

from tenacity import RetryCallState

from ..core.retry_after import clamp_retry_after, retry_after_seconds

__all__ = ["RETRY_STATUSES", "WaitRetryAfter", "clamp_retry_after", "retry_after_seconds"]

# HTTP answers worth another try (OHIP's token endpoint and REST API).
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class WaitRetryAfter:
    """A tenacity ``wait``: the failed attempt's ``retry_after`` if it has a sane one, else
    the fallback."""

    def __init__(self, fallback: Callable[[RetryCallState], float]) -> None:
        self._fallback = fallback

    def __call__(self, rs: RetryCallState) -> float:
        exc = rs.outcome.exception() if rs.outcome else None
        after = clamp_retry_after(getattr(exc, "retry_after", None))
        if after is not None:
            return after
        return self._fallback(rs)
