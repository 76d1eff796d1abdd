"""The two timing rules OHIP sets around ``subscribe`` (reference §2.1, §2.5), as plain
arithmetic the stream runner applies:

* the gap after a completed subscription: a ``subscribe`` too soon after the previous one on
  the same stream was completed and closed gets 4409 (and the lockout). The close time is kept
  in the state store, on the store's clock (the database's in a fleet, never the closing
  host's), so a restarted daemon or a fleet member taking the stream over waits out what
  remains of it (:func:`gap_left`);
* ``subscribe`` within ``subscribe_deadline_s`` of ``connection_init``: the ack wait, the
  connection-status answer and the takeover jitter all come out of one budget
  (:class:`SubscribeDeadline`), and a subscribe that would be late is never sent.
"""

from __future__ import annotations

from dataclasses import dataclass

# The waits before subscribe end this long before the deadline (a loop that wakes late must
# not make us miss it). The setting must exceed it (config validation).
SUBSCRIBE_MARGIN_S = 0.5


def gap_left(closed_at: float | None, now: float, gap_s: float) -> float:
    """Seconds still to wait before subscribing, given when the previous completed
    subscription was closed (None: none recorded) and the time now, both on one clock (the
    state store's: in a fleet, the database's, never two hosts'). Never more than ``gap_s``: a
    clock that jumped back (a close "in the future") must not stretch the wait."""
    if closed_at is None or gap_s <= 0:
        return 0.0
    return max(0.0, min(gap_s, closed_at + gap_s - now))


@dataclass(frozen=True, slots=True)
class SubscribeDeadline:
    """When ``subscribe`` is due on a connection whose ``connection_init`` went out at
    ``sent_at`` (monotonic): the waits before it end :data:`SUBSCRIBE_MARGIN_S` early (for a
    loop that wakes late), and it is never sent after the deadline itself. (The gateway's
    clock starts when the init arrives and stops when the subscribe does: one trip each,
    which cancel out.)"""

    at: float  # the deadline itself

    @classmethod
    def after_init(cls, sent_at: float, deadline_s: float) -> SubscribeDeadline:
        return cls(sent_at + deadline_s)

    def left(self, now: float) -> float:
        """How long a wait before subscribing may still last."""
        return max(0.0, self.at - SUBSCRIBE_MARGIN_S - now)

    def bound(self, limit_s: float, now: float) -> tuple[float, bool]:
        """A wait of at most ``limit_s`` cut to what is left; and whether the deadline, not
        ``limit_s``, is what cuts it (a timeout then means: too late to subscribe)."""
        left = self.left(now)
        return min(limit_s, left), left < limit_s

    def passed(self, now: float) -> bool:
        return now > self.at
