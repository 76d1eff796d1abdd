"""The one owner of completion: per stream, what arrived, what is done, what is durable.

The pipeline tells the committer what happens to each frame (arrived, processed, a duplicate,
dead-lettered) and asks it what was seen before; nothing else writes a checkpoint. Per stream
the committer keeps the low watermark over arrival order (offsets are opaque: order comes from
arrival), the ids processed but not yet durable, and the dead letters not yet durable.
A dead-lettered event counts as handled: its id is recorded with the processed ids, so a copy
sent again (the inclusive resume after a restart or a reconnect) is a duplicate, never a second
try; the DLQ row stays its one copy, with its first reason, until ``dlq replay`` delivers it.

Group commit: a single task commits; adaptive (the default), it commits as soon as something
is done and the previous commit has finished, so a quiet stream's event is durable within one
commit's time (commits start at most every ``commit_min_interval_ms``) while under load each
commit takes everything that was done during the one before (batches grow with the load);
otherwise at most every ``commit_max_events`` events or
``commit_interval_ms``, whichever comes first. The snapshot of what to commit is taken without
awaiting, so the checkpoint, the processed ids, the dead letters, the rows a sink staged and
the sink's position always describe the same instant, and go into the store in one
transaction. When that transaction refuses a staged row for its data (a trigger failing on it,
or a deferred constraint at COMMIT: :class:`~consumer.errors.StagedRowRefused`, which names no
row), the batch's staged rows go through the sink's own
path first (durable before the checkpoint that passes them), an event refused there too is
dead-lettered alone, and the rest commits (see :meth:`Committer._set_aside`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import structlog
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter

from ..core.events import Event, event_time
from ..core.evidence import masked
from ..core.records import CommitBatch, DeadLetter, Fence, Staged
from ..core.watermark import Position, Positioned, Watermark
from ..errors import Fenced, PermanentSinkError, StagedRowRefused, StoreError, TransientSinkError
from ..logs import REDACTOR
from ..sinks.base import Sink
from ..state.base import PRUNE_CHUNK, StateStore

log = structlog.get_logger(__name__)

# Who moved a refused commit's streams on: another member (a fleet), or an operator's command
# (a single daemon on PostgreSQL: `offset set/reset` moves the epochs while its lease was lost).
FLEET_FENCE = "another member holds the lease now"
OPERATOR_FENCE = "an operator's command changed the stream while this daemon's lease was lost"

# Rounds of the rows staged while a set-aside ran, written before the sink switches (see
# Committer._switch_when_drained); each round's rows were staged during the one before.
_CATCH_UP_ROUNDS = 4


@dataclass(slots=True)
class _Ledger:
    """One stream's completion state."""

    watermark: Watermark = field(default_factory=Watermark)
    pending_ids: set[str] = field(default_factory=set)  # processed, not in a commit yet
    committing_ids: set[str] = field(default_factory=set)  # in the commit under way
    # primaryKey -> dead letters of it not durable yet (park-key must not trust the store);
    # a key leaves once its count is settled, so the ledger holds the resources with dead
    # letters in flight, not every primaryKey ever dead-lettered.
    letters_not_durable: Counter[str] = field(default_factory=Counter)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def letter_settled(self, primary_key: str) -> None:
        """A dead letter of ``primary_key`` is durable, or dropped (its commit fenced)."""
        letters = self.letters_not_durable
        left = letters[primary_key] - 1
        if left > 0:
            letters[primary_key] = left
        else:
            letters.pop(primary_key, None)


class Committer:
    def __init__(
        self,
        store: StateStore,
        sink: Sink,
        *,
        max_events: int,
        interval_s: float,
        max_pending: int | None = None,
        max_pending_bytes: int = 16 * 1024 * 1024,
        adaptive: bool = False,
        min_interval_s: float = 0.0,
        event_timezone: str = "UTC",
    ) -> None:
        self._store = store
        self._zone = ZoneInfo(event_timezone)  # of the events' timestamps (checkpoint event time)
        self._sink = sink
        self._max_events = max_events
        self._interval = interval_s
        # Adaptive: any work done wakes the commit task, which waits for no interval, only
        # for min_interval_s since the start of the commit before.
        self._adaptive = adaptive
        self._min_interval = min_interval_s
        self._last_start = -1e9  # monotonic start of the last commit (adaptive)
        # Done and not yet durable: what a commit held up by the disk lets wait (the ids,
        # a sink's staged rows). 5,000 by default: never reached in a catch-up whose commits
        # keep up (jsonl, sqlite, postgres); 20 x let a slow commit hold 3-4 MB more (issue
        # #12, before the jsonl lines went to the file ahead of the commit).
        self._max_pending = max_pending or max_events * 10
        # Dead letters carry payloads (each bounded), and a sink may hold the events it was
        # given until the commit: their bytes count against capacity too, so a flood of large
        # frames waits for commits however few they are.
        self._max_pending_bytes = max_pending_bytes
        # Fleet mode: the leases every commit needs, and whom to tell when the store refuses
        # them; what a fenced stream did since its last commit is dropped, never retried.
        self._fence: Callable[[], Fence | None] = lambda: None
        self._on_fenced: Callable[[frozenset[str]], None] = lambda streams: None
        self._fenced_by = FLEET_FENCE  # who moved a refused commit's leases on, for the log
        # stream -> the epoch at which the store refused it (None: not held then). A stream
        # taken again later has a new epoch and is not fenced by the old refusal.
        self._fenced: dict[str, int | None] = {}
        self._forgotten_in_flight: set[str] = set()  # forgotten while a commit was under way
        # A stream fenced while the sink keeps one position for every stream's bytes (a jsonl
        # file, outside a fleet): nothing is committed any more (see fence_out).
        self._position_fenced = False
        self.fencing_rejections = 0
        self._pending_bytes = 0
        self._ledgers: dict[str, _Ledger] = {}
        self._batch = CommitBatch()
        # A failed commit, kept whole, and its bytes: sent again before anything newer.
        self._unsure: tuple[CommitBatch, int] | None = None
        # The batch the commit under way sends now, once its staged rows were set aside
        # (written through the sink's own path, durable): kept instead if that commit fails.
        self._sent: CommitBatch | None = None
        self._left_running: set[asyncio.Future[bool]] = set()  # see _shielded_flush
        self.aside_dead_letters = 0  # dead letters made on that path (see _set_aside)
        # stream -> whoever runs it: told of those dead letters (they are its stream's), and
        # whether it parks a resource behind one (park-key). See on_set_aside.
        self._runs: dict[str, tuple[Callable[[Sequence[DeadLetter]], None], bool]] = {}
        # stream -> whoever runs it: records what its sink said it took (see on_commit).
        self._on_commit: dict[str, Callable[[], None]] = {}
        # A replay's dead letters delivered, not yet removed by a durable commit: id -> its
        # event's (stream, uniqueEventId). See _still_letters.
        self._resolving: dict[int, tuple[str, str]] = {}
        self._id = secrets.token_hex(8)  # this committer's batches' marks (CommitBatch.mark)
        self._seq = 0
        self._pending = 0
        self._wake = asyncio.Event()
        self._committed = asyncio.Event()
        self._lock = asyncio.Lock()
        self.commits = 0
        self.busy_since: float | None = None  # monotonic start of the commit under way
        # Monotonic start of whatever holds the store's writer now (a commit, a prune step, an
        # anchor): what the watchdog asks (a prune stuck on the disk holds every commit).
        self.writing_since: float | None = None
        self.failing_since: float | None = None  # monotonic time of the first failed commit
        self.failures = 0  # consecutive failed commits
        self.last_error = ""  # of the last failed commit while they fail (masked before its cut)
        # stream -> monotonic time it last moved (the daemon seeds it at the stream's start)
        self.checkpointed_at: dict[str, float] = {}

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        """The store's writer, one user at a time (a commit, a prune step, an anchor)."""
        async with self._lock:
            self.writing_since = time.monotonic()
            try:
                yield
            finally:
                self.writing_since = None

    def configure_fence(
        self,
        fence: Callable[[], Fence | None],
        on_fenced: Callable[[frozenset[str]], None],
        fenced_by: str = FLEET_FENCE,
    ) -> None:
        """Fleet mode, and a single daemon on PostgreSQL: ``fence()`` gives the leases each
        commit needs; ``on_fenced`` hears of the streams the store refused; ``fenced_by``
        says in the log who moved them on (:data:`FLEET_FENCE`, :data:`OPERATOR_FENCE`)."""
        self._fence, self._on_fenced, self._fenced_by = fence, on_fenced, fenced_by

    def on_set_aside(
        self, stream: str, told: Callable[[Sequence[DeadLetter]], None], *, parks: bool
    ) -> None:
        """Whoever runs ``stream`` (its pipeline) hears of the dead letters a commit makes
        when the state transaction refused a staged row (:meth:`_set_aside`): ``told`` them,
        in order, once each, as it hears of its own. ``parks`` (park-key): the later events of
        such a letter's resource in that commit are dead-lettered too (reason ``parked``),
        never written, as the pipeline holds back those of its own dead letters; ``told``
        parks the key for the events after. A later call for the stream replaces this one."""
        self._runs[stream] = (told, parks)

    def on_commit(self, stream: str, record: Callable[[], None]) -> None:
        """Whoever runs ``stream`` (its pipeline) records, when ``record`` is called, what its
        sink said it took and is not recorded yet (:func:`~consumer.sinks.base.took`): called
        as each commit starts, before the commit reads what is done, while the stream is here.
        A later call for the stream replaces this one."""
        self._on_commit[stream] = record

    def took_more(self) -> None:
        """A sink said it took more (recorded as the next commit starts): an adaptive
        committer commits soon, as it does for anything done."""
        if self._adaptive:
            self._wake.set()

    def _ledger(self, stream: str) -> _Ledger:
        ledger = self._ledgers.get(stream)
        if ledger is None:
            ledger = self._ledgers[stream] = _Ledger()
            ledger.idle.set()
        return ledger

    # --- what happens to each frame (the pipeline; no I/O) ------------------------------------

    def arrived(self, stream: str, position: Positioned | None) -> int:
        """A frame was read: its place in line (``position`` None: a malformed frame)."""
        return self.arrived_all(stream, (position,))

    def arrived_all(self, stream: str, events: Sequence[Positioned | None]) -> int:
        """Frames were read, in this order: the first one's place in line (the others follow
        it). An event is its own position (read as one only when the position is asked for)."""
        ledger = self._ledger(stream)
        ledger.idle.clear()
        return ledger.watermark.add_all(events)

    def processed(
        self, stream: str, event_ids: Sequence[str], seqs: Sequence[int] = (), nbytes: int = 0
    ) -> None:
        """Delivered to the sink: recorded as processed in the next commit. ``nbytes``: the
        events' size, which a sink may hold until the commit (the jsonl buffer, staged rows):
        counted against the capacity like dead letters, so large events commit early rather
        than pile up."""
        ledger = self._ledger(stream)
        self._hold(nbytes)
        self._batch.processed.setdefault(stream, []).extend(event_ids)
        ledger.pending_ids.update(event_ids)
        self._done(stream, ledger, seqs, len(event_ids))

    def skipped(self, stream: str, seqs: Sequence[int]) -> None:
        """Duplicates: nothing to record, but the watermark moves past them."""
        self._done(stream, self._ledger(stream), seqs, 0, other=len(seqs))

    def dead_letter(self, letter: DeadLetter, seq: int | None = None) -> None:
        """Set aside: the letter in the next commit and, for an event, its id as handled
        (see the module's doc; a malformed frame has no id, it counts attempts by its hash)."""
        ledger = self._ledger(letter.stream)
        self._batch.dead_letters.append(letter)
        if letter.unique_event_id is not None:
            self._batch.processed.setdefault(letter.stream, []).append(letter.unique_event_id)
            ledger.pending_ids.add(letter.unique_event_id)
        if letter.primary_key is not None:
            ledger.letters_not_durable[letter.primary_key] += 1
        self._hold(len(letter.payload) + len(letter.error))
        self._done(letter.stream, ledger, () if seq is None else (seq,), 0, other=1)

    def _hold(self, nbytes: int) -> None:
        """Bytes held until the next commit (events a sink buffers, dead letters): past a
        quarter of the capacity a commit starts early rather than hold more."""
        self._pending_bytes += nbytes
        if self._pending_bytes >= self._max_pending_bytes // 4:
            self._wake.set()

    def resolved(self, dead_letter_id: int, stream: str, unique_event_id: str) -> None:
        """A dead letter delivered by a replay (its event's stream and id): removed in the
        same transaction, unless that transaction dead-letters the event again (see
        :meth:`_still_letters`)."""
        self._batch.resolved.append(dead_letter_id)
        self._resolving[dead_letter_id] = (stream, unique_event_id)
        self._pending += 1
        if self._adaptive or self._pending >= self._max_events:
            self._wake.set()

    def staging(self) -> bool:
        """Whether rows a sink staged wait for the next commit (taken from the sink into the
        batch, in order): what they deliver is not final before it, since its transaction may
        refuse a row and the event is then dead-lettered (:meth:`_set_aside`). A replay holds
        its outcomes meanwhile."""
        staged = self._sink.staged()
        if staged is not None:
            self._batch.staged.append(staged)
        return any(s.rows for s in self._batch.staged)

    def _still_letters(self, resolved: list[int], letters: Sequence[DeadLetter]) -> list[int]:
        """``resolved`` without the replay's dead letters whose event ``letters`` dead-letter
        again (refused in the state transaction, then on the sink's own path): such a letter
        is kept, the new one lands on it (same stream and uniqueEventId: one more attempt,
        the new reason). Removed with the resolved ones, the event was lost (its id recorded
        as processed, in neither the sink nor the DLQ)."""
        if not resolved or not letters:
            return resolved
        again = {(d.stream, d.unique_event_id) for d in letters}
        kept: list[int] = []
        for dead_letter_id in resolved:
            if self._resolving.get(dead_letter_id) in again:
                del self._resolving[dead_letter_id]  # resolved no more
            else:
                kept.append(dead_letter_id)
        return kept

    def _done(
        self, stream: str, ledger: _Ledger, seqs: Sequence[int], done: int, other: int = 0
    ) -> None:
        ledger.watermark.done_all(seqs)
        if done:
            counts = self._batch.done_counts
            counts[stream] = counts.get(stream, 0) + done
        self._pending += done + other
        if self._adaptive or self._pending >= self._max_events:
            self._wake.set()
        self._maybe_idle(ledger)

    @staticmethod
    def _maybe_idle(ledger: _Ledger) -> None:
        if not ledger.watermark.in_flight:
            ledger.idle.set()

    # --- what the pipeline asks -----------------------------------------------------------------

    def position(self, stream: str) -> Position | None:
        """Newest position whose whole prefix is done: where a new session resumes."""
        return self._ledger(stream).watermark.position

    def in_flight(self, stream: str) -> int:
        return self._ledger(stream).watermark.in_flight

    def is_pending(self, stream: str, seq: int) -> bool:
        return self._ledger(stream).watermark.is_pending(seq)

    async def drained(self, stream: str) -> None:
        """Returns when every frame of the stream that arrived is done."""
        ledger = self._ledger(stream)
        # Until forgotten too (the stream lost meanwhile): what it waited for is dropped, and a
        # shutdown's drain of it would otherwise hold the other streams' drain time.
        while ledger.watermark.in_flight and self._ledgers.get(stream) is ledger:
            ledger.idle.clear()
            await ledger.idle.wait()

    async def seen(self, stream: str, event_ids: Sequence[str]) -> set[str]:
        """Which of these ids were processed before: in a commit to come, under way, or done.
        Pending ids first, then the store: an id cannot slip between the two checks."""
        ledger = self._ledger(stream)
        ids = set(event_ids)  # set operations: no Python step per id
        found = (ids & ledger.pending_ids) | (ids & ledger.committing_ids)
        if len(found) < len(ids):
            found |= await self._store.seen(stream, list(ids - found))
        return found

    async def has_dead_letters(self, stream: str, primary_key: str) -> bool:
        """Does this resource have dead letters, durable or not? (park-key)"""
        if self._ledger(stream).letters_not_durable[primary_key]:
            return True
        return await self._store.has_dead_letters(stream, primary_key)

    @property
    def store(self) -> StateStore:
        """The store it commits to (park-key's per-batch lookup asks it directly)."""
        return self._store

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

    # --- the commit task ------------------------------------------------------------------------

    async def run(self) -> None:
        """Commit forever; cancel to stop (then call :meth:`flush` once more)."""
        # One retry policy, begun afresh by each failure (every `async for` over it starts at
        # attempt 1): the backoff starts over once a commit succeeds. Around the whole loop,
        # as it was, its attempt count grew with every failure of the daemon's life, and
        # after eight of them any blip stopped the commits for 30 s.
        retrying = AsyncRetrying(
            # Anything that may clear by itself (a locked or full disk, a sink that is down);
            # anything else (a corrupt store, a sink file replaced underneath) ends the daemon.
            retry=retry_if_exception(_may_clear),
            wait=wait_exponential_jitter(multiplier=0.2, max=30.0, jitter=0.2),
            before_sleep=lambda rs: log.warning(
                "commit failed; retrying",
                failures=self.failures,
                retry_in_s=round(rs.next_action.sleep, 2) if rs.next_action else None,
                error=masked(
                    str(rs.outcome.exception() if rs.outcome else ""), 500, REDACTOR.scrub
                ),
            ),
        )
        while True:
            await self._due()
            try:
                await self._shielded_flush()
            except Exception as exc:
                if not _may_clear(exc):
                    raise
                await self._until_committed(retrying, exc)

    async def _due(self) -> None:
        """Until the next commit is due: adaptive, once woken (at most every min interval);
        else woken or at the interval."""
        if self._adaptive:
            await self._wake.wait()
            rest = self._last_start + self._min_interval - time.monotonic()
            if rest > 0:  # what is done meanwhile joins this commit
                await asyncio.sleep(rest)
            self._last_start = time.monotonic()
        else:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel
            # landing in the same step as the wake; shutdown then hangs.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
        self._wake.clear()

    async def _until_committed(self, retrying: AsyncRetrying, failed: BaseException) -> None:
        """Commit again, with backoff, until a commit succeeds (the failed one is tenacity's
        first attempt); what was done meanwhile goes with it."""
        first: BaseException | None = failed
        async for attempt in retrying:
            with attempt:
                if first is not None:
                    failure, first = first, None
                    raise failure
                await self._shielded_flush()

    async def _shielded_flush(self) -> None:
        """:meth:`flush`, finished even if we are cancelled meanwhile (a commit under way is
        never cut). Left running by a stop, its task is held (asyncio keeps only a weak
        reference) and its outcome read: a failure is logged once, never left to asyncio's
        "Task exception was never retrieved" with a traceback; the final flush (it waits for
        this one's lock) tries again."""
        task = asyncio.ensure_future(self.flush())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                self._left_running.add(task)
                task.add_done_callback(self._left_flush_done)
            raise

    def _left_flush_done(self, task: asyncio.Future[bool]) -> None:
        self._left_running.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.warning(
                "the commit under way at the stop failed; the final commit tries again",
                error=masked(str(exc) or type(exc).__name__, 500, REDACTOR.scrub),
            )

    async def flush(self) -> bool:
        """Commit what is done now. Returns True when something was committed."""
        async with self._writing():
            if self._position_fenced:
                self._drop_all()
                return False
            unsure = self._unsure is not None and await self._commit_unsure()
            for record in self._on_commit.values():  # a forgotten stream's are gone
                record()
            held = self._pending_bytes  # what the snapshot takes (restored if it fails)
            batch = self._snapshot()
            if not batch:
                # Only duplicates since the last commit: the snapshot freed their capacity,
                # so workers waiting in wait_capacity() may go on (else they wait forever
                # when one of them holds the event the checkpoint waits for).
                self._committed.set()
                return unsure
            self._seq += 1
            batch.mark = (self._id, self._seq)
            return await self._commit_one(batch, held) or unsure

    async def _commit_unsure(self) -> bool:
        """A failed commit first, alone and as it was (its mark makes it once at most)."""
        assert self._unsure is not None
        batch, held = self._unsure
        self._unsure = None
        self._pending_bytes -= held  # taken again by _restore if it fails once more
        self._pending -= _size(batch)
        # Not the streams fenced since (or during the failed try, which narrowed its own copy
        # of the batch): their part is dropped, as a snapshot drops it, and settled no more.
        fenced = self._fenced_now()
        return await self._commit_one(batch.without(fenced) if fenced else batch, held, True)

    async def _commit_one(self, batch: CommitBatch, held: int, again: bool = False) -> bool:
        """``again``: a failed commit sent again. Its sink position is long synced; what was
        written since goes on to the disk while the commits fail (a jsonl rotation's files
        too), through a sync to no position: a sync to a position tells the sink that a
        commit may cover it, and a jsonl file renamed meanwhile keeps that much (see
        JsonlSink._cut_gone), which no commit carried."""
        self.busy_since = time.monotonic()
        self._sent = None
        try:
            if again:
                await self._sink.sync(None)
            await self._sink.sync(None if batch.sink_state is None else batch.sink_state[1])
            batch = await self._commit_fenced(batch)
        except BaseException as exc:
            if self._sent is not None:  # its rows are durable now: the rest is what is kept
                batch, self._sent = self._sent, None
            # Work of a stream forgotten meanwhile belongs to a lease that is gone.
            gone = self._end_in_flight()
            self._restore(batch.without(gone) if gone else batch, held)
            if not isinstance(exc, asyncio.CancelledError):
                self.failures += 1
                self.last_error = masked(str(exc) or type(exc).__name__, 2000, REDACTOR.scrub)
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
            raise
        self._sent = None
        gone = self._end_in_flight()
        self.failures = 0
        self.failing_since = None
        self.last_error = ""
        self._committed.set()
        if not batch:  # every stream in it was fenced
            return False
        self._durable(batch, gone)
        if batch.sink_state is not None:
            self._sink.committed(batch.sink_state[1])
        self.commits += 1
        return True

    def _end_in_flight(self) -> frozenset[str]:
        """The commit is over: the streams forgotten while it was under way. Their ledgers
        are gone, or belong to a new lease by now: nothing of this commit is theirs to settle."""
        self.busy_since = None
        gone = frozenset(self._forgotten_in_flight)
        self._forgotten_in_flight.clear()
        return gone

    def _live(self, stream: str, gone: frozenset[str]) -> _Ledger | None:
        """The stream's ledger, unless the stream was forgotten (never recreated here: a
        ledger made for a forgotten stream's letters would hold a negative count, a false
        park if the stream is taken again)."""
        return None if stream in gone else self._ledgers.get(stream)

    async def _commit_fenced(self, batch: CommitBatch) -> CommitBatch:
        """Commit; when the store refuses streams whose lease is gone, drop their part and
        commit the rest (each round drops at least one stream). Returns what was committed.
        The batch commits under the leases it was taken under (:meth:`_snapshot`): the
        sink's sync, and a set-aside (:meth:`_set_aside`), await long before the store
        commits, and a stream lost and taken again by this member meanwhile has a new epoch,
        which the old lease's work must not commit under."""
        if batch.fence is None:
            batch.fence = self._fence()
        while True:
            try:
                if not await self._store.commit(batch):
                    log.info("a commit whose outcome was lost had been applied: not again")
                return batch
            except Fenced as exc:
                self.fencing_rejections += 1
                log.warning(
                    f"commit refused: {self._fenced_by}; dropping this process's uncommitted "
                    "work on the stream (replayed from the checkpoint by whoever goes on)",
                    streams=sorted(exc.streams),
                )
                epochs = batch.fence.epochs if batch.fence is not None else {}
                self.fence_out(exc.streams - self._forgotten_in_flight, epochs)
                self._forget_in_flight(batch, exc.streams)
                if self._position_fenced:
                    return CommitBatch()  # its sink position covers the refused streams' bytes
                batch = batch.without(exc.streams)
                if not batch:
                    return batch
            except StagedRowRefused as exc:
                # Once at most: the batch sent again has no staged rows.
                batch = await self._set_aside(batch, exc)

    async def _set_aside(self, batch: CommitBatch, refused: StagedRowRefused) -> CommitBatch:
        """The state transaction refused a row a sink staged, for that row's data (nothing
        was committed): every staged row of the batch goes through its sink's own path
        instead (:attr:`Staged.aside`; the sink writes through it from now on, once the rows
        staged meanwhile went there too: :meth:`_switch_when_drained`), durable before
        the commit of the rest; an event refused there too is dead-lettered alone, as the
        pipeline does with a refusal of the sink's own path (with park-key, the later events
        of its resource in the batch too, and the pipeline told: see :meth:`on_set_aside`).
        The batch without its staged rows, with those dead letters, is what is committed
        then. A failure of the own path that every event meets (:class:`TransientSinkError`)
        fails this commit, retried as any; the rows it wrote are upserted again then."""
        ways = [(s, s.aside) for s in batch.staged if s.rows]
        if any(aside is None or s.events is None for s, aside in ways):
            raise refused  # no way round: the commit fails, as it did
        log.warning(
            "a row a sink staged was refused in the state transaction; writing the batch's "
            "rows through the sink's own path, and every batch from now on",
            error=masked(str(refused), 1000, REDACTOR.scrub),
        )
        letters: list[DeadLetter] = []
        # stream -> its resources parked by those letters (park-key), across the batch's rows
        parked: dict[str, dict[str, str]] = {s: {} for s, (_, p) in self._runs.items() if p}
        for staged, aside in ways:
            assert aside is not None
            for stream, events in staged.by_stream().items():
                letters += await self._write_aside(aside, stream, events, parked.get(stream))
        rest = dataclasses.replace(
            batch,
            staged=[],
            dead_letters=[*batch.dead_letters, *letters],
            done_counts=dict(batch.done_counts),
            resolved=self._still_letters(batch.resolved, letters),
        )
        gone = frozenset(self._forgotten_in_flight)
        for letter in letters:
            # Handled, not delivered: its id stays with the processed ones (the pipeline's
            # dead letters' too), its count goes.
            if rest.done_counts.get(letter.stream):
                rest.done_counts[letter.stream] -= 1
            ledger = self._live(letter.stream, gone)
            if ledger is not None and letter.primary_key is not None:
                ledger.letters_not_durable[letter.primary_key] += 1  # settled by _durable
        self.aside_dead_letters += len(letters)
        # Told once the letters are final (a failure above makes them again at the retry;
        # the batch kept when the commit of the rest fails keeps them as they are).
        self._tell(letters, gone)
        self._sent = rest  # its rows are durable: what is kept if anything below fails
        await self._switch_when_drained(ways, parked)
        return rest

    def _tell(self, letters: Sequence[DeadLetter], gone: frozenset[str]) -> None:
        """Whoever runs each stream hears of its letters (see :meth:`on_set_aside`)."""
        told: dict[str, list[DeadLetter]] = {}
        for letter in letters:
            if self._live(letter.stream, gone) is not None:
                told.setdefault(letter.stream, []).append(letter)
        for stream, its in told.items():
            runs = self._runs.get(stream)
            if runs is not None:
                runs[0](its)

    async def _switch_when_drained(
        self, ways: Sequence[tuple[Staged, object]], parked: dict[str, dict[str, str]]
    ) -> None:
        """After a set-aside: the rows the pipeline staged while it ran (the sink stages until
        :attr:`Staged.switch`) go through the sink's own path now, in order, as the
        set-aside's did; with park-key (the pipeline did not know the keys parked yet), those
        of a resource parked by then are dead-lettered ``parked`` instead, never written, and a
        refusal there parks its resource too. The sink switches once none is left, with no
        await between: a row left staged commits with the next state transaction, after a
        later event of its resource went through the own path and was committed at once (the
        table held the later event without the earlier one until then, for good after a
        crash, and the earlier one's row came after it; with park-key, it broke the
        resource's order when refused). Bounded: the pipeline stages little more than the
        committer's capacity meanwhile; rows left then (or when the own path fails for a
        while) commit in the next batch, the sink staging still, a refusal there set aside
        again."""
        for _ in range(_CATCH_UP_ROUNDS):
            window = self._taken_back()
            if not window:
                for staged, _ in ways:
                    if staged.switch is not None:
                        staged.switch()
                return
            free = [self._park_rows(staged, parked) for staged in window]
            if any(s.aside is None or s.events is None for s in free):
                self._batch.staged.extend(free)  # no way round: they commit staged
                return
            letters: list[DeadLetter] = []
            try:
                for staged in free:
                    assert staged.aside is not None
                    for stream, events in staged.by_stream().items():
                        letters += await self._write_aside(
                            staged.aside, stream, events, parked.get(stream)
                        )
            except TransientSinkError as exc:
                self._batch.staged.extend(free)  # staged again, as they were
                log.warning(
                    "the sink's own path failed; the rows staged meanwhile commit with the "
                    "next batch",
                    error=masked(str(exc), 500, REDACTOR.scrub),
                )
                return
            except BaseException:
                self._batch.staged.extend(free)
                raise
            self._later(letters)
        left = [self._park_rows(staged, parked) for staged in self._taken_back()]
        self._batch.staged.extend(left)

    def _taken_back(self) -> list[Staged]:
        """The rows staged since the snapshot: the sink's, and those :meth:`forget` moved to
        the next batch (the other streams' of a sink it drained)."""
        window, self._batch.staged = self._batch.staged, []
        staged = self._sink.staged()
        if staged is not None:
            window.append(staged)
        gone = frozenset(self._forgotten_in_flight)
        window = [s.without(gone) if gone else s for s in window]
        return [s for s in window if s.rows]

    def _park_rows(self, staged: Staged, parked: dict[str, dict[str, str]]) -> Staged:
        """The rows of ``staged`` whose resource is not parked; the others' events
        dead-lettered ``parked`` (:meth:`_later`)."""
        letters: list[DeadLetter] = []

        def free(stream: str, ev: Event) -> bool:
            behind = parked.get(stream, {}).get(ev.primary_key)
            if behind is None:
                return True
            letters.append(self._aside_letter(stream, ev, "parked", parked_error(ev, behind)))
            return False

        kept = staged.where(free) if staged.events is not None else staged
        self._later(letters)
        return kept

    def _later(self, letters: Sequence[DeadLetter]) -> None:
        """Dead letters of events the pipeline handed the sink after the commit's snapshot:
        the next batch's (their ids are there, processed: handled, their count goes), and
        told to whoever runs the stream."""
        gone = frozenset(self._forgotten_in_flight)
        its: list[DeadLetter] = []
        for letter in letters:
            ledger = self._live(letter.stream, gone)
            if ledger is None:
                continue  # forgotten meanwhile: its work is dropped
            its.append(letter)
            self._batch.dead_letters.append(letter)
            counts = self._batch.done_counts
            if counts.get(letter.stream):
                counts[letter.stream] -= 1
            if letter.primary_key is not None:
                ledger.letters_not_durable[letter.primary_key] += 1  # settled by _durable
            self._hold(len(letter.payload) + len(letter.error))
        self._batch.resolved = self._still_letters(self._batch.resolved, its)
        self.aside_dead_letters += len(its)
        self._tell(its, gone)

    async def _write_aside(
        self,
        write: Callable[[str, Sequence[Event]], Awaitable[None]],
        stream: str,
        events: list[Event],
        parked: dict[str, str] | None = None,
    ) -> list[DeadLetter]:
        """Write the events through the sink's own path; the dead letters of those it refuses.
        A refusal that names no event splits the part in two (bisection: a few writes find
        one event among thousands); each failed write splits a part or dead-letters one
        event, so there are at most twice as many writes as events. The parts go in the
        events' order, each written whole or split: with ``parked`` (park-key: primaryKey ->
        the event it waits behind), an event whose resource has a dead letter before it is
        dead-lettered (``parked``), never written after it."""
        letters: list[DeadLetter] = []
        parts: deque[list[Event]] = deque([events])
        while parts:
            part = parts.popleft()
            if parked and any(e.primary_key in parked for e in part):
                for e in part:
                    if e.primary_key in parked:
                        why = parked_error(e, parked[e.primary_key])
                        letters.append(self._aside_letter(stream, e, "parked", why))
                part = [e for e in part if e.primary_key not in parked]
                if not part:
                    continue
            try:
                await write(stream, part)
            except PermanentSinkError as exc:
                part = part[min(max(0, exc.delivered), len(part)) :]  # those taken are done
                if not part:
                    continue
                at = 0 if len(part) == 1 else _index(part, exc.unique_event_id)
                if at is None:
                    half = len(part) // 2
                    parts.extendleft((part[half:], part[:half]))  # the first half first
                    continue
                ev = part[at]
                error = masked(str(exc), 1000, REDACTOR.scrub)
                letters.append(self._aside_letter(stream, ev, "sink_rejected", error))
                if parked is not None:
                    parked.setdefault(ev.primary_key, ev.unique_event_id)
                parts.extendleft(p for p in (part[at + 1 :], part[:at]) if p)
        return letters

    def _aside_letter(self, stream: str, ev: Event, reason: str, error: str) -> DeadLetter:
        """An event the sink's own path refused too, or one parked behind such an event:
        its dead letter, as the pipeline's."""
        log.warning(
            "event dead-lettered",
            stream=stream,
            offset=ev.offset,
            unique_event_id=ev.unique_event_id,
            event_name=ev.event_name,
            reason=reason,
            error=error,
        )
        return DeadLetter.of_event(ev, stream=stream, reason=reason, error=error)

    def fence_out(self, streams: frozenset[str], epochs: dict[str, int]) -> None:
        """The store refused these streams at these epochs: nothing of theirs is committed
        from now on (until :meth:`forget`, or a new epoch), and whoever runs them is told."""
        new = frozenset(s for s in streams if s not in self._fenced)
        for s in streams:
            self._fenced[s] = epochs.get(s)
        if streams and self._sink.position() is not None and not self._position_fenced:
            # One position covers every stream's bytes (a jsonl file: outside a fleet, so an
            # operator's command moved these streams and the daemon stops, exit 1). A commit
            # of the rest would carry it, and the refused streams' lines with it, which their
            # next delivery writes again; without it, the rest's lines are cut at the restart
            # while their ids say processed. So nothing more is committed: the restart cuts
            # the file back to the last commit, and every stream replays from its checkpoint.
            self._position_fenced = True
            log.error(
                "the sink's file holds the refused streams' lines among the others': "
                "committing nothing more; the restart cuts it back to the last commit",
                sink=self._sink.name,
            )
        if new:
            self._on_fenced(new)

    def _fenced_now(self) -> frozenset[str]:
        if not self._fenced:
            return frozenset()
        fence = self._fence()
        current = fence.epochs if fence is not None else {}
        for s in [s for s, e in self._fenced.items() if e is not None and current.get(s) != e]:
            del self._fenced[s]  # taken again since: a new epoch
        return frozenset(self._fenced)

    def _forget_in_flight(self, batch: CommitBatch, streams: frozenset[str]) -> None:
        gone = frozenset(self._forgotten_in_flight)
        for stream in streams:
            ledger = self._live(stream, gone)
            if ledger is not None:
                ledger.committing_ids.difference_update(batch.processed.get(stream, ()))
        for letter in batch.dead_letters:
            if letter.stream in streams and letter.primary_key is not None:
                ledger = self._live(letter.stream, gone)
                if ledger is not None:
                    ledger.letter_settled(letter.primary_key)

    def forget(self, stream: str) -> None:
        """The stream stopped here (released or lost; its workers are stopped): drop its
        completion state and its uncommitted work, wherever it waits (the batch, the sink's
        staged rows, a commit under way), so that a later lease starts from the store's
        checkpoint with nothing of the old one."""
        gone = frozenset({stream})
        # Its pipeline's callbacks too: they would hold the stopped pipeline (its queues, its
        # sink's state) for the process's life; a later lease's pipeline registers its own.
        self._runs.pop(stream, None)
        self._on_commit.pop(stream, None)
        ledger = self._ledgers.pop(stream, None)
        if ledger is not None:
            ledger.idle.set()  # a drain waiting for it ends (see drained)
        self._fenced.pop(stream, None)
        self.checkpointed_at.pop(stream, None)
        self._batch = self._batch.without(gone)
        if self._unsure is not None:
            unsure, held = self._unsure
            kept = unsure.without(gone)
            self._pending -= _size(unsure) - _size(kept)
            self._unsure = (kept, held) if kept else None
            if not kept:
                self._pending_bytes -= held
        staged = self._sink.staged()  # the other streams' rows wait in the batch instead
        if staged is not None:
            self._batch.staged.append(staged.without(gone))
        if self.busy_since is not None:
            self._forgotten_in_flight.add(stream)

    async def anchor(self, stream: str, position: Position) -> None:
        """Create the stream's checkpoint if it has none (never moves an existing one)."""
        async with self._writing():
            try:
                await self._store.anchor(stream, position, self._fence())
            except Fenced as exc:
                self.fencing_rejections += 1
                # Said here, as a refused commit is: the stream's stop that fence_out starts
                # may cancel its session before the error reaches the stream's loop.
                log.warning(
                    f"recording where the stream begins refused: {self._fenced_by}; the "
                    "stream stops here (whoever goes on records it)",
                    streams=sorted(exc.streams),
                )
                fence = self._fence()
                self.fence_out(exc.streams, fence.epochs if fence is not None else {})
                raise

    async def prune(self, older_than: float, streams: Sequence[str] | None = None) -> int:
        """Prune processed ids (of ``streams`` when given) a bounded statement at a time,
        each between two commits (SQLite: both use the one writer connection), so a large
        prune never holds commits back."""
        total = 0
        while True:
            async with self._writing():
                n = await self._store.prune_processed(older_than, streams=streams, once=True)
            total += n
            if n < PRUNE_CHUNK:
                return total
            await asyncio.sleep(0)

    def _snapshot(self) -> CommitBatch:
        batch, self._batch = self._batch, CommitBatch()
        batch.fence = self._fence()  # the leases its work was done under (_commit_fenced)
        self._pending = 0
        self._pending_bytes = 0
        fenced = self._fenced_now()
        if fenced:
            batch = batch.without(fenced)
        for stream, ledger in self._ledgers.items():
            if stream in fenced:
                continue
            pos = ledger.watermark.advance()
            if pos is not None:
                batch.checkpoints[stream] = pos
                at = event_time(pos.timestamp, self._zone)  # once per stream and commit
                if at is not None:
                    batch.event_at[stream] = at
        for stream, ids in batch.processed.items():
            ledger = self._ledgers[stream]
            ledger.committing_ids.update(ids)
            ledger.pending_ids.difference_update(ids)
        staged = self._sink.staged()
        if staged is not None:
            batch.staged.append(staged.without(fenced) if fenced else staged)
        if batch:
            position = self._sink.position()
            if position is not None:
                batch.sink_state = (self._sink.name, position)
        return batch

    def _durable(self, batch: CommitBatch, gone: frozenset[str]) -> None:
        """The commit is durable: settle it in the ledgers (not those of ``gone``)."""
        now = time.monotonic()
        for stream, ids in batch.processed.items():
            ledger = self._live(stream, gone)
            if ledger is not None:
                ledger.committing_ids.difference_update(ids)
        for letter in batch.dead_letters:
            if letter.primary_key is not None:
                ledger = self._live(letter.stream, gone)
                if ledger is not None:
                    ledger.letter_settled(letter.primary_key)
        for stream in batch.checkpoints:
            if self._live(stream, gone) is not None:
                self.checkpointed_at[stream] = now
        for dead_letter_id in batch.resolved:
            self._resolving.pop(dead_letter_id, None)

    def _drop_all(self) -> None:
        """Nothing of what is done is committed (see fence_out): dropped, and whoever waits
        for capacity let go."""
        self._batch, self._unsure = CommitBatch(), None
        self._pending = self._pending_bytes = 0
        self._committed.set()

    def _restore(self, batch: CommitBatch, held: int) -> None:
        """A failed commit: kept as it is, to be sent first and alone at the next flush
        (``held``: its bytes counted against capacity). Its outcome may be unknown (cancelled
        during COMMIT, a connection lost after it): merged with newer work, a batch that
        was in fact applied would be applied again (counts, attempts, resolved letters)."""
        self._unsure = (batch, held) if batch else None
        self._pending += _size(batch)
        self._pending_bytes += held
        if self._adaptive:
            self._wake.set()  # no interval comes to retry it: the next round does


def _size(batch: CommitBatch) -> int:
    """A batch's weight against capacity, as the pipeline counted it."""
    return (
        sum(len(v) for v in batch.processed.values())
        + sum(d.unique_event_id is None for d in batch.dead_letters)  # else an id above
        + len(batch.resolved)
    )


def parked_error(ev: Event, behind: str | None) -> str:
    """Why ``ev`` is dead-lettered unwritten (park-key): its resource waits behind the dead
    letter of event ``behind``."""
    return f"primaryKey {ev.primary_key} is parked behind {behind}"


def _index(events: list[Event], unique_event_id: str | None) -> int | None:
    """Where the event a refusal names is among ``events`` (None: it names none of them)."""
    if unique_event_id is None:
        return None
    return next((i for i, e in enumerate(events) if e.unique_event_id == unique_event_id), None)


def _may_clear(exc: BaseException) -> bool:
    if isinstance(exc, TransientSinkError | OSError):
        return True
    return isinstance(exc, StoreError) and exc.retriable
