"""The jsonl sink: buffer, durable position, cut back to the committed length."""

from __future__ import annotations

import json
from pathlib import Path

from consumer.core.events import Event
from consumer.sinks.jsonl import JsonlSink


def event(i: int) -> Event:
    raw = {"metadata": {"offset": str(i), "uniqueEventId": f"e{i}"}, "detail": [{"newValue": "é"}]}
    return Event(str(i), f"e{i}", "E", "M", f"k{i}", None, None, raw)


async def test_lines_are_the_events_as_received_once_synced(tmp_path: Path):
    path = tmp_path / "out.jsonl"
    sink = JsonlSink(path, fsync=True)
    await sink.open(None)
    await sink.write([event(1), event(2)])
    assert path.read_bytes() == b""  # buffered until the committer syncs
    position = sink.position()
    await sink.sync(position)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == [event(1).raw, event(2).raw]
    assert position == str(path.stat().st_size)
    await sink.sync(position)  # idempotent
    assert path.stat().st_size == int(position)
    await sink.close()


async def test_position_covers_exactly_the_returned_writes(tmp_path: Path):
    sink = JsonlSink(tmp_path / "out.jsonl")
    await sink.open(None)
    await sink.write([event(1)])
    first = sink.position()
    await sink.write([event(2)])
    await sink.sync(first)  # the later write goes to disk too, beyond the recorded position
    assert first is not None and int(first) < int(sink.position() or 0)
    await sink.close()


async def test_open_cuts_what_the_checkpoint_does_not_cover(tmp_path: Path):
    path = tmp_path / "out.jsonl"
    sink = JsonlSink(path)
    await sink.open(None)
    await sink.write([event(1)])
    committed = sink.position()
    await sink.sync(committed)
    await sink.write([event(2), event(3)])
    await sink.sync(None)  # on disk, but never committed: as if killed before the commit
    await sink.close()
    reopened = JsonlSink(path)
    await reopened.open(committed)
    assert [json.loads(x)["metadata"]["offset"] for x in path.read_text().splitlines()] == ["1"]
    await reopened.write([event(4)])
    await reopened.sync(reopened.position())
    assert [json.loads(x)["metadata"]["offset"] for x in path.read_text().splitlines()] == [
        "1",
        "4",
    ]
    await reopened.close()


async def test_a_file_shorter_than_committed_is_accepted(tmp_path: Path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"a":1}\n')
    sink = JsonlSink(path)
    await sink.open("999")
    assert sink.position() == "8"
    await sink.close()
