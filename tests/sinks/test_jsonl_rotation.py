"""The jsonl sink's rotation on real files in tmp_path: by size and by time, the position as
(file, length), recovery after a crash at every step of a rotating sync and of the recovery
itself, retention, and what the state store must hold before a file can be trusted.

A crash is simulated in-process: from the N-th file-system call on (open, pwritev, fsync,
ftruncate, unlink) every call raises, the sink is abandoned and a new one opens with what the
"state store" (a variable here) last committed, as after ``kill -9``.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from support import (
    Held,
    committed,
    make_settings,
    newest_offset,
    running,
    sink_length,
    truth_ids,
    wait_until,
)

from consumer.commands.sink import adopt
from consumer.config import load_settings
from consumer.core.events import Event
from consumer.core.rotation import Rotation
from consumer.core.watermark import Position
from consumer.errors import ConfigError, SinkLost, SinkUnusable
from consumer.runtime.committer import Committer
from consumer.sinks.jsonl import WRITE_OUT_BYTES, JsonlSink, adopt_position, rotated_files
from consumer.state.sqlite import SqliteStore

PATTERN = "events-%Y%m%dT%H%M%SZ.jsonl"
T0 = 1_704_067_200.0  # 2024-01-01T00:00:00Z


def event(i: int) -> Event:
    raw = {
        "metadata": {"offset": f"{i:04d}", "uniqueEventId": f"u{i:04d}"},
        "eventName": "UPDATE RESERVATION",
        "primaryKey": f"pk{i % 3}",
        "detail": [{"elementName": "Name", "newValue": f"Zoë «{i:04d}»", "oldValue": None}],
    }
    return Event(
        f"{i:04d}", f"u{i:04d}", "UPDATE RESERVATION", "Reservation", f"pk{i % 3}", None, None, raw
    )


LINE = len(orjson.dumps(event(0).document())) + 1  # every line is this long (i < 10000)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rotation(**kw: Any) -> Rotation:
    kw.setdefault("max_bytes", 3 * LINE)
    return Rotation(PATTERN, **kw)


def ids(path: Path, rot: Rotation) -> list[str]:
    """Every event id in the rotated files, in file order, each file whole lines."""
    out = []
    for f in rotated_files(path, rot):
        data = f.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{f.name} ends in a partial line"
        out += [json.loads(line)["metadata"]["uniqueEventId"] for line in data.splitlines()]
    return out


def truth(n: int) -> list[str]:
    return [f"u{i:04d}" for i in range(n)]


def position(sink: JsonlSink) -> dict[str, Any]:
    p = sink.position()
    assert p is not None
    doc: dict[str, Any] = json.loads(p)
    return doc


# --- rotation by size and by time ----------------------------------------------------------------


async def test_rotation_by_size_keeps_files_under_the_limit_in_numbered_order(
    tmp_path: Path,
) -> None:
    path, rot, clock = tmp_path / "events.jsonl", rotation(), Clock()
    sink = JsonlSink(path, rotation=rot, clock=clock)
    await sink.open(None)
    try:
        first = position(sink)
        # created durably at open: a start to cut to, bound to that file (its inode)
        assert first.pop("ino") == (tmp_path / first["file"]).stat().st_ino
        assert first == {
            "file": rot.name(1, int(T0)),
            "seq": 1,
            "length": 0,
            "started": T0,
            "path": str(path),
            "pattern": PATTERN,
        }
        for i in range(0, 10, 2):
            await sink.write("main", [event(i), event(i + 1)])
            clock.now += 1
        await sink.sync(sink.position())
    finally:
        await sink.close()
    files = rotated_files(path, rot)
    # 2 lines, then 2 more would pass 3 lines: each batch of 2 starts a file.
    assert [f.stat().st_size for f in files] == [2 * LINE] * 5
    assert [rot.seq_of(f.name) for f in files] == [1, 2, 3, 4, 5]
    assert files[1].name == rot.name(2, int(T0) + 1)  # named by the time it started
    assert ids(path, rot) == truth(10)
    assert not path.exists()  # with rotation the configured path only names the files
    assert position(sink) == {
        "file": files[-1].name,
        "seq": 5,
        "length": 2 * LINE,
        "started": int(T0) + 4,
        "path": str(path),
        "pattern": PATTERN,
        "ino": files[-1].stat().st_ino,
    }


async def test_rotation_by_size_counts_the_lines_written_out_before_the_commit(
    tmp_path: Path,
) -> None:
    # Past WRITE_OUT_BYTES the lines go to the file before the next commit: the file's size is
    # what was written plus what is buffered, not what is durable plus what is buffered.
    batch = 1200  # events: about 230 KB, so a write-out starts every few batches
    path, rot = tmp_path / "events.jsonl", rotation(max_bytes=6 * batch * LINE)
    sink = JsonlSink(path, fsync=False, rotation=rot, clock=Clock())
    await sink.open(None)
    try:
        for i in range(0, 8 * batch, batch):
            await sink.write("main", [event(j) for j in range(i, i + batch)])
            await wait_until(lambda: sink._writer is None)  # a write-out started: landed
        assert sum(f.stat().st_size for f in rotated_files(path, rot)) >= WRITE_OUT_BYTES
        await sink.sync(sink.position())
    finally:
        await sink.close()
    files = rotated_files(path, rot)
    assert [f.stat().st_size for f in files] == [6 * batch * LINE, 2 * batch * LINE]
    assert ids(path, rot) == truth(8 * batch)


async def test_a_batch_larger_than_the_limit_is_never_split(tmp_path: Path) -> None:
    path, rot = tmp_path / "events.jsonl", rotation(max_bytes=LINE)
    sink = JsonlSink(path, rotation=rot, clock=Clock())
    await sink.open(None)
    try:
        await sink.write("main", [event(i) for i in range(4)])
        await sink.write("main", [event(4)])
        await sink.sync(None)
    finally:
        await sink.close()
    assert [f.stat().st_size for f in rotated_files(path, rot)] == [4 * LINE, LINE]


async def test_rotation_by_time_at_the_first_write_of_a_new_interval(tmp_path: Path) -> None:
    path, clock = tmp_path / "events.jsonl", Clock(T0 + 10)
    rot = Rotation("events-%Y%m%dT%H.jsonl", interval_s=3600)
    sink = JsonlSink(path, rotation=rot, clock=clock)
    await sink.open(None)
    try:
        await sink.write("main", [event(0)])
        clock.now = T0 + 3599
        await sink.write("main", [event(1)])
        clock.now = T0 + 5 * 3600 + 30  # idle for hours: no empty files meanwhile
        await sink.sync(sink.position())
        assert len(rotated_files(path, rot)) == 1
        await sink.write("main", [event(2)])
        await sink.sync(sink.position())
    finally:
        await sink.close()
    names = [f.name for f in rotated_files(path, rot)]
    assert names == ["events-20240101T00.000001.jsonl", "events-20240101T05.000002.jsonl"]
    assert ids(path, rot) == truth(3)


async def test_a_rotated_file_is_created_by_the_sync_not_by_the_write(tmp_path: Path) -> None:
    path, rot = tmp_path / "events.jsonl", rotation(max_bytes=LINE)
    sink = JsonlSink(path, rotation=rot, clock=Clock())
    await sink.open(None)
    try:
        await sink.write("main", [event(0)])
        await sink.write("main", [event(1)])  # due: file 2, in the buffer only
        token = position(sink)
        assert token["seq"] == 2 and token["length"] == LINE
        assert not (tmp_path / token["file"]).exists()
        await sink.sync(json.dumps(token))
        assert (tmp_path / token["file"]).stat().st_size == LINE
        assert sink.current == tmp_path / token["file"]
        # A token of the earlier file is on disk already: nothing to do.
        await sink.sync(json.dumps({**token, "seq": 1}))
    finally:
        await sink.close()


async def test_a_failed_fsync_of_a_rotated_files_directory_stops_the_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The new file's directory entry is not provably on disk, and a second fsync of the
    # directory would return 0: as after a file's failed fsync, the sink stops for a replay
    # rather than commit lines into a file a power cut may take away.
    path, rot = tmp_path / "events.jsonl", rotation(max_bytes=LINE)
    sink = JsonlSink(path, rotation=rot, clock=Clock())
    await sink.open(None)
    try:
        await sink.write("main", [event(0)])
        await sink.sync(sink.position())
        await sink.write("main", [event(1)])  # due: file 2, created by the next write-out
        real, failed = os.fsync, []

        def fsync(fd: int) -> None:
            if not failed and stat.S_ISDIR(os.fstat(fd).st_mode):
                failed.append(fd)
                raise OSError(5, "Input/output error")
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(SinkLost, match=r"fsync of directory .* failed \(Input/output"):
            await sink.sync(sink.position())
        assert failed
        with pytest.raises(SinkLost):  # never again in this process: the restart replays
            await sink.sync(sink.position())
    finally:
        await sink.close()


async def test_a_write_out_thread_that_waited_past_the_close_writes_nothing(
    tmp_path: Path,
) -> None:
    # A sync cancelled while its write-out waited to start (the thread is beyond reach): once
    # the sink is closed, that thread must not create the next file nor write into it.
    path, rot = tmp_path / "events.jsonl", rotation(max_bytes=LINE)
    sink = JsonlSink(path, rotation=rot, clock=Clock())
    await sink.open(None)
    await sink.write("main", [event(0)])
    await sink.sync(sink.position())
    await sink.write("main", [event(1)])  # due: file 2, created by the next write-out
    token = position(sink)
    held = Held(sink, "_write")
    syncing = asyncio.create_task(sink.sync(sink.position()))
    await held.reached()
    syncing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await syncing
    await sink.close()
    held.release.set()
    await wait_until(held.done.is_set, timeout=10)
    assert not (tmp_path / token["file"]).exists()
    assert ids(path, rot) == truth(1)


# --- a crash at every step ---------------------------------------------------------------------


class Crash(BaseException):
    """kill -9: not an error the sink may handle."""


@contextmanager
def crash_after(calls: int | None) -> Iterator[list[int]]:
    """From the ``calls``-th file-system call on, every one raises :class:`Crash` (None: no
    crash). Yields the count of calls made."""
    made = [0]
    saved = {n: getattr(os, n) for n in ("open", "pwritev", "fsync", "ftruncate", "unlink")}

    def wrap(real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if calls is not None and made[0] >= calls:
                raise Crash
            made[0] += 1
            return real(*args, **kwargs)

        return call

    for name, real in saved.items():
        setattr(os, name, wrap(real))
    try:
        yield made
    finally:
        for name, real in saved.items():
            setattr(os, name, real)


@dataclass
class Store:
    """What the state store holds: the sink's committed position and the checkpoint (how
    many events it covers: the stream replays from there)."""

    position: str | None = None
    done: int = 0


async def deliver(
    sink: JsonlSink, store: Store, upto: int, *, commit: bool = True, batch: int = 2
) -> None:
    """Write the events from the checkpoint on in batches, sync, and (commit) record the
    position with the checkpoint as the committer does."""
    for i in range(store.done, upto, batch):
        await sink.write("main", [event(j) for j in range(i, min(i + batch, upto))])
    token = sink.position()
    await sink.sync(token)
    if commit:
        assert token is not None
        store.position, store.done = token, upto
        sink.committed(token)
        if sink._retaining is not None:
            await sink._retaining  # retention after the commit, as it runs in the daemon


async def crashed_run(path: Path, rot: Rotation, store: Store, calls: int | None) -> bool:
    """A run that commits events 0-9 (files 1-5, two lines each), then writes 10-29 one at a
    time (the third line of file 5, then files of three) and crashes at the ``calls``-th step
    of its sync, or (None) after the sync, before the commit. Returns whether the crash came
    inside the sync."""
    sink = JsonlSink(path, rotation=rot, clock=Clock())
    await sink.open(store.position)
    try:
        await deliver(sink, store, 10)
        with crash_after(calls):
            await deliver(sink, store, 30, commit=False, batch=1)
        return False
    except Crash:
        return True
    finally:
        await sink.close()


async def recover(path: Path, rot: Rotation, store: Store, upto: int = 40) -> None:
    """The restart after a crash: replay from the checkpoint (no fsync: only the files'
    content is looked at)."""
    sink = JsonlSink(path, fsync=False, rotation=rot, clock=Clock(T0 + 100))
    await sink.open(store.position)
    try:
        await deliver(sink, store, upto)
    finally:
        await sink.close()


async def test_a_crash_at_any_step_of_a_rotating_sync_leaves_every_event_once(
    tmp_path: Path,
) -> None:
    """Crash windows: before anything reached the disk, while the full file is written, after
    the new file is created but before its directory entry is durable, while writing into it,
    between files, after the sync but before the commit. Each time the restart cuts the
    committed file back and deletes the files numbered after it; the replay then puts every
    event in exactly once, in order."""
    rot = rotation()
    steps = 0
    while True:
        case = tmp_path / f"crash-{steps}"
        path, store = case / "events.jsonl", Store()
        inside = await crashed_run(path, rot, store, steps)
        assert store.done == 10
        await recover(path, rot, store)
        assert ids(path, rot) == truth(40), f"crash at step {steps}"
        if not inside:
            break  # the sync ran to its end: the crash came after it, before the commit
        steps += 1
    assert steps >= 12  # 10 creates, writes and fsyncs at least: every one was a crash point


async def test_the_restart_deletes_exactly_the_files_after_the_committed_one(
    tmp_path: Path,
) -> None:
    path, rot, store = tmp_path / "events.jsonl", rotation(), Store()
    assert not await crashed_run(path, rot, store, None)  # synced, not committed
    committed = json.loads(store.position or "")
    before = {f.name for f in rotated_files(path, rot)}
    later = {f for f in before if (rot.seq_of(f) or 0) > committed["seq"]}
    assert len(later) >= 5  # the sync created them; no commit covers them
    # Files that are not the sink's are left alone, even numbered ones.
    strangers = ["events-notes.000099.jsonl", "events-20240101T000000Z.000099.jsonl.bak"]
    for name in strangers:
        (tmp_path / name).write_text("keep me\n")
    os.symlink(tmp_path / strangers[0], tmp_path / rot.name(98, int(T0)))
    sink = JsonlSink(path, rotation=rot, clock=Clock())
    await sink.open(store.position)
    try:
        after = {f.name for f in rotated_files(path, rot)}
        assert after == before - later
        committed_file = tmp_path / committed["file"]
        assert committed_file.stat().st_size == committed["length"]  # its tail cut
        assert sink.current == committed_file
        assert all((tmp_path / name).read_text() == "keep me\n" for name in strangers)
        assert (tmp_path / rot.name(98, int(T0))).is_symlink()
        # The next file takes the next number after the committed one.
        await deliver(sink, store, 30)
        assert position(sink)["seq"] > committed["seq"]
    finally:
        await sink.close()
    assert ids(path, rot) == truth(30)


def sizes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in folder.iterdir()}


async def test_check_decides_as_open_does_and_changes_nothing(tmp_path: Path) -> None:
    """preflight's question (``check``): what open would refuse, with no file cut, removed
    or created; open then does it all."""
    path, rot, store = tmp_path / "events.jsonl", rotation(), Store()
    assert not await crashed_run(path, rot, store, None)  # files after the committed one
    before = sizes(tmp_path)
    await JsonlSink(path, rotation=rot, clock=Clock()).check(store.position)
    with pytest.raises(SinkUnusable, match="sink adopt"):  # as open(None) would
        await JsonlSink(path, rotation=rot, clock=Clock()).check(None)
    assert sizes(tmp_path) == before
    sink = JsonlSink(path, rotation=rot, clock=Clock())
    await sink.open(store.position)
    await sink.close()
    assert sizes(tmp_path) != before


async def test_a_crash_during_the_recovery_is_recovered_from_too(tmp_path: Path) -> None:
    rot = rotation()
    steps = 0
    while True:
        case = tmp_path / f"crash-{steps}"
        path, store = case / "events.jsonl", Store()
        assert not await crashed_run(path, rot, store, None)
        sink = JsonlSink(path, rotation=rot, clock=Clock())
        try:
            with crash_after(steps):
                await sink.open(store.position)
            finished = True
        except Crash:
            finished = False
        finally:
            await sink.close()
        await recover(path, rot, store)
        assert ids(path, rot) == truth(40), f"crash at step {steps} of the recovery"
        if finished:
            break
        steps += 1
    assert steps >= 6  # unlinks, the cut and its fsync, the opens


async def test_a_crash_after_the_commit_keeps_everything(tmp_path: Path) -> None:
    path, rot, store = tmp_path / "events.jsonl", rotation(), Store()
    sink = JsonlSink(path, rotation=rot, clock=Clock())
    await sink.open(None)
    await deliver(sink, store, 30)
    await sink.close()  # no clean shutdown of any kind: the files as they are
    await recover(path, rot, store)
    assert ids(path, rot) == truth(40)


# --- what the state store holds -----------------------------------------------------------------


async def test_rotated_files_without_a_committed_position_are_refused(tmp_path: Path) -> None:
    """A new or replaced state store: nothing in any file can be proven uncommitted."""
    path, rot = tmp_path / "events.jsonl", rotation()
    full = tmp_path / rot.name(4, int(T0))
    full.write_bytes(b'{"a":1}\n')
    with pytest.raises(SinkUnusable) as raised:
        await JsonlSink(path, rotation=rot).open(None)
    assert full.name in str(raised.value) and "sink adopt" in str(raised.value)
    assert full.read_bytes() == b'{"a":1}\n'
    # Empty ones hold nothing: the sink starts after them.
    full.write_bytes(b"")
    sink = JsonlSink(path, rotation=rot, clock=Clock())
    await sink.open(None)
    try:
        assert position(sink)["seq"] == 5
    finally:
        await sink.close()


async def test_a_plain_length_from_before_rotation_goes_on_in_the_path_until_a_commit(
    tmp_path: Path,
) -> None:
    """Upgrade: the state store holds a length of the configured path. The path is file 0;
    no rotation happens before a commit has recorded (file, length), so that a crash never
    leaves a rotated file beside a position that cannot tell it is newer."""
    path, rot = tmp_path / "events.jsonl", rotation(max_bytes=LINE)
    path.write_bytes(b"".join(orjson.dumps(event(i).document()) + b"\n" for i in range(3)))
    store = Store(str(3 * LINE), 3)
    sink = JsonlSink(path, rotation=rot, clock=Clock())
    await sink.open(store.position)
    try:
        await deliver(sink, store, 6)
        assert json.loads(store.position or "")["file"] == "events.jsonl"
        assert rotated_files(path, rot) == []  # held back until that commit
        await deliver(sink, store, 10)
    finally:
        await sink.close()
    files = rotated_files(path, rot)
    assert len(files) == 2  # one batch of 2 each
    lines = path.read_bytes().splitlines()
    assert [json.loads(x)["metadata"]["uniqueEventId"] for x in lines] == truth(6)
    assert ids(path, rot) == truth(10)[6:]


async def test_a_plain_length_beside_rotated_files_is_refused(tmp_path: Path) -> None:
    """Rotated files with a committed length of the path alone: they may be older than it
    (rotation switched off and on again), so nothing proves them uncommitted."""
    path, rot = tmp_path / "events.jsonl", rotation()
    path.write_bytes(b"")
    (tmp_path / rot.name(3, int(T0))).write_bytes(b'{"a":1}\n')
    with pytest.raises(SinkUnusable, match="from before them"):
        await JsonlSink(path, rotation=rot).open("0")
    assert (tmp_path / rot.name(3, int(T0))).read_bytes() == b'{"a":1}\n'


async def test_rotation_switched_off_with_a_rotated_position_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    rotated = json.dumps({"file": "events-x.000003.jsonl", "seq": 3, "length": 0})
    with pytest.raises(SinkUnusable, match="no rotation is configured") as raised:
        await JsonlSink(path).open(rotated)
    assert "sink adopt" in str(raised.value)
    # A position in the path itself (rotation on, never rotated) is the plain length.
    path.write_bytes(b"x\nyz")
    sink = JsonlSink(path)
    await sink.open(json.dumps({"file": "events.jsonl", "seq": 0, "length": 2}))
    try:
        assert sink_length(sink.position()) == 2
        assert path.read_bytes() == b"x\n"
    finally:
        await sink.close()


@pytest.mark.parametrize(
    "committed",
    [
        "abc",
        "-5",
        "[1]",
        '{"file": "../elsewhere.jsonl", "seq": 1, "length": 0}',
        '{"file": "/etc/passwd", "seq": 1, "length": 0}',
        '{"file": "e.jsonl", "seq": -1, "length": 0}',
        '{"file": "e.jsonl", "seq": 1, "length": true}',
        '{"file": "e.jsonl", "seq": 1}',
        '{"file": "' + "x" * 300 + '", "seq": 1, "length": 0}',
    ],
)
async def test_a_committed_position_the_sink_never_writes_is_refused(
    tmp_path: Path, committed: str
) -> None:
    for rot in (None, rotation()):
        with pytest.raises(SinkUnusable, match="not one this sink writes"):
            await JsonlSink(tmp_path / "events.jsonl", rotation=rot).open(committed)
    assert os.listdir(tmp_path) == []  # nothing created, nothing cut


async def test_a_stranger_file_with_the_next_name_stops_the_sink(tmp_path: Path) -> None:
    path, rot, clock = tmp_path / "events.jsonl", rotation(max_bytes=LINE), Clock()
    sink = JsonlSink(path, rotation=rot, clock=clock)
    await sink.open(None)
    try:
        await sink.write("main", [event(0)])
        await sink.write("main", [event(1)])
        squatter = tmp_path / position(sink)["file"]
        squatter.write_text("not yours\n")
        with pytest.raises(SinkUnusable, match="exists already"):
            await sink.sync(sink.position())
        assert squatter.read_text() == "not yours\n"
    finally:
        await sink.close()


# --- retention ------------------------------------------------------------------------------------


async def test_retention_keeps_n_files_and_deletes_only_committed_ones(tmp_path: Path) -> None:
    path, rot, store = tmp_path / "events.jsonl", rotation(keep_files=2), Store()
    sink = JsonlSink(path, rotation=rot, clock=Clock())
    await sink.open(None)
    try:
        await deliver(sink, store, 20)  # 10 files of 2 lines, committed in file 10
        assert [rot.seq_of(f.name) for f in rotated_files(path, rot)] == [8, 9, 10]
        await deliver(sink, store, 22)
        # The current file, and the two newest before it.
        assert [rot.seq_of(f.name) for f in rotated_files(path, rot)] == [9, 10, 11]
        assert ids(path, rot) == truth(22)[-6:]
        # Written, not committed (the commit lags): nothing goes, though past the two newest.
        await deliver(sink, store, 30, commit=False)
        seqs = [rot.seq_of(f.name) for f in rotated_files(path, rot)]
        assert seqs == [9, 10, 11, 12, 13, 14, 15]
    finally:
        await sink.close()
    # A crash: the restart deletes 12-15, goes on in 11, and the replay refills.
    await recover(path, rot, store, 44)
    got = ids(path, rot)
    assert got == truth(44)[-len(got) :]
    assert len(rotated_files(path, rot)) == 3


async def test_retention_by_age_uses_the_clock_and_the_last_write(tmp_path: Path) -> None:
    path, rot, store = tmp_path / "events.jsonl", rotation(keep_days=1), Store()
    clock = Clock(T0)
    sink = JsonlSink(path, rotation=rot, clock=clock)
    await sink.open(None)
    try:
        await deliver(sink, store, 8)  # files 1-4
        for f in rotated_files(path, rot):
            os.utime(f, (T0, T0))
        clock.now = T0 + 86400 + 1
        await deliver(sink, store, 10)  # file 5, committed: 1-4 are past it and old
        await deliver(sink, store, 12)  # the sync after that commit
    finally:
        await sink.close()
    assert [rot.seq_of(f.name) for f in rotated_files(path, rot)] == [5, 6]


# --- the committer, the state store, the configuration, adopt -------------------------------


async def test_the_committer_tells_the_sink_what_is_committed(tmp_path: Path) -> None:
    """The committed position goes into SQLite with the checkpoint; the committer then tells
    the sink, whose retention acts on it."""
    path, rot = tmp_path / "events.jsonl", rotation(keep_files=1)
    store = await SqliteStore.open(tmp_path / "state.db")
    sink = JsonlSink(path, rotation=rot, clock=Clock())
    try:
        await sink.open(await store.sink_state("jsonl"))
        committer = Committer(store, sink, max_events=1000, interval_s=3600)
        for i in range(0, 12, 2):
            batch = [event(i), event(i + 1)]
            seqs = [committer.arrived("main", Position(e.offset, e.unique_event_id)) for e in batch]
            await sink.write("main", batch)
            committer.processed("main", [e.unique_event_id for e in batch], seqs)
            assert await committer.flush()
        state = json.loads(await store.sink_state("jsonl") or "")
        # The last write started a file, which that commit's sync created: its position,
        # taken before, names no inode yet.
        assert "ino" not in state
        assert state | {"ino": position(sink)["ino"]} == position(sink)
        # Retention runs in a task of its own after the commit: wait for what it must leave.
        async with asyncio.timeout(10):
            while [rot.seq_of(f.name) for f in rotated_files(path, rot)] != [5, 6]:
                await asyncio.sleep(0.01)
    finally:
        await sink.close()
        await store.close()


BASE = """
[streams.main]
gateway_url = "https://gw.example.com/"
chain_code = "CHAIN1"
app_key = "app-key-0001"

[streams.main.auth]
client_id = "cid"
client_secret = "client-secret-0001"

[sink]
path = "/var/lib/opera/events.jsonl"
"""


@pytest.mark.usefixtures("hermetic_config")
@pytest.mark.parametrize(
    ("keys", "key", "says"),
    [
        ("rotate_bytes = -1", "sink.rotate_bytes", "greater than 0"),
        ("rotate_bytes = 0", "sink.rotate_bytes", "greater than 0"),
        ("rotate_interval_s = 0", "sink.rotate_interval_s", "greater than 0"),
        ("rotate_interval_s = 1.5", "sink.rotate_interval_s", "integer"),
        ("rotate_bytes = 1000\nkeep_files = 0", "sink.keep_files", "greater than 0"),
        ("rotate_bytes = 1000\nkeep_days = -1", "sink.keep_days", "greater than 0"),
        ('rotate_name = "e-%Y.jsonl"', "sink.rotate_name", "set rotate_bytes"),
        ("keep_files = 3", "sink.keep_files", "no rotation is configured"),
        ('rotate_bytes = 1000\nrotate_name = "logs/e-%Y.jsonl"', "sink.rotate_name", "no '/'"),
        ('rotate_bytes = 1000\nrotate_name = "e-%b.jsonl"', "sink.rotate_name", "use only %Y"),
        ('rotate_interval_s = 3600\nrotate_name = "e-%Y%m%d.jsonl"', "sink.rotate_name",
         "3600 s intervals apart"),
    ],
)  # fmt: skip
def test_check_config_refuses_bad_rotation_keys(
    tmp_path: Path, keys: str, key: str, says: str
) -> None:
    (tmp_path / "config.toml").write_text(BASE + keys + "\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(tmp_path / "config.toml")
    lines = [x for x in str(raised.value).splitlines() if x.strip().startswith(key + ":")]
    assert lines, str(raised.value)
    assert says in lines[0] and " -> " in lines[0]


@pytest.mark.usefixtures("hermetic_config")
def test_rotation_is_off_unless_configured(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(BASE)
    sink = load_settings(tmp_path / "config.toml").sink
    assert sink.type == "jsonl" and sink.rotation() is None
    (tmp_path / "config.toml").write_text(BASE + "rotate_interval_s = 86400\nkeep_days = 7\n")
    sink = load_settings(tmp_path / "config.toml").sink
    assert sink.type == "jsonl"
    rot = sink.rotation()
    assert rot is not None and rot.pattern == "events-%Y%m%dT%H%M%SZ.jsonl"
    assert (rot.interval_s, rot.keep_days, rot.max_bytes) == (86400, 7.0, None)


async def test_adopt_records_the_newest_rotated_file(tmp_path: Path) -> None:
    path, rot = tmp_path / "events.jsonl", rotation()
    # No file: inode 0, which no file has (one put there later is not taken as this one).
    assert adopt_position(path, None, T0) == (
        path,
        0,
        json.dumps({"path": str(path), "length": 0, "ino": 0}, separators=(",", ":")),
        0,
    )
    assert adopt_position(path, rot, T0)[2] == json.dumps(
        {"file": "events.jsonl", "seq": 0, "length": 0, "started": int(T0), "path": str(path)}
        | {"pattern": PATTERN, "ino": 0},
        separators=(",", ":"),
    )
    for seq in (3, 12, 7):
        (tmp_path / rot.name(seq, int(T0))).write_bytes(b"x\n" * seq)
    newest, size, token, torn = adopt_position(path, rot, T0)
    assert (newest.name, size, torn) == (rot.name(12, int(T0)), 24, 0)
    # The sink takes that position as it would its own: nothing is cut, nothing deleted.
    sink = JsonlSink(path, rotation=rot, clock=Clock())
    await sink.open(token)
    try:
        assert sink.current == newest and position(sink)["length"] == 24
        assert len(rotated_files(path, rot)) == 3
    finally:
        await sink.close()


@pytest.mark.usefixtures("hermetic_config")
async def test_the_adopt_command_with_rotation(tmp_path: Path, capsys: Any) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        BASE.replace("/var/lib/opera/events.jsonl", str(tmp_path / "events.jsonl"))
        + f'rotate_bytes = 1000\n[state]\npath = "{tmp_path / "state.db"}"\n'
    )
    settings = load_settings(config)
    rot = settings.sink.rotation()  # type: ignore[union-attr]
    assert rot is not None
    (tmp_path / rot.name(2, int(T0))).write_bytes(b"a\n")
    assert await adopt(settings, execute=True) == 0
    assert rot.name(2, int(T0)) in capsys.readouterr().out
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        state = json.loads(await store.sink_state("jsonl") or "")
    finally:
        await store.close()
    assert (state["file"], state["seq"], state["length"]) == (rot.name(2, int(T0)), 2, 2)


async def test_the_daemon_rotates_and_retains_from_its_configuration(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The whole chain: settings -> sink -> committer -> retention. Every event reaches the
    files in order; retention leaves the newest files, which end with the newest events."""
    gw = await sandbox_factory(backlog=400)
    path = tmp_path / "events.jsonl"
    settings = make_settings(
        tmp_path,
        gw.url,
        sink={"type": "jsonl", "path": path, "rotate_bytes": 4096, "keep_files": 2},
        pipeline={"batch_max": 4},
    )
    rot = settings.sink.rotation()  # type: ignore[union-attr]
    assert rot is not None
    newest = newest_offset(gw)
    seen: set[int] = set()

    def done() -> bool:
        seen.update(rot.seq_of(f.name) or 0 for f in rotated_files(path, rot))
        return committed(tmp_path / "state.db", newest)

    async with running(settings):
        await wait_until(done, timeout=60)
    files = rotated_files(path, rot)
    assert len(seen) >= 20 and len(files) < len(seen)  # many files, the oldest deleted
    assert rot.seq_of(files[0].name) != 1
    # The newest events of each primaryKey, once each, in order (the workers interleave the
    # keys, so the files hold the newest per key, not the newest overall).
    lines = [e for f in files for e in map(json.loads, f.read_bytes().splitlines())]
    got = [e["metadata"]["uniqueEventId"] for e in lines]
    truth_events = gw.events("DEMO")
    assert got and len(set(got)) == len(got) and set(got) <= set(truth_ids(truth_events))
    for key in {e["primaryKey"] for e in lines}:
        mine = [e["metadata"]["uniqueEventId"] for e in lines if e["primaryKey"] == key]
        theirs = [e["metadata"]["uniqueEventId"] for e in truth_events if e["primaryKey"] == key]
        assert mine == theirs[-len(mine) :]


async def test_files_made_after_the_commit_under_a_rotate_name_changed_since_are_removed(
    tmp_path: Path,
) -> None:
    """A crash left files no commit covers (numbered after the committed one), then the
    operator changed rotate_name: they are found under the name the committed position
    records, and removed as the current name's are; the committed file is cut. Before, they
    stayed, and the replay wrote their events again into files of the new name."""
    before = Rotation("old-%Y%m%d.jsonl", max_bytes=3 * LINE)
    names = [before.name(seq, int(T0)) for seq in (1, 2, 3)]
    for name in names:
        (tmp_path / name).write_bytes(b"x\nyz\n")
    unrelated = tmp_path / "other-20240101.000002.log"  # another suffix: not of the series
    unrelated.write_bytes(b"precious")
    committed = {"file": names[0], "seq": 1, "length": 2, "pattern": before.pattern}
    sink = JsonlSink(tmp_path / "events.jsonl", rotation=rotation(), clock=Clock())
    await sink.open(json.dumps(committed))
    try:
        assert sink.current == tmp_path / names[0]
        assert (tmp_path / names[0]).read_bytes() == b"x\n"
        assert not (tmp_path / names[1]).exists() and not (tmp_path / names[2]).exists()
        assert unrelated.read_bytes() == b"precious"
        assert json.loads(sink.position() or "")["pattern"] == PATTERN  # recorded from now on
    finally:
        await sink.close()


async def test_a_committed_position_naming_a_file_outside_the_series_is_refused(
    tmp_path: Path,
) -> None:
    """The state store's copy is not trusted to name what gets cut: a file that is neither
    the path (file 0) nor numbered as the series numbers its files is never touched."""
    (tmp_path / "state.db").write_bytes(b"precious")
    (tmp_path / "backup.000003.tar").write_bytes(b"precious")
    cases = (
        ("state.db", 3),
        ("events.jsonl", 2),
        ("events-x.000004.jsonl", 3),
        ("backup.000003.tar", 3),  # the number, but not before the series' suffix
    )
    for name, seq in cases:
        committed = json.dumps({"file": name, "seq": seq, "length": 0})
        with pytest.raises(SinkUnusable, match="not one of the series"):
            await JsonlSink(tmp_path / "events.jsonl", rotation=rotation()).open(committed)
    assert (tmp_path / "state.db").read_bytes() == b"precious"
    assert (tmp_path / "backup.000003.tar").read_bytes() == b"precious"
    # A file of the series made with another rotate_name is still the committed one.
    old = tmp_path / "old-name.000003.jsonl"
    old.write_bytes(b"x\nyz")
    sink = JsonlSink(tmp_path / "events.jsonl", rotation=rotation(), clock=Clock())
    await sink.open(json.dumps({"file": old.name, "seq": 3, "length": 2}))
    try:
        assert sink.current == old and old.read_bytes() == b"x\n"
    finally:
        await sink.close()
