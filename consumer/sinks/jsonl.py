"""JSON Lines sink: one line per event, the ``newEvent`` object as received.

Exactly-once across ``kill -9``: lines are appended to an in-memory buffer; the committer
writes and fsyncs the buffer, then records the file length in the same SQLite transaction as
the checkpoint. On start the file is cut back to the committed length, which removes lines the
checkpoint does not cover (those events are replayed).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import orjson
import structlog

from ..core.events import Event
from ..errors import TransientSinkError

log = structlog.get_logger(__name__)


class JsonlSink:
    name = "jsonl"
    transactional = True

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self._fsync = fsync
        self._fd: int | None = None
        self._durable = 0  # bytes on disk that a checkpoint may cover
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._lock = asyncio.Lock()

    async def open(self, committed: str | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        size = os.fstat(fd).st_size
        length = int(committed) if committed else 0
        if size < length:
            log.warning(
                "jsonl file is shorter than the committed length; was it rotated or truncated?",
                path=str(self.path),
                size=size,
                committed=length,
            )
            length = size
        elif size > length:
            # Lines written after the last checkpoint: their events will be replayed.
            os.ftruncate(fd, length)
            os.fsync(fd)
            log.info("cut uncommitted tail of jsonl file", path=str(self.path), bytes=size - length)
        self._fd = fd
        self._durable = length

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
                raise TransientSinkError(f"writing {self.path}: {exc}") from exc
            # Only now drop the buffer: after a failure or a cancellation the next sync writes
            # the same bytes again at the same position (pwrite), which is harmless.
            del self._buffer[:parts]
            self._buffered -= len(data)
            self._durable += len(data)

    def _append(self, at: int, data: bytes) -> None:
        assert self._fd is not None, "sink not open"
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, at)
            at += written
            view = view[written:]
        if self._fsync:
            os.fsync(self._fd)

    async def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
