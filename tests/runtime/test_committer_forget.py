"""Fleet mode: a stream forgotten (consumer.runtime.committer.Committer.forget) while a commit
that carries its work is under way, as when ``stop_stream`` gives up waiting for a slow commit.
The commit goes through; settling it must neither fail on the stream's missing ledger nor
make one up (a dead letter's count of -1 would park the resource when the stream is taken
again). Real Committer and SqliteStore; the store's commit waits for the test's word.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Sequence
from pathlib import Path

import pytest

from consumer.core.events import Event
from consumer.core.records import CommitBatch, DeadLetter
from consumer.core.watermark import Position
from consumer.runtime.committer import Committer
from consumer.sinks.base import PlainSink
from consumer.state.sqlite import SqliteStore

WAIT_S = 5.0


class NullSink(PlainSink):
    name = "null"

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        return None


@pytest.mark.parametrize("taken_again", [False, True])
@pytest.mark.parametrize("work", ["an event and a dead letter", "a dead letter only"])
async def test_forgotten_during_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, work: str, taken_again: bool
) -> None:
    store = await SqliteStore.open(tmp_path / "state.db")
    committer = Committer(store, NullSink(), max_events=1000, interval_s=3600)
    entered, release = asyncio.Event(), asyncio.Event()
    real = store.commit

    async def slow(batch: CommitBatch, now: float | None = None) -> None:
        entered.set()
        await release.wait()  # a slow commit: PostgreSQL under a partition, say
        await real(batch, now)

    monkeypatch.setattr(store, "commit", slow)
    try:
        if work == "an event and a dead letter":
            seq = committer.arrived("b", Position("000001", "b-u1"))
            committer.processed("b", ["b-u1"], [seq])
        committer.dead_letter(
            DeadLetter(stream="b", reason="malformed", error="x", payload="{", primary_key="K"),
            committer.arrived("b", None),
        )
        flush = asyncio.create_task(committer.flush())  # the commit task's, under way
        async with asyncio.timeout(WAIT_S):
            await entered.wait()
        committer.forget("b")  # stop_stream, after its grace
        if taken_again:  # and the stream taken again before the old commit ends
            committer.arrived("b", Position("000002", "b-u2"))
        release.set()
        async with asyncio.timeout(WAIT_S):
            assert await flush  # no KeyError: the committer (and the member) lives on
        monkeypatch.setattr(store, "commit", real)
        # The commit is durable as it was taken.
        rows = await store.dead_letters("b")
        assert [(r.reason, r.primary_key) for r in rows] == [("malformed", "K")]
        if work == "an event and a dead letter":
            assert await store.seen("b", ["b-u1"]) == {"b-u1"}
            cp = await store.checkpoint("b")
            assert cp is not None and cp.offset == "000001"
        # Nothing settled into the forgotten stream's (or its new lease's) ledger: once the
        # letter is purged, the resource is free.
        assert "b" not in committer.checkpointed_at
        await store.purge_dead_letters([r.id for r in rows])
        assert not await committer.has_dead_letters("b", "K")
        assert committer.in_flight("b") == (1 if taken_again else 0)
        assert not await committer.flush()  # and the next commit has nothing of the old one
    finally:
        await store.close()


async def test_a_drain_of_a_stream_forgotten_meanwhile_ends(tmp_path: Path) -> None:
    """A stream lost while the shutdown drains it is forgotten (its work dropped): the drain
    waited on for ever, up to the shutdown's deadline, and the streams after it got no drain
    time at all (replayed at the next start)."""
    store = await SqliteStore.open(tmp_path / "state.db")
    committer = Committer(store, NullSink(), max_events=1000, interval_s=3600)
    try:
        committer.arrived("b", Position("000001", "b-u1"))  # in flight: never processed
        drain = asyncio.create_task(committer.drained("b"))
        await asyncio.sleep(0)
        assert not drain.done()
        committer.forget("b")
        async with asyncio.timeout(WAIT_S):
            await drain
    finally:
        await store.close()


async def test_a_forgotten_streams_pipeline_is_not_held(tmp_path: Path) -> None:
    """What a stream's pipeline registered (on_commit, on_set_aside) goes with the stream: a
    fleet member that lost a stream for good held its stopped pipeline, queues and sink state
    included, for the rest of its life."""

    class Pipeline:  # what the committer keeps of a pipeline: its bound methods
        def record(self) -> None: ...

        def told(self, letters: Sequence[DeadLetter]) -> None: ...

    store = await SqliteStore.open(tmp_path / "state.db")
    committer = Committer(store, NullSink(), max_events=1000, interval_s=3600)
    try:
        old = Pipeline()
        committer.on_commit("b", old.record)
        committer.on_set_aside("b", old.told, parks=True)
        held = weakref.ref(old)
        del old
        gc.collect()
        assert held() is not None  # registered: held while the stream runs here
        committer.forget("b")
        gc.collect()
        assert held() is None
    finally:
        await store.close()
