"""Deadlines of many short operations on one timer.

``asyncio.timeout`` makes a timer handle per use and cancels it at the end, and the loop keeps
the cancelled handles in its heap until it rebuilds it: with one webhook POST per event that
cost about a twentieth of the event loop's CPU (issue #12). Here a deadline is an entry in a
set, and one timer, armed while any deadline is live, checks them every ``tick`` seconds: an
operation is cancelled at most one tick after its deadline. On expiry a :class:`Deadline`
behaves as ``asyncio.timeout`` does: its task is cancelled, and the ``CancelledError`` coming
out of the block becomes ``TimeoutError`` unless someone else cancelled the task too (a stop),
which then goes on as a cancellation.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadlines:
    """Deadlines of ``seconds`` each (see :meth:`new`), checked every ``tick`` seconds (at
    most a tenth of ``seconds``). One event loop at a time; :meth:`close` when done."""

    def __init__(self, seconds: float, tick: float = 1.0) -> None:
        self.seconds = seconds
        self._tick = min(tick, seconds / 10)
        self._live: set[Deadline] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def new(self) -> Deadline:
        """A deadline ``seconds`` after the block it guards is entered."""
        return Deadline(self)

    def close(self) -> None:
        """Stop the timer (the live deadlines are not enforced any more)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._live.clear()

    def _enter(self, deadline: Deadline, loop: asyncio.AbstractEventLoop) -> float:
        """Register ``deadline``: returns when it expires, in ``loop``'s time."""
        self._live.add(deadline)
        if self._timer is None or self._loop is not loop:  # first, or a loop of its own now
            if self._timer is not None:
                self._timer.cancel()
            self._loop = loop
            self._timer = loop.call_later(self._tick, self._check)
        return loop.time() + self.seconds

    def _leave(self, deadline: Deadline) -> None:
        self._live.discard(deadline)

    def _check(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        for deadline in [d for d in self._live if d.when <= now]:
            self._live.discard(deadline)
            deadline._expire()
        # Re-armed while any deadline is live; the next one entered arms it again.
        self._timer = loop.call_later(self._tick, self._check) if self._live else None


class Deadline:
    """A block (``with``, in a task) cancelled once its deadline passed; see the module."""

    __slots__ = ("_cancelling", "_deadlines", "_expired", "_task", "when")

    def __init__(self, deadlines: Deadlines) -> None:
        self._deadlines = deadlines
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._expired = False
        self.when = 0.0  # loop time; set when entered

    def __enter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None or self._task is not None:
            raise RuntimeError("a Deadline is entered once, in a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.when = self._deadlines._enter(self, task.get_loop())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._deadlines._leave(self)
        if self._expired:
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def renew(self) -> None:
        """The whole deadline again, from now (a part of the work done). Nothing once it
        expired."""
        if self._task is not None and not self._expired:
            self.when = self._task.get_loop().time() + self._deadlines.seconds

    def expired(self) -> bool:
        return self._expired

    def _expire(self) -> None:
        self._expired = True
        assert self._task is not None
        self._task.cancel()
