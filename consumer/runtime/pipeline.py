"""Per-stream pipeline: per-worker queues, partitioned by ``primaryKey``, bounded.

The reader calls :meth:`StreamPipeline.add` for each event, which never waits. The events read
in one go (until the reader waits for the socket) are handed over together: registered with
the committer in one call, then partitioned into the workers' queues, so the per-event cost is
a list append, not a queue operation, a wake-up and a watermark step each. When the queues hold
``queue_size`` events or ``queue_max_bytes`` of them (an event alone may be larger), or one
worker's queue its share of them, ``add`` says so and the reader waits in :meth:`room`, so
backpressure reaches the server through TCP; nothing is dropped.
``add`` also says so after :data:`HANDOVER` events read in one go: in a catch-up one socket read
brings some 300 frames, and the workers write (and free) the first before the rest are decoded.
Events of one resource always go to the same worker, so they are processed in arrival order
while different resources run in parallel.
Each worker takes what is queued as a batch: drop what the event filter leaves out, skip ids
already processed, write the rest to the sink, and tell the committer (the one owner of
completion) what became of each.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential_jitter,
)

# How long the workers a stop cancels have to end (see there: the self-fence counts it).
from ..config.settings import CANCEL_GRACE_S
from ..core.events import Event
from ..core.evidence import describe, prefix
from ..core.filters import EventFilter
from ..core.printable import printable
from ..core.protocol import DecodeError
from ..core.records import DeadLetter
from ..core.retry_after import WaitRetryAfter
from ..core.watermark import Position
from ..errors import PermanentSinkError, SinkError, SinkUnusable, StoreError, TransientSinkError
from ..logs import REDACTOR, RateLimitedLogger
from ..sinks.base import Sink, taking
from .committer import Committer, parked_error
from .parking import ParkedKeys

log = structlog.get_logger(__name__)

_Item = tuple[int, Event]

# At most this many events read in one go before the reader lets the workers take them. One
# socket read in a catch-up brings some 300 frames; decoding them all before any is written
# held them all at once: about 3 MB of a jsonl catch-up's peak RSS (issue #12). At 128 the
# same events/s (jsonl, sqlite); at 64 fewer.
HANDOVER = 128

# Workers when [pipeline] workers is not set, for a sink whose write waits on I/O: four
# requests (or handler calls) in flight at once.
WAITING_SINK_WORKERS = 4

# Events read and not yet taken, per worker, when [pipeline] queue_size is not set. One worker
# (jsonl, sqlite) never filled 500 in a catch-up whose commits keep up; while a commit waits on
# the disk the queue fills, and 2,000 held some 3 MB more at the peak (issue #12). Four workers
# keep the 2,000 their batches grow in while the sink answers.
QUEUE_PER_WORKER = 500

# A worker holding a batch past its fleet member's self-fence deadline asks again this often
# whether a renewal moved the deadline (else the stream's stop ends the wait).
FENCED_RECHECK_S = 0.05
# Coroutines followed down from a stuck worker to name the code it waits in, at most.
_AWAITS_FOLLOWED = 64


def _stop_if_asked() -> None:
    """A worker that was asked to stop writes nothing more, even when the sink turned the
    CancelledError into an error of its own (a handler that catches everything): that error
    must not send the batch on to be re-delivered one by one."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _closing(owner: asyncio.Task[None] | None) -> bool:
    """Whether a GeneratorExit caught in a coroutine ``owner`` runs is that coroutine being
    closed (``coro.close()`` throws it in while the coroutine is suspended: never while its
    task runs). One raised while ``owner`` runs (a sink's, a handler's) is an error like any
    other: let through, it ended the worker, and every restart replayed the event into it."""
    try:
        return owner is None or asyncio.current_task() is not owner
    except RuntimeError:  # no running loop: a finalizer's close()
        return True


async def _still_running(
    tasks: list[asyncio.Task[None]], seconds: float
) -> list[asyncio.Task[None]]:
    """Those of ``tasks`` that have not ended within ``seconds``."""
    if tasks:
        await asyncio.wait(tasks, timeout=seconds)
    return [t for t in tasks if not t.done()]


def _waiting_in(task: asyncio.Task[Any]) -> str:
    """Where a stuck worker waits, by the code's names only (never a value from the wire):
    the coroutines it awaits outside this package and asyncio, outermost first (a python
    sink's handler, then what it awaits; a sink library's calls), as module:function."""
    names: list[str] = []
    coro: Any = task.get_coro()
    for _ in range(_AWAITS_FOLLOWED):
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        module = str(frame.f_globals.get("__name__", "?"))
        if not module.startswith(("consumer.", "asyncio.")):
            names.append(f"{module}:{frame.f_code.co_qualname}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return printable(" > ".join(names) or "?", 300)


def _taken(exc: TransientSinkError | PermanentSinkError, written: int) -> int:
    """How many of the ``written`` events the failed write took (a sink's own figure, kept
    within the write)."""
    return min(max(0, exc.delivered), written)


class _Taken:
    """What the sink took of the items a delivery writes, recorded as processed (``record``)
    once each, never later than the next commit: the sink says so between the parts of its
    write (:func:`~consumer.sinks.base.took`), which is noted (``said``) and recorded by the
    next of: the start of a commit (see :meth:`Committer.on_commit`), a failed write (its
    ``delivered``, before its retry backs off), the write's end or stop. Never later: a
    commit records the sink's position, which covers them already (a jsonl file's length,
    every line appended), and must record them processed with it and the watermark past
    them; else a stop (or kill -9) leaves them in the committed file unrecorded, and the
    restart writes them again. Not at once either: one record per event said was a twentieth
    of the event loop's CPU with one webhook POST per event (issue #12)."""

    __slots__ = ("_items", "_record", "_wake", "base", "count", "said")

    def __init__(
        self, items: list[_Item], record: Callable[[list[_Item]], None], wake: Callable[[], None]
    ) -> None:
        self._items = items
        self._record = record
        self._wake = wake  # the committer's: a sink took more
        self.base = 0  # where the sink's write under way starts among the items
        self.count = 0  # how many of the items, the first ones, are recorded
        self.said = 0  # how many of the items, the first ones, the sink said it took

    def __call__(self, n: int) -> None:
        """The sink's word: ``n`` of its write's events taken (counted from that write's
        start, which is ``base`` here)."""
        if self.base + n > self.said:
            self.said = self.base + n
            self._wake()

    def upto(self, n: int) -> None:
        """The first ``n`` items taken (and any more the sink said): record those not
        recorded yet (once each)."""
        items, count = self._items, self.count
        n = min(max(n, self.said), len(items))
        if n > count:
            self.count = n
            self._record(items if n - count == len(items) else items[count:n])


def default_workers(sink: Sink) -> int:
    """One worker for a sink whose write never suspends (``Sink.waits``): nothing of its
    writes could overlap, and more workers only cut each hand-over into smaller batches, each
    with its own lookup, write call and metrics. Measured on a catch-up (issue #12): the
    event loop's CPU per event 17.3 µs with one worker against 20.1 µs with four (jsonl), and
    18.3 against 20.7 (sqlite)."""
    return WAITING_SINK_WORKERS if sink.waits else 1


class StreamPipeline:
    def __init__(
        self,
        stream: str,
        *,
        sink: Sink,
        committer: Committer,
        workers: int,
        queue_size: int,
        batch_max: int,
        queue_max_bytes: int = 16 * 1024 * 1024,
        retry_initial_s: float,
        retry_max_s: float,
        park_key: bool = False,
        event_filter: EventFilter | None = None,
        past_fence: Callable[[], bool] | None = None,
    ) -> None:
        """``park_key``: a resource with dead letters holds its later events back (the store
        asked per batch: :class:`ParkedKeys`). ``event_filter``: the events
        it filters out are done without reaching the sink (see :meth:`_drop_filtered`).
        ``past_fence``: a fleet member's :meth:`~consumer.runtime.fleet.Fleet.past_fence`
        for this stream, asked before each sink write (see :meth:`_hold_while_fenced`); None
        outside a fleet."""
        self.stream = stream
        self._sink = sink
        self._committer = committer
        self._batch_max = batch_max
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        self._capacity = max(1, queue_size)
        # A worker's share too: one stuck worker (a Retry-After backoff) must stop the reader
        # after about queue_size reads, not after workers x queue_size while the others drain.
        self._share = max(1, queue_size // workers)
        self._queues: list[deque[_Item]] = [deque() for _ in range(workers)]
        self._full = False  # a worker's queue holds its share (seen at the last hand-over)
        # Events read and not yet past the done prefix, at most (the reader waits there): one
        # worker retrying an event holds the prefix, while the others, free to take the events
        # of other resources, would let the reader read on for good. Far above what a healthy
        # stream holds (the queues, what the workers write, what is done behind them).
        self._in_flight_max = 2 * self._capacity + 2 * workers * batch_max + HANDOVER
        self._behind = False  # in flight past _in_flight_max (seen at the last hand-over)
        self._ready = [asyncio.Event() for _ in range(workers)]  # its queue has events
        self._queued = 0  # events in the queues, not yet taken by a worker
        self._max_bytes = max(1, queue_max_bytes)
        self._queued_bytes = 0  # their Event.held_bytes, and that of the chunk read meanwhile
        self._room = asyncio.Event()  # set when _queued drops below capacity
        self._chunk: list[Event] = []  # read, not yet handed to the workers
        self._flush_soon: asyncio.Handle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Workers that did not end when a stop cancelled them (see CANCEL_GRACE_S): still
        # running, so the daemon waits for them nowhere, and ends its process itself.
        self.abandoned: list[asyncio.Task[None]] = []
        # Set once a stop gave up on them: what they do from then on is recorded nowhere (the
        # daemon forgets the stream next; the next lease's ledger is not theirs).
        self._ended = False
        self._stopping: asyncio.Future[None] | None = None  # the stop, once begun
        self._parking = (
            ParkedKeys(stream, committer, retry_initial_s=retry_initial_s, retry_max_s=retry_max_s)
            if park_key
            else None
        )
        committer.on_set_aside(stream, self._set_aside, parks=park_key)
        # The writes under way: what their sinks said they took is recorded as each commit
        # starts (see _Taken).
        self._under_way: set[_Taken] = set()
        committer.on_commit(stream, self._record_said)
        # None when nothing is filtered: the per-batch cost is then this one attribute check.
        self._filter = None if event_filter is None or event_filter.passes_all else event_filter
        self._past_fence = past_fence
        self.writes_fenced = 0  # writes held back: past the fleet member's self-fence deadline
        # The ids the workers are deciding on or writing now (from the lookup to the outcome),
        # and a wake-up when some are let go: see _claim. None with one worker: no other
        # worker can hold an id, and holding them is two set operations per event.
        self._writing: set[str] | None = set() if workers > 1 else None
        self._let_go = asyncio.Event()
        self.delivered = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.sink_retries = 0  # failed writes retried (a sink down, a WAIT refused...)
        # Monotonic start of the writes failing now (one worker's or more: each retrying its
        # own), None while none is: nothing flows to the sink meanwhile (/readyz).
        self.sink_failing_since: float | None = None
        self._failing_writes = 0
        self.filtered: Counter[str] = Counter()  # events filtered out, by reason
        # Called after each successful sink write: (seconds it took, newest event written).
        self.on_write: Callable[[float, Event], None] | None = None
        # A flood of bad frames or failing writes: a few lines a second, and a count of the rest.
        self._log = RateLimitedLogger(log, per_s=5.0)

    def _retrying(self) -> AsyncRetrying:
        """One per worker (not per batch): a transient failure is retried until it clears, or
        until we are cancelled at shutdown; a sink that says when to come back (Retry-After)
        is taken at its word."""
        return AsyncRetrying(
            retry=retry_if_exception_type(TransientSinkError),
            wait=WaitRetryAfter(
                wait_exponential_jitter(
                    multiplier=self._retry_initial, max=self._retry_max, jitter=self._retry_initial
                )
            ),
            before_sleep=self._retried,
            reraise=True,
        )

    def _failing(self, change: int) -> None:
        """One more (+1) or one less (-1) write retrying a failure now."""
        self._failing_writes += change
        if self._failing_writes == 0:
            self.sink_failing_since = None
        elif self.sink_failing_since is None:
            self.sink_failing_since = time.monotonic()

    def _retried(self, rs: RetryCallState) -> None:
        self.sink_retries += 1
        self._log.warning(
            "sink write failed; retrying",
            stream=self.stream,
            attempt=rs.attempt_number,
            error=describe(rs.outcome.exception() if rs.outcome else None, REDACTOR.scrub),
        )

    def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._worker(i), name=f"worker-{self.stream}-{i}")
            for i in range(len(self._queues))
        ]

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return self._tasks

    @property
    def queue_size(self) -> int:
        """Events read and not yet taken by a worker, at most (the reader waits there)."""
        return self._capacity

    # --- intake (called by the reader) ------------------------------------------------------

    def add(self, event: Event) -> bool:
        """Take the event (never waits); it reaches its worker once the reader next waits.
        False: await :meth:`room` before adding more (the pipeline is full, or
        :data:`HANDOVER` events were added since the reader last waited)."""
        chunk = self._chunk
        chunk.append(event)
        if len(chunk) == 1:
            self._flush_soon = asyncio.get_running_loop().call_soon(self._flush)
        n = len(chunk)
        # Event.held_bytes, inline: once per event
        self._queued_bytes += len(event.text or event.frame) + len(event.detail_text or b"")
        return (
            n < HANDOVER
            and not self._full
            and not self._behind
            and self._queued + n < self._capacity
            and self._queued_bytes < self._max_bytes
        )

    async def room(self) -> None:
        """Hand over what was added, let the workers take it, and wait until the queues have
        room again."""
        self._flush()
        await asyncio.sleep(0)  # the woken workers run before the reader reads on
        while (
            self._full
            or self._behind
            or self._queued >= self._capacity
            or self._queued_bytes >= self._max_bytes
        ):
            self._room.clear()
            await self._room.wait()

    async def put(self, event: Event) -> None:
        """:meth:`add`, waiting for room when the pipeline is full."""
        if not self.add(event):
            await self.room()

    def _flush(self) -> None:
        """Register the events added since the last flush, in arrival order, and queue each
        for its resource's worker. Until then they are in no watermark: a stop before it
        leaves them to the replay, like frames never read."""
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        chunk = self._chunk
        if not chunk:
            return
        self._chunk = []
        first = self._committer.arrived_all(self.stream, chunk)
        queues = self._queues
        if len(queues) == 1:
            queues[0].extend(enumerate(chunk, first))
        else:
            worker_of = self._worker_of
            for item in enumerate(chunk, first):
                queues[worker_of(item[1])].append(item)
        self._queued += len(chunk)
        self._behind = self._committer.in_flight(self.stream) >= self._in_flight_max
        share = self._share
        for queue, ready in zip(queues, self._ready, strict=True):
            if queue:
                ready.set()
                if len(queue) >= share:
                    self._full = True

    def _worker_of(self, event: Event) -> int:
        return zlib.crc32(event.primary_key.encode()) % len(self._queues)

    async def put_malformed(self, error: DecodeError) -> None:
        """A frame that cannot be decoded: dead-letter a bounded copy of it, in its place in
        line. Waits for capacity like an event does: a flood of bad frames is backpressure,
        not memory. Its copy and reason were masked by the session (``scrub``) before they
        were cut: masked here, a secret across the cut would leave its start."""
        self._flush()  # the events read before it come first
        if self._behind:  # each takes a slot behind the unfinished event too
            await self.room()
        await self._committer.wait_capacity()
        seq = self._committer.arrived(self.stream, None)
        self._committer.dead_letter(
            DeadLetter.of(
                error.evidence, stream=self.stream, reason="malformed", error=error.reason
            ),
            seq,
        )
        self.dead_lettered += 1
        self._log.warning(
            "malformed frame dead-lettered",
            stream=self.stream,
            error=error.reason,
            bytes=error.evidence.size,
        )

    async def anchor(self, event: Event) -> None:
        """Persist ``event`` as the checkpoint of a stream that has none (its first event)."""
        await self._committer.anchor(self.stream, Position(event.offset, event.unique_event_id))

    # --- position and drain -----------------------------------------------------------------

    @property
    def position(self) -> Position | None:
        """Newest position whose whole prefix is done: where a new session resumes."""
        return self._committer.position(self.stream)

    @property
    def in_flight(self) -> int:
        return self._committer.in_flight(self.stream) + len(self._chunk)

    async def drained(self) -> None:
        """Returns when every event handed to :meth:`add` is done."""
        self._flush()
        await self._committer.drained(self.stream)

    async def stop(self) -> None:
        """Cancel the workers (idempotent; a second caller waits for the first one's stop).
        Events not done are replayed at the next start. A worker that has not ended within
        :data:`CANCEL_GRACE_S` is abandoned (:attr:`abandoned`): the stop returns all the
        same."""
        if self._stopping is None:
            if self._flush_soon is not None:
                self._flush_soon.cancel()
                self._flush_soon = None
            self._queued_bytes -= sum([ev.held_bytes() for ev in self._chunk])
            self._chunk = []
            tasks, self._tasks = self._tasks, []
            for t in tasks:
                t.cancel()
            self._stopping = asyncio.ensure_future(self._end(tasks))
        # Shielded: a caller cancelled meanwhile (a handover cut short) leaves it to the others.
        await asyncio.shield(self._stopping)

    async def _end(self, tasks: list[asyncio.Task[None]]) -> None:
        """Wait for the cancelled ``tasks`` to end, within the grace."""
        stuck = await _still_running(tasks, CANCEL_GRACE_S / 2)
        for t in stuck:
            t.cancel()  # the first one swallowed
        stuck = await _still_running(stuck, CANCEL_GRACE_S / 2)
        for t in stuck:
            log.error(
                "worker did not end when cancelled; abandoned",
                stream=self.stream,
                worker=t.get_name(),
                sink=self._sink.name,
                waiting_in=_waiting_in(t),
                grace_s=CANCEL_GRACE_S,
            )
        self.abandoned += stuck
        self._ended = True
        await asyncio.gather(*[t for t in tasks if t not in stuck], return_exceptions=True)

    # --- workers ----------------------------------------------------------------------------

    async def _worker(self, index: int) -> None:
        queue, ready = self._queues[index], self._ready[index]
        retrying = self._retrying()
        while True:
            _stop_if_asked()  # an abandoned worker whose write ended takes no more
            while not queue:
                ready.clear()
                await ready.wait()
            batch = [queue.popleft() for _ in range(min(len(queue), self._batch_max))]
            self._queued -= len(batch)
            # Event.held_bytes, inline (a call per event costs what the sum does)
            self._queued_bytes -= sum(
                [len(ev.text or ev.frame) + len(ev.detail_text or b"") for _, ev in batch]
            )
            if self._full:
                self._full = any(len(q) >= self._share for q in self._queues)
            self._wake_reader()
            await self._committer.wait_capacity()
            await self._handle(batch, retrying)
            if self._behind:  # the batch done may have moved the done prefix
                self._behind = self._committer.in_flight(self.stream) >= self._in_flight_max
                self._wake_reader()
            # Not kept while the worker waits for more: an idle stream would hold its last
            # events (up to max_frame_bytes each) outside every bound for as long as it idles.
            del batch

    def _wake_reader(self) -> None:
        """Room again (the reader waits in :meth:`room`): say so."""
        if (
            not self._full
            and not self._behind
            and self._queued < self._capacity
            and self._queued_bytes < self._max_bytes
        ):
            self._room.set()

    async def _handle(self, batch: list[_Item], retrying: AsyncRetrying) -> None:
        owner = asyncio.current_task()
        delay = self._retry_initial
        while True:
            try:
                await self._process(batch, retrying)
                return
            except (SinkUnusable, StoreError):
                # Writing on could lose data, or the store fails beyond what _lookup retries:
                # not the events' fault, so no dead letters; the daemon stops (78, or 1).
                raise
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # we are being stopped: the rest is replayed at the next start
                # A CancelledError nobody asked for (a handler's, or a shared fetch whose
                # owner is being stopped): would end the worker silently. Not the events'
                # fault either: what is not done yet is tried again.
                self._log.warning(
                    "the sink raised CancelledError; trying the batch again", stream=self.stream
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                batch = [
                    (seq, ev) for seq, ev in batch if self._committer.is_pending(self.stream, seq)
                ]
                if not batch:
                    return
            except BaseException as exc:  # a bug: never a dead worker, never a lost event
                if isinstance(exc, GeneratorExit) and _closing(owner):
                    raise  # the coroutine is being closed (the loop is going away)
                # BaseException: a SystemExit or KeyboardInterrupt out of a task would end the
                # event loop under the daemon (SIGINT is the daemon's signal, never raised here).
                self._rescue(batch, exc)
                return

    def _rescue(self, batch: list[_Item], exc: BaseException) -> None:
        """Last resort: dead-letter what of the batch is not done yet, so that the stream goes
        on and nothing is lost (the DLQ can replay it once the cause is fixed)."""
        log.error(
            "unexpected error while handling events; dead-lettering them",
            stream=self.stream,
            error=describe(exc, REDACTOR.scrub),
            exc_info=exc,
        )
        for seq, ev in batch:
            if self._committer.is_pending(self.stream, seq):
                self._dead_letter(seq, ev, exc, reason="internal_error")

    async def _process(self, batch: list[_Item], retrying: AsyncRetrying) -> None:
        if self._filter is not None:
            batch = self._drop_filtered(batch, self._filter)
            if not batch:
                return
        ids = [ev.unique_event_id for _, ev in batch]
        writing = self._writing
        if writing is None:
            await self._decide(batch, ids, retrying)
            return
        await self._claim(writing, ids)
        try:
            await self._decide(batch, ids, retrying)
        finally:
            writing.difference_update(ids)
            self._let_go.set()

    async def _claim(self, writing: set[str], ids: list[str]) -> None:
        """Wait while another worker is deciding on or writing one of these ids, then hold
        them. One uniqueEventId under two primaryKeys (a gateway should never send that, but
        every byte from outside is hostile) goes to two workers: the second would find the id
        neither processed nor pending while the first's write awaits its sink, and write it
        too. After the wait, the lookup finds it (processed, or dead-lettered: handled)."""
        while not writing.isdisjoint(ids):
            self._let_go.clear()
            await self._let_go.wait()
        writing.update(ids)

    async def _decide(self, batch: list[_Item], ids: list[str], retrying: AsyncRetrying) -> None:
        """Skip the ids already processed; deliver the others."""
        seen = await self._lookup(ids)
        if not seen and len(set(ids)) == len(ids):  # the usual case: all of them new
            await self._deliver(batch, retrying)
            return
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
            self._committer.skipped(self.stream, dup_seqs)
        if fresh:
            await self._deliver(fresh, retrying)

    def filters_out(self, event: Event) -> bool:
        """Whether the [filter] keeps ``event`` from the sink: done without a processed id."""
        return self._filter is not None and self._filter.reason(event) is not None

    def _drop_filtered(self, batch: list[_Item], event_filter: EventFilter) -> list[_Item]:
        """The events the filter lets through; the others are done at once, like duplicates:
        before the duplicate lookup and the sink, never dead-lettered, and the watermark (so the
        checkpoint) moves past them. Also for a parked resource (park-key): a filtered event
        would never reach the sink anyway, so it is not held back behind the dead letter.
        Dropping an event changes nothing in the order of the others of its resource."""
        reason = event_filter.reason
        kept: list[_Item] = []
        dropped: list[int] = []
        counts = self.filtered
        for item in batch:
            why = reason(item[1])
            if why is None:
                kept.append(item)
            else:
                dropped.append(item[0])
                counts[why] += 1
        if dropped:
            self._committer.skipped(self.stream, dropped)
        return kept

    async def _lookup(self, ids: list[str]) -> set[str]:
        """The deduplication lookup; a store failing for a while (locked, an I/O error) is
        asked again with backoff, the batch waiting meanwhile (no event is guessed new)."""
        delay = self._retry_initial
        while True:
            try:
                return await self._committer.seen(self.stream, ids)
            except StoreError as exc:
                if not exc.retriable:
                    raise
                self._log.warning(
                    "deduplication lookup failed; retrying", stream=self.stream, error=str(exc)
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)

    async def _deliver(self, items: list[_Item], retrying: AsyncRetrying) -> None:
        """Write the items in order; a poison event among them is dead-lettered and those
        after it written on. A loop over what remains after each culprit: one nested call per
        culprit reached Python's recursion limit in a batch of hundreds of rejected events,
        and the last resort dead-lettered the good ones left."""
        owner = asyncio.current_task()
        while items:
            if self._parking:
                free = await self._parking.split(items)
                if len(free) < len(items):
                    for seq, ev in items:
                        if self._parking.behind(ev.primary_key) is not None:
                            self._dead_letter(seq, ev, None)
                    items = free
                if not items:
                    return
            events = [ev for _, ev in items]
            taken = _Taken(items, self._written, self._committer.took_more)
            try:
                await self._write(events, taken, retrying)
            except PermanentSinkError as exc:
                _stop_if_asked()
                if taken.count:  # written before the failure: done, not to be sent again
                    items = items[taken.count :]
                if items:
                    items = await self._isolate(items, exc, retrying)
                continue
            except (TransientSinkError, SinkUnusable, asyncio.CancelledError):
                raise  # transient ones are retried inside _write until they clear
            except BaseException as exc:
                if isinstance(exc, GeneratorExit) and _closing(owner):
                    raise  # the coroutine is being closed; one a sink raised is its event's
                _stop_if_asked()
                # Anything else the sink raised (an event it cannot serialize, a bug in a
                # user's handler, a SystemExit of a sink's library): permanent for the event
                # at fault, found one by one (among those the sink did not say it took).
                problem = PermanentSinkError(describe(exc, REDACTOR.scrub))
                if taken.count:
                    items = items[taken.count :]
                if items:
                    items = await self._isolate(items, problem, retrying, reason="unprocessable")
                continue
            return

    def _record_said(self) -> None:
        for taken in self._under_way:
            taken.upto(0)

    def _written(self, items: list[_Item]) -> None:
        """The sink took these: processed, in the next commit (not once the stop ended: an
        abandoned worker's write belongs to no lease; its events are the next holder's)."""
        if self._ended:
            return
        self.delivered += len(items)
        self._committer.processed(
            self.stream,
            [ev.unique_event_id for _, ev in items],
            [seq for seq, _ in items],
            sum([len(ev.text or ev.frame) + len(ev.detail_text or b"") for _, ev in items]),
        )

    async def _isolate(
        self,
        items: list[_Item],
        exc: PermanentSinkError,
        retrying: AsyncRetrying,
        *,
        reason: str = "sink_rejected",
    ) -> list[_Item]:
        """A batch with a poison event: deliver those before the culprit, dead-letter it, and
        return those after it, still to deliver (by the caller, in order)."""
        culprit = exc.unique_event_id if len(items) > 1 else items[0][1].unique_event_id
        at = next((i for i, it in enumerate(items) if it[1].unique_event_id == culprit), None)
        if at is None:  # a culprit the sink does not name (or not in this batch): one by one
            for item in items:
                await self._deliver([item], retrying)
            return []
        # Those before the culprit first: with park-key, those after it of the same resource
        # are then held back (its dead letter parks the key).
        if at:
            await self._deliver(items[:at], retrying)
        seq, ev = items[at]
        self._dead_letter(seq, ev, exc, reason=reason)
        return items[at + 1 :]

    def _dead_letter(
        self, seq: int, ev: Event, exc: BaseException | None, *, reason: str = ""
    ) -> None:
        """``exc`` None: held back because the resource is parked."""
        if self._ended:
            return  # an abandoned worker's (see _written)
        self.dead_lettered += 1
        behind = self._parking.behind(ev.primary_key) if self._parking is not None else None
        if exc is None:
            reason, error = "parked", parked_error(ev, behind)
            if self._parking is not None:
                # Pinned until its own letter is durable, as a refused event's: the letter it
                # waits behind may be replayed or purged before then, and the later events
                # must still wait behind this one.
                self._parking.park(ev.primary_key, behind or ev.unique_event_id)
        else:
            # A sink's own error says what it means; anything else is named by its type. A
            # handler's words may hold a secret: masked before they are cut.
            scrub = REDACTOR.scrub
            text = (
                prefix(scrub(str(exc)), 1000)
                if isinstance(exc, SinkError)
                else describe(exc, scrub)
            )
            reason, error = reason or "sink_rejected", text
            if self._parking is not None:
                self._parking.park(ev.primary_key, ev.unique_event_id)
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
            DeadLetter.of_event(ev, stream=self.stream, reason=reason, error=error), seq
        )

    def _set_aside(self, letters: Sequence[DeadLetter]) -> None:
        """The committer dead-lettered these events of the stream after the sink took them:
        the state transaction refused a row it had staged, and the sink's own path refused
        the event too, or it was behind one that was (park-key). Counted as this pipeline's
        dead letters, and their resources parked as by :meth:`_dead_letter`, so the later
        events wait behind them. (They counted as delivered when the sink took them: that
        count stays, a counter never goes down.)"""
        self.dead_lettered += len(letters)
        if self._parking is not None:
            for letter in letters:
                if letter.primary_key is not None and letter.unique_event_id is not None:
                    self._parking.park(letter.primary_key, letter.unique_event_id)

    async def _hold_while_fenced(self, events: int) -> None:
        """Past the fleet member's self-fence deadline its leases may be another member's
        (a process paused past them, by SIGSTOP or a VM freeze, runs its workers before the
        self-fence timer or the renewal says so): write nothing, as if the stream were being
        stopped, which it is once the timer runs. The events stay undone (nothing processed,
        nothing dead-lettered): whoever holds the stream next replays them. A renewal that
        succeeds after all moves the deadline, and the write goes on, unless it found this
        stream lost (then held till its stop). Called once the deadline is seen passed."""
        past = self._past_fence
        assert past is not None
        self.writes_fenced += 1
        self._log.warning(
            "the stream's lease may be another member's (no renewal for self_fence_after_s, "
            "or found taken): not writing to the sink (the stream stops; whoever holds it "
            "next replays these events)",
            stream=self.stream,
            events=events,
        )
        while past():  # noqa: ASYNC110  # a clock's deadline, moved by the fleet's renewals
            await asyncio.sleep(FENCED_RECHECK_S)
        _stop_if_asked()

    async def _write(self, events: Sequence[Event], taken: _Taken, retrying: AsyncRetrying) -> None:
        """Write ``events`` (``taken``'s items'), retrying a transient failure until it
        clears. What the sink takes is recorded as soon as it is known (see :class:`_Taken`):
        every event once this returns; ``taken.count`` of them when it raises."""
        _stop_if_asked()
        if self._past_fence is not None and self._past_fence():
            await self._hold_while_fenced(len(events))
        started = time.perf_counter()
        taking(taken)  # the sink's word between its write's parts (took)
        self._under_way.add(taken)
        try:
            # The first try without tenacity: setting up its state costs more than the
            # write itself for a small batch (measured: ~10% of the CPU per event then).
            await self._sink.write(self.stream, events)
        except TransientSinkError as exc:
            first: TransientSinkError | None = exc
            # What the sink took before it failed is recorded before the backoff (a commit
            # while it waits records the sink's position, which covers it) and is not written
            # again (a receiver keyed by Idempotency-Key alone would take it twice under
            # another chunk's key).
            taken.upto(_taken(exc, len(events)))
            self._failing(+1)
            try:
                async for attempt in retrying:
                    with attempt:
                        if first is not None:  # tenacity's attempt 1: its wait honours Retry-After
                            failed, first = first, None
                            raise failed from None
                        _stop_if_asked()
                        # The backoff may outlast the lease.
                        if self._past_fence is not None and self._past_fence():
                            await self._hold_while_fenced(len(events) - taken.count)
                        started = time.perf_counter()
                        taken.base = done = taken.count  # exactly the rest
                        try:
                            await self._sink.write(self.stream, events[done:])
                        except (TransientSinkError, PermanentSinkError) as again:
                            taken.upto(done + _taken(again, len(events) - done))
                            raise
            finally:
                self._failing(-1)
        except PermanentSinkError as exc:
            taken.upto(_taken(exc, len(events)))
            raise
        finally:
            taking(None)
            self._under_way.discard(taken)
            taken.upto(0)  # a stop, or anything else the sink raised: what it said it took
        taken.upto(len(events))
        if self.on_write is not None:
            self.on_write(time.perf_counter() - started, events[-1])
