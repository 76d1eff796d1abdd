"""A commit that failed is sent again first and alone (Committer._commit_unsure). It synced the
sink to its position *now*, though it commits the failed batch's older one; a sync tells the
jsonl sink that a commit may cover what it syncs, so a file renamed underneath next (logrotate's
create mode) kept the lines written after the failure (JsonlSink._cut_gone keeps what a commit
may cover), and the restart replayed them into the new file: in both. Real JsonlSink, Committer
and SqliteStore; the store's commit fails as a full disk does (found by a review).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consumer.config import StateSettings
from consumer.core.events import Event
from consumer.core.protocol import event_from_raw
from consumer.core.records import CommitBatch
from consumer.core.watermark import Position
from consumer.errors import SinkUnusable, StoreError
from consumer.runtime.assembly import open_sink
from consumer.runtime.committer import Committer
from consumer.sinks.jsonl import JsonlSink
from consumer.state import open_store


def event(i: int) -> Event:
    ev = event_from_raw({"metadata": {"offset": f"{i:06d}", "uniqueEventId": f"u{i}"}})
    assert ev is not None
    return ev


def ids(path: Path) -> list[str]:
    return [json.loads(x)["metadata"]["uniqueEventId"] for x in path.read_bytes().splitlines()]


async def test_a_retried_commit_lets_no_later_line_stay_in_a_renamed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(StateSettings(path=tmp_path / "state.db"))
    real = store.commit

    async def disk_full(batch: CommitBatch, now: float | None = None) -> bool:
        raise StoreError("database or disk is full", retriable=True)

    path, rotated = tmp_path / "events.jsonl", tmp_path / "events.jsonl.1"
    sink = JsonlSink(path)
    await open_sink(sink, store, "state")
    committer = Committer(store, sink, max_events=1_000_000, interval_s=3600.0)

    async def deliver(*numbers: int) -> None:
        events = [event(i) for i in numbers]
        seqs = [committer.arrived("s", Position(e.offset, e.unique_event_id)) for e in events]
        await sink.write("s", events)
        committer.processed("s", [e.unique_event_id for e in events], seqs)

    try:
        monkeypatch.setattr(store, "commit", disk_full)
        await deliver(0, 1, 2)
        with pytest.raises(StoreError):
            await committer.flush()  # A synced, its commit fails
        await deliver(3, 4, 5)
        with pytest.raises(StoreError):
            await committer.flush()  # A sent again alone, and fails again
        path.rename(rotated)  # logrotate, create mode
        path.touch()
        monkeypatch.setattr(store, "commit", real)
        with pytest.raises(SinkUnusable, match="removed or replaced"):
            await committer.flush()
    finally:
        await sink.close()
        await store.close()
    # A commit carried the position past u2 (whether it landed is the store's word), none a
    # later one: the renamed file keeps u0..u2 and nothing after them (the restart replays
    # the rest into the new file).
    assert ids(rotated) == ["u0", "u1", "u2"]
