"""Unit tests for consumer.sinks.jsonl.JsonlSink on real files in tmp_path."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from support import Held, as_received, sink_length, wait_until

from consumer.core.events import Event
from consumer.errors import PermanentSinkError, SinkLost, SinkUnusable, TransientSinkError
from consumer.sinks.jsonl import WRITE_OUT_BYTES, JsonlSink


def event(i: int, **extra: Any) -> Event:
    raw = {
        "metadata": {"offset": f"{i:04d}", "uniqueEventId": f"u{i}"},
        "eventName": "UPDATE RESERVATION",
        "primaryKey": f"pk{i % 3}",
        "detail": [{"elementName": "Name", "newValue": f"Zoë «{i}»", "oldValue": None}],
        **extra,
    }
    return Event(
        f"{i:04d}", f"u{i}", "UPDATE RESERVATION", "Reservation", f"pk{i % 3}", None, None, raw
    )


def line_bytes(ev: Event) -> bytes:
    return orjson.dumps(ev.raw) + b"\n"


def read_lines(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(line) for line in data.decode().splitlines()]


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[JsonlSink]:
    s = JsonlSink(tmp_path / "out" / "events.jsonl", fsync=True)
    await s.open(None)
    try:
        yield s
    finally:
        await s.close()


async def test_open_creates_the_file_and_starts_at_zero(sink: JsonlSink) -> None:
    assert sink.path.is_file()
    assert sink.path.stat().st_size == 0
    assert sink_length(sink.position()) == 0
    assert sink.name == "jsonl"


async def test_lines_are_the_raw_event_json_one_per_line(sink: JsonlSink) -> None:
    events = [event(i) for i in range(5)]
    await sink.write("main", events[:2])
    await sink.write("main", events[2:])
    await sink.sync(sink.position())
    assert read_lines(sink.path) == [e.raw for e in events]
    assert sink.path.read_bytes() == b"".join(line_bytes(e) for e in events)


async def test_nothing_reaches_the_file_before_sync(sink: JsonlSink) -> None:
    await sink.write("main", [event(1)])
    assert sink.path.stat().st_size == 0
    assert sink_length(sink.position()) == len(line_bytes(event(1)))


async def test_position_covers_exactly_the_writes_that_returned(sink: JsonlSink) -> None:
    sizes = [0]
    for i in range(4):
        await sink.write("main", [event(i)])
        sizes.append(sizes[-1] + len(line_bytes(event(i))))
        assert sink_length(sink.position()) == sizes[-1]
    await sink.write("main", [])
    assert sink_length(sink.position()) == sizes[-1]
    await sink.sync(sink.position())
    assert sink.path.stat().st_size == sizes[-1]
    assert sink_length(sink.position()) == sizes[-1]


async def test_sync_is_idempotent(sink: JsonlSink) -> None:
    await sink.write("main", [event(1), event(2)])
    token = sink.position()
    await sink.sync(token)
    content = sink.path.read_bytes()
    await sink.sync(token)
    await sink.sync(None)
    await sink.sync("0")
    assert sink.path.read_bytes() == content
    assert sink.position() == token


async def test_sync_none_writes_everything(sink: JsonlSink) -> None:
    await sink.write("main", [event(1)])
    await sink.sync(None)
    assert read_lines(sink.path) == [event(1).raw]


async def test_later_syncs_append(sink: JsonlSink) -> None:
    await sink.write("main", [event(1)])
    await sink.sync(sink.position())
    await sink.write("main", [event(2)])
    await sink.sync(sink.position())
    assert read_lines(sink.path) == [event(1).raw, event(2).raw]


async def test_token_of_an_earlier_write_restores_exactly_that_prefix(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    s = JsonlSink(path, fsync=False)
    await s.open(None)
    await s.write("main", [event(1)])
    token = s.position()
    await s.write("main", [event(2), event(3)])
    await s.sync(token)  # may write more than the token covers...
    await s.close()
    again = JsonlSink(path, fsync=False)
    await again.open(token)  # ...but restoring the token cuts back to it
    try:
        assert read_lines(path) == [event(1).raw]
        assert again.position() == token
    finally:
        await again.close()


async def test_open_cuts_a_longer_file_back_to_the_committed_length(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    first = line_bytes(event(1))
    path.write_bytes(first + line_bytes(event(2)) + b'{"partial')
    s = JsonlSink(path)
    await s.open(str(len(first)))
    try:
        assert path.read_bytes() == first
        assert sink_length(s.position()) == len(first)
        await s.write("main", [event(3)])
        await s.sync(s.position())
        assert read_lines(path) == [event(1).raw, event(3).raw]
    finally:
        await s.close()


async def test_open_without_committed_length_refuses_a_non_empty_file(tmp_path: Path) -> None:
    """Issue #9 item 1: with no committed length (a new or replaced state store) no byte of
    the file can be proven uncommitted: refuse, naming the file and the way out, cut nothing."""
    path = tmp_path / "e.jsonl"
    content = line_bytes(event(1)) + line_bytes(event(2))
    path.write_bytes(content)
    s = JsonlSink(path)
    with pytest.raises(SinkUnusable) as raised:
        await s.open(None)
    assert str(path) in str(raised.value)
    said = str(raised.value)
    assert "sink adopt --execute" in said and "move the file aside" in said  # not a mere plan
    assert path.read_bytes() == content


async def test_open_without_committed_length_takes_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"")
    s = JsonlSink(path)
    await s.open(None)
    try:
        assert sink_length(s.position()) == 0
    finally:
        await s.close()


async def test_a_file_replaced_while_running_stops_the_sink(tmp_path: Path) -> None:
    """Issue #9 item 1: rotated away underneath (renamed, a new file at the path): writing on
    would put committed lines in a file nobody reads. Stop with a clear error instead."""
    path = tmp_path / "e.jsonl"
    s = JsonlSink(path)
    await s.open(None)
    try:
        await s.write("main", [event(1)])
        await s.sync(s.position())
        path.rename(tmp_path / "e.jsonl.1")
        path.write_bytes(b"")
        await s.write("main", [event(2)])
        with pytest.raises(SinkUnusable, match="removed or replaced"):
            await s.sync(s.position())
        assert path.read_bytes() == b""
        assert read_lines(tmp_path / "e.jsonl.1") == [event(1).raw]
    finally:
        await s.close()


async def test_a_file_removed_while_running_stops_the_sink(tmp_path: Path) -> None:
    """Issue #9 item 1: writing into a deleted file loses every line."""
    path = tmp_path / "e.jsonl"
    s = JsonlSink(path)
    await s.open(None)
    try:
        path.unlink()
        await s.write("main", [event(1)])
        with pytest.raises(SinkUnusable, match="removed or replaced"):
            await s.sync(s.position())
    finally:
        await s.close()


async def test_a_file_truncated_while_running_stops_the_sink(tmp_path: Path) -> None:
    """Issue #9 item 1: a pwrite past the end of a truncated file leaves a hole of NUL bytes."""
    path = tmp_path / "e.jsonl"
    s = JsonlSink(path)
    await s.open(None)
    try:
        await s.write("main", [event(1), event(2)])
        await s.sync(s.position())
        os.truncate(path, 0)
        await s.write("main", [event(3)])
        with pytest.raises(SinkUnusable, match="shrank"):
            await s.sync(s.position())
        assert b"\x00" not in path.read_bytes()
    finally:
        await s.close()


async def test_open_with_the_exact_length_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    content = line_bytes(event(1)) + line_bytes(event(2))
    path.write_bytes(content)
    s = JsonlSink(path)
    await s.open(str(len(content)))
    try:
        assert path.read_bytes() == content
        assert sink_length(s.position()) == len(content)
    finally:
        await s.close()


async def test_a_file_shorter_than_committed_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    content = line_bytes(event(1))
    path.write_bytes(content)
    s = JsonlSink(path)
    await s.open(str(len(content) + 1000))  # rotated or truncated: a warning, not an error
    try:
        assert path.read_bytes() == content
        assert sink_length(s.position()) == len(content)
        await s.write("main", [event(2)])
        await s.sync(s.position())
        # appended right after the existing data: no hole of zero bytes
        assert b"\x00" not in path.read_bytes()
        assert read_lines(path) == [event(1).raw, event(2).raw]
    finally:
        await s.close()


async def test_a_missing_file_with_a_committed_length_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "gone.jsonl"
    s = JsonlSink(path)
    await s.open("500")
    try:
        assert sink_length(s.position()) == 0
    finally:
        await s.close()


async def test_failed_write_to_disk_is_transient_and_retried(
    sink: JsonlSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwritev
    failures = [OSError(28, "No space left on device")]

    def flaky(fd: int, buffers: Any, offset: int) -> int:
        if failures:
            raise failures.pop()
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", flaky)
    await sink.write("main", [event(1)])
    token = sink.position()
    with pytest.raises(TransientSinkError):
        await sink.sync(token)
    assert sink.position() == token  # the buffer is kept
    await sink.sync(token)
    assert read_lines(sink.path) == [event(1).raw]


async def test_a_sync_of_more_parts_than_one_pwritev_takes_writes_them_all(
    sink: JsonlSink,
) -> None:
    n = os.sysconf("SC_IOV_MAX") * 2 + 3  # one write() a part: the kernel refuses more at once
    for i in range(n):
        await sink.write("main", [event(i)])
    await sink.sync(sink.position())
    assert read_lines(sink.path) == [event(i).raw for i in range(n)]
    assert sink_length(sink.position()) == sink.path.stat().st_size


async def test_a_short_write_goes_on_where_it_stopped(
    sink: JsonlSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwritev
    calls = []

    def short(fd: int, buffers: Any, offset: int) -> int:
        calls.append(offset)
        return real(fd, [bytes(buffers[0])[:7]], offset)  # 7 bytes at most, mid-line

    monkeypatch.setattr(os, "pwritev", short)
    await sink.write("main", [event(1), event(2)])
    await sink.write("main", [event(3)])
    await sink.sync(sink.position())
    assert read_lines(sink.path) == [event(i).raw for i in (1, 2, 3)]
    assert len(calls) > 3 and calls == sorted(set(calls))  # each call after the last one


async def test_a_write_during_sync_is_kept_for_the_next_sync(sink: JsonlSink) -> None:
    held = Held(sink, "_write")
    await sink.write("main", [event(1)])
    first = sink.position()
    task = asyncio.create_task(sink.sync(first))
    await held.reached()
    await sink.write("main", [event(2)])  # arrives while the first sync is on disk
    second = sink.position()
    assert second is not None
    assert sink_length(second) == len(line_bytes(event(1))) + len(line_bytes(event(2)))
    held.release.set()
    async with asyncio.timeout(5):
        await task
    assert sink.position() == second
    await sink.sync(second)
    assert read_lines(sink.path) == [event(1).raw, event(2).raw]


async def test_a_cancelled_close_still_closes_once_the_sync_thread_is_done(
    sink: JsonlSink,
) -> None:
    # The close waits for a sync's thread; cancelled meanwhile, it must not leave the lock
    # taken (a later close would hang) nor the descriptors open.
    fds = [f.fd for f in sink._files if f.fd is not None]
    assert fds
    sink._io.acquire()  # a cancelled sync, still in its thread
    closing = asyncio.create_task(sink.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    sink._io.release()
    async with asyncio.timeout(5):
        await sink.close()
        while any(_is_open(fd) for fd in fds):
            await asyncio.sleep(0.005)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_close_is_idempotent(tmp_path: Path) -> None:
    s = JsonlSink(tmp_path / "e.jsonl")
    await s.open(None)
    await s.close()
    await s.close()


async def test_a_line_is_the_event_text_as_received(sink: JsonlSink) -> None:
    # Escapes and a number stay as the gateway wrote them: nothing re-encoded.
    text = (
        b'{"metadata":{"offset":"7","uniqueEventId":"u7"},"hotelId":"H\\u00d6TEL",'
        b'"detail":[{"newValue":"Zo\\u00eb","n":1.50E+2}]}'
    )
    await sink.write("main", [as_received(text)])
    await sink.sync(sink.position())
    assert sink.path.read_bytes() == text + b"\n"


async def test_an_event_text_that_cannot_be_parsed_with_a_resource_is_that_events_fault(
    sink: JsonlSink,
) -> None:
    # With a fetched resource the document is rebuilt: a number beyond a double cannot be.
    # (decode refuses such a frame: this event is one built otherwise.)
    text = b'{"metadata":{"offset":"7","uniqueEventId":"u7"},"detail":[{"n":1e999}]}'
    ev = Event("7", "u7", "", "", "u7", None, None, None, text=text, resource={"id": 1})
    ev = ev._replace(fetched=True)
    with pytest.raises(PermanentSinkError) as err:
        await sink.write("main", [ev])
    assert err.value.unique_event_id == "u7"
    assert "cannot be serialized" in str(err.value)
    assert sink_length(sink.position()) == 0


async def test_the_preflight_check_refuses_a_link_as_open_does(tmp_path: Path) -> None:
    # open() never writes through a symbolic link (O_NOFOLLOW); check() said it would do.
    target = tmp_path / "elsewhere.jsonl"
    target.write_bytes(b"")
    link = tmp_path / "events.jsonl"
    link.symlink_to(target)
    with pytest.raises(SinkUnusable) as opened:
        await JsonlSink(link).open(None)
    with pytest.raises(SinkUnusable) as checked:
        await JsonlSink(link).check(None)
    assert str(checked.value) == str(opened.value)
    await JsonlSink(tmp_path / "new.jsonl").check(None)  # a missing file is fine
    assert not (tmp_path / "new.jsonl").exists()


async def test_a_failed_write_leaves_no_half_line_behind_and_is_retried(
    sink: JsonlSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk: the write got half a line out. The file used to keep those bytes until the
    # next start cut them; a reader saw a broken last line.
    await sink.write("main", [event(1)])
    await sink.sync(sink.position())
    durable = sink.path.stat().st_size
    real = os.pwritev

    def half_then_full(fd: int, buffers: Any, offset: int) -> int:
        real(fd, [bytes(buffers[0])[:9]], offset)
        raise OSError(28, "No space left on device")

    await sink.write("main", [event(2), event(3)])
    monkeypatch.setattr(os, "pwritev", half_then_full)
    with pytest.raises(TransientSinkError, match="No space left"):
        await sink.sync(sink.position())
    assert sink.path.stat().st_size == durable  # cut back to what is durable
    monkeypatch.undo()
    await sink.sync(sink.position())  # the retry writes them again, from memory
    assert read_lines(sink.path) == [e.raw for e in (event(1), event(2), event(3))]


async def test_a_failed_fsync_cuts_what_it_wrote_and_stops_for_a_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lines went to the OS and left the heap; the fsync failed: the kernel may have
    # dropped them, and they are not in memory to write again. A restart replays them.
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path, fsync=True)
    await sink.open(None)
    await sink.write("main", [event(1)])
    committed = sink.position()
    await sink.sync(committed)
    assert committed is not None
    real = os.fsync
    target = os.stat(path).st_ino

    def failing(fd: int) -> None:
        if os.fstat(fd).st_ino == target:
            raise OSError(5, "Input/output error")
        real(fd)

    await sink.write("main", [event(2), event(3)])
    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(
        SinkLost, match=r"fsync of jsonl file .*events\.jsonl failed \(Input/output"
    ):
        await sink.sync(sink.position())
    monkeypatch.undo()
    assert path.stat().st_size == sink_length(committed)  # a reader sees the committed lines only
    await sink.write("main", [event(4)])
    with pytest.raises(SinkLost):  # never again in this process: the bytes are gone
        await sink.sync(sink.position())
    assert path.stat().st_size == sink_length(committed)
    await sink.close()
    # The restart: from the committed position, the stream replays 2 and 3 (and 4).
    again = JsonlSink(path, fsync=True)
    await again.open(committed)
    await again.write("main", [event(2), event(3), event(4)])
    await again.sync(again.position())
    await again.close()
    assert read_lines(path) == [event(i).raw for i in (1, 2, 3, 4)]


def fsync_failing_once(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """os.fsync fails the first time it is called, once ``release`` (returned) is set; then
    succeeds: Linux reports a writeback error once per open file and marks the pages clean."""
    release, real, calls = threading.Event(), os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            assert release.wait(10)
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return release


async def committed_then_more(path: Path) -> tuple[JsonlSink, str]:
    sink = JsonlSink(path, fsync=True)
    await sink.open(None)
    await sink.write("main", [event(1)])
    committed = sink.position()
    assert committed is not None
    await sink.sync(committed)
    await sink.write("main", [event(2), event(3)])
    return sink, committed


@pytest.mark.parametrize("next_sync", ["after it failed", "queued behind it"])
async def test_an_fsync_failing_after_its_sync_was_cancelled_still_stops_the_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, next_sync: str
) -> None:
    # A sync cancelled while its fsync runs (a stream stopped within its grace) drops the
    # error with its future, and the next fsync of the file returns 0: the next sync, whether
    # it starts once that fsync has failed or already waits for the fsync lock, must not call
    # the lines written since the commit durable.
    path = tmp_path / "events.jsonl"
    sink, committed = await committed_then_more(path)
    release = fsync_failing_once(monkeypatch)
    held = Held(sink, "_fsync_files")
    first = asyncio.create_task(sink.sync(sink.position()))
    await held.reached()
    held.release.set()  # into the fsync, which waits for `release`
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    if next_sync == "queued behind it":
        second = asyncio.create_task(sink.sync(sink.position()))
        release.set()
    else:
        release.set()
        await wait_until(held.done.is_set, timeout=10)  # the fsync failed, unawaited
        second = asyncio.create_task(sink.sync(sink.position()))
    with pytest.raises(SinkLost, match=r"fsync of jsonl file .*events\.jsonl failed"):
        async with asyncio.timeout(10):
            await second
    assert path.stat().st_size == sink_length(committed)
    await sink.close()


async def test_lines_waiting_for_a_slow_commit_go_to_the_file_not_the_heap(
    sink: JsonlSink,
) -> None:
    # A commit waits on the disk while events go on: their lines used to stay in memory until
    # the next commit (megabytes in a catch-up). Past WRITE_OUT_BYTES they are written out.
    fsync = Held(sink, "_fsync_files")
    await sink.write("main", [event(0)])
    first = sink.position()
    commit = asyncio.create_task(sink.sync(first))
    try:
        await fsync.reached()
        events = [event(i, pad="x" * 1000) for i in range(1, 3001)]  # about 3 MB of lines
        for i in range(0, len(events), 100):
            await sink.write("main", events[i : i + 100])
        position = sink.position()
        assert position is not None

        def held() -> int:
            return sum(len(p) for f in sink._files for p in f.parts)

        # The write-outs reach the file while the fsync waits: the heap keeps less than one.
        await wait_until(lambda: held() < WRITE_OUT_BYTES and sink._writer is None)
        assert sink.path.stat().st_size == sink_length(position) - held()
        assert not commit.done()
    finally:
        fsync.release.set()
    async with asyncio.timeout(10):
        await commit
    await sink.sync(position)
    assert read_lines(sink.path) == [e.raw for e in [event(0), *events]]


async def test_a_write_waits_while_the_disk_is_a_write_out_behind(sink: JsonlSink) -> None:
    # A write-out that the disk holds up: one more write-out's worth may gather behind it,
    # then the writes wait for it (what the disk cannot take stays unread, not in the heap).
    held = Held(sink, "_write")

    # Batches of 0.6 x WRITE_OUT_BYTES: the second starts a write-out (held), two more
    # gather behind it (1.2 x, short of a write-out's worth more), the fifth waits.
    n = int(0.6 * WRITE_OUT_BYTES) // len(line_bytes(event(0, pad="x" * 1000)))

    def batch(k: int) -> list[Event]:
        return [event(i, pad="x" * 1000) for i in range(k * n, (k + 1) * n)]

    try:
        for k in (0, 1):
            await sink.write("main", batch(k))
        await held.reached()
        await sink.write("main", batch(2))
        await sink.write("main", batch(3))

        async def third() -> bool:
            await sink.write("main", batch(4))
            return held.done.is_set()

        waiting = asyncio.create_task(third())
    finally:
        held.release.set()
    async with asyncio.timeout(10):
        assert await waiting  # it went on only once the held write-out had landed
    await sink.sync(sink.position())
    assert read_lines(sink.path) == [e.raw for k in range(5) for e in batch(k)]


async def test_close_waits_for_a_write_out_under_way(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path, fsync=False)
    await sink.open(None)
    await sink.write("main", [event(i, pad="x" * 2000) for i in range(600)])  # > 1 MiB
    size = sink_length(sink.position())
    assert size >= WRITE_OUT_BYTES
    await sink.close()  # no sync: the write-out started by write() finished, nothing leaked
    assert path.stat().st_size == size


async def renamed_mid_catch_up(tmp_path: Path, *, heard: bool) -> tuple[JsonlSink, Path, int]:
    """A sink that committed its first lines (``heard``: and heard so), then handed a write-out
    of lines no commit covers to the file, which logrotate's create mode then renamed
    (a new empty file at the path). Returns the sink, the renamed file, the committed length."""
    path, rotated = tmp_path / "e.jsonl", tmp_path / "e.jsonl.1"
    s = JsonlSink(path)
    await s.open(None)
    await s.write("main", [event(0), event(1)])
    first = s.position()
    assert first is not None
    await s.sync(first)
    if heard:
        s.committed(first)
    n = WRITE_OUT_BYTES // len(line_bytes(event(2, pad="x" * 1000))) + 1
    await s.write("main", [event(i, pad="x" * 1000) for i in range(2, 2 + n)])
    await wait_until(lambda: s._writer is None)  # the write-out between commits is done
    assert path.stat().st_size > sink_length(first)
    path.rename(rotated)
    path.touch()
    return s, rotated, sink_length(first)


@pytest.mark.parametrize("heard", [True, False])
async def test_a_file_renamed_while_running_keeps_no_uncommitted_line_in_it(
    tmp_path: Path, heard: bool
) -> None:
    """logrotate's create mode renames the file while lines no commit covers were already
    handed to it (a write-out between commits): the sink stops, and its restart replays their
    events into the new file. Left in the renamed file too, they were there twice. The sink
    cuts its own open file (by descriptor) back to what a commit may cover before it stops:
    the committed length, also when the commit's success was not heard (its sync succeeded:
    it may have landed), never below it."""
    s, rotated, length = await renamed_mid_catch_up(tmp_path, heard=heard)
    try:
        await s.write("main", [event(99)])
        with pytest.raises(SinkUnusable, match="removed or replaced"):
            await s.sync(s.position())
        assert rotated.stat().st_size == length
        assert read_lines(rotated) == [event(0).raw, event(1).raw]
        assert s.path.read_bytes() == b""  # the new file is not touched
        with pytest.raises(SinkUnusable, match="removed or replaced"):  # and it stays stopped
            await s.sync(None)
    finally:
        await s.close()
    assert rotated.stat().st_size == length


async def test_a_rename_met_by_a_write_out_between_commits_stops_the_next_sync(
    tmp_path: Path,
) -> None:
    """The rename is met by a write-out between commits (not by a sync): it cuts there, and
    the next sync, even one to a position already on disk, refuses, so that no commit covers
    what was cut."""
    s, rotated, length = await renamed_mid_catch_up(tmp_path, heard=True)
    try:
        covered = s.position()
        n = WRITE_OUT_BYTES // len(line_bytes(event(0, pad="y" * 1000))) + 1
        await s.write("main", [event(i, pad="y" * 1000) for i in range(5000, 5000 + n)])
        await wait_until(lambda: s._writer is None)  # met the rename, cut, logged
        assert rotated.stat().st_size == length
        with pytest.raises(SinkUnusable, match="removed or replaced"):
            await s.sync(covered)
    finally:
        await s.close()
    assert read_lines(rotated) == [event(0).raw, event(1).raw]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ENOSPC, TransientSinkError),
        (errno.EDQUOT, TransientSinkError),
        (errno.EIO, TransientSinkError),
        (errno.EACCES, SinkUnusable),
        (errno.EROFS, SinkUnusable),
    ],
)
async def test_a_full_disk_at_open_is_retriable_not_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, expected: type[Exception]
) -> None:
    """A full disk (no inode for the new file), a quota or a failing device at start may clear
    by itself: exit 1, which systemd restarts, not 78 (never restarted) blaming sink.path."""
    path = tmp_path / "e.jsonl"
    real = os.open

    def failing(file: Any, flags: int, *args: Any, **kw: Any) -> int:
        if os.fspath(file) == str(path) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real(file, flags, *args, **kw)

    monkeypatch.setattr(os, "open", failing)
    s = JsonlSink(path)
    with pytest.raises(expected) as caught:
        await s.open(None)
    assert not isinstance(caught.value, SinkUnusable) or expected is SinkUnusable
    if expected is TransientSinkError:
        assert "free disk space or fix the device" in str(caught.value)
    else:
        assert "check sink.path" in str(caught.value)
