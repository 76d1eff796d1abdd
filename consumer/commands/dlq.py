"""``opera-consumer dlq list | show | replay | purge``: the dead-letter queue, by hand.

Safe while the daemon runs (SQLite WAL; every change is one short transaction). A replay goes
through the configured sink (and orchestration): each event delivered is removed from the DLQ
and recorded as processed in the same transaction, so the stream will skip it if OHIP sends
it again. Events of one primaryKey are replayed in arrival order; after one fails, the later
ones of that resource are left in place. A sink whose rows go into the state store's own
transaction delivers them with that commit: an event whose row it refuses (and the sink's own
path too) stays in the DLQ, reported failed (see :class:`_Outcomes`). The jsonl sink has a
single writer: replaying into it needs the daemon stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from ..config import ConnectionSettings, JsonlSinkSettings, Settings
from ..core.events import Event
from ..core.evidence import describe, prefix
from ..core.printable import printable
from ..core.protocol import DecodeError, Next, decode
from ..core.records import DeadLetter, DeadLetterRow
from ..core.retry_after import WaitRetryAfter
from ..early_signals import REPLAY_SIGNALS, cancelling
from ..errors import (
    ExitCode,
    LeaseHeld,
    OperatorRefused,
    ReplayRefused,
    SinkLost,
    SinkUnusable,
    StoreError,
    TransientSinkError,
)
from ..logs import REDACTOR, configure
from ..runtime.assembly import build_sink, http_client, open_sink, register_secrets
from ..runtime.committer import Committer
from ..sinks.base import Sink
from ..state import StateStore, acquire, acquire_replay, current_holder, open_store
from ..state.lease import REPLAY, Held
from .output import Printer, escaped, iso, no_store, parse_when

log = structlog.get_logger(__name__)

LIST_COLUMNS = ("id", "stream", "reason", "event_name", "primary_key", "offset", "attempts")
_EXCERPT = 60
_COMMIT_EVERY = 100
# Rows in a row whose every attempt failed transiently: the sink looks down, and a replay
# that went on would spend its attempts (and the sink's Retry-After, up to 300 s) on every
# resource of the queue. It stops; the rest stays in the DLQ.
_DOWN_AFTER = 3
# Dead letters a command reads, and holds, at once (a replay's with their payloads, tens of KB
# each for a big reservation): a DLQ of any size is listed, replayed or purged page by page.
PAGE = 200
# Of payloads, what a replay holds at once, about (characters): a dead letter keeps its event
# whole, up to 4 x max_frame_bytes (a sink that refuses big events fills the DLQ with exactly
# those, and 200 of them were gigabytes). A page's payloads are read in parts of at most this
# much; a larger one alone.
PAGE_CHARS = 16 * 1024 * 1024
_MALFORMED = "a malformed frame cannot be replayed: purge it"
_UNKNOWN_STREAM = "its stream is not in the configuration (the sink may need its settings): add it"
_EARLIER_FAILED = "an earlier event of this primaryKey was not delivered"
_FRAME_HEAD = b'{"id":"dlq","type":"next","payload":{"data":{"newEvent":'
_NOT_AN_EVENT = (
    "its payload is not a whole event (cut short, nested deeper than a parser goes, or "
    "without usable metadata): it cannot be replayed; purge it"
)


def summary(row: DeadLetterRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "stream": row.stream,
        "reason": row.reason,
        "event_name": row.event_name,
        "primary_key": row.primary_key,
        "offset": row.offset,
        "unique_event_id": row.unique_event_id,
        "attempts": row.attempts,
        "first_at": iso(row.first_at),
        "last_at": iso(row.last_at),
        "error": row.error if len(row.error) <= _EXCERPT else row.error[:_EXCERPT] + "…",
    }


def detail(row: DeadLetterRow) -> dict[str, Any]:
    out = summary(row)
    out["error"] = row.error
    try:
        # orjson: no NaN, Infinity or 1e400 read as a float `show --json` would then print
        # (not JSON); such a frame is shown as its text.
        out["payload"] = orjson.loads(row.payload)
        json.dumps(out["payload"], indent=2)  # as show prints it: Python code, recursive
    except (ValueError, RecursionError):
        out["payload"] = row.payload  # a malformed frame (or one too deep): its raw text
    return out


@dataclass(frozen=True, slots=True)
class Outcome:
    id: int
    stream: str
    unique_event_id: str | None
    primary_key: str | None
    result: str  # delivered | would deliver | failed | skipped
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "stream": self.stream,
            "unique_event_id": self.unique_event_id,
            "primary_key": self.primary_key,
            "result": self.result,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Selection:
    """The dead letters a command names: each filter given (None: any), ``ids`` from the
    command line."""

    stream: str | None = None
    reason: str | None = None
    since: float | None = None
    before: float | None = None
    ids: tuple[int, ...] | None = None

    async def read(
        self, store: StateStore, *, payloads: bool, after: int | None, limit: int
    ) -> list[DeadLetterRow]:
        """The next ``limit`` of them after id ``after``."""
        return await store.dead_letters(
            self.stream,
            reason=self.reason,
            since=self.since,
            before=self.before,
            ids=self.ids,
            payloads=payloads,
            after=after,
            limit=limit,
        )

    async def held_back(
        self, store: StateStore, rows: Sequence[DeadLetterRow], failed: set[tuple[str, str]]
    ) -> dict[tuple[str, str], int]:
        """The oldest dead letter outside the selection of each resource of ``rows`` (a page)
        older than one of them, but those of ``failed`` (their later events are skipped
        anyway): asked of the store per page, so that a replay holds the keys of a page, not
        every key of the queue (millions, for a filtered replay of a large queue)."""
        keys = {(r.stream, r.primary_key) for r in rows if r.primary_key} - failed
        if not keys:
            return {}
        return await store.oldest_outside(
            sorted(keys),
            below=rows[-1].id,
            reason=self.reason,
            since=self.since,
            before=self.before,
            ids=self.ids,
        )


async def pages(
    store: StateStore,
    selection: Selection,
    *,
    payloads: bool,
    page: int | None = None,
    through: int | None = None,
) -> AsyncIterator[list[DeadLetterRow]]:
    """The selection's dead letters, page by page in id order, up to id ``through`` if given
    (a purge may delete a page's rows before asking for the next: the next begins after the
    last id read)."""
    page = page or PAGE
    after: int | None = None
    while True:
        rows = await selection.read(store, payloads=False, after=after, limit=page)
        past = through is not None and bool(rows) and rows[-1].id > through
        if past:
            rows = [r for r in rows if through is None or r.id <= through]
        if rows and payloads:
            async for part in _with_payloads(store, rows):
                yield part
        elif rows:
            yield rows
        if past or len(rows) < page:
            return
        after = rows[-1].id


async def _with_payloads(
    store: StateStore, rows: Sequence[DeadLetterRow]
) -> AsyncIterator[list[DeadLetterRow]]:
    """``rows`` (a page, read without payloads) with their payloads, in parts of at most
    :data:`PAGE_CHARS` (one larger row alone); a row gone meanwhile is left out."""
    lengths = await store.payload_lengths([r.id for r in rows])
    part: list[int] = []
    size = 0
    for row in rows:
        n = lengths.get(row.id)
        if n is None:
            continue
        if part and size + n > PAGE_CHARS:
            if got := await store.dead_letters(ids=part, payloads=True):
                yield got
            part, size = [], 0
        part.append(row.id)
        size += n
    if part and (got := await store.dead_letters(ids=part, payloads=True)):
        yield got


ReplayPages = AsyncIterator[tuple[list[DeadLetterRow], dict[tuple[str, str], int]]]


async def walk(
    store: StateStore,
    selection: Selection,
    failed: set[tuple[str, str]],
    *,
    payloads: bool,
    page: int | None = None,
) -> ReplayPages:
    """:func:`pages`, for a replay: each page with the oldest dead letter outside the
    selection of each of its resources older than one of its rows (see :func:`_held`), but
    those of ``failed`` (the replay's resources with an event not delivered, as it goes).
    Memory: a page of rows and an id per resource of the page, whatever the queue's size."""
    async for rows in pages(store, selection, payloads=payloads, page=page):
        yield rows, await selection.held_back(store, rows, failed)


async def replay(
    settings: Settings,
    selection: Selection,
    *,
    dry_run: bool,
    on_outcome: Callable[[Outcome], None],
    attempts: int = 3,
    page: int | None = None,
) -> None:
    """Re-deliver the selection's dead letters in id order through the configured sink, read
    a page at a time (under the replay's lock), each outcome given to ``on_outcome`` as it is
    known: a queue of any size is replayed in the memory of a page. A row whose key has an
    older dead letter outside the selection, or an earlier row in this replay that was not
    delivered, is skipped: a key's events keep their order."""
    failed_keys: set[tuple[str, str]] = set()

    def source(store: StateStore) -> ReplayPages:
        return walk(store, selection, failed_keys, payloads=True, page=page)

    if dry_run:
        store = await open_store(settings.state, create=False)
        try:
            async for rows, held_back in source(store):
                for row in rows:
                    skip = _held(row, held_back, failed_keys)
                    if skip is None and row.stream not in settings.streams:  # as the run
                        skip = _unusable(row, _UNKNOWN_STREAM, failed_keys)
                    if skip is None and not isinstance(event := _event(row, settings), Event):
                        skip = _unusable(row, event, failed_keys)
                    on_outcome(skip or _outcome(row, "would deliver"))
        finally:
            await store.close()
        return
    register_secrets(settings)  # as the daemon does: nothing we log may show one
    replaying = await acquire_replay(settings.state)
    try:
        running = await current_holder(settings.state)
        if running is not None and isinstance(settings.sink, JsonlSinkSettings):
            raise ReplayRefused(
                f"the jsonl sink has one writer and a daemon (pid {running.get('pid')}) is "
                "running: stop it, replay, start it again (or use --dry-run to see the plan)"
            )
        await _replay(
            settings,
            source,
            replaying,
            alone=running is None,
            failed_keys=failed_keys,
            attempts=attempts,
            on_outcome=on_outcome,
        )
    finally:
        await replaying.release()


async def _replay(
    settings: Settings,
    source: Callable[[StateStore], ReplayPages],
    replaying: Held,
    *,
    alone: bool,
    failed_keys: set[tuple[str, str]],
    attempts: int,
    on_outcome: Callable[[Outcome], None],
) -> None:
    """The replay, under its lock (``alone``: no daemon runs; keep one from starting). Each
    write waits for the locks to be confirmed ours: on PostgreSQL they are session locks,
    which the server drops with their session (a restart, a cut, the backend terminated),
    and another replay or a daemon could then start beside us. Found taken meanwhile, or
    unconfirmable, the replay stops without its last commit: what it delivered since the
    one before stays in the DLQ (a sink it shares with the newcomer must not get its
    positions), as after a crash."""
    st = settings.state
    # While we replay into a single-writer sink, keep a daemon from starting.
    held = await acquire(st, (), role=REPLAY) if alone else None
    locks = [replaying] if held is None else [replaying, held]
    try:
        store = await open_store(st)
        http = http_client(settings)
        try:
            sink = build_sink(settings, http)
            await open_sink(sink, store, st.path)
            committer = Committer(store, sink, max_events=1_000_000, interval_s=1.0)
            outcomes = _Outcomes(committer, settings, failed_keys, on_outcome)
            down = 0  # rows in a row that failed transiently
            try:
                done = 0
                # Read under the lock: a replay that ended meanwhile took its rows out.
                async for rows, held_back in source(store):
                    for row in rows:
                        skip = _held(row, held_back, failed_keys)
                        if skip is None and row.stream not in settings.streams:
                            skip = _unusable(row, _UNKNOWN_STREAM, failed_keys)
                        if skip is None:
                            await _confirmed(locks, outcomes)
                        if skip is not None:
                            outcomes.outcome(skip)
                        else:
                            outcome, transient = await _one(
                                row, settings, sink, committer, failed_keys, attempts=attempts
                            )
                            outcomes.outcome(outcome)
                            down = down + 1 if transient else 0
                            if down >= _DOWN_AFTER:
                                raise ReplayRefused(
                                    f"the sink failed transiently for {down} rows in a row, "
                                    f"each tried {attempts} times (the last: {outcome.detail}): "
                                    "it looks down; stopped, the rest stays in the DLQ: replay "
                                    "again once it is back"
                                )
                        done += 1
                        if done % _COMMIT_EVERY == 0:  # bound what a crash here would re-deliver
                            await outcomes.flush()
            finally:
                try:  # what was delivered is recorded however the loop ended (^C too)
                    await outcomes.flush(last=True)
                finally:
                    await sink.close()
        finally:
            await http.close()
            await store.close()
    finally:
        if held is not None:
            await held.release()


async def _confirmed(locks: Sequence[Held], outcomes: _Outcomes) -> None:
    """Before a write: the replay's locks still ours (see :func:`_replay`). Else what was
    delivered since the last commit is abandoned, and :class:`ReplayRefused`."""
    try:
        for lock in locks:
            await lock.confirm()
    except (LeaseHeld, StoreError) as exc:
        outcomes.abandon(
            "delivered, but the replay's lock was lost before the commit recording it: it "
            "stays in the DLQ"
        )
        raise ReplayRefused(
            "the replay's lock on the state store was lost (its PostgreSQL session ended) and "
            f"is not ours again: {describe(exc)}; stopped, the rest stays in the DLQ"
        ) from None


async def _one(
    row: DeadLetterRow,
    settings: Settings,
    sink: Sink,
    committer: Committer,
    failed_keys: set[tuple[str, str]],
    *,
    attempts: int,
) -> tuple[Outcome, bool]:
    """The row's outcome, and whether it failed transiently (every attempt)."""
    event = _event(row, settings)
    if not isinstance(event, Event):
        return _unusable(row, event, failed_keys), False
    key = (row.stream, event.primary_key)
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(TransientSinkError),
            stop=stop_after_attempt(attempts),
            wait=WaitRetryAfter(wait_exponential_jitter(multiplier=0.5, max=10.0, jitter=0.5)),
            reraise=True,
        ):
            with attempt:
                await sink.write(row.stream, [event])
    except (SinkUnusable, SinkLost):  # the sink itself is gone: stop (the rest stays)
        raise
    except (KeyboardInterrupt, asyncio.CancelledError, GeneratorExit):
        # ^C (the second arrives as KeyboardInterrupt, through a python sink's handler too):
        # stop; this row stays in the DLQ and what was delivered is recorded (_replay).
        raise
    except BaseException as exc:  # as in the daemon: a sink's surprise is this event's failure
        # BaseException: a SystemExit or a library's own out of a sink would end the replay
        # with a traceback, the rows after it not tried.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from None  # a stop the sink turned into its own error
        failed_keys.add(key)
        # As the daemon words it (pipeline._dead_letter): a handler's words may hold a
        # secret, masked before the cut; the table's cells and JSON escape the rest.
        scrub = REDACTOR.scrub
        why = prefix(scrub(str(exc)), 1000) if isinstance(exc, Exception) else describe(exc, scrub)
        return _outcome(row, "failed", why), isinstance(exc, TransientSinkError)
    committer.processed(row.stream, [event.unique_event_id])
    committer.resolved(row.id, row.stream, event.unique_event_id)
    return _outcome(row, "delivered"), False


class _Outcomes:
    """A replay's outcomes, each given on as soon as it is final. A row a sink staged for the
    state transaction is delivered only by the commit, which may refuse it and dead-letter the
    event again (the committer's set-aside; its letter stays in the DLQ, and the later events
    of its resource in that commit are parked): its outcome, and those after it (in id order),
    wait for that commit, then say what it did."""

    def __init__(
        self,
        committer: Committer,
        settings: Settings,
        failed_keys: set[tuple[str, str]],
        on_outcome: Callable[[Outcome], None],
    ) -> None:
        self._committer = committer
        self._failed_keys = failed_keys
        self._on_outcome = on_outcome
        self._held: list[Outcome] = []
        self._abandoned = False
        self._letters: dict[tuple[str, str], DeadLetter] = {}  # (stream, uid) -> set aside
        for stream in settings.streams:  # parks: a resource's order holds, as in the daemon
            committer.on_set_aside(stream, self._heard, parks=True)

    def _heard(self, letters: Sequence[DeadLetter]) -> None:
        for d in letters:
            if d.unique_event_id is not None:
                self._letters[(d.stream, d.unique_event_id)] = d

    def outcome(self, outcome: Outcome) -> None:
        self._held.append(outcome)
        if not self._committer.staging():
            self._give()

    def abandon(self, why: str) -> None:
        """No commit for the outcomes held, nor any later: given on, each delivery with
        ``why``."""
        self._abandoned = True
        self._give(why)

    async def flush(self, *, last: bool = False) -> None:
        """Commit; the outcomes held for it given on, as it settled them. When it fails they
        stay held for the ``last`` one, which sends the same batch again (the committer keeps
        what it was unsure of): said as that one settles them. Nothing once abandoned."""
        if self._abandoned:
            return
        try:
            await self._committer.flush()
        except BaseException:
            if last:
                self._give("delivered, but the commit recording it failed: it stays in the DLQ")
            raise
        self._give()

    def _give(self, not_committed: str = "") -> None:
        held, self._held = self._held, []
        for outcome in held:
            self._on_outcome(
                self._settled(outcome, not_committed) if outcome.result == "delivered" else outcome
            )
        self._letters.clear()

    def _settled(self, delivered: Outcome, not_committed: str) -> Outcome:
        """What the commit made of a delivery (``not_committed``: why it made nothing)."""
        letter = self._letters.get((delivered.stream, delivered.unique_event_id or ""))
        if letter is not None:  # dead-lettered again: its later events wait behind it
            if letter.primary_key:
                self._failed_keys.add((letter.stream, letter.primary_key))
            if letter.reason == "parked":
                return dataclasses.replace(delivered, result="skipped", detail=_EARLIER_FAILED)
            return dataclasses.replace(delivered, result="failed", detail=letter.error)
        if not_committed:
            return dataclasses.replace(delivered, result="failed", detail=not_committed)
        return delivered


def _held(
    row: DeadLetterRow, held_back: dict[tuple[str, str], int], failed: set[tuple[str, str]]
) -> Outcome | None:
    """``row`` skipped when an older event of its key is not delivered (its key then holds
    back the later ones too), else None."""
    if not row.primary_key:
        return None
    key = (row.stream, row.primary_key)
    if key in failed:
        return _outcome(row, "skipped", _EARLIER_FAILED)
    older = held_back.get(key)
    if older is None or older > row.id:
        return None
    failed.add(key)
    why = f"dead letter {older} of this primaryKey is older and not in this replay: "
    return _outcome(row, "skipped", why + "replay it first, or with this one")


def _unusable(row: DeadLetterRow, why: str, failed: set[tuple[str, str]]) -> Outcome:
    """``row`` skipped: no event to deliver (``why``); its key's later events wait for it."""
    if row.primary_key:
        failed.add((row.stream, row.primary_key))
    return _outcome(row, "skipped", why)


def _event(row: DeadLetterRow, settings: Settings) -> Event | str:
    """The dead letter's event, or why it cannot be replayed."""
    if row.reason == "malformed":
        return _MALFORMED
    # The payload is the newEvent's JSON: read by the decoder the wire goes through, in a frame
    # of its own, so that the sink gets what the daemon would have given it (the text as
    # received; a number no double holds or a key twice refused, as the daemon refuses them
    # since). Python's json read 1e400 as inf, which the sinks wrote as null.
    frame = _FRAME_HEAD + row.payload.encode("utf-8", "surrogatepass") + b"}}}"
    # Under the stream's frame limit, as the daemon read it: the decoder's budget of values
    # follows the limit, and an event taken under a raised one must replay too. Never below
    # the frame's own size: a limit lowered since refuses nothing already stored.
    stream = settings.streams.get(row.stream)
    connection = ConnectionSettings() if stream is None else stream.connection
    out = decode(frame, max(len(frame), connection.max_frame_bytes))
    if type(out) is Next:
        return out.event
    if isinstance(out, DecodeError) and not out.reason.startswith("invalid JSON"):
        return f"{out.reason}: it cannot be replayed; purge it"  # what is wrong with the event
    return _NOT_AN_EVENT


def _outcome(row: DeadLetterRow, result: str, why: str = "") -> Outcome:
    return Outcome(row.id, row.stream, row.unique_event_id, row.primary_key, result, why)


async def command(settings: Settings, args: argparse.Namespace) -> int:
    """`dlq list|show|replay|purge`, with the arguments the CLI parsed."""
    configure("warning", settings.log.format)
    if no_store(settings):
        return ExitCode.RUNTIME
    action: str = args.dlq_command
    try:
        since = parse_when(args.since) if getattr(args, "since", None) else None
        before = parse_when(args.before) if getattr(args, "before", None) else None
    except ValueError as exc:
        print(f"opera-consumer: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if action in ("replay", "purge") and not args.ids and not args.all:
        print(f"opera-consumer dlq {action}: name IDs, or --all (with filters)", file=sys.stderr)
        return ExitCode.USAGE
    ids = [args.id] if action == "show" else (getattr(args, "ids", None) or None)
    selection = Selection(
        getattr(args, "stream", None),
        getattr(args, "reason", None),
        since,
        before,
        None if ids is None else tuple(ids),
    )
    if action == "replay":
        return await _replay_command(settings, selection, args)
    store = await open_store(settings.state, create=False)
    try:
        if action == "show":
            return _show(await store.dead_letters(ids=ids), args)
        if action == "list":
            return await _list(store, selection, args)
        return await _purge(store, selection, args)
    finally:
        await store.close()


def _show(rows: Sequence[DeadLetterRow], args: argparse.Namespace) -> int:
    if not rows:
        print(f"no dead letter with id {args.id}", file=sys.stderr)
        return ExitCode.RUNTIME
    shown = detail(rows[0])
    if args.json:  # \u escapes: the same values, and no control reaches a terminal
        print(json.dumps(shown, indent=2))
        return ExitCode.OK
    payload = shown.pop("payload")
    width = max(len(k) for k in shown)
    for key, value in shown.items():
        text = "-" if value is None else str(value)
        print(f"{key.ljust(width)}  {printable(text, len(text))}")
    print("payload:")  # as received, its lines kept, any other control escaped
    text = (
        payload if isinstance(payload, str) else json.dumps(payload, indent=2, ensure_ascii=False)
    )
    print(escaped(text))
    return ExitCode.OK


async def _list(store: StateStore, selection: Selection, args: argparse.Namespace) -> int:
    limit: int | None = args.limit or None  # 0: all
    more = False
    # one more than shown: whether there are more to say so
    page = PAGE if limit is None else min(PAGE, limit + 1)
    with Printer(LIST_COLUMNS, as_json=args.json, settle=PAGE) as out:
        async for rows in pages(store, selection, payloads=False, page=page):
            for row in rows:
                if limit is not None and out.count >= limit:
                    more = True
                    break
                out.row(summary(row))
            if more:
                break
    if more:
        print(
            f"only the oldest {args.limit} shown: more dead letters match (--limit N, "
            "0 for all, or narrow with --stream, --reason, --since)",
            file=sys.stderr,
        )
    return ExitCode.OK


async def _purge(store: StateStore, selection: Selection, args: argparse.Namespace) -> int:
    """Page by page: a page listed, then deleted by the ids listed; only what was in the
    queue when the purge began (a dead letter a running daemon writes meanwhile is not
    purged unseen, however long the purge of a large queue takes)."""
    found: set[int] = set()  # of the ids named (as many as the command line has)
    listed = purged = 0
    last = await store.newest_dead_letter_id()
    # Nothing on stdout but a dry run's rows.
    out = Printer(LIST_COLUMNS, as_json=args.json, settle=PAGE) if args.dry_run else None
    try:
        if last is not None:
            async for rows in pages(store, selection, payloads=False, through=last):
                listed += len(rows)
                if selection.ids is not None:
                    found.update(r.id for r in rows)
                if out is not None:
                    for row in rows:
                        out.row(summary(row))
                else:
                    purged += await store.purge_dead_letters([r.id for r in rows])
    finally:
        if out is not None:
            out.close()
    missing = _missing(selection, found)
    if args.dry_run:
        print(f"would purge {listed} dead letter(s)", file=sys.stderr)
    else:
        print(f"purged {purged} dead letter(s)", file=sys.stderr)
    return ExitCode.RUNTIME if missing else ExitCode.OK


def _missing(selection: Selection, found: set[int]) -> list[int]:
    """The ids named that no dead letter has (said on stderr)."""
    missing = sorted(set(selection.ids or ()) - found)
    if missing:
        print(f"no dead letter with id {', '.join(map(str, missing))}", file=sys.stderr)
    return missing


REPLAY_COLUMNS = ("id", "stream", "unique_event_id", "result", "detail")


async def _replay_command(
    settings: Settings, selection: Selection, args: argparse.Namespace
) -> int:
    store = await open_store(settings.state, create=False)  # a store the daemon made, or why
    await store.close()
    found: set[int] = set()
    not_done = 0
    # Widths fixed before the first outcome (each printed as it is known): an id of 8
    # digits, a uniqueEventId of a UUID's length, the longest result.
    widths = {
        "id": 8,
        "stream": max(map(len, settings.streams), default=0),
        "unique_event_id": 36,
        "result": len("would deliver"),
    }
    with Printer(REPLAY_COLUMNS, as_json=args.json, widths=widths) as out:

        def outcome(done: Outcome) -> None:
            nonlocal not_done
            out.row(done.as_dict())
            not_done += done.result in ("failed", "skipped")
            if selection.ids is not None:
                found.add(done.id)

        task = asyncio.current_task()
        assert task is not None
        # SIGTERM (a replay under systemd-run), SIGHUP (its ssh session dropped): as ^C, so
        # what was delivered is recorded (the replay's finally), not lost to a killed process.
        with cancelling(task, REPLAY_SIGNALS) as taken:
            try:
                await replay(settings, selection, dry_run=args.dry_run, on_outcome=outcome)
            except LeaseHeld as exc:  # refused, like any operator command that would do harm
                raise OperatorRefused(str(exc)) from None
            except (KeyboardInterrupt, asyncio.CancelledError):  # ^C, a signal, a sink's ^C
                out.close()
                by = f" by {taken[0].name}" if taken else ""
                print(
                    f"opera-consumer dlq replay: interrupted{by}: the events delivered before "
                    "it are recorded and out of the DLQ; the one being delivered and the rest "
                    "stay in it (dlq list shows them; replay them again)",
                    file=sys.stderr,
                )
                return ExitCode.INTERRUPTED
    missing = _missing(selection, found)
    return ExitCode.RUNTIME if not_done or missing else ExitCode.OK
