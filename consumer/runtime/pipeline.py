"""Per-stream pipeline: bounded per-worker queues, partitioned by ``primaryKey``.

The reader calls :meth:`StreamPipeline.put` for each event (it waits when the worker's queue is
full, so backpressure reaches the server through TCP; nothing is dropped). Events of one
resource always go to the same worker, so they are processed in arrival order while different
resources run in parallel. Each worker takes what is queued as a batch: skip ids already
processed, write the rest to the sink, report them to the committer, mark them done in the
watermark.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import zlib
from collections.abc import Callable, Sequence

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from ..core.events import Event
from ..core.evidence import describe, event_evidence, prefix
from ..core.protocol import DecodeError
from ..core.watermark import Position, Watermark
from ..errors import PermanentSinkError, SinkError, SinkUnusable, TransientSinkError
from ..logs import RateLimitedLogger
from ..sinks.base import Sink
from .committer import Committer
from .retry import WaitRetryAfter
from .store import CommitBatch, DeadLetter, Store

log = structlog.get_logger(__name__)

_Item = tuple[int, Event]


class StreamPipeline:
    def __init__(
        self,
        stream: str,
        *,
        store: Store,
        sink: Sink,
        committer: Committer,
        workers: int,
        queue_size: int,
        batch_max: int,
        retry_initial_s: float,
        retry_max_s: float,
        parked: dict[str, str] | None = None,
    ) -> None:
        """``parked``: given for a park-key stream, the resources that have dead letters
        (primaryKey -> the uniqueEventId they are parked behind)."""
        self.stream = stream
        self.watermark = Watermark()
        self._store = store
        self._sink = sink
        self._committer = committer
        self._batch_max = batch_max
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        per_worker = max(1, queue_size // workers)
        self._queues: list[asyncio.Queue[_Item]] = [
            asyncio.Queue(per_worker) for _ in range(workers)
        ]
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self.delivered = 0
        self.duplicates = 0
        # Called after each successful sink write: (seconds it took, newest event written).
        self.on_write: Callable[[float, Event], None] | None = None
        self.dead_lettered = 0
        # park-key: primaryKey -> the event it is parked behind. A key whose dead letter is not
        # committed yet stays parked whatever the store says: only after the commit may its
        # absence there mean that an operator replayed or purged it.
        self._park = parked is not None
        self._parked: dict[str, str] = dict(parked or {})
        self._uncommitted: set[str] = set()
        # A flood of bad frames or failing writes: a few lines a second, and a count of the rest.
        self._log = RateLimitedLogger(log, per_s=5.0)
        committer.register(stream, self.watermark)
        if self._park:
            committer.on_commit.append(self._confirm_parked)

    def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._worker(q), name=f"worker-{self.stream}-{i}")
            for i, q in enumerate(self._queues)
        ]

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return self._tasks

    # --- intake (called by the reader) ------------------------------------------------------

    def try_put(self, event: Event) -> bool:
        """Queue the event unless its worker's queue is full (then call :meth:`put`)."""
        queue = self._queue_for(event)
        if queue.full():
            return False
        seq = self.watermark.add(Position(event.offset, event.unique_event_id))
        self._idle.clear()
        queue.put_nowait((seq, event))
        return True

    async def put(self, event: Event) -> None:
        """Queue the event, waiting while its worker's queue is full."""
        seq = self.watermark.add(Position(event.offset, event.unique_event_id))
        self._idle.clear()
        try:
            await self._queue_for(event).put((seq, event))
        except asyncio.CancelledError:
            self.watermark.cancel(seq)  # never queued: it will be replayed
            self._maybe_idle()
            raise

    def malformed_fits(self) -> bool:
        """Can a malformed frame be dead-lettered now (else await :meth:`put_malformed`)?"""
        return not self._committer.full

    async def put_malformed(self, error: DecodeError) -> None:
        """A frame that cannot be decoded: dead-letter a bounded copy of it, in its place in
        line. Waits for capacity like an event does: a flood of bad frames is backpressure,
        not memory."""
        await self._committer.wait_capacity()
        seq = self.watermark.add(None)
        self._committer.dead_letter(
            DeadLetter.of(
                error.evidence, stream=self.stream, reason="malformed", error=error.reason
            )
        )
        self.dead_lettered += 1
        self.watermark.done(seq)
        self._maybe_idle()
        self._log.warning(
            "malformed frame dead-lettered",
            stream=self.stream,
            error=error.reason,
            bytes=error.evidence.size,
        )

    async def anchor(self, event: Event) -> None:
        """Persist ``event`` as the checkpoint of a stream that has none (its first event)."""
        await self._committer.anchor(self.stream, Position(event.offset, event.unique_event_id))

    def _queue_for(self, event: Event) -> asyncio.Queue[_Item]:
        queues = self._queues
        return queues[zlib.crc32(event.primary_key.encode()) % len(queues)]

    # --- drain ------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self.watermark.in_flight

    async def drained(self) -> None:
        """Returns when every event handed to :meth:`put` is done."""
        while self.watermark.in_flight:
            self._idle.clear()
            await self._idle.wait()

    async def stop(self) -> None:
        """Cancel the workers (idempotent). Events not done are replayed at the next start."""
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- workers ----------------------------------------------------------------------------

    async def _worker(self, queue: asyncio.Queue[_Item]) -> None:
        while True:
            batch = [await queue.get()]
            while len(batch) < self._batch_max and not queue.empty():
                batch.append(queue.get_nowait())
            await self._committer.wait_capacity()
            try:
                await self._process(batch)
            except SinkUnusable:
                raise  # writing on could lose data: the daemon stops (exit 78)
            except Exception as exc:  # a bug: never a dead worker, never a lost event
                self._rescue(batch, exc)
            self._maybe_idle()

    def _rescue(self, batch: list[_Item], exc: Exception) -> None:
        """Last resort: dead-letter what of the batch is not done yet, so that the stream goes
        on and nothing is lost (the DLQ can replay it once the cause is fixed)."""
        log.error(
            "unexpected error while handling events; dead-lettering them",
            stream=self.stream,
            error=describe(exc),
            exc_info=exc,
        )
        for seq, ev in batch:
            if self.watermark.is_pending(seq):
                self._dead_letter(ev, exc, reason="internal_error")
                self.watermark.done(seq)

    def _maybe_idle(self) -> None:
        if not self.watermark.in_flight:
            self._idle.set()

    async def _process(self, batch: list[_Item]) -> None:
        stream = self.stream
        ids = [ev.unique_event_id for _, ev in batch]
        # Pending ids first, then the store: an id cannot slip between the two checks.
        seen = self._committer.pending_ids(stream, ids)
        seen |= await self._retrying("deduplication lookup", self._store.seen, stream, ids, seen)
        fresh: list[_Item] = []
        dup_seqs: list[int] = []
        for seq, ev in batch:
            if ev.unique_event_id in seen:
                dup_seqs.append(seq)
            else:
                seen.add(ev.unique_event_id)  # a repeat inside this batch
                fresh.append((seq, ev))
        if dup_seqs:
            self.duplicates += len(dup_seqs)
            self._committer.skipped(stream, len(dup_seqs))
            for seq in dup_seqs:
                self.watermark.done(seq)
        if fresh:
            await self._deliver(fresh)

    async def _deliver(self, items: list[_Item]) -> None:
        if self._parked:
            items = self._hold_parked(items)
            if not items:
                return
        events = [ev for _, ev in items]
        try:
            await self._write(events)
        except PermanentSinkError as exc:
            await self._isolate(items, exc)
            return
        except (TransientSinkError, SinkUnusable):
            raise  # transient ones are retried inside _write until they clear
        except Exception as exc:
            # Anything else the sink raised (an event it cannot serialize, a bug in a user's
            # handler): permanent for the event at fault, found by delivering one by one.
            await self._isolate(items, PermanentSinkError(describe(exc)), reason="unprocessable")
            return
        self._done(items)

    def _done(self, items: Sequence[_Item]) -> None:
        self._committer.processed(self.stream, [ev.unique_event_id for _, ev in items])
        self.delivered += len(items)
        for seq, _ in items:
            self.watermark.done(seq)

    async def _isolate(
        self, items: list[_Item], exc: PermanentSinkError, *, reason: str = "sink_rejected"
    ) -> None:
        """A batch with a poison event: dead-letter the culprit, deliver the rest in order."""
        culprit = exc.unique_event_id if len(items) > 1 else items[0][1].unique_event_id
        at = next((i for i, it in enumerate(items) if it[1].unique_event_id == culprit), None)
        if at is None:  # a culprit the sink does not name (or not in this batch): one by one
            for item in items:
                await self._deliver([item])
            return
        # Those before the culprit first: with park-key, those after it of the same resource
        # are then held back (its dead letter parks the key).
        if at:
            await self._deliver(items[:at])
        seq, ev = items[at]
        self._dead_letter(ev, exc, reason=reason)
        self.watermark.done(seq)
        if at + 1 < len(items):
            await self._deliver(items[at + 1 :])

    def _hold_parked(self, items: list[_Item]) -> list[_Item]:
        """park-key: dead-letter the events of parked resources; return the others."""
        free: list[_Item] = []
        checked: set[str] = set()
        for seq, ev in items:
            key = ev.primary_key
            if key in self._parked and key not in checked:
                checked.add(key)
                if key not in self._uncommitted and not self._has_dead_letters(key):
                    del self._parked[key]  # replayed or purged by an operator: flow again
                    log.info("resource unparked", stream=self.stream, primary_key=key)
            if key in self._parked:
                self._dead_letter(ev, None)
                self.watermark.done(seq)
            else:
                free.append((seq, ev))
        return free

    def _confirm_parked(self, batch: CommitBatch) -> None:
        for d in batch.dead_letters:
            if d.stream == self.stream and d.primary_key is not None:
                self._uncommitted.discard(d.primary_key)

    def _has_dead_letters(self, key: str) -> bool:
        try:
            return self._store.has_dead_letters(self.stream, key)
        except sqlite3.Error:
            return True  # unknown: stay parked (order first); the next batch asks again

    def _dead_letter(self, ev: Event, exc: Exception | None, *, reason: str = "") -> None:
        """``exc`` None: held back because the resource is parked."""
        self.dead_lettered += 1
        if exc is None:
            behind = self._parked[ev.primary_key]
            reason, error = "parked", f"primaryKey {ev.primary_key} is parked behind {behind}"
        else:
            # A sink's own error says what it means; anything else is named by its type.
            text = prefix(str(exc), 1000) if isinstance(exc, SinkError) else describe(exc)
            reason, error = reason or "sink_rejected", text
            if self._park and ev.primary_key not in self._parked:
                self._parked[ev.primary_key] = ev.unique_event_id
                self._uncommitted.add(ev.primary_key)
        self._log.warning(
            "event dead-lettered",
            stream=self.stream,
            offset=ev.offset,
            unique_event_id=ev.unique_event_id,
            event_name=ev.event_name,
            reason=reason,
            error=error,
        )
        self._committer.dead_letter(
            DeadLetter.of(
                event_evidence(ev),
                stream=self.stream,
                reason=reason,
                error=error,
                offset=ev.offset,
                unique_event_id=ev.unique_event_id,
                event_name=ev.event_name,
                primary_key=ev.primary_key,
            )
        )

    async def _retrying(
        self,
        what: str,
        lookup: Callable[[str, list[str]], set[str]],
        stream: str,
        ids: list[str],
        known: set[str],
    ) -> set[str]:
        """A store lookup that may fail for a while (locked, I/O error): retried with backoff
        until it answers, the batch waiting meanwhile (no event is guessed new)."""
        todo = [i for i in ids if i not in known]
        delay = self._retry_initial
        while True:
            try:
                return lookup(stream, todo)
            except sqlite3.Error as exc:
                self._log.warning(f"{what} failed; retrying", stream=stream, error=describe(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)

    async def _write(self, events: list[Event]) -> None:
        # A transient failure is retried until it clears (or we are cancelled at shutdown);
        # meanwhile this worker's queue fills and the reader stops reading.
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(TransientSinkError),
            # A sink that says when to come back (Retry-After) is taken at its word.
            wait=WaitRetryAfter(
                wait_exponential_jitter(
                    multiplier=self._retry_initial, max=self._retry_max, jitter=self._retry_initial
                )
            ),
            before_sleep=lambda rs: self._log.warning(
                "sink write failed; retrying",
                stream=self.stream,
                attempt=rs.attempt_number,
                error=describe(rs.outcome.exception() if rs.outcome else None),
            ),
            reraise=True,
        ):
            with attempt:
                started = time.perf_counter()
                await self._sink.write(self.stream, events)
        if self.on_write is not None:
            self.on_write(time.perf_counter() - started, events[-1])
