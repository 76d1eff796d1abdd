"""Low watermark over arrival order: the offset that is safe to persist.

Offsets are opaque strings, so order comes from arrival: each frame gets a local sequence
number when it is read, workers finish out of order, and the committable position is that of
the newest frame such that it and every frame before it are done. Frames without an offset
(malformed ones, dead-lettered as raw text) take a slot too, so the checkpoint never moves past
one whose dead-letter row is not yet written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol


class Position(NamedTuple):
    """Where a stream is."""

    offset: str
    unique_event_id: str
    # The event's own timestamp, as received (parsed once per commit, not per event): what
    # the checkpoint's event time is made of. None: unknown (operator-set, or not given).
    timestamp: str | None = None


class Positioned(Protocol):
    """What a frame's slot holds: a :class:`Position`, or an event (read as one once per
    batch of completions that moves the done prefix, not once per event)."""

    @property
    def offset(self) -> str: ...
    @property
    def unique_event_id(self) -> str: ...
    @property
    def timestamp(self) -> str | None: ...


def _position(p: Positioned | None) -> Position | None:
    if p is None or type(p) is Position:
        return p
    return Position(p.offset, p.unique_event_id, p.timestamp)


class Watermark:
    """Not thread-safe; one per stream, driven from one event loop.

    The frames in flight are ``_slots[_head:]``, the first with sequence number ``_base``; done
    ones wait in ``_done`` until the prefix before them is done. Completions come in batches
    (a worker's), so the prefix is advanced once per batch, not once per frame, and the newest
    done event read as a :class:`Position` then: the watermark keeps no event once it is done
    (an idle stream held its last one, text and detail, for as long as it stayed idle)."""

    __slots__ = ("_base", "_done", "_head", "_last", "_position", "_slots")

    def __init__(self) -> None:
        self._base = 0  # sequence number of _slots[_head]
        self._head = 0
        self._slots: list[Positioned | None] = []
        self._done: set[int] = set()
        self._position: Position | None = None  # newest position of the done prefix
        self._last: Position | None = None  # last position handed out by advance()

    def add(self, position: Positioned | None) -> int:
        """Register a frame in arrival order; returns its sequence number."""
        return self.add_all((position,))

    def add_all(self, positions: Sequence[Positioned | None]) -> int:
        """Register frames in arrival order; returns the first one's sequence number (the
        others follow it)."""
        first = self._base + len(self._slots) - self._head
        self._slots.extend(positions)
        return first

    def done(self, seq: int) -> None:
        self.done_all((seq,))

    def done_all(self, seqs: Sequence[int]) -> None:
        """Mark frames done (any order); a sequence number not in flight is a ValueError."""
        if not seqs:
            return
        base, done = self._base, self._done
        if min(seqs) < base or max(seqs) >= base + len(self._slots) - self._head:
            bad = next(s for s in seqs if not base <= s < base + len(self._slots) - self._head)
            raise ValueError(f"sequence {bad} is not pending")
        done.update(seqs)
        if base not in done:
            self._keep_positions(seqs)
            return
        end = base + 1
        while end in done:
            end += 1
        done.difference_update(range(base, end))
        slots, head = self._slots, self._head
        stop = head + end - base
        for i in range(stop - 1, head - 1, -1):  # newest frame with a position
            if slots[i] is not None:
                self._position = _position(slots[i])
                break
        self._base = end
        if stop >= 1024 and stop * 2 >= len(slots):
            del slots[:stop]  # amortised: the done prefix is dropped in bulk
            self._head = 0
        else:
            slots[head:stop] = [None] * (stop - head)  # let the done events go
            self._head = stop
        if done and max(seqs) >= end:
            self._keep_positions(seqs)

    def _keep_positions(self, seqs: Sequence[int]) -> None:
        """Done frames behind one that is not: each keeps its position, not its event (text,
        detail), while it waits. A worker stuck on one event holds the prefix back for as long
        as it retries; what is done meanwhile then holds a few hundred bytes each."""
        base, head, slots = self._base, self._head, self._slots
        for seq in seqs:
            if seq >= base:
                i = head + seq - base
                p = slots[i]
                if p is not None and type(p) is not Position:
                    slots[i] = Position(p.offset, p.unique_event_id, p.timestamp)

    def is_pending(self, seq: int) -> bool:
        """Registered and not done yet."""
        return self._base <= seq < self._base + self.in_flight and seq not in self._done

    @property
    def in_flight(self) -> int:
        return len(self._slots) - self._head

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
