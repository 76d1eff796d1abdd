"""Low watermark over arrival order: the offset that is safe to persist.

Offsets are opaque strings, so order comes from arrival: each frame gets a local sequence
number when it is read, workers finish out of order, and the committable position is that of
the newest frame such that it and every frame before it are done. Frames without an offset
(malformed ones, dead-lettered as raw text) take a slot too, so the checkpoint never moves past
one whose dead-letter row is not yet written.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple


class Position(NamedTuple):
    """Where a stream is: one per event on the hot path (a NamedTuple: a third of the cost of
    building a frozen dataclass)."""

    offset: str
    unique_event_id: str
    # The event's own timestamp, as received (parsed once per commit, not per event): what
    # the checkpoint's event time is made of. None: unknown (operator-set, or not given).
    timestamp: str | None = None


class Watermark:
    """Not thread-safe; one per stream, driven from one event loop."""

    __slots__ = ("_base", "_done", "_last", "_pending", "_position")

    def __init__(self) -> None:
        self._base = 0  # sequence number of _pending[0]
        self._pending: deque[Position | None] = deque()
        self._done: set[int] = set()
        self._position: Position | None = None  # newest position of the done prefix
        self._last: Position | None = None  # last position handed out by advance()

    def add(self, position: Position | None) -> int:
        """Register a frame in arrival order; returns its sequence number."""
        self._pending.append(position)
        return self._base + len(self._pending) - 1

    def done(self, seq: int) -> None:
        if seq < self._base or seq >= self._base + len(self._pending):
            raise ValueError(f"sequence {seq} is not pending")
        self._done.add(seq)
        pending, done = self._pending, self._done
        while pending and self._base in done:
            done.discard(self._base)
            pos = pending.popleft()
            if pos is not None:
                self._position = pos
            self._base += 1

    def is_pending(self, seq: int) -> bool:
        """Registered and not done yet."""
        return self._base <= seq < self._base + len(self._pending) and seq not in self._done

    def cancel(self, seq: int) -> None:
        """Forget the newest frame: it was never handed to a worker (shutdown)."""
        if seq != self._base + len(self._pending) - 1:
            raise ValueError(f"only the newest frame can be cancelled, not {seq}")
        self._pending.pop()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def position(self) -> Position | None:
        """Newest position whose whole prefix is done (None until one is)."""
        return self._position

    def advance(self) -> Position | None:
        """The position to persist if it moved since the last call, else None."""
        if self._position is None or self._position is self._last:
            return None
        self._last = self._position
        return self._position

    def rewind(self) -> None:
        """The last advance() was not persisted: offer the position again."""
        self._last = None
