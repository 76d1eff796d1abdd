"""A jsonl file shortened in place between runs, inside a line, is refused at start.

The defect: the committed position names its file (path and inode), and a file of that
identity found shorter than the committed length was taken as it is, with a warning, the sink
going on after its last byte. Shortened in place at a length that is not a line's end (an
operator's ``truncate -s``, or an older copy restored over it with ``cp``, which keeps the
inode), the first new event was glued to the half line left there (both lines unreadable), and
the committed lines cut off were gone with nothing more than that warning.

The sink only ever commits at a line's end, so a start position that is not one is not what was
committed. Going on after it writes a torn line; cutting back to the last complete line deletes
committed bytes; ending the half line with a newline leaves a line of garbage in the middle of
the file for every reader, the loss behind one log line. None of that is the sink's to decide:
the start is refused (exit 78, as a file of another identity with lines is), naming
``sink.path``, the committed and the found length, and the fixes (restore the file; or
``sink adopt``, which takes the file up to its last complete line). Nothing is cut or written.

A file shortened at a line's end (lines shipped away by hand, an older copy restored) is
accepted as before: the sink goes on after its last line, and warns that the committed lines
cut off are not written again.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from jsonl_lines import LINE, T0, lines, run_sink
from log_capture import captured_logs, records
from support import (
    cli,
    committed,
    make_settings,
    newest_offset,
    running,
    sink_length,
    toml_config,
    truth_ids,
    wait_until,
)

from consumer.commands.sink import adopt
from consumer.core.rotation import Rotation
from consumer.errors import SinkUnusable
from consumer.runtime.assembly import open_sink
from consumer.sinks.jsonl import JsonlSink, rotated_files
from consumer.state.sqlite import SqliteStore


def parsed(path: Path) -> tuple[list[str], list[bytes]]:
    """(uniqueEventIds of the lines that are JSON, the lines that are not)."""
    ids, bad = [], []
    for line in path.read_bytes().splitlines():
        try:
            ids.append(json.loads(line)["metadata"]["uniqueEventId"])
        except (ValueError, KeyError, TypeError):
            bad.append(line)
    return ids, bad


def shorten(path: Path, how: str, length: int) -> None:
    """Shorten ``path`` in place (same inode) to ``length`` bytes."""
    ino = path.stat().st_ino
    if how == "truncate -s":
        os.truncate(path, length)
    else:  # cp of an older copy over it: opened with O_TRUNC, same inode
        older = path.with_name("backup.jsonl")
        older.write_bytes(path.read_bytes()[:length])
        shutil.copyfile(older, path)
    assert path.stat().st_ino == ino
    assert path.stat().st_size == length


# --- inside a line: refused, nothing cut or written -----------------------------------------------


@pytest.mark.parametrize("how", ["truncate -s", "cp of an older copy"])
async def test_a_file_shortened_inside_a_line_is_refused_and_left_as_it_is(
    tmp_path: Path, how: str
) -> None:
    path = tmp_path / "events.jsonl"
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        position = await run_sink(store, path, range(10))
        assert sink_length(position) == 10 * LINE
        cut = 3 * LINE + LINE // 2  # three lines and half of the fourth
        shorten(path, how, cut)
        before = path.read_bytes()
        sink = JsonlSink(path)
        with pytest.raises(SinkUnusable) as refused:
            await open_sink(sink, store, "state.db")
        assert await store.sink_state("jsonl") == position  # nothing recorded
    finally:
        await store.close()
    text = str(refused.value)
    assert f"sink.path {path} holds {cut} bytes" in text
    assert f"{10 * LINE} bytes" in text and f"{cut} bytes" in text  # committed and found
    assert "inside a line" in text
    assert "restore" in text and "sink adopt" in text
    assert path.read_bytes() == before  # nothing cut, nothing appended


@pytest.mark.parametrize(
    "recorded",
    ["bare length", "without inode", "with inode"],
)
async def test_old_positions_are_read_and_a_half_line_refused_the_same(
    tmp_path: Path, recorded: str
) -> None:
    """A position recorded before it named its file (a bare number) or its inode is still a
    length of the configured path: a file shorter than it inside a line is refused too."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(lines(0, 1) + b'{"metadata":{"off')
    where = str(path)
    position = {
        "bare length": str(5 * LINE),
        "without inode": json.dumps({"path": where, "length": 5 * LINE}),
        "with inode": json.dumps({"path": where, "length": 5 * LINE, "ino": path.stat().st_ino}),
    }[recorded]
    before = path.read_bytes()
    with pytest.raises(SinkUnusable, match="inside a line"):
        await JsonlSink(path).open(position)
    with pytest.raises(SinkUnusable, match="inside a line"):
        await JsonlSink(path).check(position)  # preflight says so too
    assert path.read_bytes() == before


async def test_a_committed_rotated_file_shortened_inside_a_line_is_refused(tmp_path: Path) -> None:
    rot = Rotation("events-%Y%m%dT%H%M%SZ.jsonl", max_bytes=4 * LINE)
    path = tmp_path / "events.jsonl"
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        position = await run_sink(store, path, range(3), rotation=rot, clock=lambda: T0)
        (one,) = rotated_files(path, rot)
        assert json.loads(position)["file"] == one.name
        os.truncate(one, LINE + 5)
        with pytest.raises(SinkUnusable, match="inside a line") as refused:
            await open_sink(JsonlSink(path, rotation=rot, clock=lambda: T0), store, "state.db")
    finally:
        await store.close()
    assert f"jsonl file {one} (of sink.path {path})" in str(refused.value)
    assert one.read_bytes() == lines(0) + lines(1)[:5]


async def test_a_file_whose_committed_length_falls_inside_a_line_is_not_cut(
    tmp_path: Path,
) -> None:
    """Another copy restored over it, longer than the committed length but not ending a line
    there: cut to it, the file would end in a half line (and the next line glued to it)."""
    path = tmp_path / "events.jsonl"
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        position = await run_sink(store, path, range(3))
        other = b'{"note":"another export"}\n' + lines(7, 8, 9)
        assert len(other) > 3 * LINE and other[3 * LINE - 1 : 3 * LINE] != b"\n"
        with path.open("r+b") as f:  # same inode
            f.write(other)
        with pytest.raises(SinkUnusable, match="inside a line"):
            await open_sink(JsonlSink(path), store, "state.db")
        assert await store.sink_state("jsonl") == position
    finally:
        await store.close()
    assert path.read_bytes() == other


# --- at a line's end: accepted, said ------------------------------------------------------------


async def test_a_file_shortened_at_a_line_end_goes_on_after_it_and_warns(tmp_path: Path) -> None:
    """As before: the sink goes on after the last line (recorded before the first write), and
    the warning says how much of what was committed is gone and that it is not written again."""
    path = tmp_path / "events.jsonl"
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        await run_sink(store, path, range(10))
        shorten(path, "truncate -s", 3 * LINE)
        # Through the daemon's own logging set-up: a structlog logger another test's set-up
        # cached would bypass structlog.testing.capture_logs.
        with captured_logs() as logs:
            position = await run_sink(store, path, range(100, 102))
    finally:
        await store.close()
    (warned,) = [e for e in records(logs) if e["level"] == "warning"]
    assert warned["event"].startswith("jsonl file is shorter than the committed length")
    assert (warned["size"], warned["committed"]) == (3 * LINE, 10 * LINE)
    assert "not written again" in warned["event"]
    assert sink_length(position) == 5 * LINE
    assert path.read_bytes() == lines(0, 1, 2, 100, 101)


# --- the daemon -----------------------------------------------------------------------------------


async def test_the_daemon_refuses_a_half_line_then_adopt_goes_on_after_the_last_whole_one(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The defect's proof through the daemon: the start after ``truncate -s`` to the middle of
    a line appended the next event right after the half line (one line of two halves, not
    JSON). Now the start is refused and the file left whole; ``sink adopt`` takes it up to its
    last complete line, and the next run writes only whole lines, each new event once."""
    gw = await sandbox_factory(backlog=50)
    path, state = tmp_path / "events.jsonl", tmp_path / "state.db"
    settings = make_settings(tmp_path, gw.url, sink={"type": "jsonl", "path": path})
    async with running(settings):
        await wait_until(lambda: committed(state, newest_offset(gw)))
    data = path.read_bytes()
    assert data.count(b"\n") == 50
    cut = data.index(b"\n", len(data) // 2) - 7  # inside line 26 or so
    os.truncate(path, cut)
    kept = [json.loads(x) for x in data[:cut].splitlines()[:-1]]  # the half line left out

    gw.append("DEMO", 5)
    with pytest.raises(SinkUnusable, match="inside a line"):
        async with running(settings):
            pass
    assert path.read_bytes() == data[:cut]
    ran = cli("run", "--config", str(toml_config(tmp_path, gw.url)))  # the process: exit 78
    assert ran.returncode == 78, ran.stderr + ran.stdout
    assert f"sink.path {path} holds {cut} bytes" in ran.stderr and "inside a line" in ran.stderr
    assert path.read_bytes() == data[:cut]

    assert await adopt(settings, execute=True) == 0
    async with running(settings):
        await wait_until(lambda: committed(state, newest_offset(gw)))
    ids, bad = parsed(path)
    assert bad == []
    assert ids[: len(kept)] == truth_ids(kept)
    assert sorted(ids[len(kept) :]) == sorted(truth_ids(gw.events("DEMO"))[50:])  # 4 workers
