"""A dead-lettered event counts as handled (consumer.runtime.committer.Committer.dead_letter):
a copy of it sent again is a duplicate, whether it comes before the dead letter's commit, after
it, or after that commit failed; the DLQ row keeps its first reason and one attempt. A malformed
frame (no id) sent again is another attempt, as before. Real Committer, StreamPipeline and
SqliteStore; the sink rejects an event once, then takes it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from consumer.core.events import Event
from consumer.core.evidence import evidence
from consumer.core.protocol import DecodeError, event_from_raw
from consumer.core.records import CommitBatch
from consumer.errors import PermanentSinkError
from consumer.runtime.committer import Committer
from consumer.runtime.pipeline import StreamPipeline
from consumer.sinks.base import PlainSink, Sink
from consumer.state.sqlite import SqliteStore

STREAM = "s"
WAIT_S = 5.0


class RejectsOnce(PlainSink):
    """Rejects the events of ``once`` the first time it sees each (a webhook's 422 that
    will not come again, a user handler fixed meanwhile)."""

    name = "once"

    def __init__(self, once: set[str]) -> None:
        self.once = set(once)
        self.got: list[str] = []

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        for e in events:
            if e.unique_event_id in self.once:
                self.once.discard(e.unique_event_id)
                raise PermanentSinkError("422 rejected", unique_event_id=e.unique_event_id)
        self.got.extend(e.unique_event_id for e in events)


def ev(offset: int, uid: str, key: str = "K") -> Event:
    return event_from_raw(
        {"metadata": {"offset": str(offset), "uniqueEventId": uid}, "primaryKey": key}
    )


async def put(pipeline: StreamPipeline, *events: Event) -> None:
    for e in events:
        await pipeline.put(e)
    async with asyncio.timeout(WAIT_S):
        await pipeline.drained()


def one_worker(
    sink: Sink, committer: Committer, parked: dict[str, str] | None = None
) -> StreamPipeline:
    return StreamPipeline(
        STREAM,
        sink=sink,
        committer=committer,
        workers=1,
        queue_size=10,
        batch_max=10,
        retry_initial_s=0.01,
        retry_max_s=0.01,
        park_key=parked is not None,
    )


@pytest.mark.parametrize("mode", ["dead-letter", "park-key"])
@pytest.mark.parametrize(
    "copy_comes", ["before the commit", "after the commit", "after a failed one"]
)
async def test_a_copy_of_a_dead_lettered_event_is_a_duplicate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, copy_comes: str
) -> None:
    store = await SqliteStore.open(tmp_path / "state.db")
    sink = RejectsOnce({"E"})
    committer = Committer(store, sink, max_events=1000, interval_s=3600)
    pipeline = one_worker(sink, committer, parked={} if mode == "park-key" else None)
    pipeline.start()
    try:
        await put(pipeline, ev(1, "E"))
        if copy_comes == "after the commit":
            assert await committer.flush()
        elif copy_comes == "after a failed one":
            real = store.commit

            async def locked(batch: CommitBatch, now: float | None = None) -> None:
                monkeypatch.setattr(store, "commit", real)
                raise sqlite3.OperationalError("database is locked")

            monkeypatch.setattr(store, "commit", locked)
            with pytest.raises(sqlite3.OperationalError):
                await committer.flush()
        await put(pipeline, ev(1, "E"), ev(2, "F"))  # the inclusive resume: E again, then F
        assert await committer.flush()
        rows = await store.dead_letters(STREAM)
        cp = await store.checkpoint(STREAM)
        handled = await store.seen(STREAM, ["E", "F"])
    finally:
        await pipeline.stop()
        await store.close()
    # F: delivered (dead-letter), or parked behind E (park-key) and not tried
    parked = [("F", "parked", "primaryKey K is parked behind E", 1)] if mode == "park-key" else []
    assert [(r.unique_event_id, r.reason, r.error, r.attempts) for r in rows] == [
        ("E", "sink_rejected", "422 rejected", 1),
        *parked,
    ]
    assert (pipeline.duplicates, pipeline.dead_lettered) == (1, 1 + len(parked))
    assert sink.got == (["F"] if mode == "dead-letter" else [])
    assert handled == {"E", "F"}
    assert cp is not None and cp.unique_event_id == "F"
    assert cp.processed_count == (1 if mode == "dead-letter" else 0)  # delivered ones only


async def test_a_malformed_frame_sent_again_is_another_attempt(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "state.db")
    sink = RejectsOnce(set())
    committer = Committer(store, sink, max_events=1000, interval_s=3600)
    pipeline = one_worker(sink, committer)
    try:
        for _ in range(2):
            await pipeline.put_malformed(DecodeError(evidence('{"broken'), "not JSON"))
            assert await committer.flush()
        rows = await store.dead_letters(STREAM)
    finally:
        await pipeline.stop()
        await store.close()
    assert [(r.reason, r.unique_event_id, r.attempts) for r in rows] == [("malformed", None, 2)]


def not_durable(committer: Committer) -> dict[str, int]:
    """The committer's count of each resource's dead letters not durable yet."""
    return dict(committer._ledgers[STREAM].letters_not_durable)


@pytest.mark.parametrize("mode", ["dead-letter", "park-key"])
async def test_a_resource_leaves_the_committer_once_its_dead_letters_are_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The committer counts each resource's dead letters until they are durable (park-key
    asks about a resource before the store has them), and forgets the resource then: it kept
    every primaryKey ever dead-lettered, at 0, for the daemon's life (in the default mode
    too, where nothing asks)."""
    store = await SqliteStore.open(tmp_path / "state.db")
    n = 50
    sink = RejectsOnce({f"E{i}" for i in range(n)} | {"X", "Y"})
    committer = Committer(store, sink, max_events=1000, interval_s=3600)
    pipeline = one_worker(sink, committer, parked={} if mode == "park-key" else None)
    pipeline.start()
    real = store.commit
    entered, release = asyncio.Event(), asyncio.Event()

    async def held(batch: CommitBatch, now: float | None = None) -> bool:
        entered.set()
        await release.wait()
        return await real(batch, now)

    try:
        await put(pipeline, *(ev(i, f"E{i}", key=f"K{i}") for i in range(n)))
        assert not_durable(committer) == {f"K{i}": 1 for i in range(n)}
        assert not await store.has_dead_letters(STREAM, "K0")  # not in the store yet
        assert await committer.has_dead_letters(STREAM, "K0")  # the committer's count says
        assert await committer.flush()
        assert not_durable(committer) == {}
        assert await committer.has_dead_letters(STREAM, "K0")  # the store says now
        assert not await committer.has_dead_letters(STREAM, "K-none")
        # A second dead letter of a resource while the first is being committed: the
        # resource stays until both are durable.
        await put(pipeline, ev(n, "X", key="K"))
        monkeypatch.setattr(store, "commit", held)
        flush = asyncio.create_task(committer.flush())
        async with asyncio.timeout(WAIT_S):
            await entered.wait()
        await put(pipeline, ev(n + 1, "Y", key="K"))  # rejected, or parked behind X (park-key)
        assert not_durable(committer) == {"K": 2}
        release.set()
        async with asyncio.timeout(WAIT_S):
            assert await flush
        monkeypatch.setattr(store, "commit", real)
        assert not_durable(committer) == {"K": 1}  # Y's
        assert await committer.has_dead_letters(STREAM, "K")
        assert await committer.flush()
        assert not_durable(committer) == {}
        rows = await store.dead_letters(STREAM, limit=10 * n)
    finally:
        await pipeline.stop()
        await store.close()
    reasons = {r.unique_event_id: r.reason for r in rows}
    assert len(rows) == n + 2
    assert reasons["Y"] == ("parked" if mode == "park-key" else "sink_rejected")
