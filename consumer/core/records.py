"""The records of the state store: what a commit carries and what the store hands back.

Plain values, shared by the pipeline and the committer that make them, the state stores that
persist them (SQLite, PostgreSQL), the sinks that stage rows into a commit, and the operator
commands that read them back.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from .events import Event
from .evidence import Evidence, event_evidence
from .watermark import Position


@dataclass(frozen=True, slots=True)
class Staged:
    """Rows a sink asks to be written inside the checkpoint's own transaction (a table in the
    state store's database): ``statement`` in that database's dialect, run once per row.
    ``many(n)``, where given, is the same statement for ``n`` rows at once (SQLite runs those:
    see :func:`consumer.sqlite_tx.write_rows`).
    Column ``STREAM_COLUMN`` of each row is its stream (the fence drops a fenced stream's).

    ``events``: the event of each row (the same order), and ``aside``: the sink's own write of
    events, outside the state transaction. Where the rows go when that transaction refuses one
    of them for its data (:class:`~consumer.errors.StagedRowRefused`): the sink then writes
    through its own path for good, and dead-letters an event it refuses there, alone. None:
    no way round, the refusal fails the commit. ``switch``: the sink's writes go through that
    path from now on; called by the committer once whoever runs the streams heard of those
    dead letters and nothing staged is left (until then a write stays staged, held: park-key
    parks a resource before its later event is written).
    ``document``: ``statement`` takes every row at once, as one JSON array of them (``$1``,
    PostgreSQL's store): one statement a commit instead of one a row, whose parameters the
    driver would encode one by one on the event loop's thread."""

    statement: str
    rows: list[tuple[Any, ...]]
    many: Callable[[int], str] | None = None
    events: list[Event] | None = None
    aside: Callable[[str, Sequence[Event]], Awaitable[None]] | None = None
    switch: Callable[[], None] | None = None
    document: bool = False

    STREAM_COLUMN = 1  # as in consumer.sinks.rows (row and json_row)

    def without(self, streams: frozenset[str]) -> Staged:
        col = self.STREAM_COLUMN
        if self.events is None:
            return dataclasses.replace(self, rows=[r for r in self.rows if r[col] not in streams])
        return self.where(lambda stream, _: stream not in streams)

    def where(self, keep: Callable[[str, Event], bool]) -> Staged:
        """The rows whose stream and event ``keep`` takes (with events only)."""
        col = self.STREAM_COLUMN
        pairs = zip(self.rows, self.events or [], strict=True)
        kept = [(r, e) for r, e in pairs if keep(str(r[col]), e)]
        return dataclasses.replace(self, rows=[r for r, _ in kept], events=[e for _, e in kept])

    def by_stream(self) -> dict[str, list[Event]]:
        """The rows' events per stream, each stream's in their order (empty without events)."""
        col = self.STREAM_COLUMN
        out: dict[str, list[Event]] = {}
        for r, e in zip(self.rows, self.events or [], strict=self.events is not None):
            out.setdefault(str(r[col]), []).append(e)
        return out

    def as_document(self) -> str:
        """``rows`` as one JSON array (``document``), one per first column, the last kept: an
        upsert may not touch a row twice in one statement (a uniqueEventId in two streams),
        and run one by one the last would win."""
        return orjson.dumps(list({r[0]: r for r in self.rows}.values())).decode()


@dataclass(frozen=True, slots=True)
class Fence:
    """A fleet member's claim on the streams of a commit: the commit goes through only if
    the member still holds each stream's lease at this epoch (checked in the transaction)."""

    member: str
    epochs: dict[str, int]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    stream: str
    offset: str
    unique_event_id: str
    updated_at: float  # checkpoint time: when it was last written (committed, anchored, set)
    processed_count: int
    # Event time: the own timestamp of the checkpoint's event (epoch seconds), from its last
    # commit; None when unknown (anchored or set by an operator, or not in Oracle's format).
    event_at: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    stream: str
    reason: str  # a short class: "malformed", "sink_rejected", ...
    error: str
    payload: str  # the event JSON (whole), or a malformed frame's first PAYLOAD_LIMIT characters
    offset: str | None = None
    unique_event_id: str | None = None
    event_name: str | None = None
    primary_key: str | None = None
    # Of the complete original, of which ``payload`` may be a prefix (None: payload is whole).
    payload_size: int | None = None
    payload_sha256: str | None = None

    @classmethod
    def of(cls, evidence: Evidence, **fields: Any) -> DeadLetter:
        return cls(
            payload=evidence.text,
            payload_size=evidence.size,
            payload_sha256=evidence.sha256,
            **fields,
        )

    @classmethod
    def of_event(cls, ev: Event, *, stream: str, reason: str, error: str) -> DeadLetter:
        """An event's dead letter: a bounded copy of it, and what identifies it."""
        return cls.of(
            event_evidence(ev),
            stream=stream,
            reason=reason,
            error=error,
            offset=ev.offset,
            unique_event_id=ev.unique_event_id,
            event_name=ev.event_name,
            primary_key=ev.primary_key,
        )

    @property
    def dedup_key(self) -> str:
        # The same malformed frame, sent again, counts as another attempt. (An event sent again
        # is a duplicate before it gets here: its id was recorded as handled; see committer.)
        digest = self.payload_sha256 or hashlib.sha256(self.payload.encode()).hexdigest()
        return self.unique_event_id or "sha256:" + digest


@dataclass(slots=True)
class CommitBatch:
    checkpoints: dict[str, Position] = field(default_factory=dict)
    event_at: dict[str, float] = field(default_factory=dict)  # of a checkpoint, when known
    processed: dict[str, list[str]] = field(default_factory=dict)  # stream -> event ids
    done_counts: dict[str, int] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    sink_state: tuple[str, str] | None = None
    # Rows a sink wants written in this very transaction (see Sink.staged).
    staged: list[Staged] = field(default_factory=list)
    resolved: list[int] = field(default_factory=list)  # dead letters delivered by a replay
    fence: Fence | None = None  # fleet mode: the leases this commit needs
    # (committer, number): the store applies a batch of one committer's at most once, so a
    # commit whose outcome the client never learnt (cancelled in COMMIT, a connection lost
    # after it) can be sent again: counts, dead-letter attempts and resolved letters once.
    mark: tuple[str, int] | None = None

    def streams(self) -> set[str]:
        """Every stream this batch writes for."""
        out = set(self.checkpoints) | set(self.processed) | set(self.done_counts)
        out.update(d.stream for d in self.dead_letters)
        col = Staged.STREAM_COLUMN
        for staged in self.staged:
            out.update(str(r[col]) for r in staged.rows)
        return out

    def without(self, streams: frozenset[str]) -> CommitBatch:
        """This batch minus everything of ``streams`` (fenced: another member owns them)."""
        return CommitBatch(
            checkpoints={s: p for s, p in self.checkpoints.items() if s not in streams},
            event_at={s: t for s, t in self.event_at.items() if s not in streams},
            processed={s: i for s, i in self.processed.items() if s not in streams},
            done_counts={s: n for s, n in self.done_counts.items() if s not in streams},
            dead_letters=[d for d in self.dead_letters if d.stream not in streams],
            sink_state=self.sink_state,
            staged=[s.without(streams) for s in self.staged],
            resolved=list(self.resolved),
            fence=self.fence,
            mark=self.mark,
        )

    def __bool__(self) -> bool:
        return bool(
            self.checkpoints
            or self.processed
            or self.dead_letters
            or self.sink_state
            or self.staged
            or self.resolved
        )


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    id: int
    stream: str
    offset: str | None
    unique_event_id: str | None
    event_name: str | None
    primary_key: str | None
    reason: str
    error: str
    payload: str
    attempts: int
    first_at: float
    last_at: float
    payload_size: int | None
    payload_sha256: str | None


def dead_letter_row(d: DeadLetter, now: float) -> tuple[Any, ...]:
    """A dead letter as the stores insert it: stream, dedup_key, offset, unique_event_id,
    event_name, primary_key, reason, error, payload, first_at, last_at, payload_size,
    payload_sha256 (both stores' column order)."""
    return (
        d.stream,
        d.dedup_key,
        d.offset,
        d.unique_event_id,
        d.event_name,
        d.primary_key,
        d.reason,
        d.error,
        d.payload,
        now,
        now,
        d.payload_size,
        d.payload_sha256,
    )
