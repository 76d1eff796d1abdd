"""Backpressure: bounded queues, and a put cancelled at shutdown leaves no trace."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from consumer.core.events import Event
from consumer.runtime.committer import Committer
from consumer.runtime.pipeline import StreamPipeline
from consumer.runtime.store import Store


class RecordingSink:
    name = "recording"
    transactional = False

    def __init__(self) -> None:
        self.written: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def open(self, committed: str | None) -> None: ...

    async def write(self, events: Sequence[Event]) -> None:
        await self.gate.wait()
        self.written.extend(e.unique_event_id for e in events)

    def position(self) -> str | None:
        return None

    async def sync(self, position: str | None) -> None: ...

    async def close(self) -> None: ...


def ev(i: int, key: str = "k") -> Event:
    return Event(str(100 + i), f"e{i}", "E", "M", key, None, None, {"i": i})


@pytest.fixture
async def parts(tmp_path: Path):
    store = await Store.open(tmp_path / "s.db")
    sink = RecordingSink()
    committer = Committer(store, sink, max_events=1000, interval_s=60)
    pipeline = StreamPipeline(
        "s",
        store=store,
        sink=sink,
        committer=committer,
        workers=3,
        queue_size=30,
        batch_max=50,
        retry_initial_s=0.01,
        retry_max_s=0.02,
    )
    pipeline.start()
    yield store, sink, committer, pipeline
    await pipeline.stop()
    await store.close()


async def drained(pipeline: StreamPipeline) -> None:
    async with asyncio.timeout(10):
        await pipeline.drained()


async def test_queues_are_bounded_and_a_cancelled_put_is_forgotten(parts):
    _, sink, _, pipeline = parts
    sink.gate.clear()  # the sink blocks: nothing drains
    await pipeline.put(ev(0, key="same"))
    await asyncio.sleep(0.02)  # its worker takes it and waits in the sink
    accepted = 1
    while pipeline.try_put(ev(accepted, key="same")):
        accepted += 1
        assert accepted < 100, "the queue must be bounded"
    put = asyncio.create_task(pipeline.put(ev(999, key="same")))
    await asyncio.sleep(0.05)
    assert not put.done()  # the reader waits: backpressure, nothing dropped
    in_flight = pipeline.in_flight
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    assert pipeline.in_flight == in_flight - 1
    sink.gate.set()
    await drained(pipeline)
    assert len(sink.written) == accepted
