"""JSON Lines sink: one line per event, the ``newEvent`` object as received.

Exactly-once across ``kill -9``: lines are appended to an in-memory buffer, handed to the OS
(``pwritev``, no fsync) at each commit and whenever half a megabyte has gathered, so that the
lines done while a commit waits on the disk wait in the page cache, not in the heap (a write
waits while the disk is a write-out behind). The committer has the file fsynced, then records
its length in the same SQLite transaction as the checkpoint. On start the file is cut back to
the committed length, which removes lines the checkpoint does not cover (those events are
replayed).

A failed write leaves its bytes in the buffer (the file is cut back, the commit is retried). A
failed fsync cannot be retried: the bytes written since the last one are no longer in memory,
and after such a failure the kernel may have dropped them from its cache too (and reports it
once: a second fsync returns 0). The file is cut to the durable length and
:class:`~consumer.errors.SinkLost` ends the daemon (exit 1): the restart replays those events
from the checkpoint. The failure is recorded by the thread that met it, so a sync cancelled
meanwhile (a stream stopped within its grace) cannot drop it; a rotated file's failed directory
fsync is final the same way.

It never cuts bytes it cannot prove uncommitted: a non-empty file that the state store has no
length for (a new or replaced state store) stops the start (:class:`~consumer.errors.
SinkUnusable`, exit 78) until an operator moves the file aside or adopts it
(``opera-consumer sink adopt``). The position names its file, ``{"path", "length", "ino"}``:
the configured path (its directory's links resolved) and the file's inode (not the device
number, which a remount may change). A position recorded for another path (sink.path changed,
then set back) or another file (moved aside, replaced) is as none: its length means nothing
for this file, so it cuts nothing, and a file with lines is refused the same way. A plain
number (the format before) is still the configured path's length. A start anywhere else than
the committed position (a new file, one moved aside or shortened at a line's end between runs)
is recorded before the first write (``open_sink``): a crash before the first commit cuts back
to it, not to the old length. A start position that is not a line's end (the file shortened in
place inside a line, another copy restored over it) is not one the sink committed: refused
(exit 78), nothing cut or written, rather than a new line glued to the half one. While
running, each sync checks that the path still names the open file and that it did not
shrink, so a file rotated, truncated or removed underneath stops the daemon instead of writing
NUL bytes or into a deleted file. Renamed or removed, the open file is first cut (by its
descriptor) back to what a commit may cover: the restart replays the rest into the new file, and
the renamed one must not hold them too.

A state store older than the file (an older backup of it restored, its last commits lost) holds
a shorter committed length for the same file, and cutting back to it would delete committed
lines. The sink keeps its own record of the last position it heard committed, beside the file:
``<path>.committed`` (with rotation one for the series, beside the configured path), a fixed
small record ``{"seq", "length", "ino"}`` written over itself (one pwrite, no fsync: it only
needs never to be past the truth) after each commit the committer reports (:meth:`JsonlSink.
committed`) and at open (the start position: the committed one, or one ``open_sink`` records
next that is never past it in the same file). On start, a record of the same file (its inode;
with rotation its number) past the committed position, where the start would cut or delete
bytes below it, refuses the start (exit 78): nothing cut or deleted; ``sink adopt`` (which
brings the record to what it records) or the file moved aside are the ways on. A record of
another inode (the file replaced), or one that cannot be read (outside data: read a few dozen
bytes at most), is as none, the latter with a warning.

Rotation (optional, :mod:`consumer.core.rotation` names the files): the position becomes
(file, length) as JSON, ``{"file", "seq", "length", "started", "path", "ino"}``, its path the
configured one (the series'); no ``ino`` when the file a rotation started is created by the
sync after the position was taken (its name, within the series, names it). A plain length is
the configured path's (without rotation, and before it). A write that makes a
new file due starts it in the buffer; the next write-out creates it (``O_EXCL``) and fsyncs the
directory before writing into it, so no byte of a file is committed before the file itself is
durable.
On start, the committed file is cut to the committed length and every file numbered after it
is deleted: the sink numbers each file it creates, so those were created after the last
commit and hold nothing it covers (a position of another series, or whose file is not the
one found, proves nothing of the kind: as none). Retention (at start, and after each commit
that passes a file, off the write path) deletes whole files numbered before the committed one
only (fully committed), never the current or the committed file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, NoReturn, TypeGuard

import orjson
import structlog

from ..core.events import Event
from ..core.printable import printable
from ..core.records import Staged
from ..core.rotation import SEQ_DIGITS, PatternError, Rotation
from ..errors import SinkLost, SinkUnusable, TransientSinkError
from ..files import DISK_FIX, identity, identity_at, make_dirs, may_clear
from .base import serialized

log = structlog.get_logger(__name__)

ADOPT_HINT = (
    "move the file aside (the stream then replays into a new one), or run "
    "`opera-consumer sink adopt --execute` to record its length as committed and its events' "
    "uniqueEventIds as processed (a replay of them is skipped)"
)
_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))  # buffers per pwritev call (-1: no limit said)
_RETAIN_EVERY_S = 3600.0  # keep_days: looked at again this often even without a rotation
# Buffered lines handed to the OS between commits once they reach this: what waits for a slow
# commit waits in the page cache, not in the heap (about 700 lines of 725 bytes; 1 MiB held
# 0.5 MB more at the peak of a catch-up behind a busy disk, for half the write-outs).
WRITE_OUT_BYTES = 1 << 19
_WHOLE = 1 << 62  # File.committable of a file a newer committed position follows
HEARD_SUFFIX = ".committed"  # the record of the last position heard committed: <path>.committed
# Its fixed size: one JSON object of three counts (at most 85 bytes), spaces, a newline. Always
# written whole at offset 0, so a shorter record never leaves a longer one's tail behind.
_HEARD_BYTES = 96
OLDER_HINT = (
    "run `opera-consumer sink adopt --execute` to record the file's length as committed and "
    "its events' uniqueEventIds as processed (the events the older checkpoint replays are "
    "skipped, not written twice), or move the file aside (the stream then replays into a new "
    "one)"
)


class _Committed(NamedTuple):
    file: str | None  # None: a plain length, of the configured path
    seq: int
    length: int
    started: int | None
    # The sink it was recorded for (the configured path, its directory's links resolved) and
    # the inode of the file it names: None in a position from before they were recorded.
    where: str | None = None
    ino: int | None = None
    # The rotate_name its series was named by then: None in a position from before it was.
    pattern: str | None = None


class _Heard(NamedTuple):
    """The sink's record of the last position it heard committed: ``length`` bytes of the
    file numbered ``seq`` (0: the configured path), whose inode is ``ino`` (0: no file)."""

    seq: int
    length: int
    ino: int


@dataclass(slots=True, eq=False)
class _File:
    """A file of the sink: the open one, or one a rotation started (created by the sync)."""

    name: str
    seq: int
    started: int
    durable: int = 0  # bytes on disk that a checkpoint may cover (fsynced)
    # The most of it a checkpoint may cover: its length at open, raised by each position a
    # sync succeeded for (its commit may land, even one whose failure was unsure) and each
    # heard committed. Past it, bytes are provably uncommitted (a cut never goes below it).
    committable: int = 0
    written: int = 0  # bytes handed to the OS (>= durable); the buffer follows them
    parts: list[bytes] = field(default_factory=list)  # buffered, not written yet
    buffered: int = 0
    fd: int | None = None
    identity: tuple[int, int] = (0, 0)
    dir_synced: bool = True  # False: created (or to be) and its directory entry not fsynced


class JsonlSink:
    name = "jsonl"
    waits = False

    def __init__(
        self,
        path: Path,
        *,
        fsync: bool = True,
        rotation: Rotation | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._dir = path.parent
        self._fsync = fsync
        self._rotation = rotation
        self._clock = clock
        self._files: list[_File] = []  # [0]: written to; after it, files a rotation started
        self._tail = _File(path.name, 0, 0)  # where the next write goes (the last of _files)
        self._next_seq = 1
        self._committed_seq = 0  # files numbered below it are fully committed
        # A plain committed length (from before rotation): no rotation until a commit has
        # recorded (file, length), so a file numbered after it is always provably newer.
        self._hold = False
        self._retained: tuple[int, float] = (-1, 0.0)  # (committed seq, time) of the last run
        self._retaining: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one sync at a time
        self._writing = asyncio.Lock()  # one write-out at a time, in order
        self._writer: asyncio.Task[None] | None = None  # a write-out between commits
        self._writing_out = 0  # bytes of the write-out under way (still buffered until done)
        self._write_failed = False  # no write-out between commits until a sync succeeds
        self._lost: str | None = None  # why written bytes can no longer be committed
        self._closed = False  # set by close(), read under _io
        # The threads' file work: writes (and creating, cutting, closing files) under _io,
        # fsyncs under _fsync_io, each held even after a cancel; a close takes both.
        self._io = threading.Lock()
        self._fsync_io = threading.Lock()
        self._dry = False  # check(): open's decisions only, nothing created, cut or removed
        # Why the open file is no longer the path's (renamed, removed underneath; set by the
        # write-out that found it, which cut it back to what a checkpoint may cover): no sync
        # succeeds after it. Under _gone_lock with the files' `committable`, so that a sync
        # either raises it first or the cut keeps its position.
        self._gone: str | None = None
        self._gone_lock = threading.Lock()
        self._where = ""  # the path positions are recorded for (set by open)
        # The record of the last position heard committed (see the module's docstring): as
        # read at open (None: none, or unreadable), and its descriptor, kept open to write it.
        self._heard_path = heard_path(path)
        self._heard: _Heard | None = None
        self._heard_fd: int | None = None
        self._heard_failed = False  # its last write failed (said once)

    @property
    def current(self) -> Path:
        """The file the sink writes to now."""
        return self._dir / (self._files[0].name if self._files else self.path.name)

    # --- start: restore the committed position ------------------------------------------------

    async def open(self, committed: str | None) -> None:
        try:
            await self._open(committed)
        except OSError as exc:
            if may_clear(exc):  # a full disk, a failing device: a restart may go on (exit 1)
                raise TransientSinkError(
                    f"jsonl sink: cannot open {printable(exc.filename or self.path)}: "
                    f"{exc.strerror or exc} -> {DISK_FIX}"
                ) from None
            # A directory where the file is, no permission, a read-only disk: an operator's.
            raise SinkUnusable(
                f"jsonl sink: cannot open {printable(exc.filename or self.path)}: "
                f"{exc.strerror or exc} -> check sink.path ({printable(self.path)}): a file "
                "whose directory the daemon's user may create and write to"
            ) from None

    async def check(self, committed: str | None) -> None:
        """What :meth:`open` would refuse (:class:`SinkUnusable`), deciding as it does but
        changing nothing: no file or directory created, cut or removed (for preflight). The
        sink is not usable afterwards."""
        self._dry = True
        try:
            await self.open(committed)
        except TransientSinkError as exc:  # the disk's: still what would stop the start
            raise SinkUnusable(str(exc)) from None

    async def _open(self, committed: str | None) -> None:
        if not self._dry:
            make_dirs(self._dir)
        self._where = _where(self.path)
        c = _parse(committed, self.path)
        self._heard = _read_heard(self._heard_path)
        foreign = None
        if c is not None and c.where is not None and c.where != self._where:
            # Recorded for another sink.path (changed, then set back): its length and its
            # numbers mean nothing here. As if there were none: nothing is cut or deleted.
            foreign = (
                f"the state store's committed position is of {printable(c.where, 300)}, not "
                f"of {printable(self._where, 300)}"
            )
            c = None
        if self._rotation is None:
            if c is not None and c.file is not None and c.file != self.path.name:
                raise SinkUnusable(
                    f"the state store's committed position is in the rotated jsonl file "
                    f"{printable(self._dir / c.file)}, but no rotation is configured: set the "
                    "rotation keys again, or (after a clean stop) run `opera-consumer sink adopt` "
                    f"without them to continue in {self.path}"
                )
            head = self._open_file(self.path.name, 0, 0, c, foreign)
        else:
            head = self._open_rotated(self._rotation, c, foreign)
        self._files = [head]
        self._tail = head
        self._next_seq = max(self._next_seq, head.seq + 1)
        if self._dry:
            return
        # The record is brought to the start position at once: the committed one, or one that
        # open_sink records next and that is never past it in the same file (a shorter file's
        # end, 0 in a new one), so it is never past the state store's, even if this start ends
        # before that (and a record of a removed file must not outlive it: its inode may be
        # reused by the next one).
        self._heard_fd = _open_heard(self._heard_path)
        self._hear(_parse(self.position(), self.path))
        if self._rotation is not None and self._rotation.retains:
            self._retain(self._clock(), head.seq)

    def _open_rotated(self, rot: Rotation, c: _Committed | None, foreign: str | None) -> _File:
        ours = _scan(self._dir, rot)
        now = self._clock()
        if c is not None and c.file is not None:
            if not _numbered(c.file, c.seq, self.path, rot.suffix):
                # Never cut a file the series does not name (the state store's copy is not
                # trusted): the path itself is file 0, any other carries its number.
                raise SinkUnusable(
                    f"jsonl file {printable(self._dir / c.file)}: the state store's committed "
                    f"position names a file that is not one of the series (number {c.seq}): "
                    f"{ADOPT_HINT}"
                )
            if c.ino is not None and _ino(self._dir / c.file) != c.ino:
                # Not the file the position was recorded in (gone, or another one by that
                # name): its number proves nothing about the files after it.
                foreign = (
                    f"the state store's committed position is of a file {printable(c.file)} "
                    "that is not the one there"
                )
                c = None
        if c is None or c.file is None:
            # No position of a rotated file: none of them can be proven uncommitted.
            full = [n for _, n in ours if _size(self._dir / n)]
            if c is None and _size(self.path):
                full.insert(0, self.path.name)
            if full:
                what = (
                    foreign
                    if foreign is not None
                    else "the state store has no committed position for them"
                    if c is None
                    else f"the state store's committed position is a length of {self.path} "
                    "alone, from before them"
                )
                raise SinkUnusable(
                    f"jsonl files in {self._dir} hold bytes ({', '.join(full[:3])}"
                    f"{', ...' if len(full) > 3 else ''}), but {what}, so none of them can be "
                    f"proven uncommitted: move them aside (the stream then replays into new "
                    f"files), or run `opera-consumer sink adopt --execute` to record the "
                    "newest's length as committed and their events' uniqueEventIds as "
                    "processed (a replay of them is skipped)"
                )
            self._next_seq = max((s for s, _ in ours), default=0) + 1
            if c is not None:  # the configured path goes on as file 0 until a commit
                self._hold = True
                return self._open_file(self.path.name, 0, rot.started_at(now), c)
            seq = self._next_seq
            started = rot.started_at(now)
            # None: a file of that name made by anyone else stops the start, it is not emptied.
            return self._open_file(rot.name(seq, started), seq, started, None, foreign)
        self._refuse_heard_past(c, ours)  # before anything is deleted or cut
        if c.pattern is not None and c.pattern != rot.pattern:
            # rotate_name changed since that commit: the files made after it under the name
            # it had are this series' too, and as uncommitted (left, their events came twice).
            with contextlib.suppress(PatternError):
                named = {n for _, n in ours}
                ours = ours + [
                    f for f in _scan(self._dir, Rotation(c.pattern, max_bytes=1))
                    if f[1] not in named
                ]  # fmt: skip
        newer = sorted(((s, n) for s, n in ours if s > c.seq and n != c.file), reverse=True)
        for _, name in [] if self._dry else newer:
            # Numbered after the committed file: created after the last commit.
            size = _size(self._dir / name)
            os.unlink(self._dir / name)
            log.info("removed uncommitted rotated jsonl file", file=name, bytes=size)
        if newer and self._fsync and not self._dry:
            _fsync_dir(self._dir)
        self._committed_seq = c.seq
        started = c.started if c.started is not None else rot.started_at(now)
        return self._open_file(c.file, c.seq, started, c)

    def _open_file(
        self, name: str, seq: int, started: int, c: _Committed | None, why: str | None = None
    ) -> _File:
        """The file ``name``, cut to the committed length of ``c`` when it is the file ``c``
        was recorded in (``why``: why there is no ``c``)."""
        path = self._dir / name
        if self._dry:
            try:  # refused as below (a link: ELOOP)
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                return _File(name, seq, started, self._committed_length(path, seq, c, None, why))
            try:
                length = self._committed_length(path, seq, c, fd, why)
            finally:
                os.close(fd)
            return _File(name, seq, started, length)
        created = False
        try:
            # O_NOFOLLOW: never cut the target of a link someone put there
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            fd = os.open(
                path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640
            )
            created = True
        try:
            size = os.fstat(fd).st_size
            length = self._committed_length(path, seq, c, fd, why)
            if size > length:
                # Lines written after the last checkpoint: their events will be replayed.
                os.ftruncate(fd, length)
                os.fsync(fd)
                log.info("cut uncommitted tail of jsonl file", path=str(path), bytes=size - length)
            if created and self._fsync:
                _fsync_dir(self._dir)  # a position naming it is recorded before any write
        except BaseException:
            os.close(fd)
            raise
        return _File(
            name,
            seq,
            started,
            durable=length,
            written=length,
            committable=length,
            fd=fd,
            identity=identity(os.fstat(fd)),
        )

    def _committed_length(
        self, path: Path, seq: int, c: _Committed | None, fd: int | None, why: str | None
    ) -> int:
        """Where the sink goes on in the file numbered ``seq``, open as ``fd`` (None: there is
        none)."""
        st = None if fd is None else os.fstat(fd)
        size = 0 if st is None else st.st_size
        if c is not None and c.ino is not None and (st is None or st.st_ino != c.ino):
            # Not the file the length was recorded for (moved aside, replaced): it means
            # nothing here, and must never cut this one.
            why = "the state store's committed length is of another file than the one there"
            c = None
        if c is None:
            if size:
                raise SinkUnusable(
                    f"jsonl file {path} holds {size} bytes, but "
                    f"{why or 'the state store has no committed length for it'}, so none of "
                    f"them can be proven uncommitted: {ADOPT_HINT}"
                )
            if why is not None:
                log.warning("jsonl file is not the committed one; starting it at 0", path=str(path))
            return 0
        if st is not None:
            self._refuse_heard_in(path, seq, st, c.length)
        length = min(size, c.length)
        if length and fd is not None and os.pread(fd, 1, length - 1) != b"\n":
            # The sink commits at a line's end only: this is not what it committed (shortened
            # in place inside a line, another copy restored over it). Going on would glue the
            # next line to the half one; cutting back to the last whole line, or ending the
            # half one, would delete or garble committed bytes, the loss unseen. An operator's.
            self._torn(path, size, c.length)
        if size < c.length:
            # Shortened or removed between runs at a line's end (lines shipped away by hand, an
            # older copy restored): nothing of ours to cut; append after what is there.
            log.warning(
                "jsonl file is shorter than the committed length; was it moved or truncated? "
                "the committed lines cut off are not written again",
                path=str(path),
                size=size,
                committed=c.length,
            )
        return length

    def _torn(self, path: Path, size: int, committed: int) -> NoReturn:
        """Refuse a start that is not at a line's end, saying what was found and the ways on."""
        sink = f"sink.path {printable(self.path)}"
        what = sink if path == self.path else f"jsonl file {printable(path)} (of {sink})"
        adopt = (
            "`opera-consumer sink adopt --execute` to take the file as it is up to its last "
            "complete line as committed (the bytes after it are cut"
        )
        if size < committed:
            raise SinkUnusable(
                f"{what} holds {size} bytes, shorter than the "
                f"{committed} bytes committed, and ends inside a line: shortened in place "
                "between runs (truncate -s, an older copy restored over it with cp). Nothing "
                "is cut or written: appending would glue the next event to that half line, and "
                f"the committed lines that were after it are gone. Restore the file (at least "
                f"{committed} bytes: the start cuts it back to the committed length), or run "
                f"{adopt}; the events cut off are not written again: they are recorded as "
                "processed), then restart"
            )
        raise SinkUnusable(
            f"{what} holds {size} bytes, and the {committed} "
            "bytes committed end inside a line: not the file that was committed (another copy "
            "restored over it). Nothing is cut or written: cut there, it would end in a half "
            "line, the next event glued to it. Restore the file that was committed, or run "
            f"{adopt}), then restart"
        )

    def _refuse_heard_in(self, path: Path, seq: int, st: os.stat_result, committed: int) -> None:
        """Refuse the start when the sink heard more of this file (``path``, numbered ``seq``)
        committed than the state store's ``committed`` length, and cutting to that would cut
        some of it: the state store is older than what the sink committed."""
        h = self._heard
        if h is None or h.seq != seq or h.ino != st.st_ino:
            return  # none, or of another file (replaced since: another inode)
        heard = min(h.length, st.st_size)  # what of it is there (fsync = false: maybe less)
        if heard <= committed:
            return  # behind (a kill -9 before it was written) or equal: the cut is as ever
        raise SinkUnusable(
            f"jsonl file {printable(path)} holds {st.st_size} bytes and the state store's "
            f"committed length is {committed}, but the sink heard {h.length} bytes of it "
            f"committed (its record {printable(self._heard_path)}): the state store looks "
            "older than the file (restored from an older backup? its last commits lost?), and "
            f"the start would cut {heard - committed} committed bytes. Nothing is cut or "
            f"written: {OLDER_HINT}"
        )

    def _refuse_heard_past(self, c: _Committed, ours: list[tuple[int, str]]) -> None:
        """With rotation, before anything is deleted or cut: refuse the start when the sink
        heard a position committed past ``c`` (the state store's) in a file still there, and
        the start would delete or cut some of what it covers."""
        h = self._heard
        assert c.file is not None
        if h is None or h.seq < c.seq:
            return
        if h.seq == c.seq:
            try:
                st = os.stat(self._dir / c.file, follow_symlinks=False)
            except FileNotFoundError:
                return
            self._refuse_heard_in(self._dir / c.file, c.seq, st, c.length)
            return
        heard = [n for s, n in ours if s == h.seq and _ino(self._dir / n) == h.ino]
        if not heard:
            return  # its file gone or replaced: it proves nothing
        # What the heard position covers: the committed file's end, the files numbered between
        # (whole), and the heard one up to its length. The start would cut or delete them all.
        cut = max(0, _size(self._dir / c.file) - c.length)
        between = [n for s, n in sorted(ours) if c.seq < s < h.seq and _size(self._dir / n)]
        if not (cut or between or min(h.length, _size(self._dir / heard[0]))):
            return
        raise SinkUnusable(
            f"jsonl file {printable(self._dir / heard[0])} (of sink.path "
            f"{printable(self.path)}) was heard committed up to {h.length} bytes (the sink's "
            f"record {printable(self._heard_path)}), but the state store's committed "
            f"position is {c.length} bytes of {printable(c.file)}, numbered before it: the "
            "state store looks older than the files (restored from an older backup? its last "
            "commits lost?), and the start would delete the files numbered after that one "
            f"({len(between) + 1} holding committed lines) and cut {cut} committed bytes of "
            "it. Nothing is deleted, cut or written: run `opera-consumer sink adopt --execute` "
            "to record the newest file's length as committed and every file's events' "
            "uniqueEventIds as processed (the events the older checkpoint replays are skipped, "
            "not written twice), or move the files aside (the stream then replays into new ones)"
        )

    # --- running --------------------------------------------------------------------------------

    def _check(self, f: _File) -> None:
        assert f.fd is not None
        fault = self._fault(f, f.fd)
        if fault is None:
            return
        path, (what, size) = self._dir / f.name, fault
        if what == "gone":
            raise SinkUnusable(self._cut_gone(f, path, size))
        raise SinkUnusable(
            f"jsonl file {path} shrank to {size} bytes below the {f.durable} committed "
            f"while the daemon wrote to it: restore it, or {ADOPT_HINT}, then restart"
        )

    def _fault(self, f: _File, fd: int) -> tuple[Literal["gone", "shrank"], int] | None:
        """What is wrong with the open file ``f`` (``fd``), and its size: its path names
        another file or none, or it was unlinked (gone); it is shorter than what was synced
        (shrank). Reads only: safe beside a write-out."""
        mine = os.fstat(fd)
        if identity_at(self._dir / f.name) != f.identity or mine.st_nlink == 0:
            return "gone", mine.st_size
        if mine.st_size < f.durable:
            return "shrank", mine.st_size
        return None

    def _cut_gone(self, f: _File, path: Path, size: int) -> str:
        """The path no longer names the open file ``f`` (renamed by logrotate's create mode,
        its directory moved, removed): the daemon stops, and its restart replays what no
        checkpoint covers into the file the path names then. What of it was written to ``f``
        since the last commit would stay in the renamed file too (twice): cut ``f`` (by its
        descriptor: the sink's own open inode, whatever its name now) back to what a
        checkpoint may cover, and fsync. Never below it. Returns why the sink stops."""
        assert f.fd is not None
        with self._gone_lock:
            keep = f.committable
            gone = self._gone = (
                f"jsonl file {path} was removed or replaced (renamed, its directory moved) "
                "while the daemon wrote to it (external rotation is not supported: see the "
                "rotate_* keys; its uncommitted lines are cut off the file it wrote): restart the "
                "daemon; events not yet committed are replayed into the file the path names then"
            )
        if size <= keep:
            return gone
        try:
            os.ftruncate(f.fd, keep)
            os.fsync(f.fd)
        except OSError as exc:
            return (
                f"{gone} (cutting the {size - keep} uncommitted bytes off the file it wrote "
                f"failed: {exc.strerror or exc}; their events will be in it and again in the "
                "new file)"
            )
        log.warning(
            "jsonl file renamed or removed underneath; cut its uncommitted tail",
            path=str(path),
            bytes=size - keep,
            committed=keep,
        )
        return gone

    def _may_commit(self, position: str | None) -> None:
        """``position`` may become committed (a sync to it succeeded, or it was heard
        committed): what of each open file it covers must never be cut. Raises what stopped
        the sink if it did meanwhile (then no commit may follow)."""
        c = None if position is None else _parse(position, self.path)
        with self._gone_lock:
            if self._gone is not None:
                raise SinkUnusable(self._gone)
            for f in [] if c is None else self._files:
                assert c is not None
                if self._rotation is not None and f.seq < c.seq:
                    f.committable = _WHOLE  # a newer file is named: all of this one is before
                elif self._rotation is None or f.seq == c.seq:
                    f.committable = max(f.committable, c.length)

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        # The disk is behind (a write-out under way, another one's worth buffered after it):
        # wait for it, so that what the disk cannot take yet waits unread, not in the heap.
        while (
            self._writer is not None and self._tail.buffered - self._writing_out >= WRITE_OUT_BYTES
        ):
            await asyncio.wait([self._writer])
        # No await from here: the position() snapshot must cover exactly the writes that
        # returned. One line each: the text as received is (protocol's fast path), and
        # orjson's is.
        lines = [serialized(ev, "jsonl") for ev in events]
        lines.append(b"")  # the last line's newline, in the one copy join makes
        data = b"\n".join(lines)
        tail = self._tail
        if self._rotation is not None and data and not self._hold:
            started = self._rotation.due(
                tail.written + tail.buffered, len(data), tail.started, self._clock
            )
            if started is not None:
                tail = self._start_file(self._rotation, started)
        tail.parts.append(data)
        tail.buffered += len(data)
        if tail.buffered >= WRITE_OUT_BYTES and not self._write_failed and self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_out_between())

    def _start_file(self, rot: Rotation, started: int) -> _File:
        """The next file, in the buffer only: a write-out creates it before writing into it."""
        seq = self._next_seq
        self._next_seq += 1
        f = _File(rot.name(seq, started), seq, started, dir_synced=False)
        self._files.append(f)
        self._tail = f
        return f

    def position(self) -> str | None:
        tail = self._tail
        length = tail.written + tail.buffered
        ino = tail.identity[1] or None  # None: a rotated file the next write-out creates
        if self._rotation is None:
            return _encode_plain(self._where, ino, length)
        return _encode(
            tail.name,
            tail.seq,
            length,
            tail.started,
            where=self._where,
            ino=ino,
            pattern=self._rotation.pattern,
        )

    def committed(self, position: str) -> None:
        with contextlib.suppress(SinkUnusable):  # stopped meanwhile: the next sync says so
            self._may_commit(position)
        c = _parse(position, self.path)
        self._hear(c)
        if self._rotation is None or c is None or c.file is None:
            return
        self._hold = False
        self._committed_seq = max(self._committed_seq, c.seq)
        last_seq, last_at = self._retained
        if not self._rotation.retains or (self._retaining and not self._retaining.done()):
            return
        if self._committed_seq != last_seq or self._clock() - last_at >= _RETAIN_EVERY_S:
            self._retaining = asyncio.get_running_loop().create_task(self._retain_soon())

    def _hear(self, c: _Committed | None) -> None:
        """The record of the last position heard committed, brought to ``c``: one pwrite of
        a few dozen bytes over it, no fsync (it only needs never to be past the state
        store's), on the event loop (a copy into the page cache)."""
        fd = self._heard_fd
        if fd is None or c is None:
            return
        f = next((f for f in self._files if f.seq == c.seq), None)
        ino = 0 if f is None else f.identity[1]
        if not ino or (c.ino is not None and c.ino != ino):
            return  # not a file of this run (closed meanwhile): the record stays behind
        record = _heard_record(c.seq, c.length, ino)
        try:
            if os.pwrite(fd, record, 0) != len(record):
                raise OSError(errno.EIO, "short write")
        except OSError as exc:
            if not self._heard_failed:  # said once, until a write succeeds again
                log.warning(
                    "cannot write the jsonl sink's record of its last commit; it stays behind",
                    path=printable(self._heard_path),
                    error=exc.strerror or str(exc),
                )
            self._heard_failed = True
            return
        self._heard_failed = False

    async def _retain_soon(self) -> None:
        """Retention off the event loop and off the write path: syncs go on meanwhile (they
        never touch a file numbered below the committed one, the only ones it deletes)."""
        try:
            while self._files:
                current = self._files[0].seq  # on disk: the files before it are finished
                await asyncio.to_thread(self._retain, self._clock(), current)
                if self._committed_seq == self._retained[0]:
                    return  # else it moved on meanwhile: once more
        except Exception:
            log.exception("jsonl retention failed; trying again after the next commit")

    async def sync(self, position: str | None) -> None:
        async with self._lock:
            await self._sync(position)
            # Only now may a commit cover it (one that fails after this may still have landed).
            self._may_commit(position)

    async def _sync(self, position: str | None) -> None:
        if self._lost is not None:
            await self._lose()
        if position is not None and self._covered(position):
            await asyncio.to_thread(self._check_open)  # on disk, but still where the path says?
            return
        try:
            await self._write_out()
        except SinkLost:  # a rotated file's directory entry not provably on disk
            await self._lose()
        # Everything written is fsynced (maybe more than the position covers: harmless).
        plan = [(f, f.written) for f in self._files if f.written > f.durable]
        try:
            await asyncio.to_thread(self._check_and_fsync, [f for f, _ in plan])
        except SinkLost:
            await self._lose()
        for f, written in plan:
            f.durable = written
        self._write_failed = False
        done = []
        while len(self._files) > 1 and self._files[1].fd is not None:
            head = self._files[0]
            if head.parts or head.durable < head.written:  # written meanwhile: next time
                break
            done.append(self._files.pop(0))  # a newer file exists: nothing more goes here
        if done:
            await asyncio.to_thread(self._close_files, done)

    async def _write_out_between(self) -> None:
        """A write-out between commits (see :data:`WRITE_OUT_BYTES`). A failure leaves the
        lines buffered; the next sync writes them again and reports it."""
        try:
            await self._write_out()
        except Exception as exc:
            self._write_failed = True
            log.warning("jsonl write-out failed; the next commit tries again", error=str(exc))
        finally:
            self._writer = None

    async def _write_out(self) -> None:
        """Hand every buffered line to the OS (no fsync), creating the files a rotation
        started. Only then are they dropped from memory: after a failure or a cancellation the
        next write-out writes the same bytes again at the same positions (pwritev), which is
        harmless."""
        async with self._writing:
            plan = [(f, f.parts[:], f.buffered) for f in self._files if f.buffered or f.fd is None]
            if not plan:
                return
            self._writing_out = sum(size for _, _, size in plan)
            try:
                await asyncio.to_thread(self._write, plan)
            finally:
                self._writing_out = 0
            for f, parts, size in plan:
                del f.parts[: len(parts)]
                f.buffered -= size
                f.written += size

    async def _lose(self) -> NoReturn:
        """After a failed fsync (``_lost``): what was written since the last one is neither
        provably on disk nor in memory to write again. Cut it (a reader never sees what no
        checkpoint will cover; again at each call, harmless) and stop for good: the restart
        replays those events."""
        assert self._lost is not None
        self._write_failed = True
        await asyncio.to_thread(self._cut, list(self._files))
        raise SinkLost(self._lost)

    def _covered(self, position: str) -> bool:
        """Whether a position is on disk already (then nothing needs writing)."""
        head = self._files[0]
        c = _parse(position, self.path)
        assert c is not None
        if self._rotation is None:
            return c.length <= head.durable
        return c.seq < head.seq or (c.seq == head.seq and c.length <= head.durable)

    def _write(self, plan: Sequence[tuple[_File, list[bytes], int]]) -> None:
        with self._io:
            if self._closed:  # a cancelled sync's thread that waited past the close
                return
            if self._lost is not None:  # cut meanwhile: nothing goes past the cut
                raise SinkLost(self._lost)
            for f, parts, _ in plan:
                path = self._dir / f.name
                try:
                    self._write_file(f, path, parts)
                except OSError as exc:
                    raise TransientSinkError(f"writing {path}: {exc.strerror}") from exc

    def _write_file(self, f: _File, path: Path, parts: list[bytes]) -> None:
        if f.fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            except FileExistsError:
                raise SinkUnusable(
                    f"jsonl file {path} exists already, but the sink was about to create it "
                    "as its next rotated file: move it aside, then restart"
                ) from None
            f.fd, f.identity = fd, identity(os.fstat(fd))
        if not f.dir_synced:
            if self._fsync:
                # The file is durable before any byte of it is committed. A failure is final,
                # as a file's is (see _fsync_files): a retry's fsync would return 0.
                try:
                    _fsync_dir(self._dir)
                except OSError as exc:
                    self._lost = _lost_reason(f"fsync of directory {printable(self._dir)}", exc)
                    raise SinkLost(self._lost) from None
            f.dir_synced = True
        if not any(parts):
            return
        self._check(f)
        try:
            _pwrite_all(f.fd, parts, f.written)
        except OSError:
            # What this write left past `written` (half a line on a full disk) is provably
            # uncommitted: no checkpoint covers more. Cut it now, not at the next start, so a
            # reader of the file never sees half a line (the retry writes it again).
            with contextlib.suppress(OSError):
                os.ftruncate(f.fd, f.written)
            raise

    def _check_open(self) -> None:
        """Every open file is still the one its path names, and did not shrink (:meth:`_check`),
        whether or not anything is written now: a write-out checks only the files it writes
        to, and lines a write-out between commits handed to a file removed since must not be
        committed (the restart would find them in no file). Looked at without the write-outs'
        lock (a commit must not wait for one): what looks wrong is looked at again under it,
        where :meth:`_check` may cut the file."""
        for f in list(self._files):
            fd = f.fd
            try:
                intact = fd is None or self._fault(f, fd) is None
            except OSError:  # closed meanwhile, or the directory gone: decided under the lock
                intact = False
            if not intact:
                with self._io:
                    if f.fd is not None:  # else closed meanwhile: nothing more goes there
                        self._check(f)

    def _check_and_fsync(self, files: Sequence[_File]) -> None:
        self._check_open()
        if self._fsync and files:
            self._fsync_files(files)

    def _fsync_files(self, files: Sequence[_File]) -> None:
        with self._fsync_io:
            for f in files:
                # A failure is recorded here, in the thread, not by the sync awaiting it: a
                # sync cancelled meanwhile (a stream stopped within its grace) drops the error
                # with its future, and a second fsync of the file returns 0 once the kernel has
                # reported the error and marked the pages clean. Nothing may follow it.
                if self._lost is not None:
                    raise SinkLost(self._lost)
                assert f.fd is not None
                try:
                    os.fsync(f.fd)
                except OSError as exc:
                    self._lost = _lost_reason(
                        f"fsync of jsonl file {printable(self._dir / f.name)}", exc
                    )
                    raise SinkLost(self._lost) from None

    def _cut(self, files: Sequence[_File]) -> None:
        with self._io:
            for f in files:
                if f.fd is not None:
                    with contextlib.suppress(OSError):
                        os.ftruncate(f.fd, f.durable)

    def _retain(self, now: float, current: int) -> None:
        """Delete the rotated files the policy lets go: whole, fully committed ones only
        (``current``: the newest file on disk; the files before it are finished)."""
        rot = self._rotation
        assert rot is not None
        committed = self._committed_seq  # it only grows meanwhile
        self._retained = (committed, now)
        try:
            finished = []
            for seq, name in _scan(self._dir, rot):
                if seq < current:
                    finished.append((seq, name, os.stat(self._dir / name).st_mtime))
            for name in rot.expired(finished, committed, now):
                os.unlink(self._dir / name)
                log.info("removed rotated jsonl file (retention)", file=name)
        except OSError as exc:
            log.warning("jsonl retention failed; trying again later", error=exc.strerror)

    def staged(self) -> Staged | None:
        return None  # its bytes are made durable by sync(), its length is the position

    def counters(self) -> dict[str, float]:
        return {}

    async def close(self) -> None:
        heard, self._heard_fd = self._heard_fd, None  # written on the event loop only
        if heard is not None:
            os.close(heard)
        if self._retaining is not None:
            await self._retaining  # a few unlinks at most; it logs its own failures
        if self._writer is not None:
            await asyncio.wait([self._writer])  # one write-out; it logs its own failure
        files, self._files = self._files, []
        self._closed = True  # a write-out thread still waiting for _io writes nothing then
        # A sync cancelled meanwhile may still be writing in its thread: the descriptors are
        # its until it is done (a number reused at once would get its bytes). Lock, close and
        # release all in the thread, so that a cancelled close still finishes them.
        await asyncio.to_thread(self._close_files, files)

    def _close_files(self, files: list[_File]) -> None:
        with self._io, self._fsync_io:
            for f in files:
                if f.fd is not None:
                    os.close(f.fd)
                    f.fd = None


class Adoption(NamedTuple):
    """What ``sink adopt`` records: ``position``, ``length`` bytes of ``path`` (the newest
    file of the sink), and ``torn``: the bytes after its last complete line, a ``kill -9``'s
    half-written line, left out (the start cuts them; that event comes again)."""

    path: Path
    length: int
    position: str
    torn: int


def adopt_position(path: Path, rotation: Rotation | None, now: float) -> Adoption:
    """What ``sink adopt`` records: the newest file of the sink, up to the end of its last
    complete line, as committed."""
    where = _where(path)
    if rotation is not None and (ours := _scan(path.parent, rotation)):
        seq, name = max(ours)
        newest = path.parent / name
        st = newest.stat()
        length = _complete_length(newest, st.st_size)
        started = rotation.started_at(st.st_mtime)
        position = _encode(
            name, seq, length, started, where=where, ino=st.st_ino, pattern=rotation.pattern
        )
        return Adoption(newest, length, position, st.st_size - length)
    try:
        st = path.stat()
        size, ino = st.st_size, st.st_ino
    except FileNotFoundError:
        size, ino = 0, 0  # no inode is 0: a file put there later is not taken as this one
    length = _complete_length(path, size)
    if rotation is None:
        return Adoption(path, length, _encode_plain(where, ino, length), size - length)
    position = _encode(
        path.name,
        0,
        length,
        rotation.started_at(now),
        where=where,
        ino=ino,
        pattern=rotation.pattern,
    )
    return Adoption(path, length, position, size - length)


def _complete_length(path: Path, size: int) -> int:
    """The length of ``path``'s first ``size`` bytes up to (and with) their last newline,
    read backwards a block at a time."""
    if not size:
        return 0
    block = 1 << 16
    with path.open("rb") as f:
        end = size
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            at = f.read(end - start).rfind(b"\n")
            if at >= 0:
                return start + at + 1
            end = start
    return 0


def heard_path(path: Path) -> Path:
    """The jsonl sink's record of the last position it heard committed (``sink.path``'s)."""
    return path.with_name(path.name + HEARD_SUFFIX)


def heard_adopted(path: Path, adoption: Adoption) -> str | None:
    """After ``sink adopt`` recorded ``adoption`` (``path``: sink.path): the sink's record of
    the last position heard committed says the same (an older run's, past it, would refuse the
    next start). None is not created (adopt may run as another user than the daemon). What
    went wrong, if anything."""
    c = _parse(adoption.position, path)
    assert c is not None
    side = heard_path(path)
    try:
        fd = os.open(side, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot write {printable(side)}: {exc.strerror or exc}"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return f"{printable(side)} is not a regular file"
        os.pwrite(fd, _heard_record(c.seq, c.length, c.ino or 0), 0)
        os.ftruncate(fd, _HEARD_BYTES)
    except OSError as exc:
        return f"cannot write {printable(side)}: {exc.strerror or exc}"
    finally:
        os.close(fd)
    return None


def _heard_record(seq: int, length: int, ino: int) -> bytes:
    text = f'{{"seq":{seq},"length":{length},"ino":{ino}}}'.encode()
    return text.ljust(_HEARD_BYTES - 1) + b"\n"  # at most 85 bytes of counts: never longer


def _read_heard(path: Path) -> _Heard | None:
    """The record of the last position heard committed, as a start finds it: None when there
    is none, or (with a warning) one this sink did not write. Outside data: a few dozen bytes
    read at most, none of it trusted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a link (ELOOP), no permission, a directory...
        _heard_unusable(path, exc.strerror or str(exc))
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, a device: never read
            _heard_unusable(path, "not a regular file")
            return None
        data = os.pread(fd, _HEARD_BYTES + 1, 0)
    except OSError as exc:
        _heard_unusable(path, exc.strerror or str(exc))
        return None
    finally:
        os.close(fd)
    if not data:
        return None  # created, not written yet (a kill -9 right then): as none
    heard = _parse_heard(data)
    if heard is None:
        _heard_unusable(path, f"not a record this sink writes: {printable(data, 60)}")
    return heard


def _parse_heard(data: bytes) -> _Heard | None:
    if len(data) != _HEARD_BYTES or not data.endswith(b"\n"):
        return None  # torn, cut, longer: not one whole record
    try:
        doc: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or doc.keys() != {"seq", "length", "ino"}:
        return None
    seq, length, ino = doc["seq"], doc["length"], doc["ino"]
    if not (_count(seq) and _count(length) and _count(ino)):
        return None
    return _Heard(seq, length, ino)


def _heard_unusable(path: Path, why: str) -> None:
    log.warning(
        "the jsonl sink's record of its last commit is unusable; going on as without one "
        "(a state store older than the file is not detected at this start)",
        path=printable(path),
        error=why,
    )


def _open_heard(path: Path) -> int | None:
    """The record, open to be written (created if need be); None, with a warning, when it
    cannot be: the sink goes on without it."""
    try:
        fd = os.open(
            path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640
        )
    except OSError as exc:
        _heard_unwritable(path, exc.strerror or str(exc))
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_size > _HEARD_BYTES:  # not ours: what is past the record would stay
            os.ftruncate(fd, _HEARD_BYTES)
    except OSError as exc:
        os.close(fd)
        _heard_unwritable(path, exc.strerror or str(exc))
        return None
    return fd


def _heard_unwritable(path: Path, why: str) -> None:
    log.warning(
        "cannot keep the jsonl sink's record of its last commit; going on without it (a state "
        "store older than the file, a restored backup, is not detected at the next start)",
        path=printable(path),
        error=why,
    )


def rotated_files(path: Path, rotation: Rotation) -> list[Path]:
    """The rotated files beside ``path``, in the order they were written."""
    return [path.parent / name for _, name in sorted(_scan(path.parent, rotation))]


def _scan(folder: Path, rot: Rotation) -> list[tuple[int, str]]:
    """(seq, name) of the regular files in ``folder`` named as the rotation names its files."""
    found = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                seq = rot.seq_of(entry.name)
                if seq is not None and entry.is_file(follow_symlinks=False):
                    found.append((seq, entry.name))
    except FileNotFoundError:
        return []
    return found


def _encode(
    name: str, seq: int, length: int, started: int, *, where: str, ino: int | None, pattern: str
) -> str:
    doc: dict[str, object] = {
        "file": name,
        "seq": seq,
        "length": length,
        "started": started,
        "path": where,
        "pattern": pattern,
    }
    if ino is not None:
        doc["ino"] = ino
    return orjson.dumps(doc).decode()


def _encode_plain(where: str, ino: int | None, length: int) -> str:
    """A position without rotation: the length of the file ``where`` names, bound to it."""
    doc: dict[str, object] = {"path": where, "length": length}
    if ino is not None:
        doc["ino"] = ino
    return orjson.dumps(doc).decode()


def _where(path: Path) -> str:
    """What a position is recorded for: ``path`` with its directory's links resolved (as
    text: JSON holds no undecodable bytes)."""
    real = os.path.join(os.path.realpath(path.parent), path.name)
    return os.fsencode(real).decode(errors="backslashreplace")


def _parse(committed: str | None, path: Path) -> _Committed | None:
    """A committed position from the state store (hostile: checked, never trusted)."""
    if committed is None:
        return None
    refused = SinkUnusable(
        f"jsonl file {path}: the state store's committed position is not one this sink "
        f"writes: {ADOPT_HINT}"
    )
    text = committed.strip()
    if text.isascii() and text.isdigit():
        if len(text) > 20:  # no file is that long (and int() refuses beyond 4,300 digits)
            raise refused
        return _Committed(None, 0, int(text), None)
    try:
        doc: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise refused from None
    if not isinstance(doc, dict):
        raise refused
    where, ino = doc.get("path"), doc.get("ino")
    if not (
        (where is None or (isinstance(where, str) and 0 < len(where) <= 4096))
        and (ino is None or _count(ino))
    ):
        raise refused
    if "file" not in doc:  # a length of the configured path, bound to it
        length = doc.get("length")
        if where is None or not _count(length):
            raise refused
        return _Committed(None, 0, length, None, where, ino)
    name, seq, length, started = (doc.get(k) for k in ("file", "seq", "length", "started"))
    pattern = doc.get("pattern")
    if not (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and len(name.encode(errors="surrogateescape")) <= 255
        and "/" not in name
        and "\0" not in name
        and _count(seq)
        and _count(length)
        and (started is None or _count(started))
        and (pattern is None or (isinstance(pattern, str) and 0 < len(pattern) <= 255))
    ):
        raise refused
    return _Committed(name, seq, length, started, where, ino, pattern)


def _numbered(name: str, seq: int, path: Path, suffix: str) -> bool:
    """Whether ``name`` is the path (file 0) or carries ``seq`` as a rotated file does: the
    number right before the series' suffix (whatever rotate_name made the rest, which may have
    changed since), in a name without control characters."""
    if name == path.name:
        return seq == 0
    tail = f".{seq:0{SEQ_DIGITS}d}{suffix}"
    return name.endswith(tail) and len(name) > len(tail) and name.isprintable()


def _count(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _ino(path: Path) -> int | None:
    """The inode of the file ``path`` names (not following a link); None: no such file."""
    try:
        return os.stat(path, follow_symlinks=False).st_ino
    except FileNotFoundError:
        return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _pwrite_all(fd: int, parts: list[bytes], at: int) -> None:
    """Write ``parts`` one after another from offset ``at``: pwritev, at most IOV_MAX buffers
    a call, going on after a short write."""
    views = [memoryview(p) for p in parts if p]
    i = 0
    while i < len(views):
        written = os.pwritev(fd, views[i : i + _IOV_MAX], at)
        if not written:  # nothing written of a non-empty buffer: it would loop for ever
            raise OSError(errno.EIO, "pwritev wrote nothing")
        at += written
        while i < len(views) and written >= len(views[i]):
            written -= len(views[i])
            i += 1
        if written:
            views[i] = views[i][written:]


def _lost_reason(what: str, exc: OSError) -> str:
    return (
        f"{what} failed ({exc.strerror or exc}): the lines written since the last commit "
        "cannot be proven on disk; the daemon stops and its restart replays them from the "
        "checkpoint"
    )


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
