"""What an event holds is what the byte bounds count, and nothing holds it once it is done.

An event from the decoder holds its newEvent text and a second copy of its ``detail`` array's
text (``detail_text``, for the row sinks): an event whose size is its detail (OHIP's changed
elements: a long note) holds twice its text. The queue's bound (``queue_max_bytes``) and the
committer's (what a sink may hold until the commit) count both. Once an event is done and
durable, neither the watermark (the stream's position) nor a waiting worker keeps it: an idle
stream held its last event, both copies, for as long as it stayed idle. Real decoder, pipeline,
committer, jsonl sink and SQLite store; memory measured with tracemalloc.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from consumer.core.events import Event
from consumer.core.protocol import Next, decode
from consumer.runtime.committer import Committer
from consumer.runtime.pipeline import StreamPipeline
from consumer.sinks.jsonl import JsonlSink
from consumer.state.sqlite import SqliteStore

STREAM = "s"
MAX_FRAME = 16 * 1024 * 1024
WAIT_S = 10.0


def event(i: int, note: int, key: str = "k") -> Event:
    """A decoded event whose size is its detail: a ``note``-byte Notes element."""
    frame = (
        '{"id":"s","type":"next","payload":{"data":{"newEvent":{"metadata":'
        f'{{"offset":"{i}","uniqueEventId":"u{i}"}},"primaryKey":"{key}","detail":'
        f'[{{"elementName":"Notes","newValue":"{"x" * note}"}}]}}}}}}}}'
    ).encode()
    out = decode(frame, MAX_FRAME)
    assert isinstance(out, Next)
    assert out.event.text is not None and out.event.detail_text is not None
    assert len(out.event.detail_text) > note  # the second copy the bounds must count
    return out.event


def held(ev: Event) -> int:
    return len(ev.text or b"") + len(ev.detail_text or b"")


@asynccontextmanager
async def pipeline_on(
    tmp_path: Path,
    *,
    queue_max_bytes: int = 16 * 1024 * 1024,
    max_pending_bytes: int = 16 * 1024 * 1024,
    start: bool = True,
) -> AsyncIterator[tuple[SqliteStore, Committer, StreamPipeline]]:
    store = await SqliteStore.open(tmp_path / "state.db")
    sink = JsonlSink(tmp_path / "events.jsonl", fsync=False)
    pipeline: StreamPipeline | None = None
    try:
        await sink.open(await store.sink_state(sink.name))
        committer = Committer(
            store, sink, max_events=1000, interval_s=3600, max_pending_bytes=max_pending_bytes
        )
        pipeline = StreamPipeline(
            STREAM,
            sink=sink,
            committer=committer,
            workers=1,
            queue_size=10_000,
            queue_max_bytes=queue_max_bytes,
            batch_max=100,
            retry_initial_s=0.01,
            retry_max_s=0.02,
        )
        if start:
            pipeline.start()
        yield store, committer, pipeline
    finally:
        if pipeline is not None:
            await pipeline.stop()
        await sink.close()
        await store.close()


async def test_an_idle_stream_keeps_no_event_once_it_is_durable(tmp_path: Path) -> None:
    """An 8 MiB event (its text and its detail's: 16 MiB) written and committed: what the
    stream keeps of it while no other event comes is its position."""
    async with pipeline_on(tmp_path) as (store, committer, pipeline):
        for i in range(1, 4):  # what is allocated once (statements, loggers) before the measure
            await pipeline.put(event(i, 100))
        async with asyncio.timeout(WAIT_S):
            await pipeline.drained()
        assert await committer.flush()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await pipeline.put(event(10, 8 * 1024 * 1024))
            async with asyncio.timeout(WAIT_S):
                await pipeline.drained()
            assert await committer.flush()
            gc.collect()
            retained = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        cp = await store.checkpoint(STREAM)
        assert pipeline.position is not None and pipeline.position.unique_event_id == "u10"
    assert cp is not None and cp.unique_event_id == "u10"  # done and durable
    assert retained < 1024 * 1024, (
        f"{retained / 2**20:.1f} MiB retained by an idle stream after its 8 MiB event was "
        "written and committed"
    )


async def test_the_queue_byte_bound_counts_what_its_events_hold(tmp_path: Path) -> None:
    """Events read and not yet taken (the workers not started): the reader is told to wait
    once queue_max_bytes of what they hold is queued, and the queue holds about that."""
    bound = 4 * 1024 * 1024
    async with pipeline_on(tmp_path, queue_max_bytes=bound, start=False) as (_, _, pipeline):
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            added: list[Event] = []
            for i in range(1, 1000):  # bounded: 64 events at most, were the detail not counted
                added.append(event(i, 64 * 1024, key=f"k{i}"))
                if not pipeline.add(added[-1]):
                    break
            pipeline._flush()  # registered and queued, as the reader's wait for room does
            gc.collect()
            queued = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert queued <= bound * 1.25, (
        f"the queue holds {queued / 2**20:.1f} MiB in {len(added)} events when its bound "
        f"queue_max_bytes = {bound / 2**20:.0f} MiB says it is full"
    )
    counted, last = sum(held(e) for e in added), held(added[-1])
    assert counted - last < bound <= counted  # full at the event that reached it


async def test_the_committer_byte_bound_counts_what_its_events_hold(tmp_path: Path) -> None:
    """Events written and not yet committed (the sink may hold them until then): the
    committer's capacity is full, and the workers wait for a commit, once what they hold
    reaches it."""
    note = 64 * 1024
    events = [event(i, note, key=f"k{i}") for i in range(1, 5)]
    bound = sum(held(e) for e in events)  # 4 events of text and detail: 8 x note, about
    async with pipeline_on(tmp_path, max_pending_bytes=bound) as (_, committer, pipeline):
        for e in events[:3]:
            await pipeline.put(e)
        async with asyncio.timeout(WAIT_S):
            await pipeline.drained()
        assert not committer.full
        await pipeline.put(events[3])
        async with asyncio.timeout(WAIT_S):
            await pipeline.drained()
        assert committer.full  # the workers wait for a commit before they take more
        assert await committer.flush()
        assert not committer.full
