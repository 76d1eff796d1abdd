"""``opera-consumer sink adopt``: take an existing jsonl file as committed.

The jsonl sink never cuts bytes it cannot prove uncommitted, so a non-empty file beside a new
or replaced state store stops the start. Adopting records the file's length as the committed
one (the operator vouches that every line in it is wanted), and the uniqueEventId of every
line in it (with rotation: in every file of the series, and the configured path's own) as
processed, stamped now: a stream that sends those events again (a new store has no
checkpoint, so the start is the configured one: an offset, or the gateway's position) has
them skipped as duplicates instead of written twice.

A line is the event as received: it names no stream (nor chain), and a uniqueEventId is unique
within a stream only. Its id is recorded for the stream it came from: the only one configured,
or, with several, the only one whose subscription could have sent its hotelId
(``hotel_codes``). A line that more than one stream could have sent is recorded for none and
counted: recorded for every stream, another stream's event with the same id would be skipped
when it comes (lost); not recorded, the line's event is written again if its stream sends it
again (a duplicate, which a reader can drop).

A last line cut short (a ``kill -9`` in the middle of a write) is left out: the recorded
length ends before it, so the start cuts it and that event is written whole when it comes
again. The files are read a line at a time, the ids recorded a chunk at a time, and the
position last, in the last chunk's transaction: adopt stopped half-way has recorded no
position, so the start still refuses, and adopt runs again (the ids it recorded are kept).
No checkpoint is set: which line came last in the stream is not known (with several workers
the file's order is not the arrival order, and events dead-lettered before it are not in the
file); what the next start does is said, with the ``offset set`` that would shorten it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import orjson

from ..config import JsonlSinkSettings, Settings
from ..core.events import Event
from ..core.printable import printable
from ..core.protocol import event_from_raw
from ..core.records import CommitBatch
from ..errors import ExitCode, LeaseHeld, OperatorRefused, SinkUnusable
from ..sinks.jsonl import Adoption, JsonlSink, adopt_position, heard_adopted, rotated_files
from ..state import StateStore, acquire, open_store
from ..state.lease import ADOPT
from .offsets import settings_start

IDS_PER_COMMIT = 10_000  # ids read, then recorded (each for its stream) in one transaction
LINE_MAX = 1 << 26  # a longer line is skipped, not held (no event the daemon wrote is)


async def adopt(settings: Settings, *, execute: bool) -> int:
    if not isinstance(settings.sink, JsonlSinkSettings):
        print("opera-consumer sink adopt: only the jsonl sink has a file to adopt", file=sys.stderr)
        return ExitCode.USAGE
    state = settings.state.path
    streams = sorted(settings.streams)
    # With rotation: the newest rotated file (the older ones are vouched for with it).
    plan = _measure(settings.sink)
    _say_plan(settings.sink, plan, streams, state)
    if not execute:
        refusal = await _refusal(settings.sink, await _committed(settings))
        if refusal is not None:
            raise OperatorRefused(refusal)
        print("plan only: nothing changed (add --execute to apply it)", file=sys.stderr)
        return ExitCode.OK
    try:
        held = await acquire(settings.state, streams, role=ADOPT)
    except LeaseHeld as exc:
        raise OperatorRefused(str(exc)) from None
    try:
        # Under the lease, so no daemon commits meanwhile: the file as it is now, and
        # what the store says now (a daemon may have committed since the plan was shown).
        store = await open_store(settings.state)
        try:
            done = _measure(settings.sink)
            refusal = await _refusal(settings.sink, await store.sink_state("jsonl"))
            if refusal is not None:
                raise OperatorRefused(refusal)
            lines = _Lines(_files(settings.sink, done), _owner(settings))
            try:
                await _record(store, lines, done.position)
            except OSError as exc:
                raise _refused(exc) from None
            finally:
                lines.close()
            # The sink's record of the last commit it heard, brought to the adopted position:
            # past it (a state store restored from an older backup), the start would refuse.
            if (trouble := heard_adopted(settings.sink.path, done)) is not None:
                print(
                    f"warning: {trouble}: remove it, or the next start may refuse the file again",
                    file=sys.stderr,
                )
            starts = {name: await _next_start(store, name) for name in streams}
        finally:
            await store.close()
    finally:
        await held.release()
    _say_done(settings, done, lines, starts)
    return ExitCode.OK


def _measure(sink: JsonlSinkSettings) -> Adoption:
    try:
        return adopt_position(sink.path, sink.rotation(), time.time())
    except OSError as exc:
        raise _refused(exc) from None


def _refused(exc: OSError) -> OperatorRefused:
    """A file adopt cannot read: nothing it has not read is vouched for (no position)."""
    return OperatorRefused(
        f"cannot read {printable(exc.filename or '?')}: {exc.strerror or exc}: adopt reads "
        "every line it vouches for; make the files readable by this user, then run it again"
    )


def _say_plan(sink: JsonlSinkSettings, plan: Adoption, streams: list[str], state: Path) -> None:
    print(f"{plan.path}: {plan.length} bytes to record as committed in {state}")
    if plan.torn:
        print(
            f"{plan.path}: the {plan.torn} bytes after its last complete line (a line cut short "
            "by a kill -9, or the file shortened inside a line) are left out: the start cuts "
            "them; that event is written again if the stream sends it again (not when a "
            "checkpoint is past it: then only a copy of the file has it)"
        )
    where = f"every line of {plan.path}"
    if sink.rotation() is not None and plan.path != sink.path:
        where = (
            f"every line of {sink.path} and of the rotated files beside it (the newest up to there)"
        )
    if len(streams) == 1:
        print(
            f"and the uniqueEventId of {where} as processed for stream {streams[0]}, stamped "
            "now: the stream sending those events again has them skipped, not written twice"
        )
        return
    print(
        f"and the uniqueEventId of {where} as processed for the stream it came from, stamped "
        "now: that stream sending the event again has it skipped, not written twice. A line "
        f"does not name its stream ({', '.join(streams)}): only a hotelId that one stream "
        "alone subscribes to (subscription.hotel_codes) tells; a line that more than one "
        "could have sent is recorded for none (ids are unique per stream only: recorded for "
        "all, another stream's event with the same id would be skipped, lost), and is written "
        "again if its stream sends it again"
    )


def _owner(settings: Settings) -> Callable[[Event], str | None]:
    """The stream a line's event came from, or None when more than one could have sent it.
    A line names no stream: with one stream it is that one's; with several, its hotelId
    tells where the streams' ``hotel_codes`` (a subscription's filter) leave exactly one
    that could have sent it (no hotel_codes: every hotel of its chain)."""
    streams = sorted(settings.streams)
    if len(streams) == 1:
        only = streams[0]
        return lambda event: only
    everywhere = {s for s in streams if not settings.streams[s].subscription.hotel_codes}
    by_hotel: dict[str, set[str]] = {}
    for s in streams:
        for code in settings.streams[s].subscription.hotel_codes:
            by_hotel.setdefault(code.casefold(), set()).add(s)

    def owner(event: Event) -> str | None:
        if not event.hotel_id:  # a chain's event: any of them
            return None
        could = everywhere | by_hotel.get(event.hotel_id.casefold(), set())
        return next(iter(could)) if len(could) == 1 else None

    return owner


def _files(sink: JsonlSinkSettings, adoption: Adoption) -> list[tuple[Path, int | None]]:
    """The files vouched for, oldest first, each with how much of it (None: the whole)."""
    rotation = sink.rotation()
    if rotation is None or adoption.path == sink.path:
        return [(adoption.path, adoption.length)]
    # Rotation's files, and the configured path's (written before rotation was): the
    # daemon never writes into either again.
    files: list[tuple[Path, int | None]] = [(sink.path, None)]
    files += [(p, None) for p in rotated_files(sink.path, rotation) if p != adoption.path]
    files.append((adoption.path, adoption.length))
    return files


class _Lines:
    """The uniqueEventIds of the files' lines by the stream each came from (``owner``), a
    chunk at a time (blocking: in a thread). ``unreadable``: lines without a usable event (not
    JSON, no id, an unfinished last line of a file, too long); ``unowned``: lines more than one
    stream could have sent (recorded for none); ``last_offset``: the offset of the last
    readable line."""

    def __init__(
        self, files: list[tuple[Path, int | None]], owner: Callable[[Event], str | None]
    ) -> None:
        self._todo = list(reversed(files))
        self._owner = owner
        self._f: BinaryIO | None = None
        self._left = 0
        self.lines = 0
        self.ids: Counter[str] = Counter()  # recorded, by stream
        self.unreadable = 0
        self.unowned = 0
        self.last_offset: str | None = None

    def chunk(self, n: int) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        taken = 0
        while taken < n:
            line = self._line()
            if line is None:
                break
            self.lines += 1
            event = _event(line)
            if event is None:
                self.unreadable += 1
                continue
            self.last_offset = event.offset
            stream = self._owner(event)
            if stream is None:
                self.unowned += 1
                continue
            out.setdefault(stream, []).append(event.unique_event_id)
            self.ids[stream] += 1
            taken += 1
        return out

    def _line(self) -> bytes | None:
        """The next complete line (None: no more); an unfinished or too long one as b""."""
        while True:
            f = self._f
            if f is None or not self._left:
                self.close()
                if not self._todo:
                    return None
                path, limit = self._todo.pop()
                try:
                    f = self._f = path.open("rb")
                except FileNotFoundError:  # the path itself with rotation: never written
                    continue
                size = os.fstat(f.fileno()).st_size
                self._left = size if limit is None else min(limit, size)
                continue
            line = f.readline(min(self._left, LINE_MAX))
            self._left -= len(line)
            if not line:  # shorter than measured
                self._left = 0
                continue
            if line.endswith(b"\n"):
                return line
            while line and not line.endswith(b"\n") and self._left:  # too long: skipped
                line = f.readline(min(self._left, LINE_MAX))
                self._left -= len(line)
            return b""

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            f.close()


def _event(line: bytes) -> Event | None:
    """The line's event (its ``uniqueEventId``, ``offset``), or None."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return event_from_raw(doc) if isinstance(doc, dict) else None


async def _record(store: StateStore, lines: _Lines, position: str) -> None:
    """Every line's id as processed for its stream, a chunk per transaction; the position
    in the last one (stopped before it: no position, the start still refuses)."""
    ids = await asyncio.to_thread(lines.chunk, IDS_PER_COMMIT)
    while True:
        more = await asyncio.to_thread(lines.chunk, IDS_PER_COMMIT) if ids else {}
        batch = CommitBatch(processed=ids)
        if not more:
            batch.sink_state = ("jsonl", position)
        await store.commit(batch)
        if not more:
            return
        ids = more


async def _next_start(store: StateStore, stream: str) -> str | None:
    """Where the stream's next start subscribes, when it has a checkpoint or a reset; None:
    per its configuration."""
    if await store.start_override(stream):
        return "highest (an operator's reset)"
    cp = await store.checkpoint(stream)
    return None if cp is None else f"offset {cp.offset} (its checkpoint)"


def _say_done(
    settings: Settings, done: Adoption, lines: _Lines, starts: dict[str, str | None]
) -> None:
    say = sys.stderr
    names = ", ".join(starts)
    counts = ", ".join(f"{name} {lines.ids[name]}" for name in starts)
    print(
        f"recorded uniqueEventIds as processed, by stream: {counts} (stamped now: kept "
        f"{settings.state.processed_retention_days:g} days, processed_retention_days)",
        file=say,
    )
    if lines.unowned:
        print(
            f"warning: {lines.unowned} of {lines.lines} lines could have come from more than "
            f"one of the streams {names} (a line does not name its stream): their ids are "
            "recorded for none, since ids are unique per stream only and, recorded for every "
            "stream, another stream's event with the same id would be skipped (lost). A "
            "stream that sends those events again writes them again: duplicates of lines "
            "already in the file, which a reader can drop. If the streams are split by "
            "hotel, configure each one's subscription.hotel_codes (as they were subscribed) "
            "and run adopt again: those lines' ids are then recorded for their stream",
            file=say,
        )
    if lines.unreadable:
        print(
            f"warning: {lines.unreadable} of {lines.lines} lines hold no event this daemon "
            "reads (not JSON, no uniqueEventId, or cut short): if the stream sends those "
            "events again, they are written again",
            file=say,
        )
    for name, start in starts.items():
        if start is not None:
            print(f"{name}: the next start resumes at {start}", file=say)
            continue
        configured = settings_start(settings, name)
        if configured == "highest":
            print(f"{name}: no checkpoint: the next start subscribes at the newest event", file=say)
            continue
        print(
            f"{name}: no checkpoint: the next start subscribes per its configuration "
            f"({configured}); the file's events it sends again are skipped as duplicates",
            file=say,
        )
        if len(starts) == 1 and lines.last_offset is not None:
            print(
                f"{name}: to shorten that replay, `opera-consumer offset set {name} "
                f"{lines.last_offset} --execute` resumes at the file's last line (inclusive) "
                "instead, but only if no event before it is missing from the file: with "
                "several workers the file's order is not the arrival order, and dead letters "
                "are not in it; an event skipped so is lost",
                file=say,
            )
    print(
        f"done: the daemon resumes appending to {done.path} at byte {done.length}",
        file=say,
    )


async def _committed(settings: Settings) -> str | None:
    """The committed position the store records now (a plan creates no store)."""
    if settings.state.backend == "sqlite" and not settings.state.path.exists():
        return None
    store = await open_store(settings.state, create=False)
    try:
        return await store.sink_state("jsonl")
    finally:
        await store.close()


async def _refusal(settings: JsonlSinkSettings, committed: str | None) -> str | None:
    """Refused when the start would take the recorded position as it is (and cut what is
    past it itself, or delete rotated files numbered after it): adopting would vouch for that
    tail (a kill -9's: its events come again from the checkpoint, written twice) or move the
    committed length back (the next start would cut committed lines). What the start refuses
    (no position, one of a file this configuration does not name) is what adopt is for."""
    if committed is None:
        return None
    try:
        await JsonlSink(settings.path, rotation=settings.rotation()).check(committed)
    except SinkUnusable:
        return None
    return (
        f"the state store already records the jsonl sink's committed position "
        f"({printable(committed, 300)}), and the daemon starts from it as it is, cutting "
        "what is past it. Adopt is for a position the start refuses (none: a new or "
        "replaced state store; or a file rotation no longer names)"
    )
