"""Group commit: processed ids, dead letters, sink position and checkpoints, in one transaction.

Workers report finished events here without any I/O; a single task commits at most every
``commit_max_events`` events or ``commit_interval_ms``, whichever comes first. The snapshot of
what to commit is taken without awaiting, so the checkpoint, the processed ids and the sink
position always describe the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable

import structlog
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter

from ..core.evidence import prefix
from ..core.watermark import Position, Watermark
from ..errors import StoreError, TransientSinkError
from ..sinks.base import Sink
from ..sinks.sqlite import StoreTableSink
from .store import CommitBatch, DeadLetter, Store

log = structlog.get_logger(__name__)


class Committer:
    def __init__(
        self,
        store: Store,
        sink: Sink,
        *,
        max_events: int,
        interval_s: float,
        max_pending: int | None = None,
        max_pending_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self._store = store
        self._sink = sink
        # A sink whose table lives in the store: its rows go into our transaction.
        inner = getattr(sink, "inner", sink)  # under orchestration
        self._table_sink = inner if isinstance(inner, StoreTableSink) else None
        self._max_events = max_events
        self._interval = interval_s
        self._max_pending = max_pending or max_events * 20
        # Dead letters carry payloads (each bounded): their bytes count against capacity too,
        # so a flood of large malformed frames waits for commits like events do.
        self._max_pending_bytes = max_pending_bytes
        self._pending_bytes = 0
        self._watermarks: dict[str, Watermark] = {}
        self._batch = CommitBatch()
        self._pending = 0
        # Ids in a commit that has not finished yet: still "seen" for deduplication.
        self._committing: dict[str, set[str]] = {}
        self._pending_ids: dict[str, set[str]] = {}
        self._wake = asyncio.Event()
        self._committed = asyncio.Event()
        self._lock = asyncio.Lock()
        self.commits = 0
        self.busy_since: float | None = None  # monotonic start of the commit under way
        self.failing_since: float | None = None  # monotonic time of the first failed commit
        self.failures = 0  # consecutive failed commits
        self.checkpointed_at: dict[str, float] = {}  # stream -> monotonic time it last moved
        # Called with each batch once it is durable (park-key learns its dead letters are).
        self.on_commit: list[Callable[[CommitBatch], None]] = []

    def register(self, stream: str, watermark: Watermark) -> None:
        self._watermarks[stream] = watermark
        self._pending_ids[stream] = set()
        self._committing[stream] = set()

    # --- called by workers, no I/O ----------------------------------------------------------

    def processed(self, stream: str, event_ids: list[str]) -> None:
        self._batch.processed.setdefault(stream, []).extend(event_ids)
        self._pending_ids.setdefault(stream, set()).update(event_ids)
        self._committing.setdefault(stream, set())
        self._count(stream, len(event_ids))

    def resolved(self, dead_letter_id: int) -> None:
        """A dead letter delivered by a replay: removed in the same transaction."""
        self._batch.resolved.append(dead_letter_id)
        self._pending += 1

    def skipped(self, stream: str, n: int) -> None:
        """Duplicates: nothing to record, but the watermark moved."""
        self._count(stream, 0, n)

    def dead_letter(self, letter: DeadLetter) -> None:
        self._batch.dead_letters.append(letter)
        self._pending_bytes += len(letter.payload) + len(letter.error)
        if self._pending_bytes >= self._max_pending_bytes // 4:
            self._wake.set()  # large dead letters: commit early rather than hold them
        self._count(letter.stream, 0, 1)

    def _count(self, stream: str, done: int, other: int = 0) -> None:
        if done:
            counts = self._batch.done_counts
            counts[stream] = counts.get(stream, 0) + done
        self._pending += done + other
        if self._pending >= self._max_events:
            self._wake.set()

    def pending_ids(self, stream: str, event_ids: list[str]) -> set[str]:
        pending, committing = self._pending_ids[stream], self._committing[stream]
        return {e for e in event_ids if e in pending or e in committing}

    @property
    def full(self) -> bool:
        return self._pending >= self._max_pending or self._pending_bytes >= self._max_pending_bytes

    async def wait_capacity(self) -> None:
        """Backpressure when commits fail or fall behind: workers (and the reader, before a
        dead letter) wait here."""
        while self.full:
            self._committed.clear()
            self._wake.set()
            await self._committed.wait()

    # --- the commit task --------------------------------------------------------------------

    async def run(self) -> None:
        """Commit forever; cancel to stop (then call :meth:`flush` once more)."""
        async for attempt in AsyncRetrying(
            # Anything that may clear by itself (a locked or full disk, a sink that is down);
            # anything else (a corrupt store, a sink file replaced underneath) ends the daemon.
            retry=retry_if_exception(_may_clear),
            wait=wait_exponential_jitter(multiplier=0.2, max=30.0, jitter=0.2),
            before_sleep=lambda rs: log.warning(
                "commit failed; retrying",
                failures=self.failures,
                error=prefix(str(rs.outcome.exception() if rs.outcome else ""), 500),
            ),
        ):
            with attempt:
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._interval)
                    self._wake.clear()
                    # A commit under way finishes even if we are cancelled meanwhile.
                    await asyncio.shield(self.flush())

    async def flush(self) -> bool:
        """Commit what is done now. Returns True when something was committed."""
        async with self._lock:
            batch = self._snapshot()
            if not batch:
                # Only duplicates since the last commit: the snapshot freed their capacity,
                # so workers waiting in wait_capacity() may go on (else they wait forever
                # when one of them holds the event the checkpoint waits for).
                self._committed.set()
                return False
            self.busy_since = time.monotonic()
            try:
                await self._sink.sync(batch.sink_state[1] if batch.sink_state else None)
                await self._store.commit(batch)
            except BaseException as exc:
                self._restore(batch)
                if not isinstance(exc, asyncio.CancelledError):
                    self.failures += 1
                    if self.failing_since is None:
                        self.failing_since = time.monotonic()
                raise
            finally:
                self.busy_since = None
            self.failures = 0
            self.failing_since = None
            for stream, ids in batch.processed.items():
                self._committing[stream].difference_update(ids)
            now = time.monotonic()
            for stream in batch.checkpoints:
                self.checkpointed_at[stream] = now
            self.commits += 1
            for hook in self.on_commit:
                hook(batch)
            self._committed.set()
            return True

    async def anchor(self, stream: str, position: Position) -> None:
        """Create the stream's checkpoint if it has none (never moves an existing one)."""
        async with self._lock:
            await self._store.anchor(stream, position)

    async def prune(self, older_than: float) -> int:
        """Prune processed ids between commits (both use the one writer connection)."""
        async with self._lock:
            return await self._store.prune_processed(older_than)

    def _snapshot(self) -> CommitBatch:
        batch, self._batch = self._batch, CommitBatch()
        self._pending = 0
        self._pending_bytes = 0
        for stream, wm in self._watermarks.items():
            pos = wm.advance()
            if pos is not None:
                batch.checkpoints[stream] = pos
        for stream, ids in batch.processed.items():
            self._committing[stream].update(ids)
            self._pending_ids[stream].difference_update(ids)
        if self._table_sink is not None:
            batch.sink_table = self._table_sink.table
            batch.sink_rows = self._table_sink.take()
        if batch:
            position = self._sink.position()
            if position is not None:
                batch.sink_state = (self._sink.name, position)
        return batch

    def _restore(self, batch: CommitBatch) -> None:
        """A failed commit: put its content back in front of what came since."""
        newer, self._batch = self._batch, batch
        for stream, ids in newer.processed.items():
            batch.processed.setdefault(stream, []).extend(ids)
        for stream, n in newer.done_counts.items():
            batch.done_counts[stream] = batch.done_counts.get(stream, 0) + n
        batch.dead_letters.extend(newer.dead_letters)
        batch.sink_rows.extend(newer.sink_rows)
        batch.resolved.extend(newer.resolved)
        for stream, ids in batch.processed.items():
            self._committing[stream].difference_update(ids)
            self._pending_ids[stream].update(ids)
        # Checkpoints: the watermark re-offers its current position at the next snapshot.
        for stream in batch.checkpoints:
            self._watermarks[stream].rewind()
        batch.checkpoints.clear()
        batch.sink_state = None
        self._pending = (
            sum(len(v) for v in batch.processed.values())
            + len(batch.dead_letters)
            + len(batch.resolved)
        )
        self._pending_bytes = sum(len(d.payload) + len(d.error) for d in batch.dead_letters)


def _may_clear(exc: BaseException) -> bool:
    if isinstance(exc, TransientSinkError | sqlite3.OperationalError | OSError):
        return True
    return isinstance(exc, StoreError) and exc.retriable
