"""Reading on while the stream's reader waits for room downstream, so server pings get answered.

The reader stops reading while the pipeline is full (a sink that is slow, or down and retried
for minutes): aiohttp's queue fills (512 KiB), aiohttp stops reading the socket, and the
gateway's ``ping`` goes unanswered, though OHIP wants the ``pong`` at once (reference 2.6: it
paces its bursts by that round trip, and may drop a client that does not answer: a replay, maybe
a 4409 lockout after it). So once a wait has lasted ``after_s``, a task reads on for the reader:
a ping is answered at once, a pong taken for the liveness clock, and every other outcome (an
event, a malformed frame, an ignored one, the server's end of the subscription...) held in
arrival order until the wait ends, when the reader handles the held ones first, exactly as if it
had just read them. It stops reading once the held frames reach ``limit_bytes``, each counted
for its length and :data:`HELD_COST` (then the old way: TCP backpressure), at the server's end
of our subscription (the reader reads on from there itself), and when the connection closes (the
reader's next ``recv`` raises the close, after what is held).

Nothing held is registered anywhere until the reader hands it on (``StreamPipeline.add`` and
``put_malformed`` register with the committer), so what is dropped held (the reader cancelled
at shutdown) is what the next session's inclusive replay from the checkpoint brings again. So
is the frame it was handling when reading ahead failed (a bug): the failure is held after what
was read before it, and the reader, reaching it, ends the session there (:class:`ReadAheadFailed`).

The connection's ``recv`` is cancellation-safe (aiohttp joins a message's fragments in its
parser and queues whole messages; its queue's waiter only signals, the message is taken after
the wait), so stopping the task loses no frame; a ``send`` of one text frame writes it before
its first suspension (the drain), so stopping the task while it answers a ping loses no pong
either. The
pong goes out through the stream's bounded send: a gateway that stopped reading has the
connection aborted rather than this task wait for the drain for good.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import structlog
from websockets.exceptions import ConnectionClosed

from ..core.liveness import Liveness
from ..core.protocol import Next
from ..core.session import ClientSession, Ended, Outcome, PongReceived, Reply

if TYPE_CHECKING:
    from .connection import Connection
    from .stream import StreamStats

log = structlog.get_logger(__name__)


class ReadAheadFailed(Exception):
    """Raised to the reader where reading ahead failed (a bug): the frame it was handling was
    taken off the connection and is in no outcome, so the session ends there, as when the
    reader's own handling of a frame fails, and the next one replays it."""


@dataclass(frozen=True, slots=True)
class _Failed:
    """Held after the outcomes read before the failure: :meth:`ReadAhead.take` raises it."""

    error: Exception


# What an outcome held costs beyond its frame's length: an empty frame's DecodeError holds some
# 410 bytes (its evidence: a SHA-256, a reason; the tuple and the deque's slot), a malformed
# 1 KB frame's 1,520, a small event's 500 for 105 bytes (tracemalloc, CPython 3.11). Counted
# by length alone, empty frames were held for nothing against the limit: without bound.
HELD_COST: Final = 512


class ReadAhead:
    """One session's read-ahead. The reader calls :meth:`pause` when it starts waiting for
    room, :meth:`resume` (awaited) when the wait ends, whatever ended it, and :meth:`close` when
    the session ends; between waits it takes :attr:`held` outcomes with :meth:`take` before it
    reads the socket again."""

    def __init__(
        self,
        ws: Connection,
        send: Callable[[str], Awaitable[None]],
        session: ClientSession,
        liveness: Liveness,
        stats: StreamStats,
        *,
        after_s: float,
        limit_bytes: int,
    ) -> None:
        self._ws = ws
        self._send = send  # the stream's ws.send, bounded by a deadline
        self._receive = session.receive
        self._liveness = liveness
        self._stats = stats
        self._after = after_s
        self._limit = limit_bytes
        # (what it is counted for: its frame's length and HELD_COST, its outcome), in arrival
        # order; filled by the task during a wait, emptied by the reader between waits (never
        # both at once).
        self.held: deque[tuple[int, Outcome | _Failed]] = deque()
        self.held_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        # No more reading ahead this session: the server ended our subscription (the reader
        # reads on from its end itself), the connection closed, or reading ahead failed.
        self._over = limit_bytes <= 0
        self._full_logged = False

    @property
    def reading(self) -> bool:
        """A task reads ahead now (it stops once the held frames reach the limit)."""
        return self._task is not None and not self._task.done()

    @property
    def full(self) -> bool:
        """The held frames reached the limit: nothing more is read until the reader takes
        some."""
        return self.held_bytes >= self._limit > 0

    def pause(self) -> None:
        """The reader starts waiting for room: read ahead once the wait has lasted ``after_s``
        (a healthy catch-up's waits, milliseconds, never get there)."""
        if self._over or self.full:
            return
        assert self._timer is None and self._task is None, "pause() while paused"
        if self._after <= 0:
            self._start()
        else:
            self._timer = asyncio.get_running_loop().call_later(self._after, self._start)

    async def resume(self) -> None:
        """The wait is over (room came, or an error or a cancel ended it): stop reading ahead
        before the reader reads again (aiohttp allows one read at a time)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is None:
            return
        task.cancel()  # a no-op once it has stopped by itself
        await asyncio.wait((task,))
        self._task = None  # not before: a cancel of the reader meanwhile leaves it to close()

    def take(self) -> Outcome:
        """The oldest held outcome, for the reader to handle as if just read.
        :class:`ReadAheadFailed` where reading ahead failed."""
        size, out = self.held.popleft()
        self.held_bytes -= size
        if isinstance(out, _Failed):
            raise ReadAheadFailed("reading ahead failed: the session ends") from out.error
        return out

    async def close(self) -> None:
        """The session ends: stop reading ahead (idempotent). Held outcomes are dropped, said
        at info: nothing of them was registered, so the next session's replay brings them."""
        self._over = True
        await self.resume()
        if self.held:
            log.info(
                "frames read ahead and not handled dropped: the next session replays them",
                frames=len(self.held),
                events=sum(1 for _, out in self.held if type(out) is Next),
                bytes=self.held_bytes,
            )
            self.held.clear()
            self.held_bytes = 0

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.create_task(self._read(), name="read-ahead")

    async def _read(self) -> None:
        ws, send, receive, liveness = self._ws, self._send, self._receive, self._liveness
        held = self.held
        monotonic = time.monotonic
        try:
            while self.held_bytes < self._limit:
                frame = await ws.recv(decode=False)
                out = receive(frame)
                now = monotonic()
                if type(out) is PongReceived:
                    liveness.pong(now)
                    continue
                # Data is proof of life, and a pong after it no round-trip sample (it may have
                # waited for a burst): as when the reader reads it.
                liveness.activity(now)
                if type(out) is Reply:  # the answer to a server ping: at once
                    await send(out.text)
                    self._stats.paused_pings += 1
                    continue
                size = len(frame) + HELD_COST
                held.append((size, out))
                self.held_bytes += size
                if isinstance(out, Ended):
                    self._over = True
                    return
        except ConnectionClosed:
            self._over = True  # the reader's next recv raises it, after what is held
            return
        except Exception as exc:  # a bug: stop reading ahead, never lose what is held
            # Nor the frame it was handling, taken off the connection: the reader ends the
            # session where it was (held after the others), and the replay brings it again.
            self._over = True
            held.append((0, _Failed(exc)))
            log.error("reading ahead failed; the session ends where it failed", exc_info=exc)
            return
        if not self._full_logged:
            self._full_logged = True
            log.info(
                "read-ahead limit reached while waiting for room: reading stops until the sink "
                "makes room (server pings wait too; logged once per session)",
                held_bytes=self.held_bytes,
                frames=len(held),
                paused_read_ahead_bytes=self._limit,
            )
