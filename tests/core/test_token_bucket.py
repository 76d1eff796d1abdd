"""The token bucket behind the orchestration stage's rate limit (pure: the test owns time)."""

from __future__ import annotations

import pytest

from consumer.core.token_bucket import TokenBucket


def test_burst_then_the_rate() -> None:
    b = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(0.0) == pytest.approx(0.5)  # one token every 1/rate seconds
    assert b.take(0.25) == pytest.approx(0.25)
    assert b.take(0.5) == 0.0
    assert b.take(0.5) == pytest.approx(0.5)


def test_refill_never_exceeds_the_burst() -> None:
    b = TokenBucket(rate=10.0, burst=2, now=0.0)
    assert b.take(100.0) == 0.0
    assert b.take(100.0) == 0.0
    assert b.take(100.0) > 0.0


def test_hold_empties_the_bucket_for_the_servers_delay() -> None:
    b = TokenBucket(rate=4.0, burst=4, now=0.0)
    b.hold(0.0, 2.0)  # a 429 with Retry-After: 2
    assert b.take(1.0) > 0.0
    assert b.take(2.0) == pytest.approx(0.25)  # just refilled to zero at t=2
    assert b.take(2.25) == 0.0


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=0.0, burst=1, now=0.0)
