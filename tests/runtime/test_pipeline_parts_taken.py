"""A sink that hands a write's events on a part at a time says after each part how many it
took (:func:`consumer.sinks.base.took`): the pipeline records them as processed by the next
commit at the latest, once each, and whatever the rest of the write does (a transient failure
and its retry, a permanent one, an error of the sink's own, a stop between the parts) they are
never sent again nor recorded twice; the retry writes exactly the rest.

A real SQLite store and committer; a sink that writes into a list, two events a part, with an
await between the parts (as the orchestrating sink awaits the next part's GETs)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from operator_support import query

from consumer.core.events import Event
from consumer.errors import PermanentSinkError, TransientSinkError
from consumer.runtime.committer import Committer
from consumer.runtime.pipeline import StreamPipeline
from consumer.sinks.base import PlainSink, taking, took, within
from consumer.state.sqlite import SqliteStore

STREAM = "main"
WAIT_S = 10.0
PART = 2


def ev(i: int) -> Event:
    uid = f"u{i}"
    raw = {
        "metadata": {"offset": str(i), "uniqueEventId": uid},
        "moduleName": "Reservation",
        "eventName": "UPDATE RESERVATION",
        "primaryKey": f"pk{i}",
        "detail": [],
    }
    return Event(str(i), uid, "UPDATE RESERVATION", "Reservation", f"pk{i}", None, None, raw)


class PartSink(PlainSink):
    """Writes ``PART`` events at a time into ``written``, saying ``took`` after each part and
    yielding to the loop before the next. ``fail``: uid -> the error raised at that event's
    part (once), before the part is written; ``broken``: an event whose part raises an error
    of the sink's own (a bug) every time. ``hold``: an event whose part waits for ``release``
    first."""

    name = "parts"

    def __init__(
        self, fail: dict[str, BaseException] | None = None, broken: str = "", hold: str = ""
    ) -> None:
        self.written: list[str] = []
        self.writes: list[list[str]] = []  # each write's events, as given
        self.fail = dict(fail or {})
        self.broken = broken
        self.hold, self.release, self.holding = hold, asyncio.Event(), asyncio.Event()

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        self.writes.append([e.unique_event_id for e in events])
        for start in range(0, len(events), PART):
            await asyncio.sleep(0)  # the next part's fetches, say
            part = events[start : start + PART]
            for e in part:
                if e.unique_event_id == self.hold:
                    self.holding.set()
                    await self.release.wait()
                failure = self.fail.pop(e.unique_event_id, None)
                if failure is not None:
                    raise failure
                if e.unique_event_id == self.broken:
                    raise ValueError("a bug")
            self.written += [e.unique_event_id for e in part]
            took(start + len(part))


@asynccontextmanager
async def life(
    tmp_path: Path, sink: PlainSink, events: Sequence[Event], *, adaptive: bool = False
) -> AsyncIterator[tuple[SqliteStore, Committer, StreamPipeline]]:
    """A store, committer and pipeline (one worker); ``events`` queued as one batch.
    ``adaptive``: the committer's task runs, committing whenever something is done (else
    commits are the test's)."""
    store = await SqliteStore.open(tmp_path / "state.db")
    committer = Committer(store, sink, max_events=10_000, interval_s=3600.0, adaptive=adaptive)
    pipeline = StreamPipeline(
        STREAM,
        sink=sink,
        committer=committer,
        workers=1,
        queue_size=1000,
        batch_max=100,
        retry_initial_s=0.01,
        retry_max_s=0.02,
    )
    commits = asyncio.create_task(committer.run()) if adaptive else None
    try:
        for e in events:
            await pipeline.put(e)
        pipeline.start()
        yield store, committer, pipeline
    finally:
        await pipeline.stop()
        if commits is not None:
            commits.cancel()
            with suppress(asyncio.CancelledError):
                await commits
        await store.close()


async def done(committer: Committer, pipeline: StreamPipeline) -> None:
    async with asyncio.timeout(WAIT_S):
        await pipeline.drained()
    assert await committer.flush()


def checkpoint(tmp_path: Path) -> list[tuple[str, int]]:
    return query(tmp_path / "state.db", "SELECT offset, processed_count FROM checkpoints")


EVENTS = [ev(i) for i in range(1, 8)]
ALL = [e.unique_event_id for e in EVENTS]


async def test_a_transient_failure_after_parts_taken_retries_exactly_the_rest(
    tmp_path: Path,
) -> None:
    """Two parts taken (said by took, and again by the failure's ``delivered``), then the
    third part fails transiently: the retry is given the last three events alone; each event
    written and recorded once (the checkpoint counts seven)."""
    sink = PartSink(fail={"u5": TransientSinkError("down", delivered=4)})
    async with life(tmp_path, sink, EVENTS) as (store, committer, pipeline):
        await done(committer, pipeline)
        assert pipeline.delivered == 7
        assert await store.seen(STREAM, ALL) == set(ALL)
    assert sink.writes == [ALL, ALL[4:]]
    assert sink.written == ALL
    assert checkpoint(tmp_path) == [("7", 7)]


async def test_parts_taken_are_recorded_before_the_retry_backs_off(tmp_path: Path) -> None:
    """A transient failure whose ``delivered`` says nothing (0) after two parts the sink said
    it took: they are recorded at once, a commit while the retry waits has them, and the
    retry writes the rest only."""
    sink = PartSink(fail={"u5": TransientSinkError("down")}, hold="u7")
    async with life(tmp_path, sink, EVENTS) as (store, committer, pipeline):
        async with asyncio.timeout(WAIT_S):
            await sink.holding.wait()  # the retry, under way
        assert await committer.flush()
        assert await store.seen(STREAM, ALL) == set(ALL[:6])  # the retry's first part too
        assert checkpoint(tmp_path) == [("6", 6)]
        sink.release.set()
        await done(committer, pipeline)
        assert pipeline.delivered == 7
    assert sink.writes == [ALL, ALL[4:]]
    assert sink.written == ALL
    assert checkpoint(tmp_path) == [("7", 7)]


async def test_a_permanent_failure_after_parts_taken_dead_letters_its_event_alone(
    tmp_path: Path,
) -> None:
    """The third part refused for good, naming u5 (``delivered`` 0): the two parts taken are
    done, u5 is dead-lettered, u6 and u7 written; nothing twice."""
    sink = PartSink(fail={"u5": PermanentSinkError("refused", unique_event_id="u5")})
    async with life(tmp_path, sink, EVENTS) as (store, committer, pipeline):
        await done(committer, pipeline)
        assert pipeline.delivered == 6
        assert pipeline.dead_lettered == 1
        letters = await store.dead_letters()
    assert [(d.unique_event_id, d.reason) for d in letters] == [("u5", "sink_rejected")]
    assert Counter(sink.written) == Counter(ALL[:4] + ALL[5:])
    assert checkpoint(tmp_path) == [("7", 6)]


async def test_an_error_of_the_sinks_own_after_parts_taken_is_found_among_the_rest(
    tmp_path: Path,
) -> None:
    """The sink raises an error of its own (a bug) at u5's part, after two parts it took:
    only the rest is tried one by one; u5 is dead-lettered ``unprocessable``."""
    sink = PartSink(broken="u5")
    async with life(tmp_path, sink, EVENTS) as (store, committer, pipeline):
        await done(committer, pipeline)
        letters = await store.dead_letters()
    assert [(d.unique_event_id, d.reason) for d in letters] == [("u5", "unprocessable")]
    assert sink.writes == [ALL, ["u5"], ["u6"], ["u7"]]
    assert Counter(sink.written) == Counter(ALL[:4] + ALL[5:])
    assert checkpoint(tmp_path) == [("7", 6)]


async def test_a_commit_while_the_write_waits_holds_the_parts_taken(tmp_path: Path) -> None:
    """A commit while the write waits before its last part records the three parts the sink
    said it took (a jsonl file's length in that commit would cover them); the last part
    follows in a later commit, nothing twice."""
    sink = PartSink(hold="u7")
    async with life(tmp_path, sink, EVENTS) as (store, committer, pipeline):
        async with asyncio.timeout(WAIT_S):
            await sink.holding.wait()
        assert await committer.flush()
        assert await store.seen(STREAM, ALL) == set(ALL[:6])
        assert checkpoint(tmp_path) == [("6", 6)]
        sink.release.set()
        await done(committer, pipeline)
        assert pipeline.delivered == 7
    assert sink.writes == [ALL]
    assert checkpoint(tmp_path) == [("7", 7)]


async def test_parts_taken_wake_an_adaptive_committer(tmp_path: Path) -> None:
    """With adaptive group commit, the parts the sink said it took are committed while the
    write still waits before its last part, with nobody asking for a commit."""
    sink = PartSink(hold="u7")
    async with life(tmp_path, sink, EVENTS, adaptive=True) as (_, _, pipeline):
        async with asyncio.timeout(WAIT_S):
            await sink.holding.wait()
            while checkpoint(tmp_path) != [("6", 6)]:
                await asyncio.sleep(0.01)
        sink.release.set()
        async with asyncio.timeout(WAIT_S):
            while checkpoint(tmp_path) != [("7", 7)]:
                await asyncio.sleep(0.01)
        assert pipeline.delivered == 7
    assert sink.written == ALL


async def test_a_stop_between_parts_leaves_the_parts_taken_recorded(tmp_path: Path) -> None:
    """The pipeline stopped while the write waits before its last part: the final commit
    records the three parts taken (processed, the checkpoint past them), not the last."""
    sink = PartSink(hold="u7")
    async with life(tmp_path, sink, EVENTS) as (store, committer, pipeline):
        async with asyncio.timeout(WAIT_S):
            await sink.holding.wait()
        await pipeline.stop()
        assert await committer.flush()  # the stop's final commit
        assert await store.seen(STREAM, ALL) == set(ALL[:6])
    assert checkpoint(tmp_path) == [("6", 6)]


def test_outside_a_pipelines_write_took_is_heard_by_nobody() -> None:
    took(3)  # dlq replay writes through the same sinks


class WrappingSink(PlainSink):
    """Writes its events through ``inner`` in halves (as the orchestrating sink writes its
    parts through the sink it wraps), each :func:`within` what it took before."""

    name = "wrapping"

    def __init__(self, inner: PartSink) -> None:
        self.inner = inner

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        half = (len(events) + 1) // 2
        for start in (0, half):
            with within(start):
                await self.inner.write(stream, events[start : start + half])


async def test_a_wrapped_sinks_word_counts_within_the_whole_write(tmp_path: Path) -> None:
    """The wrapped sink says what it took of its own write (two events a part): within the
    wrapper's write, that counts after what the wrapper wrote before. Stopped while the second
    half's last part waits: the first half and the second half's first part are recorded (six
    events: had it been heard as counted from the write's start, two)."""
    sink = PartSink(hold="u7")
    async with life(tmp_path, WrappingSink(sink), EVENTS) as (store, committer, pipeline):
        async with asyncio.timeout(WAIT_S):
            await sink.holding.wait()
        await pipeline.stop()
        assert await committer.flush()
        assert await store.seen(STREAM, ALL) == set(ALL[:6])
    assert checkpoint(tmp_path) == [("6", 6)]


def test_within_counts_after_what_was_taken_before() -> None:
    heard: list[int] = []

    async def write() -> None:
        taking(heard.append)
        took(1)
        with within(2):
            took(3)
            with within(1):
                took(1)
        took(6)

    asyncio.run(write())
    assert heard == [1, 5, 4, 6]
