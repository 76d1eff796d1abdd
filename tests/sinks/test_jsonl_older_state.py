"""A state store older than the jsonl file (an older backup restored) never cuts committed lines.

The defect: the sink's committed position is recorded with the checkpoint, and the start cuts
the file back to it. An operator who restores an older copy of the state store (the SQLite file
copied back, a PostgreSQL database restored) gives the start a shorter committed length of the
same file (same inode: the identity check passes): the start cut lines that were committed,
and with rotation deleted every file numbered after the older committed one. Their events are
replayed from the older checkpoint only up to what the gateway still holds; the lines were gone.

The sink now keeps its own record of the last position it heard committed, beside the file
(``<path>.committed``), written after each commit the committer reports and at open. A start
whose committed position is behind that record, in the same file, where it would cut or delete
bytes the record covers, is refused (exit 78): nothing cut, nothing deleted; the message names
the file, both lengths, and the ways on (``sink adopt --execute``, or the file moved aside).
``sink adopt`` brings the record to what it records, so the start after it goes on, and the
older checkpoint's replay skips the adopted events: every event once.

A record behind the committed position (a kill -9 between the commit and its write) cuts as
before; one that cannot be read (garbage, torn, huge, not a regular file) is as none, with a
warning; one of another file (removed, a new one in its place, even with the inode reused) is
brought to the new file at open and refuses nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from jsonl_lines import LINE, T0, event, lines, run_sink
from log_capture import log_records
from support import (
    cli,
    committed,
    make_settings,
    newest_offset,
    running,
    sink_ids,
    toml_config,
    truth_ids,
    wait_until,
)

from consumer.core.rotation import Rotation
from consumer.errors import SinkUnusable
from consumer.runtime.assembly import open_sink
from consumer.sinks.jsonl import JsonlSink, rotated_files
from consumer.state.sqlite import SqliteStore

RECORD_BYTES = 96  # the record's fixed size


def record_of(path: Path) -> Path:
    return path.with_name(path.name + ".committed")


def record(seq: int, length: int, ino: int) -> bytes:
    """A record as the sink writes it."""
    return f'{{"seq":{seq},"length":{length},"ino":{ino}}}'.encode().ljust(95) + b"\n"


def heard(path: Path) -> dict[str, int]:
    """The sink's record of the last position it heard committed."""
    data = record_of(path).read_bytes()
    assert len(data) == RECORD_BYTES and data.endswith(b"\n"), data
    doc = json.loads(data)
    assert isinstance(doc, dict)
    return doc


def snapshot(state: Path, to: Path) -> None:
    """A copy of the state store as a backup takes it (SQLite's online backup)."""
    with closing(sqlite3.connect(state)) as src, closing(sqlite3.connect(to)) as dst:
        src.backup(dst)


def restore(backup: Path, state: Path) -> None:
    """The backup copied back over the state store (its WAL and index removed, as an operator
    restoring a file does)."""
    for extra in ("-wal", "-shm"):
        state.with_name(state.name + extra).unlink(missing_ok=True)
    shutil.copyfile(backup, state)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if "jsonl" in p.name}


# --- the daemon: an older backup of the state store restored -----------------------------------


async def test_a_restored_older_state_store_is_refused_and_adopt_keeps_every_event_once(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The defect's proof: the start after restoring the older state store cut the file back
    to the older committed length (the 60 lines committed after it gone). Now it exits 78
    naming the file, both lengths and the ways on, the file byte for byte as it was; after
    `sink adopt --execute` the start goes on, the older checkpoint's replay skips the adopted
    events, and every event is in the file once."""
    gw = await sandbox_factory(backlog=80)
    path, state, backup = tmp_path / "events.jsonl", tmp_path / "state.db", tmp_path / "bak.db"
    settings = make_settings(tmp_path, gw.url, sink={"type": "jsonl", "path": path})
    async with running(settings):
        await wait_until(lambda: committed(state, newest_offset(gw)))
    snapshot(state, backup)
    older = path.stat().st_size

    gw.append("DEMO", 60)
    async with running(settings):
        await wait_until(lambda: committed(state, newest_offset(gw)))
    assert heard(path)["length"] == path.stat().st_size > older
    restore(backup, state)
    before = path.read_bytes()
    assert before.count(b"\n") == 140

    with pytest.raises(SinkUnusable, match="looks older than the file"):
        async with running(settings):
            pass
    assert path.read_bytes() == before
    ran = cli("run", "--config", str(toml_config(tmp_path, gw.url)))  # the process: exit 78
    assert ran.returncode == 78, ran.stderr + ran.stdout
    said = ran.stderr
    assert f"jsonl file {path} holds {len(before)} bytes" in said, said
    assert f"committed length is {older}" in said and f"heard {len(before)} bytes" in said
    assert "restored from an older backup" in said
    assert "sink adopt --execute" in said and "move the file aside" in said
    assert path.read_bytes() == before
    preflight = cli("preflight", "--config", str(toml_config(tmp_path, gw.url)))
    assert "looks older than the file" in preflight.stdout + preflight.stderr
    assert path.read_bytes() == before

    adopted = cli("sink", "adopt", "--execute", "--config", str(toml_config(tmp_path, gw.url)))
    assert adopted.returncode == 0, adopted.stderr
    assert heard(path)["length"] == len(before)
    gw.append("DEMO", 5)
    async with running(settings):
        await wait_until(lambda: committed(state, newest_offset(gw)))
    data = path.read_bytes()
    assert data.startswith(before)
    assert Counter(sink_ids(path)) == Counter(truth_ids(gw.events("DEMO"))), "each event once"


async def test_with_rotation_the_files_after_the_older_committed_one_are_not_deleted(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The same with rotation: the start after the restore deleted every file numbered after
    the older committed one (and cut that one). Now none is deleted or cut, and after adopt
    every event is in the series once."""
    gw = await sandbox_factory(backlog=60)
    path, state, backup = tmp_path / "events.jsonl", tmp_path / "state.db", tmp_path / "bak.db"
    sink = {"type": "jsonl", "path": path, "rotate_bytes": 16384}
    settings = make_settings(tmp_path, gw.url, sink=sink)
    rot = settings.sink.rotation()  # type: ignore[union-attr]
    assert rot is not None
    async with running(settings):
        await wait_until(lambda: committed(state, newest_offset(gw)))
    snapshot(state, backup)
    older = rotated_files(path, rot)

    gw.append("DEMO", 120)
    async with running(settings):
        await wait_until(lambda: committed(state, newest_offset(gw)))
    restore(backup, state)
    before = files_of(tmp_path)
    newer = [f for f in rotated_files(path, rot) if f not in older]
    assert len(newer) >= 3
    assert heard(path)["seq"] == rot.seq_of(newer[-1].name)

    with pytest.raises(SinkUnusable, match="looks older than the files") as refused:
        async with running(settings):
            pass
    text = str(refused.value)
    assert f"jsonl file {newer[-1]} (of sink.path {path})" in text
    assert older[-1].name in text and "move the files aside" in text
    assert files_of(tmp_path) == before
    config = toml_config(tmp_path, gw.url, sink=f'[sink]\npath = "{path}"\nrotate_bytes = 16384')
    ran = cli("run", "--config", str(config))
    assert ran.returncode == 78, ran.stderr + ran.stdout
    assert "looks older than the files" in ran.stderr
    assert files_of(tmp_path) == before

    adopted = cli("sink", "adopt", "--execute", "--config", str(config))
    assert adopted.returncode == 0, adopted.stderr
    gw.append("DEMO", 5)
    async with running(settings):
        await wait_until(lambda: committed(state, newest_offset(gw)))
    files = rotated_files(path, rot)
    for f in files:
        if f.name in before:
            assert f.read_bytes().startswith(before[f.name]), f.name
    written = [i for f in files for i in sink_ids(f)]
    assert Counter(written) == Counter(truth_ids(gw.events("DEMO"))), "each event once"


# --- the sink: what the record refuses, and what it does not ------------------------------------


async def test_the_preflight_check_refuses_as_open_does_and_changes_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.jsonl"
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        older = await run_sink(store, path, range(5))
        await run_sink(store, path, range(5, 10))
    finally:
        await store.close()
    before = files_of(tmp_path)  # the file and the record
    for step in (JsonlSink(path).check, JsonlSink(path).open):
        with pytest.raises(SinkUnusable) as refused:
            await step(older)
        assert f"committed length is {5 * LINE}, but the sink heard {10 * LINE}" in str(
            refused.value
        )
        assert f"would cut {5 * LINE} committed bytes" in str(refused.value)
        assert files_of(tmp_path) == before


async def test_rotation_with_the_older_position_in_the_heard_file_cuts_nothing(
    tmp_path: Path,
) -> None:
    """Both positions in one rotated file: the newer files are not deleted before the refusal
    either (nothing at all changes)."""
    rot = Rotation("events-%Y%m%dT%H%M%SZ.jsonl", max_bytes=100 * LINE)
    path = tmp_path / "events.jsonl"
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        older = await run_sink(store, path, range(3), rotation=rot, clock=lambda: T0)
        await run_sink(store, path, range(3, 6), rotation=rot, clock=lambda: T0)
        # A kill -9's next file (uncommitted), which the start deletes when it goes on.
        (one,) = rotated_files(path, rot)
        (tmp_path / rot.name(2, int(T0))).write_bytes(lines(6))
        before = files_of(tmp_path)
        for step in ("check", "open"):
            sink = JsonlSink(path, rotation=rot, clock=lambda: T0)
            with pytest.raises(SinkUnusable, match=f"jsonl file {one} holds {6 * LINE} bytes"):
                await getattr(sink, step)(older)
            assert files_of(tmp_path) == before
    finally:
        await store.close()


async def test_a_record_behind_or_equal_cuts_the_uncommitted_tail_as_before(
    tmp_path: Path,
) -> None:
    """A kill -9 between the state store's commit and the record's write (behind), or after
    both (equal): the start cuts what no commit covers, as it always did."""
    path = tmp_path / "events.jsonl"
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        await run_sink(store, path, range(3))
        sink = JsonlSink(path)
        await open_sink(sink, store, "state.db")
        try:
            await sink.write("main", [event(3), event(4)])
            behind = sink.position()
            assert behind is not None
            await sink.sync(behind)
            await store.set_sink_state("jsonl", behind)  # committed, never heard: kill -9
            await sink.write("main", [event(5), event(6)])  # and a tail
            await sink.sync(sink.position())
        finally:
            await sink.close()
        assert heard(path)["length"] == 3 * LINE < 5 * LINE
        await run_sink(store, path, range(7, 9), commit=False)  # cut to 5 lines; a tail again
        assert heard(path)["length"] == 5 * LINE  # brought to the start at open: equal now
        await run_sink(store, path, range(9, 10))  # cut to 5 lines again
    finally:
        await store.close()
    assert path.read_bytes() == lines(0, 1, 2, 3, 4, 9)


@pytest.mark.parametrize("lost", ["none of what was heard", "part of what was heard"])
async def test_without_fsync_only_what_is_still_in_the_file_counts(
    tmp_path: Path, lost: str
) -> None:
    """fsync = false and a power loss: the file may be shorter than the record says. Only what
    of the heard length is still there and past the committed length is refused."""
    path = tmp_path / "events.jsonl"
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        older = await run_sink(store, path, range(5), fsync=False)
        await run_sink(store, path, range(5, 10), fsync=False)
        os.truncate(path, 5 * LINE if lost == "none of what was heard" else 7 * LINE)
        await store.set_sink_state("jsonl", older)
        sink = JsonlSink(path, fsync=False)
        if lost == "none of what was heard":
            await open_sink(sink, store, "state.db")
            await sink.close()
            assert heard(path)["length"] == 5 * LINE
        else:
            with pytest.raises(SinkUnusable, match=f"would cut {2 * LINE} committed bytes"):
                await open_sink(sink, store, "state.db")
    finally:
        await store.close()


@pytest.mark.parametrize(
    "found",
    ["garbage", "torn", "huge", "a link", "a directory", "a FIFO", "unknown keys", "negative"],
)
async def test_an_unusable_record_is_as_none_with_a_warning(tmp_path: Path, found: str) -> None:
    """Outside data: whatever is there, the start goes on as without it (the older length cut
    to, as before the record existed), warns, never reads more than a record's worth,
    and (where it is a file) writes a record of its own over it."""
    path = tmp_path / "events.jsonl"
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        await run_sink(store, path, range(3))
        await run_sink(store, path, range(3, 5), commit=False)  # a kill -9's tail
        side = record_of(path)
        side.unlink(missing_ok=True)
        good = record(0, 5 * LINE, path.stat().st_ino)  # what it would refuse, read
        if found == "garbage":
            side.write_bytes(b"\x1b[31m\xff\xfe not a record\n" * 3)
        elif found == "torn":
            side.write_bytes(good[:40])
        elif found == "huge":
            with side.open("wb") as f:
                f.write(good)
                f.truncate(1 << 30)  # sparse: a whole read would hold a gigabyte
        elif found == "a link":
            target = tmp_path / "elsewhere"
            target.write_bytes(good)
            side.symlink_to(target)
        elif found == "a directory":
            side.mkdir()
        elif found == "a FIFO":
            os.mkfifo(side)
        elif found == "unknown keys":
            side.write_bytes(good.replace(b'"seq"', b'"sek"'))
        else:
            side.write_bytes(good.replace(b'"length":', b'"length":-'))
        with log_records() as logs:
            sink = JsonlSink(path)
            await open_sink(sink, store, "state.db")
            await sink.close()
    finally:
        await store.close()
    assert path.read_bytes() == lines(0, 1, 2)  # cut as without a record
    warned = [r for r in logs if r["level"] == "warning" and "record of its last" in r["event"]]
    assert warned, logs
    assert all(len(json.dumps(r)) < 2000 for r in warned)  # its content never whole in a line
    assert "\x1b" not in json.dumps(warned)
    if found in ("garbage", "torn", "huge", "unknown keys", "negative"):
        assert heard(path) == {"seq": 0, "length": 3 * LINE, "ino": path.stat().st_ino}
    elif found == "a link":
        assert (tmp_path / "elsewhere").read_bytes() == good  # never written through


@pytest.mark.parametrize("inode", ["another inode", "the same inode reused"])
async def test_a_removed_file_and_a_new_one_in_its_place_are_not_refused(
    tmp_path: Path, inode: str
) -> None:
    """The file removed between runs and a new one in its place: the record of the old one
    means nothing for it, even when the new file got the old one's inode. It is brought to
    the new file at open, so the new file's uncommitted tail is cut after a kill -9, not
    refused for lines of a file that is gone."""
    path = tmp_path / "events.jsonl"
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        await run_sink(store, path, range(10))
        path.unlink()
        path.touch()  # the new file (an operator's, or the start's own)
        ino = path.stat().st_ino
        recorded = json.loads(await store.sink_state("jsonl") or "")
        if inode == "the same inode reused":  # what the old file's record and position name
            await store.set_sink_state("jsonl", json.dumps(recorded | {"ino": ino}))
            record_of(path).write_bytes(record(0, 10 * LINE, ino))
        sink = JsonlSink(path)
        await open_sink(sink, store, "state.db")
        await sink.close()
        assert heard(path) == {"seq": 0, "length": 0, "ino": ino}
        await run_sink(store, path, range(10, 13), commit=False)  # a kill -9's tail
        await run_sink(store, path, range(13, 14))
    finally:
        await store.close()
    assert path.read_bytes() == lines(13)


async def test_a_record_of_another_inode_refuses_nothing(tmp_path: Path) -> None:
    """The file replaced by another one (a restored copy: a new inode) under an older state
    store whose position names no inode: the record, of the old file, proves nothing here."""
    path = tmp_path / "events.jsonl"
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        await run_sink(store, path, range(3))
        await run_sink(store, path, range(3, 10))
        copy = tmp_path / "copy.jsonl"
        copy.write_bytes(lines(*range(5)))
        copy.replace(path)  # another inode
        await store.set_sink_state("jsonl", str(3 * LINE))  # a bare length: no inode
        await run_sink(store, path, range(20, 21))
    finally:
        await store.close()
    assert path.read_bytes() == lines(0, 1, 2, 20)
    assert heard(path) == {"seq": 0, "length": 4 * LINE, "ino": path.stat().st_ino}


async def test_the_record_is_written_over_itself_without_a_reopen(tmp_path: Path) -> None:
    """One pwrite per commit on a descriptor kept open (closed with the sink), always the
    record's fixed size."""
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    await sink.open(None)
    fds = set(os.listdir("/proc/self/fd"))
    try:
        for n in range(1, 4):
            await sink.write("main", [event(n)])
            position = sink.position()
            assert position is not None
            await sink.sync(position)
            sink.committed(position)
            assert heard(path)["length"] == n * LINE
            assert record_of(path).stat().st_size == RECORD_BYTES
        assert set(os.listdir("/proc/self/fd")) == fds
    finally:
        await sink.close()
    assert len(set(os.listdir("/proc/self/fd"))) < len(fds)
