"""JSON Lines sink: one line per event, the ``newEvent`` object as received.

Exactly-once across ``kill -9``: lines are appended to an in-memory buffer; the committer
writes and fsyncs the buffer, then records the file length in the same SQLite transaction as
the checkpoint. On start the file is cut back to the committed length, which removes lines the
checkpoint does not cover (those events are replayed).

It never cuts bytes it cannot prove uncommitted: a non-empty file that the state store has no
length for (a new or replaced state store) stops the start (:class:`~consumer.errors.
SinkUnusable`, exit 78) until an operator moves the file aside or adopts it
(``opera-consumer sink adopt``). While running, each sync checks that the
path still names the open file and that it did not shrink, so a file rotated, truncated or
removed underneath stops the daemon instead of writing NUL bytes or into a deleted file.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import orjson
import structlog

from ..core.events import Event
from ..core.records import Staged
from ..errors import SinkUnusable, TransientSinkError

log = structlog.get_logger(__name__)

ADOPT_HINT = (
    "move the file aside (the stream then replays into a new one), or run "
    "`opera-consumer sink adopt` to record its current length as committed"
)


class JsonlSink:
    name = "jsonl"
    transactional = True

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self._fsync = fsync
        self._fd: int | None = None
        self._identity = (0, 0)
        self._durable = 0  # bytes on disk that a checkpoint may cover
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._lock = asyncio.Lock()

    async def open(self, committed: str | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(fd).st_size
            length = self._committed_length(committed, size)
            if size > length:
                # Lines written after the last checkpoint: their events will be replayed.
                os.ftruncate(fd, length)
                os.fsync(fd)
                log.info(
                    "cut uncommitted tail of jsonl file", path=str(self.path), bytes=size - length
                )
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._identity = _identity(os.fstat(fd))
        self._durable = length

    def _committed_length(self, committed: str | None, size: int) -> int:
        if committed is None:
            if size:
                raise SinkUnusable(
                    f"jsonl file {self.path} holds {size} bytes, but the state store has no "
                    f"committed length for it, so none of them can be proven uncommitted: "
                    f"{ADOPT_HINT}"
                )
            return 0
        try:
            length = int(committed)
        except ValueError:
            raise SinkUnusable(
                f"jsonl file {self.path}: the state store's committed length is not a number: "
                f"{ADOPT_HINT}"
            ) from None
        if size < length:
            # Shortened or removed between runs (shipped away by hand, say): nothing of ours
            # to cut; append after what is there.
            log.warning(
                "jsonl file is shorter than the committed length; was it moved or truncated?",
                path=str(self.path),
                size=size,
                committed=length,
            )
            return size
        return length

    def check(self) -> None:
        """Raise :class:`SinkUnusable` unless the path still names our file, unshrunk."""
        assert self._fd is not None, "sink not open"
        mine = os.fstat(self._fd)
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            named = None
        if named is None or _identity(named) != self._identity or mine.st_nlink == 0:
            raise SinkUnusable(
                f"jsonl file {self.path} was removed or replaced while the daemon wrote to it "
                "(external rotation is not supported): restart the daemon; events not yet "
                "committed are replayed into the file the path names then"
            )
        if mine.st_size < self._durable:
            raise SinkUnusable(
                f"jsonl file {self.path} shrank to {mine.st_size} bytes below the "
                f"{self._durable} committed while the daemon wrote to it: restore it, or "
                f"{ADOPT_HINT}, then restart"
            )

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        # No await here: the position() snapshot must cover exactly the writes that returned.
        line = orjson.OPT_APPEND_NEWLINE
        data = b"".join([orjson.dumps(ev.document(), option=line) for ev in events])
        self._buffer.append(data)
        self._buffered += len(data)

    def position(self) -> str | None:
        return str(self._durable + self._buffered)

    async def sync(self, position: str | None) -> None:
        async with self._lock:
            target = int(position) if position is not None else self._durable + self._buffered
            if target <= self._durable:
                return
            parts = len(self._buffer)
            data = b"".join(self._buffer)
            try:
                await asyncio.to_thread(self._append, self._durable, data)
            except OSError as exc:
                raise TransientSinkError(f"writing {self.path}: {exc.strerror}") from exc
            # Only now drop the buffer: after a failure or a cancellation the next sync writes
            # the same bytes again at the same position (pwrite), which is harmless.
            del self._buffer[:parts]
            self._buffered -= len(data)
            self._durable += len(data)

    def _append(self, at: int, data: bytes) -> None:
        assert self._fd is not None, "sink not open"
        self.check()
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, at)
            at += written
            view = view[written:]
        if self._fsync:
            os.fsync(self._fd)

    def staged(self) -> Staged | None:
        return None  # its bytes are made durable by sync(), its length is the position

    def counters(self) -> dict[str, float]:
        return {}

    async def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)
