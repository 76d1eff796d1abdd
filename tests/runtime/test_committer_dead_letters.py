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
from consumer.sinks.base import PlainSink
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
    sink: RejectsOnce, committer: Committer, parked: dict[str, str] | None = None
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
        parked=parked,
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
