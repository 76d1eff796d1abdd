"""``Retry-After`` and any other wait a far end asks for, parsed and bounded in one place.

Every HTTP client of the process (token endpoint, REST API, webhook) and the python sink's
exceptions go through here: NaN, infinity, negative or unparseable values fall back to the
caller's normal backoff, and the rest is clamped so that "0" is no tight loop and "1e9" no hang.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

from tenacity import RetryCallState

# HTTP answers worth another try (OHIP's token endpoint and REST API).
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# Besides every 5xx: the far end's timeout, "too early", throttling.
_TRANSIENT_4XX = frozenset({408, 425, 429})


def transient_status(status: int) -> bool:
    """Whether an answer to a sink's request (webhook POST, orchestration GET) is the far
    end's passing trouble rather than the event's fault: 408, 425, 429 and every status from
    500 up. An outage answers what its proxy or CDN likes (501, 507, 520-530...): taking
    those as the event's fault would dead-letter every event of the outage."""
    return status >= 500 or status in _TRANSIENT_4XX


# Bounds on any wait a far end asks for: "0" must not become a tight loop, nor "1e9" a hang.
RETRY_AFTER_MIN_S: Final = 0.5
RETRY_AFTER_MAX_S: Final = 300.0


def clamp_retry_after(seconds: object) -> float | None:
    """A wait the far end asked for, made safe: None (use the normal backoff) unless it is a
    finite, non-negative number; then clamped to [RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S]."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return None
    try:
        value = float(seconds)
    except OverflowError:  # an integer beyond any float
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return min(max(value, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)


def retry_after_seconds(value: str | None) -> float | None:
    """Parse ``Retry-After`` (delta-seconds or HTTP-date) once, for every HTTP client.

    Unparseable, negative, NaN or infinite: None (the caller's normal backoff applies). A date
    in the past means "now", i.e. the minimum.
    """
    if not value or len(value) > 64:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = max(0.0, (when - datetime.now(UTC)).total_seconds())
    return clamp_retry_after(seconds)


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
