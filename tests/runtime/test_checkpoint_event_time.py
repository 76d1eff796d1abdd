"""The checkpoint's event time (issue #13): the committer writes the own timestamp of the
checkpoint's event, in ``[metrics] event_timezone``, parsed once per commit; a real SQLite
store and jsonl sink, events through the real pipeline."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from bus_events import event
from support import wait_until

from consumer.runtime.committer import Committer
from consumer.runtime.pipeline import StreamPipeline
from consumer.sinks.jsonl import JsonlSink
from consumer.state.sqlite import SqliteStore

STAMP = "28-APR-24 06.18.59.028027 PM"  # Oracle's format


@pytest.mark.parametrize(
    ("zone", "stamp", "expected"),
    [
        ("UTC", STAMP, datetime(2024, 4, 28, 18, 18, 59, 28027, ZoneInfo("UTC")).timestamp()),
        (
            "America/New_York",
            STAMP,
            datetime(2024, 4, 28, 18, 18, 59, 28027, ZoneInfo("America/New_York")).timestamp(),
        ),
        ("UTC", "2024-04-28T18:18:59Z", None),  # not Oracle's format: unknown, not a guess
        ("UTC", None, None),  # no timestamp at all
    ],
)
async def test_the_checkpoint_carries_its_events_time(
    tmp_path: Path, zone: str, stamp: str | None, expected: float | None
) -> None:
    store = await SqliteStore.open(tmp_path / "state.db")
    sink = JsonlSink(tmp_path / "events.jsonl")
    await sink.open(None)
    committer = Committer(store, sink, max_events=10_000, interval_s=3600.0, event_timezone=zone)
    pipeline = StreamPipeline(
        "main",
        sink=sink,
        committer=committer,
        workers=2,
        queue_size=100,
        batch_max=10,
        retry_initial_s=0.01,
        retry_max_s=0.02,
    )
    pipeline.start()
    try:
        older = "28-APR-24 06.00.00.000000 AM"
        for i in range(1, 20):
            await pipeline.put(event(i, timestamp=older))
        await pipeline.put(event(20, timestamp=stamp))  # the newest: the checkpoint's event
        await wait_until(lambda: pipeline.in_flight == 0)
        assert await committer.flush()
        cp = await store.checkpoint("main")
        assert cp is not None and cp.offset == "20"
        assert cp.event_at == (pytest.approx(expected) if expected is not None else None)
    finally:
        await pipeline.stop()
        await sink.close()
        await store.close()
