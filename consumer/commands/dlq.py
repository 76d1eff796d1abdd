"""``opera-consumer dlq list | show | replay | purge``: the dead-letter queue, by hand.

Safe while the daemon runs (SQLite WAL; every change is one short transaction). A replay goes
through the configured sink (and orchestration): each event delivered is removed from the DLQ
and recorded as processed in the same transaction, so the stream will skip it if OHIP sends
it again. Events of one primaryKey are replayed in arrival order; after one fails, the later
ones of that resource are left in place. The jsonl sink has a single writer: replaying into it
needs the daemon stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
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

from ..config import JsonlSinkSettings, Settings
from ..core.events import Event
from ..core.evidence import describe, prefix
from ..core.printable import printable
from ..core.protocol import DecodeError, Next, decode
from ..core.records import DeadLetterRow
from ..core.retry_after import WaitRetryAfter
from ..errors import (
    ExitCode,
    LeaseHeld,
    OperatorRefused,
    ReplayRefused,
    SinkLost,
    SinkUnusable,
    TransientSinkError,
)
from ..logs import REDACTOR, configure
from ..runtime.assembly import build_sink, http_client, open_sink, register_secrets
from ..runtime.committer import Committer
from ..sinks.base import Sink
from ..state import acquire, acquire_replay, current_holder, open_store
from .output import emit, escaped, iso, no_store, parse_when

log = structlog.get_logger(__name__)

LIST_COLUMNS = ("id", "stream", "reason", "event_name", "primary_key", "offset", "attempts")
_EXCERPT = 60
_COMMIT_EVERY = 100
_MALFORMED = "a malformed frame cannot be replayed: purge it"
_GONE = "no longer in the DLQ: replayed or purged since it was read"
_UNKNOWN_STREAM = "its stream is not in the configuration (the sink may need its settings): add it"
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


def older_outside(
    rows: Sequence[DeadLetterRow], every: Sequence[DeadLetterRow]
) -> dict[tuple[str, str], int]:
    """Per (stream, primaryKey): the oldest dead letter of ``every`` that is not in ``rows``.
    A row of that key after it must wait for it: replaying it first would apply a resource's
    later change before its earlier one (in park-key mode the later ones are parked)."""
    chosen = {row.id for row in rows}
    oldest: dict[tuple[str, str], int] = {}
    for row in every:
        if row.primary_key and row.id not in chosen:
            key = (row.stream, row.primary_key)
            oldest[key] = min(row.id, oldest.get(key, row.id))
    return oldest


async def replay(
    settings: Settings,
    rows: Sequence[DeadLetterRow],
    *,
    dry_run: bool,
    attempts: int = 3,
    waiting_for: dict[tuple[str, str], int] | None = None,
) -> list[Outcome]:
    """Re-deliver ``rows`` (in id order) through the configured sink. A row whose key has an
    older dead letter in ``waiting_for`` (see :func:`older_outside`), or an earlier row in
    this replay that was not delivered, is skipped: a key's events keep their order."""
    failed_keys: set[tuple[str, str]] = set()
    held_back = waiting_for or {}
    if dry_run:
        plan = []
        for row in rows:
            skip = _held(row, held_back, failed_keys)
            if skip is None and not isinstance(event := _event(row), Event):
                skip = _unusable(row, event, failed_keys)
            plan.append(skip or _outcome(row, "would deliver"))
        return plan
    register_secrets(settings)  # as the daemon does: nothing we log may show one
    replaying = await acquire_replay(settings.state)
    try:
        running = await current_holder(settings.state)
        if running is not None and isinstance(settings.sink, JsonlSinkSettings):
            raise ReplayRefused(
                f"the jsonl sink has one writer and a daemon (pid {running.get('pid')}) is "
                "running: stop it, replay, start it again (or use --dry-run to see the plan)"
            )
        return await _replay(
            settings,
            rows,
            alone=running is None,
            held_back=held_back,
            failed_keys=failed_keys,
            attempts=attempts,
        )
    finally:
        await replaying.release()


async def _replay(
    settings: Settings,
    rows: Sequence[DeadLetterRow],
    *,
    alone: bool,
    held_back: dict[tuple[str, str], int],
    failed_keys: set[tuple[str, str]],
    attempts: int,
) -> list[Outcome]:
    """The replay, under its lock (``alone``: no daemon runs; keep one from starting)."""
    st = settings.state
    outcomes: list[Outcome] = []
    # While we replay into a single-writer sink, keep a daemon from starting.
    held = await acquire(st, (), role="dlq-replay") if alone else None
    try:
        store = await open_store(st)
        http = http_client(settings)
        try:
            # Read before the lock was ours: a replay that ended meanwhile delivered some.
            listed = await store.dead_letters(ids=[r.id for r in rows], payloads=False)
            still = {r.id for r in listed}
            sink = build_sink(settings, http)
            await open_sink(sink, store, st.path)
            committer = Committer(store, sink, max_events=1_000_000, interval_s=1.0)
            try:
                for i, row in enumerate(rows, 1):
                    skip = _held(row, held_back, failed_keys)
                    if skip is None and row.id not in still:
                        skip = _outcome(row, "skipped", _GONE)  # its key may go on
                    if skip is None and row.stream not in settings.streams:
                        skip = _unusable(row, _UNKNOWN_STREAM, failed_keys)
                    outcomes.append(skip or await _one(row, sink, committer, failed_keys, attempts))
                    if i % _COMMIT_EVERY == 0:  # bound what a crash here would re-deliver
                        await committer.flush()
            finally:
                try:  # what was delivered is recorded however the loop ended (^C too)
                    await committer.flush()
                finally:
                    await sink.close()
        finally:
            await http.close()
            await store.close()
    finally:
        if held is not None:
            await held.release()
    return outcomes


async def _one(
    row: DeadLetterRow,
    sink: Sink,
    committer: Committer,
    failed_keys: set[tuple[str, str]],
    attempts: int,
) -> Outcome:
    event = _event(row)
    if not isinstance(event, Event):
        return _unusable(row, event, failed_keys)
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
        return _outcome(row, "failed", why)
    committer.processed(row.stream, [event.unique_event_id])
    committer.resolved(row.id)
    return _outcome(row, "delivered")


def _held(
    row: DeadLetterRow, held_back: dict[tuple[str, str], int], failed: set[tuple[str, str]]
) -> Outcome | None:
    """``row`` skipped when an older event of its key is not delivered (its key then holds
    back the later ones too), else None."""
    if not row.primary_key:
        return None
    key = (row.stream, row.primary_key)
    if key in failed:
        return _outcome(row, "skipped", "an earlier event of this primaryKey was not delivered")
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


def _event(row: DeadLetterRow) -> Event | str:
    """The dead letter's event, or why it cannot be replayed."""
    if row.reason == "malformed":
        return _MALFORMED
    # The payload is the newEvent's JSON: read by the decoder the wire goes through, in a frame
    # of its own, so that the sink gets what the daemon would have given it (the text as
    # received; a number no double holds or a key twice refused, as the daemon refuses them
    # since). Python's json read 1e400 as inf, which the sinks wrote as null.
    out = decode(_FRAME_HEAD + row.payload.encode("utf-8", "surrogatepass") + b"}}}")
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
    store = await open_store(settings.state, create=False)
    try:
        rows = await store.dead_letters(
            getattr(args, "stream", None),
            reason=getattr(args, "reason", None),
            since=since,
            before=before,
            ids=[args.id] if action == "show" else (getattr(args, "ids", None) or None),
            payloads=action in ("show", "replay"),  # list and purge show summaries only
            # one more than shown: whether there are more to say so
            limit=args.limit + 1 if action == "list" and args.limit else None,
        )
        if action == "purge" and not args.dry_run:
            n = await store.purge_dead_letters([r.id for r in rows])
        if action == "replay":  # what the chosen rows' keys wait for
            waiting_for = older_outside(rows, await store.dead_letters(None, payloads=False))
    finally:
        await store.close()
    if action == "list":
        more = bool(args.limit) and len(rows) > args.limit
        emit([summary(r) for r in rows[: args.limit or None]], LIST_COLUMNS, as_json=args.json)
        if more:
            print(
                f"only the oldest {args.limit} shown: more dead letters match (--limit N, "
                "0 for all, or narrow with --stream, --reason, --since)",
                file=sys.stderr,
            )
        return ExitCode.OK
    if action == "show":
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
            payload
            if isinstance(payload, str)
            else json.dumps(payload, indent=2, ensure_ascii=False)
        )
        print(escaped(text))
        return ExitCode.OK
    missing = sorted(set(args.ids) - {r.id for r in rows})
    if missing:
        print(f"no dead letter with id {', '.join(map(str, missing))}", file=sys.stderr)
    if action == "purge":
        if args.dry_run:
            emit([summary(r) for r in rows], LIST_COLUMNS, as_json=args.json)
            print(f"would purge {len(rows)} dead letter(s)", file=sys.stderr)
        else:
            print(f"purged {n} dead letter(s)", file=sys.stderr)
        return ExitCode.RUNTIME if missing else ExitCode.OK
    try:
        outcomes = await replay(settings, rows, dry_run=args.dry_run, waiting_for=waiting_for)
    except LeaseHeld as exc:  # refused, like any operator command that would do harm now
        raise OperatorRefused(str(exc)) from None
    except (KeyboardInterrupt, asyncio.CancelledError):  # ^C, or a sink's KeyboardInterrupt
        print(
            "opera-consumer dlq replay: interrupted: the events delivered before it are "
            "recorded and out of the DLQ; the one being delivered and the rest stay in it "
            "(dlq list shows them; replay them again)",
            file=sys.stderr,
        )
        return ExitCode.INTERRUPTED
    emit(
        [o.as_dict() for o in outcomes],
        ("id", "stream", "unique_event_id", "result", "detail"),
        as_json=args.json,
    )
    failed = [o for o in outcomes if o.result in ("failed", "skipped")]
    return ExitCode.RUNTIME if failed or missing else ExitCode.OK
