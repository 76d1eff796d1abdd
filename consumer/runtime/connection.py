"""The stream's WebSocket connection: websockets' client connection, none of whose writes can
hang on a gateway that stopped reading, and whose reader takes a frame already received
without an await (:meth:`Connection.take`). The one module that knows websockets' connection
internals (its frame queue, drain, data_received); the stream runner uses what it adds.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Final, Literal, overload

import structlog
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.messages import Assembler
from websockets.exceptions import ConcurrencyError
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.typing import Data

log = structlog.get_logger(__name__)


# websockets' own queue of frames received and not yet taken by the reader counts frames, not
# bytes: while the reader waits (the pipeline is full), 64 frames of the largest size read
# (4 x max_frame_bytes: 64 MiB by default) would be 4 GiB. So as many of those as fit in
# _READ_AHEAD_BYTES, within [2, 64]: 2 by default, 64 with max_frame_bytes up to 64 KiB.
_READ_AHEAD_BYTES = 16 * 1024 * 1024


def read_ahead_frames(max_size: int) -> int:
    """websockets' ``max_queue`` for frames of at most ``max_size`` bytes."""
    return max(2, min(64, _READ_AHEAD_BYTES // max_size))


# How long a close frame may wait to be written before the TCP connection is aborted instead:
# websockets waits for the peer's answer after it (close_timeout), which a peer that reads
# nothing never sends, and connect's __aexit__ closes so when a stop cancels the session.
CLOSE_WRITE_S: Final = 1.0


# What the transport may hold unwritten once something arrives while writing is paused (past
# websockets' high-water mark, 32 KiB). websockets answers a ping inside data_received, writing
# the pong to the transport directly, never through drain(), and pings fill no max_queue: a
# gateway that stops reading and floods pings would otherwise be answered into this buffer for
# the whole write deadline (the liveness deadline, up to 600 s: hundreds of MiB). Far above
# what the client writes itself (small frames, each waiting in drain() past the mark).
UNWRITTEN_MAX: Final = 1024 * 1024


class WriteStalled(Exception):
    """Why a connection was aborted (the ``__cause__`` of its ConnectionClosed): the gateway
    stopped reading. A frame was not written within its deadline (``after_s``), or the pongs
    websockets wrote itself piled up past :data:`UNWRITTEN_MAX` (``held`` bytes unwritten)."""

    def __init__(self, after_s: float | None = None, *, held: int = 0) -> None:
        super().__init__(
            f"a frame unwritten after {after_s:.1f} s"
            if after_s is not None
            else f"{held} bytes of answers to its pings unwritten"
        )
        self.after_s = after_s
        self.held = held


class Frames(Assembler):
    """websockets' queue of frames received, with :meth:`take`: the next message when it is
    whole and waiting, without an await. A socket read brings dozens of frames in a catch-up;
    ``recv`` takes each through three coroutines and a join (some 0.7 µs an event, measured),
    where this is a pop.

    A fragmented message is joined as its frames come (:meth:`get`), bounded in bytes by
    ``max_size`` (websockets counts the whole message against it), not in frames: websockets
    keeps every frame until the last and refuses more than 4,096 (1009), and a gateway or a
    proxy that cuts frames small sends that message again at every resume."""

    @overload
    async def get(self, decode: Literal[True]) -> str: ...
    @overload
    async def get(self, decode: Literal[False]) -> bytes: ...
    @overload
    async def get(self, decode: bool | None = None) -> Data: ...

    async def get(self, decode: bool | None = None) -> Data:
        if self.get_in_progress:
            raise ConcurrencyError("get() or get_iter() is already running")
        self.get_in_progress = True
        try:
            frame = await self.frames.get(not self.closed)
            self.maybe_resume()
            if decode is None:
                decode = frame.opcode is Opcode.TEXT
            if frame.fin:
                data = bytes(frame.data)
            else:
                first, joined = frame, bytearray(frame.data)
                while not frame.fin:
                    try:
                        frame = await self.frames.get(not self.closed)
                    except asyncio.CancelledError:
                        # As websockets does: what was taken goes back, here as one frame.
                        self.frames.put_back([dataclasses.replace(first, data=bytes(joined))])
                        raise
                    self.maybe_resume()
                    joined += frame.data
                data = bytes(joined)
        finally:
            self.get_in_progress = False
        return data.decode() if decode else data

    def take(self) -> bytes | None:
        """The next message if it is a single frame already received (text or binary, as
        ``recv(decode=False)`` gives it), else None: await ``recv`` (the first frame of a
        fragmented message, nothing received, a ``recv`` under way)."""
        queue = self.frames.queue
        if not queue or self.get_in_progress or not queue[0].fin:
            return None
        data = queue.popleft().data
        if self.paused:  # maybe_resume's own test, first: a call and a len() per frame saved
            self.maybe_resume()
        return data if type(data) is bytes else bytes(data)


def nothing_taken() -> None:
    return None


class Connection(ClientConnection):
    """A client connection none of whose writes can hang on a peer that stopped reading.

    websockets writes each frame (send, ping, pong, close), then waits in :meth:`drain` for the
    transport to take it, without a limit; every later write waits behind it. Here a frame
    still unwritten after its deadline aborts the connection: lost (1006), as after a crash,
    and replaced as any lost connection. The deadline: ``write_timeout()`` for a data frame
    (set by the runner for each phase; none until then), :data:`CLOSE_WRITE_S` for the close
    frame (the opening handshake has open_timeout). A data frame's abort is logged and is the
    cause (:class:`WriteStalled`) of the ConnectionClosed that follow; a close frame's is not
    (the connection was ending anyway). What websockets writes outside drain (the pong to a
    ping, in :meth:`data_received`) is bounded by size instead: past :data:`UNWRITTEN_MAX`
    unwritten, the connection is aborted the same way."""

    write_timeout: Callable[[], float] | None = None
    recv_messages: Frames

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        queue = self.recv_messages  # nothing in it yet
        self.recv_messages = Frames(queue.high, queue.low, queue.pause, queue.resume)

    def take(self) -> bytes | None:
        """The next message if it is whole and already received (see :meth:`Frames.take`)."""
        return self.recv_messages.take()

    async def drain(self) -> None:
        state, timeout = self.protocol.state, self.write_timeout
        if state is State.OPEN and timeout is not None:
            bound = timeout()
            timer = self.loop.call_later(bound, self._abort_unwritten, bound)
            try:
                await super().drain()  # the abort ends the wait too (connection_lost)
            finally:
                timer.cancel()
            return
        if state is State.CLOSING:
            # Not cancelled once drained: the peer's answer, waited for next, needs it written.
            self.loop.call_later(CLOSE_WRITE_S, self._abort_unwritten, None)
        await super().drain()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # answers pings: send_data(), no drain()
        # ``paused`` (websockets' flag, set past the high-water mark) first: one attribute
        # read per chunk read on the usual path.
        if self.paused:
            held = self.transport.get_write_buffer_size()
            if held > UNWRITTEN_MAX and not self.transport.is_closing():
                log.warning(
                    "the gateway stopped reading: answers to its pings piled up unwritten; "
                    "connection aborted",
                    unwritten_bytes=held,
                )
                self.set_connection_exc(WriteStalled(held=held))
                self.transport.abort()

    def _abort_unwritten(self, bound: float | None) -> None:
        if self.transport.get_write_buffer_size() == 0:
            return
        if bound is not None and not self.transport.is_closing():
            log.warning(
                "the gateway stopped reading: a frame was not written within the deadline; "
                "connection aborted",
                deadline_s=round(bound, 1),
            )
            self.set_connection_exc(WriteStalled(bound))  # before the abort, as websockets does
        self.transport.abort()
