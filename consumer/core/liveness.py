"""Connection liveness from application-level ping/pong and data frames (RFC 6298 smoothing).

OHIP defers pongs while it sends a burst, so a missing pong alone proves nothing: the link is
declared dead only when neither a pong nor a ``next`` frame has arrived within
``max(floor, multiplier * SRTT + 4 * RTTVAR)``, at most ``ceiling``. A pong that came after
data frames may have waited for the burst to end: it measures the burst, not the link, so it
is proof of life but no round-trip sample (else one long burst would stretch the deadline for
many minutes after it).
"""

from __future__ import annotations

from collections import deque

_ALPHA = 1 / 8  # RFC 6298 gains
_BETA = 1 / 4


def first_ping_due(init_sent_at: float, interval_s: float, now: float) -> float:
    """When a connection's first ``ping`` is due: ``interval_s`` after its ``connection_init``
    went out, not after the subscribe. OHIP wants a ping at least every 15 s and the waits
    before subscribing (the ack, the connection status, the takeover jitter) may take most of
    that. ``now`` when that time has passed already."""
    return max(init_sent_at + interval_s, now)


class Liveness:
    __slots__ = (
        "_ceiling",
        "_floor",
        "_last_alive",
        "_last_data",
        "_multiplier",
        "_pings",
        "rttvar",
        "srtt",
    )

    def __init__(
        self,
        now: float,
        *,
        floor_s: float,
        multiplier: float = 4.0,
        ceiling_s: float = float("inf"),
    ) -> None:
        self._floor = floor_s
        self._ceiling = max(ceiling_s, floor_s)
        self._multiplier = multiplier
        self._last_alive = now
        self._last_data = now
        self._pings: deque[float] = deque(maxlen=64)
        self.srtt: float | None = None
        self.rttvar: float | None = None

    def ping_sent(self, now: float) -> None:
        self._pings.append(now)

    def pong(self, now: float) -> None:
        # graphql-transport-ws pongs carry no id; they answer pings in order. A ping sent
        # before the last data frame gives no sample (its pong may have waited for the burst),
        # and is dropped here: a burst's pings may get one pong between them, and those left
        # queued would pair every later pong with a ping sent many intervals before it (SRTT
        # at the lag, the deadline at the ceiling, for the rest of the session).
        pings, last_data = self._pings, self._last_data
        while pings and pings[0] < last_data:
            pings.popleft()
        if pings:  # sent after the last data frame: nothing held this pong back
            self._sample(now - pings.popleft())
        self._last_alive = now

    def activity(self, now: float) -> None:
        """Any data frame is proof of life."""
        self._last_alive = self._last_data = now

    def unobserved(self, seconds: float) -> None:
        """Nothing could be read for ``seconds`` (the event loop was busy): don't count them."""
        self._last_alive += max(seconds, 0.0)

    def _sample(self, rtt: float) -> None:
        rtt = max(rtt, 0.0)
        if self.srtt is None or self.rttvar is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = (1 - _BETA) * self.rttvar + _BETA * abs(self.srtt - rtt)
            self.srtt = (1 - _ALPHA) * self.srtt + _ALPHA * rtt

    @property
    def timeout(self) -> float:
        if self.srtt is None or self.rttvar is None:
            return self._floor
        return min(self._ceiling, max(self._floor, self._multiplier * self.srtt + 4 * self.rttvar))

    def deadline(self) -> float:
        return self._last_alive + self.timeout

    def is_dead(self, now: float) -> bool:
        return now >= self.deadline()
