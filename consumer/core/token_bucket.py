"""A token bucket: ``rate`` requests per second on average, ``burst`` at once. Pure (the
caller passes the clock and does the sleeping)."""

from __future__ import annotations


class TokenBucket:
    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def take(self, now: float) -> float:
        """Take a token and return 0.0, or return how long to wait before asking again."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate

    def hold(self, now: float, seconds: float) -> None:
        """The server said "not before ``seconds``" (429 Retry-After): empty the bucket so
        the next token appears only then, for every caller."""
        self._refill(now)
        self._tokens = min(self._tokens, -seconds * self.rate)
