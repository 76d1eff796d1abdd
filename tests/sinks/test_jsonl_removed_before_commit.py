"""The jsonl file removed after a write-out between commits handed it every line, before the
commit: the commit's sync has nothing to write, so the write-out's check that the path still
names the open file never ran, and the commit recorded lines that are in no file (the restart
starts a new one under the path: the events were lost, recorded as processed). Each sync now
checks every open file, written to or not: the daemon stops, nothing is committed, and the
restart replays the events. Real JsonlSink, Committer and SqliteStore (found by a review).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import wait_until

from consumer.config import StateSettings
from consumer.core.events import Event
from consumer.core.protocol import event_from_raw
from consumer.core.watermark import Position
from consumer.errors import SinkUnusable
from consumer.runtime.assembly import open_sink
from consumer.runtime.committer import Committer
from consumer.sinks.jsonl import WRITE_OUT_BYTES, JsonlSink
from consumer.state import open_store


def event(i: int) -> Event:
    ev = event_from_raw(
        {
            "metadata": {"offset": f"{i:06d}", "uniqueEventId": f"u{i}"},
            "primaryKey": f"pk{i}",
            "detail": [{"elementName": "Name", "newValue": "x" * 900}],
        }
    )
    assert ev is not None
    return ev


@pytest.mark.parametrize("commit", ["the first", "a retry of the covered position"])
async def test_lines_of_a_file_removed_before_their_commit_are_not_committed(
    tmp_path: Path, commit: str
) -> None:
    store = await open_store(StateSettings(path=tmp_path / "state.db"))
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    await open_sink(sink, store, "state")
    committer = Committer(store, sink, max_events=1_000_000, interval_s=3600.0)
    committed = await store.sink_state(sink.name)  # the start's: length 0
    events = [event(i) for i in range(800)]  # some 750 KB: past WRITE_OUT_BYTES
    ids = [e.unique_event_id for e in events]
    try:
        seqs = [committer.arrived("s", Position(e.offset, e.unique_event_id)) for e in events]
        await sink.write("s", events)
        committer.processed("s", ids, seqs)
        if commit == "a retry of the covered position":
            # The lines synced to disk, the commit lost (a failing store): its retry has a
            # position on disk already, and nothing to write.
            position = sink.position()
            await sink.sync(position)
        else:  # the write-out between commits hands every line to the file
            await wait_until(lambda: path.stat().st_size >= 800 * 900, timeout=10)
        assert path.stat().st_size >= WRITE_OUT_BYTES
        path.unlink()  # removed underneath, before a commit covers its lines
        with pytest.raises(SinkUnusable, match="removed or replaced"):
            await committer.flush()
        assert await store.seen("s", ids) == set()
        assert await store.sink_state(sink.name) == committed
    finally:
        await sink.close()
        await store.close()
