"""Unit tests for consumer.runtime.pipeline + consumer.runtime.committer.

A real Store and a real JsonlSink in tmp_path; a small fake sink where failures are needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from log_capture import captured_logs
from support import sink_length, wait_until

from consumer.core.events import Event
from consumer.core.evidence import evidence
from consumer.core.protocol import DecodeError
from consumer.core.records import CommitBatch
from consumer.core.watermark import Position
from consumer.errors import PermanentSinkError, StoreError, TransientSinkError
from consumer.logs import REDACTOR
from consumer.runtime.committer import Committer
from consumer.runtime.pipeline import HANDOVER, StreamPipeline
from consumer.sinks.base import PlainSink
from consumer.sinks.jsonl import JsonlSink
from consumer.state.sqlite import SqliteStore as Store

STREAM = "main"
WAIT_S = 5.0


def bad(text: str, reason: str) -> DecodeError:
    return DecodeError(evidence(text), reason)


def ev(i: int, key: str | None = None) -> Event:
    key = key if key is not None else f"pk{i % 7}"
    offset = f"{i:05d}"
    uid = f"u{i}"
    raw = {
        "metadata": {"offset": offset, "uniqueEventId": uid},
        "moduleName": "Reservation",
        "eventName": "UPDATE RESERVATION",
        "primaryKey": key,
        "hotelId": "H1",
        "timestamp": "28-APR-24 06.18.59.028027 AM",
        "detail": [{"elementName": "Seq", "newValue": str(i), "oldValue": ""}],
    }
    return Event(
        offset=offset,
        unique_event_id=uid,
        event_name="UPDATE RESERVATION",
        module_name="Reservation",
        primary_key=key,
        hotel_id="H1",
        timestamp="28-APR-24 06.18.59.028027 AM",
        parsed=raw,
    )


class FakeSink(PlainSink):
    """Records delivered events; can interleave, fail transiently, or reject a poison event."""

    name = "fake"

    def __init__(
        self,
        *,
        transient_failures: int = 0,
        poison: set[str] | None = None,
        name_culprit: bool = True,
        culprit_override: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.delivered: list[Event] = []
        self.calls = 0
        self.transient_left = transient_failures
        self.poison = poison or set()
        self.name_culprit = name_culprit
        self.culprit_override = culprit_override
        self.rng = rng
        self.gate = asyncio.Event()
        self.gate.set()
        self.hold: dict[str, asyncio.Event] = {}  # primaryKey -> gate for that key only

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        self.calls += 1
        await self.gate.wait()
        for e in events:
            if e.primary_key in self.hold:
                await self.hold[e.primary_key].wait()
        if self.rng is not None:
            for _ in range(self.rng.randrange(4)):
                await asyncio.sleep(0)
        if self.transient_left > 0:
            self.transient_left -= 1
            raise TransientSinkError("backend busy")
        for e in events:
            if e.unique_event_id in self.poison:
                culprit = self.culprit_override or e.unique_event_id
                raise PermanentSinkError(
                    f"rejected {e.unique_event_id}",
                    unique_event_id=culprit if self.name_culprit else None,
                )
        self.delivered.extend(events)  # all or nothing


@asynccontextmanager
async def harness(
    tmp_path: Path,
    sink: Any,
    *,
    workers: int = 4,
    queue_size: int = 1000,
    queue_max_bytes: int = 16 * 1024 * 1024,
    batch_max: int = 50,
    max_events: int = 10_000,
    max_pending_bytes: int = 16 * 1024 * 1024,
    interval_s: float = 3600.0,
    start: bool = True,
    past_fence: Callable[[], bool] | None = None,
) -> AsyncIterator[tuple[Store, Committer, StreamPipeline]]:
    store = await Store.open(tmp_path / "state.db")
    pipeline: StreamPipeline | None = None
    try:  # closed whatever fails (an open aiosqlite thread keeps pytest from exiting)
        await sink.open(await store.sink_state(sink.name))
        committer = Committer(
            store,
            sink,
            max_events=max_events,
            interval_s=interval_s,
            max_pending_bytes=max_pending_bytes,
        )
        pipeline = StreamPipeline(
            STREAM,
            sink=sink,
            committer=committer,
            workers=workers,
            queue_size=queue_size,
            queue_max_bytes=queue_max_bytes,
            batch_max=batch_max,
            retry_initial_s=0.01,
            retry_max_s=0.02,
            past_fence=past_fence,
        )
        if start:
            pipeline.start()
        yield store, committer, pipeline
    finally:
        if pipeline is not None:
            await pipeline.stop()
        await sink.close()
        await store.close()


async def drained(pipeline: StreamPipeline) -> None:
    async with asyncio.timeout(WAIT_S):
        await pipeline.drained()


async def still_pending(task: asyncio.Task[Any], seconds: float = 0.3) -> None:
    """The loop turns until its clock has moved ``seconds`` on (the positive condition), and
    ``task`` (a wait for room that has none) is pending all along: a wait that gave up after a
    timeout shorter than that, rather than waiting for room, fails here."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while loop.time() < until:
        assert not task.done(), "the wait for room returned while there was none"
        await asyncio.sleep(0.01)
    assert not task.done(), "the wait for room returned while there was none"


def large(i: int, size: int) -> Event:
    """``ev(i)`` kept as its JSON text as received (as the fast decode keeps it), padded to
    ``size`` bytes."""
    e = ev(i, key="same")
    text = orjson.dumps({**e.raw, "pad": ""})
    text = text[:-3] + b'"' + b"x" * (size - len(text)) + b'"}'
    assert len(text) == size
    return e._replace(parsed=None, text=text)


def fail_next_commit(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's next commit fails as a locked database does; the ones after it go through."""
    real_commit = store.commit
    failures = [sqlite3.OperationalError("database is locked")]

    async def flaky(batch: CommitBatch, now: float | None = None) -> None:
        if failures:
            raise failures.pop()
        await real_commit(batch, now)

    monkeypatch.setattr(store, "commit", flaky)


def jsonl_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def uid_of(line: dict[str, Any]) -> str:
    return str(line["metadata"]["uniqueEventId"])


# --- ordering ----------------------------------------------------------------------------------


async def test_same_primary_key_keeps_arrival_order_across_workers(tmp_path: Path) -> None:
    sink = FakeSink(rng=random.Random(42))
    events = [ev(i, key=f"pk{(i * 7) % 11}") for i in range(300)]
    async with harness(tmp_path, sink, workers=4, batch_max=3) as (_, _, pipeline):
        for e in events:
            await pipeline.put(e)
        await drained(pipeline)
    assert sorted(e.unique_event_id for e in sink.delivered) == sorted(
        e.unique_event_id for e in events
    )
    for key in {e.primary_key for e in events}:
        expected = [e.unique_event_id for e in events if e.primary_key == key]
        got = [e.unique_event_id for e in sink.delivered if e.primary_key == key]
        assert got == expected, key
    # several workers really ran in parallel: delivery is not the global arrival order
    assert [e.unique_event_id for e in sink.delivered] != [e.unique_event_id for e in events]


async def test_jsonl_file_keeps_per_key_order(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "events.jsonl", fsync=False)
    events = [ev(i, key=f"pk{i % 5}") for i in range(200)]
    async with harness(tmp_path, sink, workers=3, batch_max=4) as (_, committer, pipeline):
        for e in events:
            await pipeline.put(e)
        await drained(pipeline)
        assert await committer.flush()
    lines = jsonl_lines(sink.path)
    assert Counter(uid_of(x) for x in lines) == Counter(e.unique_event_id for e in events)
    for key in {e.primary_key for e in events}:
        expected = [e.raw for e in events if e.primary_key == key]
        assert [x for x in lines if x["primaryKey"] == key] == expected


# --- duplicates --------------------------------------------------------------------------------


async def test_duplicates_are_delivered_once(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "events.jsonl", fsync=False)
    async with harness(tmp_path, sink, workers=3, start=False) as (store, committer, pipeline):
        # committed in an earlier run
        await store.commit(CommitBatch(processed={STREAM: ["u0"]}))
        # twice in one batch (the workers are not started yet: one queue, one batch)
        for e in [ev(0, "a"), ev(1, "a"), ev(1, "a"), ev(2, "a")]:
            await pipeline.put(e)
        pipeline.start()
        await drained(pipeline)
        assert pipeline.duplicates == 2
        # processed but not yet committed (pending)
        await pipeline.put(ev(2, "a"))
        await drained(pipeline)
        assert pipeline.duplicates == 3
        assert await committer.flush()
        # committed now
        await pipeline.put(ev(1, "a"))
        await drained(pipeline)
        assert pipeline.duplicates == 4
        assert pipeline.delivered == 2
        await committer.flush()
        cp = await store.checkpoint(STREAM)
    assert [uid_of(x) for x in jsonl_lines(sink.path)] == ["u1", "u2"]
    assert cp is not None
    # offsets are opaque: the position is that of the newest frame in arrival order (the
    # replayed u1), not the "highest" offset
    assert cp.offset == ev(1).offset
    assert cp.processed_count == 2


async def test_duplicate_during_an_unfinished_commit_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = FakeSink()
    async with harness(tmp_path, sink, workers=2) as (store, committer, pipeline):
        await pipeline.put(ev(1))
        await drained(pipeline)
        gate = asyncio.Event()
        entered = asyncio.Event()
        real_commit = store.commit

        async def slow_commit(batch: CommitBatch, now: float | None = None) -> None:
            entered.set()
            await gate.wait()
            await real_commit(batch, now)

        monkeypatch.setattr(store, "commit", slow_commit)
        flush = asyncio.create_task(committer.flush())
        async with asyncio.timeout(WAIT_S):
            await entered.wait()
        await pipeline.put(ev(1))  # neither pending nor in the store yet: being committed
        await drained(pipeline)
        gate.set()
        async with asyncio.timeout(WAIT_S):
            assert await flush
        await pipeline.put(ev(1))  # and after the commit: in the store
        await drained(pipeline)
    assert [e.unique_event_id for e in sink.delivered] == ["u1"]
    assert pipeline.duplicates == 2


async def test_failed_commit_keeps_ids_pending_and_retries_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = FakeSink()
    async with harness(tmp_path, sink, workers=2) as (store, committer, pipeline):
        for i in range(5):
            await pipeline.put(ev(i))
        await drained(pipeline)
        fail_next_commit(store, monkeypatch)
        with pytest.raises(sqlite3.OperationalError):
            await committer.flush()
        assert await store.checkpoint(STREAM) is None
        # ids of the failed commit are still known: a replay is skipped
        await pipeline.put(ev(3))
        await drained(pipeline)
        await pipeline.put(ev(5))
        await drained(pipeline)
        assert await committer.flush()
        cp = await store.checkpoint(STREAM)
        seen = await store.seen(STREAM, [f"u{i}" for i in range(6)])
    assert [e.unique_event_id for e in sink.delivered] == [f"u{i}" for i in range(6)]
    assert pipeline.duplicates == 1
    assert seen == {f"u{i}" for i in range(6)}
    assert cp is not None
    assert (cp.offset, cp.unique_event_id) == (ev(5).offset, "u5")
    assert cp.processed_count == 6


def applied_then_lost(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's next commit is applied and then reported failed: the client never learns
    the outcome (cancelled during COMMIT, a connection lost after it)."""
    real_commit = store.commit
    lost = [StoreError("connection lost after COMMIT", retriable=True)]

    async def commit(batch: CommitBatch, now: float | None = None) -> bool:
        applied = await real_commit(batch, now)
        if lost:
            raise lost.pop()
        return applied

    monkeypatch.setattr(store, "commit", commit)


async def test_a_commit_applied_though_reported_failed_is_not_applied_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent again, alone and as it was, before what was done since: its count, its dead
    letter's attempts and a letter a replay delivered meanwhile are not applied twice."""
    sink = FakeSink(poison={"u2"})
    async with harness(tmp_path, sink, workers=2) as (store, committer, pipeline):
        for i in range(5):
            await pipeline.put(ev(i))
        await drained(pipeline)
        applied_then_lost(store, monkeypatch)
        with pytest.raises(StoreError):
            await committer.flush()
        [letter] = await store.dead_letters(STREAM)
        assert await store.purge_dead_letters([letter.id]) == 1  # a replay delivered it
        await pipeline.put(ev(5))
        await drained(pipeline)
        assert await committer.flush()
        cp = await store.checkpoint(STREAM)
        letters = await store.dead_letters(STREAM)
    assert [e.unique_event_id for e in sink.delivered] == ["u0", "u1", "u3", "u4", "u5"]
    assert cp is not None
    assert (cp.offset, cp.processed_count) == (ev(5).offset, 5)
    assert letters == []


async def test_events_held_for_a_commit_count_in_bytes_until_it_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sink may hold what it was given until the commit (the jsonl buffer): the events' size
    counts against the committer's capacity, and a failed commit gives it back."""
    sink = FakeSink()
    async with harness(tmp_path, sink, workers=1, max_pending_bytes=8000) as (
        store,
        committer,
        pipeline,
    ):
        await pipeline.put(large(1, 3000))
        await drained(pipeline)
        assert not committer.full
        await pipeline.put(large(2, 5000))
        await drained(pipeline)
        assert committer.full  # 8,000 bytes held: workers wait for a commit
        fail_next_commit(store, monkeypatch)
        with pytest.raises(sqlite3.OperationalError):
            await committer.flush()
        assert committer.full  # still held
        assert await committer.flush()
        assert not committer.full


# --- failures ----------------------------------------------------------------------------------


async def test_a_large_rejected_event_is_kept_whole_for_its_replay(tmp_path: Path) -> None:
    # The DLQ kept 64 KiB of it, so `dlq replay` could never deliver a valid 100 KB event (and
    # its id counts as handled): every event is at most max_frame_bytes, so it is kept whole.
    big = ev(1)
    big.raw["detail"] = [{"elementName": "Note", "newValue": "x" * 100_000, "oldValue": ""}]
    sink = FakeSink(poison={"u1"})
    async with harness(tmp_path, sink, workers=1) as (store, committer, pipeline):
        await pipeline.put(big)
        await drained(pipeline)
        await committer.flush()
        (letter,) = await store.dead_letters(STREAM)
    assert json.loads(letter.payload) == big.raw
    assert letter.payload_size == len(letter.payload.encode())


@pytest.mark.parametrize("name_culprit", [True, False])
async def test_permanent_error_dead_letters_only_that_event(
    tmp_path: Path, name_culprit: bool
) -> None:
    sink = FakeSink(poison={"u3"}, name_culprit=name_culprit)
    events = [ev(i, key="same") for i in range(8)]
    async with harness(tmp_path, sink, workers=2, start=False) as (store, committer, pipeline):
        for e in events:  # one queue, one batch with the poison event inside
            await pipeline.put(e)
        pipeline.start()
        await drained(pipeline)
        await committer.flush()
        letters = await store.dead_letters(STREAM)
        cp = await store.checkpoint(STREAM)
        seen = await store.seen(STREAM, [e.unique_event_id for e in events])
    assert [e.unique_event_id for e in sink.delivered] == [
        e.unique_event_id for e in events if e.unique_event_id != "u3"
    ]
    assert len(letters) == 1
    dl = letters[0]
    poison = events[3]
    assert (dl.unique_event_id, dl.offset, dl.event_name) == (
        "u3",
        poison.offset,
        poison.event_name,
    )
    assert dl.reason == "sink_rejected"
    assert "rejected u3" in dl.error
    assert json.loads(dl.payload) == poison.raw
    assert dl.attempts == 1
    assert pipeline.dead_lettered == 1
    assert "u3" in seen  # dead-lettered: handled, a copy sent again is a duplicate
    assert cp is not None
    assert cp.offset == events[-1].offset  # the checkpoint moves past the dead letter


async def test_a_batch_of_hundreds_of_rejected_events_is_set_aside_one_culprit_at_a_time(
    tmp_path: Path,
) -> None:
    """Each culprit the sink named used to nest one more call: past Python's recursion limit
    the last resort dead-lettered the rest as internal errors, good events among them."""
    n = 1200
    poison = {f"u{i}" for i in range(n) if i % 100 != 99}  # 12 good events among them
    sink = FakeSink(poison=poison)
    events = [ev(i, key="same") for i in range(n)]
    async with harness(
        tmp_path, sink, workers=1, queue_size=2 * n, batch_max=n, max_events=2 * n, start=False
    ) as (store, committer, pipeline):
        for e in events:  # one queue, one batch
            await pipeline.put(e)
        pipeline.start()
        await drained(pipeline)
        await committer.flush()
        letters = await store.dead_letters(STREAM, limit=None)
    assert [e.unique_event_id for e in sink.delivered] == [f"u{i}" for i in range(99, n, 100)]
    assert {d.reason for d in letters} == {"sink_rejected"}
    assert {d.unique_event_id for d in letters} == poison


class SwallowingSink(FakeSink):
    """A careless handler: whatever happens, it raises an error of its own."""

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        try:
            await super().write(stream, events)
        except asyncio.CancelledError:
            raise ValueError("handler failed") from None


async def test_a_sink_that_turns_the_stop_into_an_error_writes_nothing_more(
    tmp_path: Path,
) -> None:
    """Stopping the workers cancels a write under way; a sink that turns the CancelledError
    into an error of its own sent the batch to be delivered one by one: the worker wrote on
    after the stop (a lost lease's stream too), and the stop waited for it."""
    sink = SwallowingSink()
    sink.gate.clear()  # the first write waits
    async with harness(tmp_path, sink, workers=1) as (_, _, pipeline):
        for i in range(3):
            await pipeline.put(ev(i, key="k"))
        await wait_until(lambda: sink.calls == 1, timeout=WAIT_S)
        async with asyncio.timeout(WAIT_S):
            await pipeline.stop()
        sink.gate.set()
        assert sink.calls == 1 and not sink.delivered and pipeline.dead_lettered == 0


async def test_permanent_error_naming_an_unknown_event_still_isolates(tmp_path: Path) -> None:
    sink = FakeSink(poison={"u1"}, culprit_override="not-in-this-batch")
    async with harness(tmp_path, sink, workers=1) as (store, committer, pipeline):
        await pipeline.put(ev(0, "k"))
        await drained(pipeline)
        await pipeline.put(ev(1, "k"))
        async with asyncio.timeout(WAIT_S):
            while pipeline.in_flight and not any(t.done() for t in pipeline.tasks):
                await asyncio.sleep(0.01)
        assert not any(t.done() for t in pipeline.tasks), "a worker died"
        await drained(pipeline)
        await committer.flush()
        letters = await store.dead_letters(STREAM)
    assert [d.unique_event_id for d in letters] == ["u1"]


async def test_transient_error_is_retried_and_nothing_is_dead_lettered(tmp_path: Path) -> None:
    sink = FakeSink(transient_failures=3)
    events = [ev(i) for i in range(10)]
    async with harness(tmp_path, sink, workers=1, start=False) as (store, committer, pipeline):
        for e in events:
            await pipeline.put(e)
        pipeline.start()
        await drained(pipeline)
        await committer.flush()
        letters = await store.dead_letters()
        cp = await store.checkpoint(STREAM)
    assert letters == []
    assert [e.unique_event_id for e in sink.delivered] == [e.unique_event_id for e in events]
    assert sink.calls == 4  # one batch: three failures, then success
    assert pipeline.dead_lettered == 0
    assert pipeline.delivered == 10
    assert cp is not None and cp.offset == events[-1].offset


class CancelsOnce(FakeSink):
    """Raises CancelledError once, without anyone cancelling the worker (a handler's own, or
    a shared fetch whose owner was stopped)."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = False

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        if not self.cancelled:
            self.cancelled = True
            raise asyncio.CancelledError
        await super().write(stream, events)


async def test_a_cancelled_error_nobody_asked_for_is_retried_not_a_dead_worker(
    tmp_path: Path,
) -> None:
    sink = CancelsOnce()
    events = [ev(i) for i in range(10)]
    async with harness(tmp_path, sink, workers=1, start=False) as (store, committer, pipeline):
        for e in events[:5]:
            await pipeline.put(e)
        pipeline.start()
        await drained(pipeline)
        for e in events[5:]:  # the worker is still there for more
            await pipeline.put(e)
        await drained(pipeline)
        await committer.flush()
        letters = await store.dead_letters()
    assert sink.cancelled and letters == []
    assert [e.unique_event_id for e in sink.delivered] == [e.unique_event_id for e in events]


class SaysTheSecret(FakeSink):
    """A handler whose error quotes a secret: at the end of a long text, where the dead
    letter's cut falls, or in a sink error of its own."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        if events[0].unique_event_id == "u0":
            raise RuntimeError("x" * 970 + self.secret)
        raise PermanentSinkError(f"refused with {self.secret}", unique_event_id="u1")


async def test_a_secret_in_a_sink_error_is_masked_in_the_dead_letter(tmp_path: Path) -> None:
    secret = f"S3CR3T-{uuid.uuid4().hex}"
    REDACTOR.add(secret)
    sink = SaysTheSecret(secret)
    async with harness(tmp_path, sink, workers=1, batch_max=1) as (store, committer, pipeline):
        for e in (ev(0), ev(1)):
            await pipeline.put(e)
        await drained(pipeline)
        await committer.flush()
        errors = [d.error for d in await store.dead_letters()]
    assert len(errors) == 2
    for error in errors:
        assert "***" in error and secret[:10] not in error, error


async def test_transient_errors_with_several_workers(tmp_path: Path) -> None:
    sink = FakeSink(transient_failures=5, rng=random.Random(1))
    events = [ev(i) for i in range(60)]
    async with harness(tmp_path, sink, workers=3, batch_max=5) as (store, committer, pipeline):
        for e in events:
            await pipeline.put(e)
        await drained(pipeline)
        await committer.flush()
        assert await store.dead_letters() == []
    assert Counter(e.unique_event_id for e in sink.delivered) == Counter(
        e.unique_event_id for e in events
    )


# --- a fleet member past its self-fence deadline ----------------------------------------------


class Deadline:
    """A fleet member's self-fence deadline as the pipeline sees it (Fleet.past_fence): the
    test says when it has passed, and counts how often the workers asked."""

    def __init__(self) -> None:
        self.past = False
        self.asked = 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.past


async def held_past_the_deadline(pipeline: StreamPipeline, deadline: Deadline) -> None:
    """The deadline passed: wait until a worker came to write, was told so, and asked again
    (it holds the batch, and the sink has not been called meanwhile)."""
    await wait_until(lambda: pipeline.writes_fenced == 1, timeout=WAIT_S)
    asked = deadline.asked
    await wait_until(lambda: deadline.asked > asked, timeout=WAIT_S)


async def test_nothing_is_written_past_the_self_fence_deadline(tmp_path: Path) -> None:
    """A fleet member paused past its leases (SIGSTOP, a VM freeze) wakes with batches in its
    workers, and another member may hold the stream by then: before the self-fence timer or
    the renewal says so, a worker wrote them (only commits were fenced). Before each write the
    worker asks whether the member is past its self-fence deadline; past it, the batch is not
    written, and the stream's stop finds it undone (replayed by whoever holds the stream
    next): not processed, not dead-lettered. Before the deadline, writes go through."""
    sink = JsonlSink(tmp_path / "events.jsonl", fsync=False)
    deadline = Deadline()
    async with harness(tmp_path, sink, workers=1, past_fence=deadline) as (_, c, pipeline):
        for i in range(5):
            await pipeline.put(ev(i))
        await drained(pipeline)  # before the deadline: written
        assert await c.flush()
        assert [uid_of(x) for x in jsonl_lines(sink.path)] == [f"u{i}" for i in range(5)]
        written = sink.position()  # what the sink took, its buffer included
        deadline.past = True
        for i in range(5, 10):
            await pipeline.put(ev(i))
        await held_past_the_deadline(pipeline, deadline)
        async with asyncio.timeout(WAIT_S):
            await pipeline.stop()  # the self-fence's stop
        assert not pipeline.abandoned
        assert sink.position() == written
        assert not await c.flush()
        assert [uid_of(x) for x in jsonl_lines(sink.path)] == [f"u{i}" for i in range(5)]
        assert pipeline.delivered == 5 and pipeline.dead_lettered == 0
        assert pipeline.in_flight == 5  # undone: the next holder replays them
        position = pipeline.position
        assert position is not None and position.offset == ev(4).offset


async def test_a_batch_held_past_the_deadline_is_written_once_a_renewal_moves_it(
    tmp_path: Path,
) -> None:
    """The deadline moves with every renewal: a renewal that succeeds after all (the leases
    were still ours) lets the held batch through, once, in order."""
    sink = JsonlSink(tmp_path / "events.jsonl", fsync=False)
    deadline = Deadline()
    deadline.past = True
    async with harness(tmp_path, sink, workers=1, past_fence=deadline) as (_, c, pipeline):
        empty = sink.position()
        for i in range(5):
            await pipeline.put(ev(i, key="k"))
        await held_past_the_deadline(pipeline, deadline)
        assert sink.position() == empty
        deadline.past = False  # renewed
        await drained(pipeline)
        assert await c.flush()
        assert [uid_of(x) for x in jsonl_lines(sink.path)] == [f"u{i}" for i in range(5)]
        assert pipeline.delivered == 5 and pipeline.dead_lettered == 0


# --- checkpoints, sink state, malformed frames -------------------------------------------------


async def test_flush_commits_checkpoint_equal_to_the_watermark(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "events.jsonl", fsync=True)
    events = [ev(i) for i in range(40)]
    async with harness(tmp_path, sink, workers=4) as (store, committer, pipeline):
        assert not await committer.flush()  # nothing to commit yet
        for e in events:
            await pipeline.put(e)
        await drained(pipeline)
        assert await committer.flush()
        position = pipeline.position
        cp = await store.checkpoint(STREAM)
        state = await store.sink_state("jsonl")
        seen = await store.seen(STREAM, [e.unique_event_id for e in events])
        assert not await committer.flush()  # nothing new
    assert position is not None
    assert cp is not None
    assert (cp.offset, cp.unique_event_id) == (position.offset, position.unique_event_id)
    assert (cp.offset, cp.unique_event_id) == (events[-1].offset, events[-1].unique_event_id)
    assert cp.processed_count == len(events)
    assert sink_length(state) == sink.path.stat().st_size
    assert seen == {e.unique_event_id for e in events}
    assert len(jsonl_lines(sink.path)) == len(events)


async def test_checkpoint_never_passes_an_unfinished_event(tmp_path: Path) -> None:
    sink = FakeSink()
    release = asyncio.Event()
    sink.hold["slow"] = release
    async with harness(tmp_path, sink, workers=4) as (store, committer, pipeline):
        await pipeline.put(ev(0, "fast0"))
        await drained(pipeline)
        slow = ev(1, "slow")
        await pipeline.put(slow)  # blocks in the sink
        # later events for resources on other workers (one worker serves a key in order)
        candidates = (ev(i, f"fast{i}") for i in range(2, 100))
        others = [e for e in candidates if pipeline._worker_of(e) != pipeline._worker_of(slow)]
        others = others[:7]
        assert others
        for e in others:
            await pipeline.put(e)
        async with asyncio.timeout(WAIT_S):
            while pipeline.delivered < 1 + len(others):  # all but the slow one finish
                await asyncio.sleep(0.005)
        # frames behind the unfinished one stay in flight until it is done
        assert pipeline.in_flight == 1 + len(others)
        assert await committer.flush()
        cp = await store.checkpoint(STREAM)
        assert cp is not None
        assert cp.offset == ev(0).offset  # u1 is not done: the checkpoint stays before it
        assert cp.processed_count == 1 + len(others)
        release.set()
        await drained(pipeline)
        assert await committer.flush()
        cp = await store.checkpoint(STREAM)
    assert cp is not None and cp.offset == others[-1].offset
    assert [e.unique_event_id for e in sink.delivered][-1] == "u1"


async def test_malformed_frames_are_dead_lettered_with_raw_text(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "events.jsonl", fsync=False)
    async with harness(tmp_path, sink, workers=2) as (store, committer, pipeline):
        await pipeline.put(ev(1))
        await pipeline.put_malformed(bad('{"type":"next","payload":', "invalid JSON: truncated"))
        await pipeline.put_malformed(bad("[1]", "frame is not a JSON object"))
        await pipeline.put(ev(2))
        await drained(pipeline)
        await committer.flush()
        letters = await store.dead_letters(STREAM)
        cp = await store.checkpoint(STREAM)
    assert [(d.reason, d.payload, d.error) for d in letters] == [
        ("malformed", '{"type":"next","payload":', "invalid JSON: truncated"),
        ("malformed", "[1]", "frame is not a JSON object"),
    ]
    assert all(d.offset is None and d.unique_event_id is None for d in letters)
    assert pipeline.dead_lettered == 2
    assert cp is not None and cp.offset == ev(2).offset
    assert [uid_of(x) for x in jsonl_lines(sink.path)] == ["u1", "u2"]


async def test_malformed_frame_alone_commits_a_dead_letter_without_checkpoint(
    tmp_path: Path,
) -> None:
    sink = FakeSink()
    async with harness(tmp_path, sink) as (store, committer, pipeline):
        await pipeline.put_malformed(bad("garbage", "invalid JSON"))
        assert pipeline.in_flight == 0
        assert await committer.flush()
        assert [d.payload for d in await store.dead_letters()] == ["garbage"]
        assert await store.checkpoint(STREAM) is None


async def test_run_commits_in_the_background(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "events.jsonl", fsync=False)
    store = await Store.open(tmp_path / "state.db")
    await sink.open(None)
    committer = Committer(store, sink, max_events=5, interval_s=0.02)
    pipeline = StreamPipeline(
        STREAM,
        sink=sink,
        committer=committer,
        workers=2,
        queue_size=100,
        batch_max=10,
        retry_initial_s=0.01,
        retry_max_s=0.02,
    )
    pipeline.start()
    runner = asyncio.create_task(committer.run())
    try:
        for i in range(12):
            await pipeline.put(ev(i))
        await drained(pipeline)
        async with asyncio.timeout(WAIT_S):
            while True:
                cp = await store.checkpoint(STREAM)
                if cp is not None and cp.offset == ev(11).offset:
                    break
                await asyncio.sleep(0.01)
        assert committer.commits >= 1
        assert sink_length(await store.sink_state("jsonl")) == sink.path.stat().st_size
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
        await pipeline.stop()
        await sink.close()
        await store.close()


async def test_restart_after_uncommitted_writes_delivers_each_event_once(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events = [ev(i) for i in range(30)]
    sink = JsonlSink(path, fsync=False)
    async with harness(tmp_path, sink, workers=3) as (_, committer, pipeline):
        for e in events[:10]:
            await pipeline.put(e)
        await drained(pipeline)
        await committer.flush()
        for e in events[10:20]:  # written to the file but never committed: a crash follows
            await pipeline.put(e)
        await drained(pipeline)
        await sink.sync(None)
    assert len(jsonl_lines(path)) == 20
    sink2 = JsonlSink(path, fsync=False)
    async with harness(tmp_path, sink2, workers=3) as (store, committer, pipeline):
        assert len(jsonl_lines(path)) == 10  # cut back to the committed length
        for e in events:  # the gateway replays from an older offset
            await pipeline.put(e)
        await drained(pipeline)
        await committer.flush()
        assert pipeline.duplicates == 10
        cp = await store.checkpoint(STREAM)
    assert Counter(uid_of(x) for x in jsonl_lines(path)) == Counter(
        e.unique_event_id for e in events
    )
    assert cp is not None and cp.offset == events[-1].offset


async def test_run_retries_a_failed_sink_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwritev = os.pwritev
    failures = [OSError(5, "I/O error")]

    def flaky(fd: int, buffers: Any, offset: int) -> int:
        if failures:
            raise failures.pop()
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", flaky)
    sink = JsonlSink(tmp_path / "events.jsonl", fsync=False)
    async with harness(tmp_path, sink, workers=2, interval_s=0.01) as (store, committer, pipeline):
        for i in range(5):
            await pipeline.put(ev(i))
        await drained(pipeline)
        runner = asyncio.create_task(committer.run())
        try:
            async with asyncio.timeout(WAIT_S):
                while (cp := await store.checkpoint(STREAM)) is None:
                    await asyncio.sleep(0.01)
        finally:
            runner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await runner
        assert not failures  # the failure happened, and was retried
        assert cp.offset == ev(4).offset
        assert cp.processed_count == 5
        assert sink_length(await store.sink_state("jsonl")) == sink.path.stat().st_size
    assert [uid_of(x) for x in jsonl_lines(sink.path)] == [f"u{i}" for i in range(5)]


async def test_the_queues_are_bounded_and_the_reader_waits_for_room(tmp_path: Path) -> None:
    sink = FakeSink()
    async with harness(tmp_path, sink, workers=3, queue_size=30, batch_max=10) as (
        _,
        _,
        pipeline,
    ):
        sink.gate.clear()  # the sink blocks: its worker holds one batch, nothing else drains
        added = 0
        while True:
            added += 1
            if not pipeline.add(ev(added, key="same")):
                break
            assert added < 100, "the queues must be bounded"
        assert added == 30  # queue_size events read in one go, not yet handed over
        room = asyncio.create_task(pipeline.room())
        async with asyncio.timeout(WAIT_S):
            while sink.calls < 1:  # the worker took a batch (10) into the blocked sink
                await asyncio.sleep(0.001)
        # 20 still queued for it, over its share of 10: no room, however long it waits.
        await still_pending(room)  # the reader waits: backpressure, nothing dropped
        assert pipeline.in_flight == 30
        # One batch through: the worker takes the next 10, which leaves its queue at its share.
        sink.gate.set()
        sink.gate.clear()  # (the write waiting now goes on, the next one blocks)
        async with asyncio.timeout(WAIT_S):
            while sink.calls < 2:  # the next write started: the queue went down to 10
                await asyncio.sleep(0.001)
        await still_pending(room)
        assert pipeline.in_flight == 20 and len(sink.delivered) == 10
        sink.gate.set()
        async with asyncio.timeout(WAIT_S):
            await room
        await drained(pipeline)
    assert [e.unique_event_id for e in sink.delivered] == [f"u{i}" for i in range(1, 31)]


async def test_the_queues_are_bounded_in_bytes_too(tmp_path: Path) -> None:
    """Large events: the reader waits once queue_max_bytes of them are queued, however few
    they are; an event larger than the bound still goes through, alone."""
    sink = FakeSink()
    async with harness(tmp_path, sink, workers=1, queue_max_bytes=6000, batch_max=1) as (
        _,
        _,
        pipeline,
    ):
        sink.gate.clear()  # the sink blocks
        assert pipeline.add(large(1, 3000))
        await pipeline.room()  # the worker took it into the blocked sink: the queue is empty
        await wait_until(lambda: sink.calls >= 1, timeout=WAIT_S)
        assert pipeline.add(large(2, 3000))  # 3,000 bytes queued
        assert not pipeline.add(large(3, 3000))  # 6,000: at the bound, two events only
        room = asyncio.create_task(pipeline.room())
        await still_pending(room)  # the reader waits while the sink holds the first
        sink.gate.set()  # the worker goes on and takes the next: 3,000 bytes left queued
        async with asyncio.timeout(WAIT_S):
            await room
        assert not pipeline.add(large(4, 20_000))  # over the bound alone
        await pipeline.room()  # taken once the queue is empty
        await drained(pipeline)
    assert [e.unique_event_id for e in sink.delivered] == ["u1", "u2", "u3", "u4"]


async def test_a_long_read_is_handed_over_every_handover_events(tmp_path: Path) -> None:
    """A catch-up read brings hundreds of frames: after HANDOVER of them the reader lets the
    workers take them before it decodes more, though the queues have room."""
    sink = FakeSink()
    async with harness(tmp_path, sink, workers=2, queue_size=10 * HANDOVER) as (_, _, pipeline):
        added = 1
        while pipeline.add(ev(added, key=f"k{added % 7}")):
            added += 1
            assert added < 10 * HANDOVER, "a long read must be handed over"
        assert added == HANDOVER
        await pipeline.room()
        assert sink.delivered  # the workers ran before the reader reads on
        await drained(pipeline)
    assert sorted(e.unique_event_id for e in sink.delivered) == sorted(
        f"u{i}" for i in range(1, HANDOVER + 1)
    )


async def test_one_stuck_event_stops_the_reader_however_the_others_hash(tmp_path: Path) -> None:
    """One event held in the sink (a retry that lasts), then only events of resources other
    workers take, which drain: no queue fills, but the done prefix stays at the held event.
    The reader waits once the events in flight reach the pipeline's bound (far above what a
    healthy stream holds). Before, it read on for good: every event read stayed in flight,
    memory growing with each."""
    sink = FakeSink()
    sink.hold["slow"] = asyncio.Event()
    async with harness(tmp_path, sink, workers=3, queue_size=30, batch_max=10) as (
        _,
        _,
        pipeline,
    ):
        stuck = pipeline._worker_of(ev(0, key="slow"))
        keys = [f"k{i}" for i in range(60) if pipeline._worker_of(ev(0, key=f"k{i}")) != stuck]
        bound = pipeline._in_flight_max
        read = [ev(0, key="slow")] + [ev(i, key=keys[i % len(keys)]) for i in range(1, 20 * bound)]

        taken = [0]

        async def reader() -> None:  # from where it was (a put cancelled has added its event)
            while taken[0] < len(read):
                taken[0] += 1
                await pipeline.put(read[taken[0] - 1])

        reading = asyncio.create_task(reader())
        await wait_until(lambda: reading.done() or pipeline.in_flight >= bound)
        await still_pending(reading)  # the reader waits for the held event
        assert bound <= pipeline.in_flight <= bound + HANDOVER
        reading.cancel()  # a malformed frame read now waits too: it takes a slot as well
        malformed = asyncio.create_task(pipeline.put_malformed(bad("x", "invalid JSON")))
        await still_pending(malformed)
        sink.hold["slow"].set()
        async with asyncio.timeout(WAIT_S):
            await malformed
        reading = asyncio.create_task(reader())
        async with asyncio.timeout(WAIT_S):
            await reading
        await drained(pipeline)
    assert Counter(e.unique_event_id for e in sink.delivered) == Counter(
        e.unique_event_id for e in read
    )


async def test_one_stuck_worker_stops_the_reader_at_its_share(tmp_path: Path) -> None:
    """While the other workers drain theirs, the queue of a worker stuck in its sink holds at
    most its share (queue_size / workers, here 10) before the reader waits: about queue_size
    events read, not workers x queue_size."""
    sink = FakeSink()
    sink.hold["slow"] = asyncio.Event()
    async with harness(tmp_path, sink, workers=3, queue_size=30, batch_max=10) as (
        _,
        _,
        pipeline,
    ):
        reads = 0
        while True:
            reads += 1
            if not pipeline.add(ev(reads, key="slow" if reads % 2 else f"k{reads}")):
                break
            await asyncio.sleep(0)  # the hand-over; the other workers take theirs
            assert reads < 200, "a stuck worker must stop the reader"
        assert reads <= 2 * (10 + 10) + 2  # its share queued, plus a batch held in the sink
        room = asyncio.create_task(pipeline.room())
        stuck = pipeline._worker_of(ev(1, key="slow"))
        read = [ev(i, key="slow" if i % 2 else f"k{i}") for i in range(1, reads + 1)]
        others = {e.unique_event_id for e in read if pipeline._worker_of(e) != stuck}
        async with asyncio.timeout(WAIT_S):  # the other workers drained theirs...
            while not others <= {e.unique_event_id for e in sink.delivered}:
                await asyncio.sleep(0.001)
        await still_pending(room)  # ...and the reader still waits for the stuck one
        assert pipeline.in_flight == reads <= 30  # read (and not committed): within queue_size
        sink.hold["slow"].set()
        async with asyncio.timeout(WAIT_S):
            await room
        await drained(pipeline)
    assert sorted(e.unique_event_id for e in sink.delivered) == sorted(
        f"u{i}" for i in range(1, reads + 1)
    )
    slow = [e.unique_event_id for e in sink.delivered if e.primary_key == "slow"]
    assert slow == [f"u{i}" for i in range(1, reads + 1, 2)]  # in order


async def test_events_added_in_one_go_reach_the_workers_once_the_reader_waits(
    tmp_path: Path,
) -> None:
    """Handed over together: nothing is registered until the reader yields, then all of it,
    in arrival order (a stop before that leaves them to the replay)."""
    sink = FakeSink()
    async with harness(tmp_path, sink, workers=2) as (_, committer, pipeline):
        for i in range(5):
            assert pipeline.add(ev(i, key=f"k{i}"))
        assert committer.in_flight(STREAM) == 0 and pipeline.in_flight == 5
        await drained(pipeline)
        assert sorted(e.unique_event_id for e in sink.delivered) == [f"u{i}" for i in range(5)]
        position = pipeline.position
        assert position is not None and position.offset == ev(4).offset
        assert pipeline.add(ev(5))
        await pipeline.stop()  # before the hand-over: never registered, never in flight
        assert committer.in_flight(STREAM) == 0 and pipeline.in_flight == 0


async def test_a_commit_of_only_duplicates_releases_waiting_workers(tmp_path: Path) -> None:
    # Duplicates count against the committer's capacity but leave nothing to commit; the
    # empty snapshot must still wake the workers waiting for capacity (it used not to, and a
    # resume over many processed events then stalled for good).
    store = await Store.open(tmp_path / "state.db")
    sink = JsonlSink(tmp_path / "events.jsonl")
    await sink.open(None)
    committer = Committer(store, sink, max_events=1, interval_s=60.0, max_pending=2)
    try:
        committer.skipped("main", [committer.arrived("main", None) for _ in range(5)])
        waiter = asyncio.create_task(committer.wait_capacity())
        await asyncio.sleep(0)
        assert not waiter.done()
        assert await committer.flush() is False  # nothing to write...
        async with asyncio.timeout(5):
            await waiter  # ...and the worker may go on
    finally:
        await sink.close()
        await store.close()


async def test_events_done_and_not_durable_are_bounded_at_ten_commits_worth(
    tmp_path: Path,
) -> None:
    """What waits for a commit held up by the disk (the jsonl buffer, the ids) is bounded at
    10 x ``commit_max_events`` unless set: 20 x held 3-4 MB more at the peak of a catch-up
    while a commit waited (issue #12); 10 x was never reached while commits kept up."""
    sink = JsonlSink(tmp_path / "events.jsonl")
    async with harness(tmp_path, sink, max_events=3, start=False) as (_, committer, _):
        for n in range(1, 31):
            assert not committer.full
            seq = committer.arrived(STREAM, Position(str(n), f"u{n}"))
            committer.processed(STREAM, [f"u{n}"], [seq])
        assert committer.full  # 30 done: the workers wait for the commit
        assert await committer.flush()
        assert not committer.full


async def test_adaptive_commit_does_not_wait_for_the_interval(tmp_path: Path) -> None:
    """Adaptive: a done event wakes the commit task at once, however long the interval (an hour
    here), and each commit takes what was done meanwhile."""
    store = await Store.open(tmp_path / "state.db")
    sink = JsonlSink(tmp_path / "events.jsonl")
    await sink.open(None)
    committer = Committer(
        store, sink, max_events=1000, interval_s=3600.0, adaptive=True, min_interval_s=0.01
    )
    task = asyncio.create_task(committer.run())
    try:
        for n in range(1, 4):
            seq = committer.arrived("main", Position(str(n), f"u{n}"))
            committer.processed("main", [f"u{n}"], [seq])
            async with asyncio.timeout(10):
                while (cp := await store.checkpoint("main")) is None or cp.offset != str(n):
                    await asyncio.sleep(0.005)
        assert await store.seen("main", ["u1", "u2", "u3"]) == {"u1", "u2", "u3"}
        assert committer.commits == 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.close()
        await store.close()


async def test_an_adaptive_commit_that_failed_is_retried_without_new_events(
    tmp_path: Path,
) -> None:
    """No interval wakes an adaptive committer: a failed commit must wake it again itself, or a
    quiet stream's checkpoint waits for the next event."""
    store = await Store.open(tmp_path / "state.db")
    sink = JsonlSink(tmp_path / "events.jsonl")
    await sink.open(None)
    failures = [StoreError("disk full (test)", retriable=True)]
    commit = store.commit

    async def failing_once(batch: CommitBatch, now: float | None = None) -> None:
        if failures:
            raise failures.pop()
        await commit(batch, now)

    store.commit = failing_once  # type: ignore[method-assign]
    committer = Committer(store, sink, max_events=1000, interval_s=3600.0, adaptive=True)
    task = asyncio.create_task(committer.run())
    try:
        seq = committer.arrived("main", Position("1", "u1"))
        committer.processed("main", ["u1"], [seq])
        async with asyncio.timeout(20):
            while (cp := await store.checkpoint("main")) is None or cp.offset != "1":
                await asyncio.sleep(0.01)
        assert not failures and committer.commits == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.close()
        await store.close()


async def test_the_commit_backoff_starts_over_once_a_commit_succeeds(tmp_path: Path) -> None:
    """Failures far apart each wait the first step of the backoff. The retry state used to
    span the committer's life: its wait doubled with every failure the daemon ever met, and
    from the eighth on any blip stopped the commits for 30 s."""
    store = await Store.open(tmp_path / "state.db")
    sink = JsonlSink(tmp_path / "events.jsonl")
    await sink.open(None)
    commit, calls = store.commit, [0]

    async def every_other_fails(batch: CommitBatch, now: float | None = None) -> None:
        calls[0] += 1
        if calls[0] % 2:
            raise StoreError("database is locked (test)", retriable=True)
        await commit(batch, now)

    store.commit = every_other_fails  # type: ignore[method-assign]
    committer = Committer(store, sink, max_events=1000, interval_s=3600.0, adaptive=True)
    with captured_logs() as logs:
        task = asyncio.create_task(committer.run())
        try:
            for i in range(1, 7):  # each commit fails once, then succeeds
                seq = committer.arrived("main", Position(str(i), f"u{i}"))
                committer.processed("main", [f"u{i}"], [seq])
                await wait_until(lambda i=i: committer.commits == i, timeout=20)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await sink.close()
            await store.close()
    lines = [json.loads(x) for x in logs.getvalue().splitlines()]
    waits = [x["retry_in_s"] for x in lines if x.get("event") == "commit failed; retrying"]
    assert len(waits) == 6
    # wait_exponential_jitter(multiplier=0.2, jitter=0.2): the first wait is 0.2 to 0.4 s,
    # the third of a growing backoff already 0.8 or more.
    assert all(0.2 <= w <= 0.4 for w in waits), waits


@pytest.mark.parametrize("outcome", ["delivered", "rejected"])
async def test_one_event_id_under_two_resources_reaches_the_sink_once(
    tmp_path: Path, outcome: str
) -> None:
    """A gateway that sends one uniqueEventId under two primaryKeys (it should not; the wire
    is hostile): the two go to different workers. The second waits for the first's outcome,
    then is a duplicate, whether the first was written or dead-lettered. Before, it found the
    id neither processed nor pending while the first write awaited its sink, and wrote it too."""
    sink = FakeSink(poison={"u1"} if outcome == "rejected" else None)
    sink.hold["k-a"] = asyncio.Event()
    async with harness(tmp_path, sink, workers=2) as (_, _, pipeline):
        first = ev(1, key="k-a")
        other = next(
            k for k in (f"k-{i}" for i in range(100)) if pipeline._worker_of(ev(2, key=k)) == 1
        )
        assert pipeline._worker_of(first) == 0, "the test needs the two on different workers"
        again = ev(2, key=other)._replace(unique_event_id="u1")
        pipeline.add(first)
        pipeline.add(again)
        await pipeline.room()
        await wait_until(lambda: sink.calls >= 1, timeout=WAIT_S)  # the first write, held
        # The other worker took its copy: from there it runs to its decision without a pause
        # (no lookup or write here awaits), so it has decided before the first write ends.
        await wait_until(lambda: pipeline._queued == 0, timeout=WAIT_S)
        sink.hold["k-a"].set()
        await drained(pipeline)
    assert [e.offset for e in sink.delivered] == ([first.offset] if outcome == "delivered" else [])
    assert pipeline.duplicates == 1
    assert pipeline.dead_lettered == (1 if outcome == "rejected" else 0)


class Boom(BaseException):
    """A library's own BaseException."""


class ExitsOnPoison(FakeSink):
    """A sink (any, not only the python one) raising a BaseException for the poison event."""

    def __init__(self, make: Any) -> None:
        super().__init__(poison={"u3"})
        self.make = make

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        if any(e.unique_event_id in self.poison for e in events):
            raise self.make()
        await super().write(stream, events)


@pytest.mark.parametrize(
    "make",
    [lambda: SystemExit(0), lambda: Boom("gave up"), GeneratorExit],
    ids=["system-exit", "boom", "generator-exit"],
)
async def test_a_base_exception_of_a_sink_dead_letters_its_event_not_the_worker(
    tmp_path: Path, make: Any
) -> None:
    """The workers caught Exception (and CancelledError) only: a SystemExit out of a worker
    task ends the event loop (the process exits with its code, 0 for sys.exit()), any other
    BaseException ends the worker and the daemon with it. A GeneratorExit a sink raised was
    let through as the worker's coroutine being closed (which it is only when thrown in)."""
    sink = ExitsOnPoison(make)
    events = [ev(i, key="same") for i in range(8)]
    async with harness(tmp_path, sink, workers=2, start=False) as (store, committer, pipeline):
        for e in events:
            await pipeline.put(e)
        pipeline.start()
        await drained(pipeline)
        assert not any(t.done() for t in pipeline.tasks), "a worker died"
        await committer.flush()
        letters = await store.dead_letters(STREAM)
    assert [e.unique_event_id for e in sink.delivered] == [
        e.unique_event_id for e in events if e.unique_event_id != "u3"
    ]
    assert [(d.unique_event_id, d.reason) for d in letters] == [("u3", "unprocessable")]
    assert letters[0].error == f"{type(make()).__name__}: {make()}"
