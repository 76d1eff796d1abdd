"""The jsonl sink's committed position names its file, and a start that moves it is recorded.

Two defects of the recovery at open (found by a review):

- The position was a bare length (or, with rotation, a file name and number) applied to
  whatever file the configuration named at the next start. Another ``sink.path`` for a run,
  then the old one again, cut the first file to the other's length: committed events deleted
  for good, and a torn line. With rotation, a position of another series in the same
  directory deleted this series' files numbered after it. The position now records the
  configured path and the file's inode; one that is not this file's is as none: nothing is
  cut, a file with lines is refused (exit 78, the adopt hint).
- A file moved aside or shortened between runs was accepted, but the store kept the old,
  larger length until the first commit: a ``kill -9`` before it kept the new lines as
  committed (the replay wrote them twice) or cut the file mid-line. The position the sink
  starts at is now recorded before its first write.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from jsonl_lines import LINE, T0, event, lines
from support import (
    committed,
    make_settings,
    newest_offset,
    running,
    sink_ids,
    sink_length,
    truth_ids,
    wait_until,
)

from consumer.commands.sink import adopt
from consumer.core.rotation import Rotation
from consumer.errors import SinkUnusable
from consumer.runtime.assembly import open_sink
from consumer.sinks.jsonl import JsonlSink, rotated_files
from consumer.state.sqlite import SqliteStore


async def written(path: Path, numbers: range, committed: str | None = None, **kw: Any) -> str:
    """Open ``path`` at ``committed``, write and sync ``numbers``: the position to commit."""
    sink = JsonlSink(path, **kw)
    await sink.open(committed)
    try:
        await sink.write("main", [event(i) for i in numbers])
        position = sink.position()
        assert position is not None
        await sink.sync(position)
        return position
    finally:
        await sink.close()


# --- 1. a position of another file never cuts this one --------------------------------------------


async def test_a_position_of_another_sink_path_never_cuts_this_file(tmp_path: Path) -> None:
    """sink.path pointed at another file for a run, then set back: the position committed for
    that file was applied to this one, which was cut to its length (committed lines deleted,
    the last one torn). Refused now, as a file the store has no length for, and left whole."""
    first, other = tmp_path / "events.jsonl", tmp_path / "other.jsonl"
    await written(first, range(5))
    before = first.read_bytes()
    position = await written(other, range(5, 6))  # the run with the other path
    with pytest.raises(SinkUnusable, match="sink adopt") as refused:
        await JsonlSink(first).open(position)
    assert str(other) in str(refused.value)
    assert first.read_bytes() == before


async def test_a_position_of_a_file_since_replaced_never_cuts_the_new_one(tmp_path: Path) -> None:
    """Same path, another file (moved aside, another one put there): its length is not this
    file's, and bytes past it are not proven uncommitted."""
    path = tmp_path / "events.jsonl"
    position = await written(path, range(2))
    path.rename(tmp_path / "archive.jsonl")
    path.write_bytes(lines(10, 11, 12))
    with pytest.raises(SinkUnusable, match="another file than the one there"):
        await JsonlSink(path).open(position)
    assert path.read_bytes() == lines(10, 11, 12)


async def test_a_bare_length_from_before_is_still_a_length_of_the_path(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(lines(0, 1) + b'{"torn')
    sink = JsonlSink(path)
    await sink.open(str(2 * LINE))
    try:
        assert path.read_bytes() == lines(0, 1)
        position = json.loads(sink.position() or "")
        assert position == {"path": str(path), "length": 2 * LINE, "ino": path.stat().st_ino}
    finally:
        await sink.close()


async def test_a_position_of_another_series_deletes_none_of_this_ones_files(
    tmp_path: Path,
) -> None:
    """Rotation: the position names a file and its number. One of another series in the same
    directory (another sink.path) passed as this series' committed file, and every file of
    this series numbered after it was deleted as uncommitted."""
    rot = Rotation("events-%Y%m%dT%H%M%SZ.jsonl", max_bytes=2 * LINE)
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path, rotation=rot, clock=lambda: T0)
    await sink.open(None)
    try:
        for i in range(6):  # files 1, 2, 3 of two lines each
            await sink.write("main", [event(i)])
        await sink.sync(sink.position())
    finally:
        await sink.close()
    ours = {f: f.read_bytes() for f in rotated_files(path, rot)}
    assert len(ours) == 3
    other_rot = Rotation("other-%Y%m%dT%H%M%SZ.jsonl", max_bytes=2 * LINE)
    position = await written(
        tmp_path / "other.jsonl", range(10, 11), rotation=other_rot, clock=lambda: T0
    )
    assert json.loads(position)["seq"] == 1
    with pytest.raises(SinkUnusable, match="sink adopt"):
        await JsonlSink(path, rotation=rot, clock=lambda: T0).open(position)
    assert {f: f.read_bytes() for f in rotated_files(path, rot)} == ours


async def test_a_rotated_file_replaced_since_its_position_deletes_nothing(tmp_path: Path) -> None:
    """The committed file of the series is not the one the position was recorded in: the
    files numbered after it are not proven uncommitted (nor is its own tail)."""
    rot = Rotation("events-%Y%m%dT%H%M%SZ.jsonl", max_bytes=2 * LINE)
    path = tmp_path / "events.jsonl"
    position = await written(path, range(1), rotation=rot, clock=lambda: T0)
    one = tmp_path / json.loads(position)["file"]
    one.rename(tmp_path / "aside.jsonl")
    one.write_bytes(lines(20, 21))  # another file by that name
    two = tmp_path / rot.name(2, int(T0))
    two.write_bytes(lines(22))
    with pytest.raises(SinkUnusable, match="not the one there"):
        await JsonlSink(path, rotation=rot, clock=lambda: T0).open(position)
    assert (one.read_bytes(), two.read_bytes()) == (lines(20, 21), lines(22))


# --- 2. a start elsewhere is recorded before the first write --------------------------------------


async def crash_after_writing(sink: JsonlSink, numbers: range) -> None:
    """Lines on disk, no commit, then the process ends (a kill -9 as far as the store sees)."""
    await sink.write("main", [event(i) for i in numbers])
    await sink.sync(sink.position())
    await sink.close()


@pytest.mark.parametrize("how", ["moved aside", "shortened in place"])
async def test_a_file_changed_between_runs_is_recorded_before_the_first_write(
    tmp_path: Path, how: str
) -> None:
    """The sink starts at the end of what is there (a new file, or a shorter one), but the
    store kept the old, larger length until the first commit: a crash before it kept the new
    lines as committed (their events replayed: twice) or cut them at the old length,
    mid-line. The new start is recorded at open, so the crash cuts back to it."""
    path = tmp_path / "events.jsonl"
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        sink = JsonlSink(path)
        await open_sink(sink, store, "state.db")
        await crash_after_writing(sink, range(10))
        await store.set_sink_state("jsonl", sink.position() or "")  # all 10 committed
        if how == "moved aside":
            path.rename(tmp_path / "archive.jsonl")
            kept = b""
        else:
            os.truncate(path, 3 * LINE)
            kept = lines(0, 1, 2)
        sink = JsonlSink(path)
        await open_sink(sink, store, "state.db")
        assert sink_length(await store.sink_state("jsonl")) == len(kept)  # before any write
        await crash_after_writing(sink, range(100, 104))  # not committed: replayed
        sink = JsonlSink(path)
        await open_sink(sink, store, "state.db")
        await sink.close()
    finally:
        await store.close()
    assert path.read_bytes() == kept


async def test_a_shortened_file_under_rotation_from_a_bare_length_is_recorded(
    tmp_path: Path,
) -> None:
    """Rotation configured, the store's position a bare length of the path (from before
    rotation), the path shortened between runs: the sink goes on in the path (file 0, no
    rotation until a commit), and where it starts is recorded as that file's position."""
    rot = Rotation("events-%Y%m%dT%H%M%SZ.jsonl", max_bytes=2 * LINE)
    path = tmp_path / "events.jsonl"
    path.write_bytes(lines(0, 1))
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        await store.set_sink_state("jsonl", str(5 * LINE))
        sink = JsonlSink(path, rotation=rot, clock=lambda: T0)
        await open_sink(sink, store, "state.db")
        state = json.loads(await store.sink_state("jsonl") or "")
        assert (state["file"], state["seq"], state["length"]) == (path.name, 0, 2 * LINE)
        await crash_after_writing(sink, range(100, 104))  # held in file 0: no rotation yet
        assert rotated_files(path, rot) == []
        sink = JsonlSink(path, rotation=rot, clock=lambda: T0)
        await open_sink(sink, store, "state.db")
        await sink.close()
    finally:
        await store.close()
    assert path.read_bytes() == lines(0, 1)


# --- the daemon -----------------------------------------------------------------------------------


async def test_sink_path_changed_and_set_back_keeps_every_committed_line(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The review's proof: the third start cut events.jsonl to other.jsonl's committed
    length. Now it refuses, naming adopt, and leaves the file whole; adopt, and every event
    is in one of the two files once."""
    gw = await sandbox_factory(backlog=200)
    first, second = tmp_path / "events.jsonl", tmp_path / "other.jsonl"
    state = tmp_path / "state.db"
    settings = make_settings(tmp_path, gw.url, sink={"type": "jsonl", "path": first})
    async with running(settings):
        await wait_until(lambda: committed(state, newest_offset(gw)))
    before = first.read_bytes()
    assert before.count(b"\n") == 200

    gw.append("DEMO", 5)
    async with running(make_settings(tmp_path, gw.url, sink={"type": "jsonl", "path": second})):
        await wait_until(lambda: committed(state, newest_offset(gw)))
    assert second.read_bytes().count(b"\n") == 5

    with pytest.raises(SinkUnusable, match="sink adopt") as refused:
        async with running(settings):
            pass
    assert str(second) in str(refused.value)
    assert first.read_bytes() == before

    assert await adopt(settings, execute=True) == 0
    gw.append("DEMO", 3)
    async with running(settings):
        await wait_until(lambda: committed(state, newest_offset(gw)))
    assert first.read_bytes().startswith(before)
    assert Counter(sink_ids(first) + sink_ids(second)) == Counter(truth_ids(gw.events("DEMO")))
