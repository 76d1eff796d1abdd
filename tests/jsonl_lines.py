"""Events whose jsonl lines all have one length (i < 10000), for tests that cut, shorten or
restore a sink's file at known byte counts, and a run of the sink over them (:func:`run_sink`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from consumer.core.events import Event
from consumer.runtime.assembly import open_sink
from consumer.sinks.jsonl import JsonlSink
from consumer.state.sqlite import SqliteStore

T0 = 1_704_067_200.0  # 2024-01-01T00:00:00Z: a rotation clock's start


def event(i: int) -> Event:
    raw = {
        "metadata": {"offset": f"{i:04d}", "uniqueEventId": f"u{i:04d}"},
        "eventName": "UPDATE RESERVATION",
        "primaryKey": f"pk{i % 3}",
    }
    return Event(
        f"{i:04d}", f"u{i:04d}", "UPDATE RESERVATION", "Reservation", f"pk{i % 3}", None, None, raw
    )


LINE = len(orjson.dumps(event(0).raw)) + 1


def lines(*numbers: int) -> bytes:
    return b"".join(orjson.dumps(event(i).raw) + b"\n" for i in numbers)


async def run_sink(
    store: SqliteStore, path: Path, numbers: range, *, commit: bool = True, **kw: Any
) -> str:
    """A run through the daemon's open path: ``numbers`` written and synced; committed as the
    committer does (the store's transaction, then the sink hears it), or not (a kill -9
    before the commit)."""
    sink = JsonlSink(path, **kw)
    await open_sink(sink, store, "state.db")
    try:
        await sink.write("main", [event(i) for i in numbers])
        position = sink.position()
        assert position is not None
        await sink.sync(position)
        if commit:
            await store.set_sink_state("jsonl", position)
            sink.committed(position)
        return position
    finally:
        await sink.close()
