"""The SQLite state store (the default): checkpoints, processed event ids, dead letters and
sink state in one file beside the daemon.

WAL mode, schema versioned with ``PRAGMA user_version``, file created mode 0600. Writes go
through one aiosqlite connection in ``BEGIN IMMEDIATE`` transactions (group commit); other reads
use a second one, which WAL lets run concurrently with a commit.

The deduplication lookup (:meth:`SqliteStore.seen`) is the exception: it runs on the event loop's
thread through a third, query-only ``sqlite3`` connection. Measured here: the lookup of a batch
takes about 50 µs, while a hop to aiosqlite's thread costs 10 ms or more once the loop is busy
(the worker thread waits for the GIL), which capped catch-up throughput.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiosqlite

from ..core.evidence import prefix
from ..core.records import (
    Checkpoint,
    CommitBatch,
    DeadLetterRow,
    Fence,
    Staged,
    dead_letter_row,
)
from ..core.watermark import Position
from ..errors import SchemaTooNew, StagedRowRefused, StoreError
from ..files import DISK_FIX, identity_at, make_dirs, may_clear
from ..files import identity as file_identity
from ..sqlite_tx import in_thread, sync_transaction, transaction, write_rows
from .base import PRUNE_CHUNK

MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema
    """
    CREATE TABLE checkpoints (
        stream          TEXT PRIMARY KEY,
        offset          TEXT NOT NULL,
        unique_event_id TEXT NOT NULL,
        updated_at      REAL NOT NULL,
        processed_count INTEGER NOT NULL DEFAULT 0,
        last_event_at   REAL
    );
    CREATE TABLE processed_events (
        stream       TEXT NOT NULL,
        event_id     TEXT NOT NULL,
        processed_at REAL NOT NULL,
        PRIMARY KEY (stream, event_id)
    ) WITHOUT ROWID;
    CREATE INDEX processed_events_at ON processed_events (processed_at);
    CREATE TABLE dead_letters (
        id              INTEGER PRIMARY KEY,
        stream          TEXT NOT NULL,
        dedup_key       TEXT NOT NULL,
        offset          TEXT,
        unique_event_id TEXT,
        event_name      TEXT,
        reason          TEXT NOT NULL,
        error           TEXT NOT NULL,
        payload         TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 1,
        first_at        REAL NOT NULL,
        last_at         REAL NOT NULL,
        UNIQUE (stream, dedup_key)
    );
    CREATE TABLE sink_state (
        sink       TEXT PRIMARY KEY,
        state      TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # 2: the resource a dead letter is about (park-key), and operator-requested start positions
    """
    ALTER TABLE dead_letters ADD COLUMN primary_key TEXT;
    CREATE INDEX dead_letters_key ON dead_letters (stream, primary_key);
    CREATE TABLE start_overrides (
        stream TEXT PRIMARY KEY,
        mode   TEXT NOT NULL CHECK (mode IN ('highest')),
        set_at REAL NOT NULL
    );
    """,
    # 3: a dead letter keeps a bounded prefix of its payload, with the size and hash of the whole
    """
    ALTER TABLE dead_letters ADD COLUMN payload_size INTEGER;
    ALTER TABLE dead_letters ADD COLUMN payload_sha256 TEXT;
    """,
    # 4: the checkpoint's event time (its event's own timestamp) under its own name; the old
    # column held the commit time (as updated_at does), so no value of it is kept
    """
    ALTER TABLE checkpoints RENAME COLUMN last_event_at TO event_at;
    UPDATE checkpoints SET event_at = NULL;
    """,
    # 5: when the stream's last subscription that we completed was closed (wall clock): the
    # next process to subscribe it waits out the rest of resubscribe_gap_s (OHIP: else 4409)
    """
    CREATE TABLE completed_subscriptions (
        stream    TEXT PRIMARY KEY,
        closed_at REAL NOT NULL
    );
    """,
    # 6: dead-letter ids are never reused (AUTOINCREMENT). A plain INTEGER PRIMARY KEY gave a
    # new letter the id of the newest one deleted: a `dlq replay` that read id N, resolving N
    # after N was purged and reused, deleted another event's only record. The table is
    # rebuilt (SQLite cannot add AUTOINCREMENT in place); ids and rows are kept.
    """
    CREATE TABLE dead_letters_v6 (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        stream          TEXT NOT NULL,
        dedup_key       TEXT NOT NULL,
        offset          TEXT,
        unique_event_id TEXT,
        event_name      TEXT,
        reason          TEXT NOT NULL,
        error           TEXT NOT NULL,
        payload         TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 1,
        first_at        REAL NOT NULL,
        last_at         REAL NOT NULL,
        primary_key     TEXT,
        payload_size    INTEGER,
        payload_sha256  TEXT,
        UNIQUE (stream, dedup_key)
    );
    INSERT INTO dead_letters_v6 (id, stream, dedup_key, offset, unique_event_id, event_name,
        reason, error, payload, attempts, first_at, last_at, primary_key, payload_size,
        payload_sha256)
    SELECT id, stream, dedup_key, offset, unique_event_id, event_name, reason, error, payload,
        attempts, first_at, last_at, primary_key, payload_size, payload_sha256
    FROM dead_letters;
    DROP TABLE dead_letters;
    ALTER TABLE dead_letters_v6 RENAME TO dead_letters;
    CREATE INDEX dead_letters_key ON dead_letters (stream, primary_key);
    """,
    # 7: the number of each committer's newest commit (see CommitBatch.mark): a commit sent
    # again after its outcome was lost is not applied twice
    """
    CREATE TABLE commit_marks (
        committer TEXT PRIMARY KEY,
        seq       INTEGER NOT NULL,
        at        REAL NOT NULL
    );
    """,
)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _translated(
    method: Callable[Concatenate[SqliteStore, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[SqliteStore, _P], Coroutine[Any, Any, _R]]:
    """sqlite3's errors become :class:`StoreError` where they enter (path, what, fix)."""

    @functools.wraps(method)
    async def translated(store: SqliteStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await method(store, *args, **kwargs)
        except sqlite3.Error as exc:
            raise store_error(store.path, exc) from None

    return translated


# Dead-letter ids (listed, purged, or resolved by a replay's commit) as one JSON parameter, not
# one variable each: a DLQ of 10^5 rows is past SQLite's variable limit (32,766 in a default
# build), and `purge --all` failed whole.
_IDS = "(SELECT value FROM json_each(?))"


def _ids(ids: Sequence[int]) -> str:
    return json.dumps([int(i) for i in ids])


@functools.cache
def _processed_sql(rows: int) -> str:
    return "INSERT OR IGNORE INTO processed_events (stream, event_id, processed_at) VALUES " + (
        ", ".join(["(?, ?, ?)"] * rows)
    )


# A committer's batch is applied when its number is past the committer's newest (or the
# committer is new); no row changed: it was applied before.
_MARK = (
    "INSERT INTO commit_marks (committer, seq, at) VALUES (?, ?, ?) "
    "ON CONFLICT (committer) DO UPDATE SET seq = excluded.seq, at = excluded.at "
    "WHERE seq < excluded.seq"
)

# A checkpoint's own event id is never pruned, however old its stamp: the inclusive resume
# sends that event again, and only its id says it was delivered (stamps of a clock that was
# slow when they were written look old to the corrected one; see core.retention).
_NOT_A_CHECKPOINT = (
    "NOT EXISTS (SELECT 1 FROM checkpoints c "
    "WHERE c.stream = p.stream AND c.unique_event_id = p.event_id)"
)

_PUT_SINK_STATE = (
    "INSERT INTO sink_state (sink, state, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (sink) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at"
)


# Primary result codes of a failed staged statement that are its row's (a constraint, a
# trigger's RAISE; too big; a datatype mismatch). A plain SQLITE_ERROR is the row's only while
# the statement still compiles: an expression failing on it ("malformed JSON" from a trigger's
# json_extract), not the table dropped or altered ("no such table"). Any other code (busy,
# locked, I/O, full) is what every event meets: the commit is retried as before.
_ROW_CODES = frozenset({sqlite3.SQLITE_CONSTRAINT, sqlite3.SQLITE_TOOBIG, sqlite3.SQLITE_MISMATCH})


def staged_row_fault(code: int | None, compiles: bool) -> bool:
    """Whether a staged statement that failed with SQLite's primary result ``code`` may have
    failed on its row's data (``compiles``: the statement still compiles against the table),
    so that the committer writes the rows through the sink's own path, which tells a row's
    refusal (that event dead-lettered) from the table's (retried)."""
    if code == sqlite3.SQLITE_ERROR:
        return compiles
    return code in _ROW_CODES


def _code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def _compiles(db: sqlite3.Connection, staged: Staged) -> bool:
    """Whether the staged statement compiles (EXPLAIN: prepared, not run) against the schema
    as it is now, with the table's triggers and generated columns."""
    width = len(staged.rows[0]) if staged.rows else 0
    try:
        db.execute(f"EXPLAIN {staged.statement}", (None,) * width).fetchall()
    except sqlite3.Error:
        return False
    return True


class SqliteStore:
    def __init__(
        self,
        path: Path,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        lookup: sqlite3.Connection,
        identity: tuple[int, int],
    ) -> None:
        self.path = path
        self._w = writer
        self._r = reader
        self._lookup = lookup
        self._closed = False
        self._identity = identity  # of the file opened: see _check_file

    @classmethod
    async def open(
        cls, path: Path, *, synchronous: str = "full", create: bool = True
    ) -> SqliteStore:
        """Open (``create``: or create) the store; :class:`StoreError` names the path and fix."""
        try:
            return await cls._open(path, synchronous, create)
        except StoreError as exc:
            raise type(exc)(f"state store {path}: {exc}", retriable=exc.retriable) from None
        except (sqlite3.Error, OSError) as exc:
            raise store_error(path, exc) from None

    @classmethod
    async def _open(cls, path: Path, synchronous: str, create: bool) -> SqliteStore:
        if (fault := not_a_file(path, "[state] path")) is not None:
            raise StoreError(fault)  # an operator's to fix: exit 78, not retried
        if create:
            make_dirs(path.parent)
            # Create it 0600 before SQLite does (SQLite gives -wal/-shm the same mode).
            os.close(os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
        else:  # FileNotFoundError when it does not exist: SQLite would create it
            os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        # A plain probe first: a file SQLite cannot open or read (a directory, a corrupt file)
        # fails here, before aiosqlite starts a thread that would outlive the failure.
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as probe:
            probe.execute("PRAGMA user_version").fetchone()
        writer = await _connect(path, synchronous)
        reader: aiosqlite.Connection | None = None
        try:
            await _migrate(writer)
            reader = await _connect(path, synchronous)
            # Inside the try too: a lookup connection that fails (out of file descriptors)
            # left the aiosqlite threads running, and the process never exited.
            lookup = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                lookup.execute("PRAGMA query_only=ON")
                lookup.execute("PRAGMA busy_timeout=5000")
                lookup.execute(_CACHE_SIZE)
                # The file the connections opened (its schema was read through them just now).
                identity = file_identity(os.stat(path))
            except BaseException:
                lookup.close()
                raise
        except BaseException:
            if reader is not None:
                await reader.close()
            await writer.close()
            raise
        return cls(path, writer, reader, lookup, identity)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._w.execute("PRAGMA optimize")
        finally:
            self._lookup.close()
            await self._w.close()
            await self._r.close()

    # --- reads ----------------------------------------------------------------------------

    @_translated
    async def checkpoint(self, stream: str) -> Checkpoint | None:
        async with self._r.execute(
            "SELECT stream, offset, unique_event_id, updated_at, processed_count, event_at "
            "FROM checkpoints WHERE stream = ?",
            (stream,),
        ) as cur:
            row = await cur.fetchone()
        return Checkpoint(*row) if row else None

    @_translated
    async def checkpoints(self) -> list[Checkpoint]:
        async with self._r.execute(
            "SELECT stream, offset, unique_event_id, updated_at, processed_count, event_at "
            "FROM checkpoints ORDER BY stream"
        ) as cur:
            return [Checkpoint(*row) for row in await cur.fetchall()]

    @_translated
    async def seen(self, stream: str, event_ids: Sequence[str]) -> set[str]:
        """Which of these ids were already processed (committed) for this stream.

        Answered on the loop's thread, without awaiting: see the module docstring.
        """
        found: set[str] = set()
        for chunk, marks in _in_lists(event_ids):
            rows = self._lookup.execute(
                f"SELECT event_id FROM processed_events WHERE stream = ? AND event_id IN ({marks})",
                (stream, *chunk),
            ).fetchall()
            found.update(row[0] for row in rows)
        return found

    @_translated
    async def payload_lengths(self, ids: Sequence[int]) -> dict[int, int]:
        async with self._r.execute(
            f"SELECT id, length(payload) FROM dead_letters WHERE id IN {_IDS}", (_ids(ids),)
        ) as cur:
            return {int(i): int(n) for i, n in await cur.fetchall()}

    @_translated
    async def sink_state(self, sink: str) -> str | None:
        async with self._r.execute("SELECT state FROM sink_state WHERE sink = ?", (sink,)) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else None

    @_translated
    async def dead_letter_counts(self) -> dict[str, int]:
        async with self._r.execute(
            "SELECT stream, COUNT(*) FROM dead_letters GROUP BY stream"
        ) as cur:
            return {str(s): int(n) for s, n in await cur.fetchall()}

    @_translated
    async def dead_letters(
        self,
        stream: str | None = None,
        *,
        reason: str | None = None,
        since: float | None = None,
        before: float | None = None,
        ids: Sequence[int] | None = None,
        payloads: bool = True,
        limit: int | None = None,
        after: int | None = None,
    ) -> list[DeadLetterRow]:
        """Dead letters in arrival order, filtered by every argument given (see StateStore)."""
        payload = "payload" if payloads else "''"  # an empty text in its place
        sql = (
            "SELECT id, stream, offset, unique_event_id, event_name, primary_key, reason, error, "
            f"{payload}, attempts, first_at, last_at, "
            "payload_size, payload_sha256 FROM dead_letters WHERE 1"
        )
        args: list[Any] = []
        # A page (limit) walks the ids: "+" keeps SQLite off the (stream, primary_key) index,
        # which had it sort the stream's every row for each page of a replay or listing.
        for clause, value in (
            (" AND +stream = ?" if limit is not None else " AND stream = ?", stream),
            (" AND reason = ?", reason),
            (" AND last_at >= ?", since),
            (" AND last_at < ?", before),
            (" AND id > ?", after),
        ):
            if value is not None:
                sql += clause
                args.append(value)
        if ids is not None:
            sql += f" AND id IN {_IDS}"
            args.append(_ids(ids))
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        async with self._r.execute(sql, args) as cur:
            return [DeadLetterRow(*row) for row in await cur.fetchall()]

    @_translated
    async def oldest_outside(
        self,
        keys: Sequence[tuple[str, str]],
        *,
        below: int,
        reason: str | None = None,
        since: float | None = None,
        before: float | None = None,
        ids: Sequence[int] | None = None,
    ) -> dict[tuple[str, str], int]:
        """Each key's oldest dead letter the filters do not select (see StateStore)."""
        chosen = ""
        args: list[Any] = [below]
        for clause, value in (
            (" AND reason = ?", reason),
            (" AND last_at >= ?", since),
            (" AND last_at < ?", before),
            (f" AND id IN {_IDS}", None if ids is None else _ids(ids)),
        ):
            if value is not None:
                chosen += clause
                args.append(value)
        if not chosen or not keys:
            return {}
        # Per key, its letters in id order on the (stream, primary_key) index, up to the first
        # one outside (or ``below``). The keys as parameters: a page's (hundreds), as they are.
        sql = (
            "SELECT column1, column2, (SELECT id FROM dead_letters WHERE stream = column1 "
            f"AND primary_key = column2 AND id < ? AND NOT (1{chosen}) ORDER BY id LIMIT 1) "
            "FROM (VALUES " + ", ".join(["(?, ?)"] * len(keys)) + ")"
        )
        args += [v for key in keys for v in key]
        async with self._r.execute(sql, args) as cur:
            return {(str(s), str(k)): int(i) for s, k, i in await cur.fetchall() if i is not None}

    @_translated
    async def parked_among(
        self, stream: str, primary_keys: Sequence[str]
    ) -> tuple[dict[str, str], bool]:
        """Of these resources, those with dead letters -> the uniqueEventId (or dedup key) of
        the oldest; and whether the stream has any dead letter of a resource (see StateStore).
        On the loop's thread, like :meth:`seen`: one statement per 900 keys on the
        (stream, primary_key) index, and one more, on its first row, when none was found."""
        found: dict[str, str] = {}
        for chunk, marks in _in_lists(primary_keys):
            # The bare columns of a MIN() aggregate are those of its row (SQLite's rule).
            rows = self._lookup.execute(
                "SELECT primary_key, COALESCE(unique_event_id, dedup_key), MIN(id) "
                f"FROM dead_letters WHERE stream = ? AND primary_key IN ({marks}) "
                "GROUP BY primary_key",
                (stream, *chunk),
            ).fetchall()
            found.update((str(k), str(v)) for k, v, _ in rows)
        if found:
            return found, True
        row = self._lookup.execute(
            "SELECT 1 FROM dead_letters WHERE stream = ? AND primary_key IS NOT NULL LIMIT 1",
            (stream,),
        ).fetchone()
        return found, row is not None

    @_translated
    async def has_dead_letters(self, stream: str, primary_key: str) -> bool:
        """Does this resource still have dead letters? (on the loop's thread, like seen)"""
        row = self._lookup.execute(
            "SELECT 1 FROM dead_letters WHERE stream = ? AND primary_key = ? LIMIT 1",
            (stream, primary_key),
        ).fetchone()
        return row is not None

    @_translated
    async def start_override(self, stream: str) -> str | None:
        async with self._r.execute(
            "SELECT mode FROM start_overrides WHERE stream = ?", (stream,)
        ) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else None

    @_translated
    async def completed_closed_at(self, stream: str) -> float | None:
        async with self._r.execute(
            "SELECT closed_at FROM completed_subscriptions WHERE stream = ?", (stream,)
        ) as cur:
            row = await cur.fetchone()
        return float(row[0]) if row else None

    async def completed_close(self, stream: str) -> tuple[float | None, float]:
        return await self.completed_closed_at(stream), time.time()  # one host: its clock

    # --- writes ---------------------------------------------------------------------------

    @_translated
    async def commit(self, batch: CommitBatch, now: float | None = None) -> bool:
        """Everything in ``batch`` becomes durable together, or not at all."""
        return await self._commit(batch, time.time() if now is None else now)

    async def _commit(self, batch: CommitBatch, now: float) -> bool:
        # One call into the writer's thread for the whole transaction: one statement per
        # await would take one turn of a loop busy with a catch-up each (measured: most of a
        # commit's time), and the thread's work is all native.
        return await in_thread(self._w, lambda db: self._commit_now(db, batch, now))

    def _commit_now(self, db: sqlite3.Connection, batch: CommitBatch, now: float) -> bool:
        written = False  # every statement ran: a failure after it is the COMMIT's
        try:
            with sync_transaction(db):
                if not self._write(db, batch, now):
                    return False
                written = True
        except sqlite3.Error as exc:
            # A deferred foreign key (foreign_keys=ON) is checked at COMMIT, not at the row's
            # statement, and SQLite says neither which row nor which key (nor can it check them
            # sooner, as PostgreSQL's SET CONSTRAINTS does): taken for the staged rows', under
            # the same rules as a statement's refusal, when the batch has any. The store's own
            # tables have no foreign key (were a trigger on one to write to a table that has,
            # the rows would go aside, then the commit of the rest fail as before). The
            # transaction is rolled back (a failed COMMIT leaves it open: sync_transaction
            # ends it).
            if not (written and any(s.rows for s in batch.staged)):
                raise
            if not staged_row_fault(_code(exc), compiles=False):
                raise
            raise self._refused(exc, " at COMMIT") from None
        return True

    def _refused(self, exc: sqlite3.Error, when: str) -> StagedRowRefused:
        """A staged row refused for its data (``when``: at COMMIT, a deferred check), bounded."""
        return StagedRowRefused(
            f"state store {self.path}: committing: a row a sink staged was refused{when} "
            f"({prefix(str(exc), 300)}): the sink writes through its own path instead"
        )

    def _write(self, db: sqlite3.Connection, batch: CommitBatch, now: float) -> bool:
        """The batch's statements, in the transaction; False: applied before."""
        if batch.mark is not None and not db.execute(_MARK, (*batch.mark, now)).rowcount:
            return False  # applied before (see CommitBatch.mark)
        for stream, ids in batch.processed.items():
            # Bound as parameters (JSON through json_each cut an id at a NUL from the
            # wire), in statements of many rows (see write_rows).
            write_rows(db, _processed_sql(1), [(stream, i, now) for i in ids], _processed_sql)
        if batch.dead_letters:
            db.executemany(
                "INSERT INTO dead_letters (stream, dedup_key, offset, unique_event_id, "
                "event_name, primary_key, reason, error, payload, first_at, last_at, "
                "payload_size, payload_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (stream, dedup_key) DO UPDATE SET attempts = attempts + 1, "
                "last_at = excluded.last_at, error = excluded.error, reason = excluded.reason",
                [dead_letter_row(d, now) for d in batch.dead_letters],
            )
        for stream in set(batch.checkpoints) | set(batch.done_counts):
            pos = batch.checkpoints.get(stream)
            count = batch.done_counts.get(stream, 0)
            at = batch.event_at.get(stream)
            if pos is not None:
                db.execute(
                    "INSERT INTO checkpoints (stream, offset, unique_event_id, updated_at, "
                    "processed_count, event_at) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (stream) DO UPDATE SET offset = excluded.offset, "
                    "unique_event_id = excluded.unique_event_id, "
                    "updated_at = excluded.updated_at, "
                    "processed_count = processed_count + excluded.processed_count, "
                    "event_at = excluded.event_at",
                    (stream, pos.offset, pos.unique_event_id, now, count, at),
                )
            elif count:
                db.execute(
                    "UPDATE checkpoints SET processed_count = processed_count + ? WHERE stream = ?",
                    (count, stream),
                )
        if batch.resolved:
            db.execute(f"DELETE FROM dead_letters WHERE id IN {_IDS}", (_ids(batch.resolved),))
        if batch.checkpoints:
            # A checkpoint written by the stream supersedes an operator's pending reset.
            marks = ",".join("?" * len(batch.checkpoints))
            db.execute(
                f"DELETE FROM start_overrides WHERE stream IN ({marks})",
                list(batch.checkpoints),
            )
        for staged in batch.staged:
            try:
                write_rows(db, staged.statement, staged.rows, staged.many)
            except sqlite3.Error as exc:
                code = _code(exc)
                compiles = code == sqlite3.SQLITE_ERROR and _compiles(db, staged)
                if not staged_row_fault(code, compiles):
                    raise
                raise self._refused(exc, "") from None
        if batch.sink_state is not None:
            db.execute(_PUT_SINK_STATE, (*batch.sink_state, now))
        self._check_file()
        return True

    def _check_file(self) -> None:
        """Before a commit's COMMIT: the path still names the file the connections write.
        Removed or replaced underneath, SQLite would go on committing checkpoints into the
        deleted inode, lost with it at the close (and the restart would start a new store).
        One stat a commit (a few microseconds)."""
        try:
            now = identity_at(self.path)
        except OSError as exc:
            raise store_error(self.path, exc) from None
        if now != self._identity:
            raise StoreError(
                f"state store {self.path} was removed or replaced while the daemon ran: this "
                "commit was rolled back and the daemon stops; put the file back, then restart "
                "(a new store starts the streams from their configured start, and a jsonl sink "
                "file must be adopted or moved aside)"
            )

    @_translated
    async def anchor(self, stream: str, position: Position, fence: Fence | None = None) -> None:
        # ``fence``: no fleet on SQLite (the settings refuse it), so there are no leases.
        async with transaction(self._w) as db:
            # After an operator's reset the stream has a checkpoint row, which the first
            # event of the new session replaces.
            reset = await db.execute("DELETE FROM start_overrides WHERE stream = ?", (stream,))
            conflict = "DO NOTHING"
            if reset.rowcount:
                conflict = (
                    "DO UPDATE SET offset = excluded.offset, "
                    "unique_event_id = excluded.unique_event_id, updated_at = excluded.updated_at, "
                    "event_at = NULL"
                )
            await db.execute(
                "INSERT INTO checkpoints (stream, offset, unique_event_id, updated_at) "
                f"VALUES (?, ?, ?, ?) ON CONFLICT (stream) {conflict}",
                (stream, position.offset, position.unique_event_id, time.time()),
            )

    @_translated
    async def set_completed_closed_at(self, stream: str, at: float | None = None) -> None:
        await self._w.execute(
            "INSERT INTO completed_subscriptions (stream, closed_at) VALUES (?, ?) "
            "ON CONFLICT (stream) DO UPDATE SET closed_at = excluded.closed_at",
            (stream, time.time() if at is None else at),
        )

    @staticmethod
    async def _put_sink_state(db: aiosqlite.Connection, sink: str, state: str, now: float) -> None:
        await db.execute(_PUT_SINK_STATE, (sink, state, now))

    # --- operator changes (the CLI, while no daemon holds the stream) ------------------------

    @_translated
    async def set_offset(self, stream: str, offset: str) -> None:
        """The next session resumes at ``offset`` (inclusive); clears a pending reset."""
        async with transaction(self._w) as db:
            await db.execute("DELETE FROM start_overrides WHERE stream = ?", (stream,))
            await db.execute(
                "INSERT INTO checkpoints (stream, offset, unique_event_id, updated_at) "
                "VALUES (?, ?, '', ?) ON CONFLICT (stream) DO UPDATE SET "
                "offset = excluded.offset, unique_event_id = '', updated_at = excluded.updated_at, "
                "event_at = NULL",
                (stream, offset, time.time()),
            )

    @_translated
    async def reset_to_highest(self, stream: str) -> None:
        """The next session subscribes with ``offsetType: highest`` (skipping the backlog)."""
        await self._w.execute(
            "INSERT INTO start_overrides (stream, mode, set_at) VALUES (?, 'highest', ?) "
            "ON CONFLICT (stream) DO UPDATE SET mode = excluded.mode, set_at = excluded.set_at",
            (stream, time.time()),
        )

    @_translated
    async def set_sink_state(self, sink: str, state: str) -> None:
        """The sink's committed position, recorded before its first write or by an
        operator's ``sink adopt``."""
        await self._put_sink_state(self._w, sink, state, time.time())

    @_translated
    async def purge_dead_letters(self, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        cur = await self._w.execute(f"DELETE FROM dead_letters WHERE id IN {_IDS}", (_ids(ids),))
        n = cur.rowcount
        await cur.close()
        return max(n, 0)

    @_translated
    async def newest_dead_letter_id(self) -> int | None:
        async with self._r.execute("SELECT MAX(id) FROM dead_letters") as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else int(row[0])

    @_translated
    async def newest_processed_at(self) -> float | None:
        async with self._r.execute("SELECT MAX(processed_at) FROM processed_events") as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    @_translated
    async def prune_processed(
        self, older_than: float, *, streams: Sequence[str] | None = None, once: bool = False
    ) -> int:
        """Delete processed ids older than ``older_than`` (epoch seconds), of ``streams`` only
        when given, in short transactions of at most ``PRUNE_CHUNK`` rows (``once``: one)."""
        only = "" if streams is None else f" AND stream IN ({','.join('?' * len(streams))})"
        # Marks of committers gone as long (one a process; a live one's moves each commit).
        await self._w.execute("DELETE FROM commit_marks WHERE at < ?", (older_than,))
        total = 0
        while True:
            cur = await self._w.execute(
                "DELETE FROM processed_events WHERE (stream, event_id) IN (SELECT stream, "
                f"event_id FROM processed_events p WHERE processed_at < ?{only} "
                f"AND {_NOT_A_CHECKPOINT} ORDER BY processed_at LIMIT ?)",
                (older_than, *(streams or ()), PRUNE_CHUNK),
            )
            deleted = cur.rowcount
            await cur.close()
            total += max(deleted, 0)
            if deleted < PRUNE_CHUNK or once:
                return total


def _in_lists(values: Sequence[str]) -> Iterator[tuple[list[str], str]]:
    """``values`` in chunks of at most 900 for an ``IN (...)`` list, with its ``?`` marks: each
    padded to a multiple of 50 (a value repeated changes no answer), so 18 statement shapes,
    all kept prepared, instead of one per batch length (each prepared anew at ~100 µs, and
    cached at ~35 KB)."""
    for i in range(0, len(values), 900):
        chunk = list(values[i : i + 900])
        chunk += chunk[-1:] * (-len(chunk) % 50)
        yield chunk, ",".join("?" * len(chunk))


# Each connection's page cache: 512 KiB, not SQLite's 2 MiB. The writer filled its 2 MiB in
# any catch-up though ids in order need only the B-trees' right edges (and random ones miss
# a cache of either size: the same commit times, measured with 200,000 random ids, 1,000 a
# transaction, synchronous=FULL); the readers' cache is emptied whenever another connection
# commits (WAL). Measured: -3 MB peak RSS of a jsonl daemon in a 200,000-event catch-up.
_CACHE_SIZE = "PRAGMA cache_size=-512"


async def _connect(path: Path, synchronous: str) -> aiosqlite.Connection:
    # isolation_level=None: we issue BEGIN IMMEDIATE/COMMIT ourselves.
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.executescript(
            "PRAGMA journal_mode=WAL;"
            f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'};"
            "PRAGMA busy_timeout=5000;"
            "PRAGMA foreign_keys=ON;"
            "PRAGMA journal_size_limit=67108864;"
            "PRAGMA temp_store=MEMORY;"
            f"{_CACHE_SIZE};"
        )
    except BaseException:
        await db.close()
        raise
    return db


async def _migrate(db: aiosqlite.Connection) -> None:
    if await _version(db) == len(MIGRATIONS):
        return  # current: no write lock taken (the usual start)
    # The version is read again under the write lock: another process (a daemon and a command
    # opening an old store together) may have migrated it since, and a script run twice fails
    # ("table already exists"). executescript would commit first: one statement at a time.
    await db.execute("BEGIN IMMEDIATE")
    try:
        version = await _version(db)
        if version > len(MIGRATIONS):
            raise SchemaTooNew(
                f"schema version {version} was written by a newer opera-consumer (this one "
                f"knows {len(MIGRATIONS)}): upgrade opera-consumer, or point [state] path at "
                "another file"
            )
        for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in _statements(script):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {target}")
        await db.execute("COMMIT")  # every migration and the version bump at once
    except BaseException:
        if db.in_transaction:
            await db.execute("ROLLBACK")
        raise


async def _version(db: aiosqlite.Connection) -> int:
    async with db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


def _statements(script: str) -> list[str]:
    """The script's statements, split where SQLite says one is complete (a ";" inside a
    string or a trigger body does not end one)."""
    statements, start = [], 0
    for end in (i + 1 for i, c in enumerate(script) if c == ";"):
        if sqlite3.complete_statement(script[start:end]):
            statements.append(script[start:end])
            start = end
    if script[start:].strip():
        statements.append(script[start:])
    return statements


# sqlite3 messages that mean "try again later" rather than "an operator must act".
_TRANSIENT_SQLITE = ("locked", "busy", "disk i/o error", "database or disk is full")


def store_error(
    path: Path, exc: sqlite3.Error | OSError, *, file: Path | None = None
) -> StoreError:
    """One line naming the path, what is wrong and the fix, for a failure to use the store.
    ``file``: the file beside it that was being opened (a lock file), named when at fault."""
    text = str(exc).lower()
    # Permissions: name the directory or file actually at fault, when one is.
    denied = isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM)
    denied |= any(word in text for word in ("readonly", "read-only", "unable to open"))
    if denied and (fault := access_fault(path, *([file] if file else []))) is not None:
        return StoreError(f"state store {path}: {fault}")
    if isinstance(exc, OSError):
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            which = f"cannot open {file}" if file else "cannot write there"
            return StoreError(
                f"state store {path}: {which} ({exc.strerror}): make its directory "
                "writable by the daemon's user, or set [state] path to a writable place"
            )
        if exc.errno == errno.ENOENT:
            return StoreError(
                f"state store {path} does not exist: the daemon has not run with this config"
            )
        if may_clear(exc):
            return StoreError(
                f"state store {path}: {exc.strerror}: {DISK_FIX}",
                retriable=True,
            )
        return StoreError(
            f"state store {path}: {exc.strerror or exc}: set [state] path to a file in a "
            "writable directory"
        )
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        return StoreError(
            f"state store {path}: cannot open it for writing ({exc}): check the permissions of "
            "the file, its -wal/-shm files and its directory, or set [state] path"
        )
    if any(word in text for word in _TRANSIENT_SQLITE):
        return StoreError(f"state store {path}: {exc}: retry later", retriable=True)
    if type(exc) is sqlite3.DatabaseError or "malformed" in text or "not a database" in text:
        return StoreError(
            f"state store {path} is not a usable SQLite database ({exc}): restore it from a "
            "backup, or move it aside to start a new one (the streams then resume from their "
            "configured start, and a jsonl sink file must be adopted or moved too)"
        )
    return StoreError(f"state store {path}: {exc}")


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def not_a_file(path: Path, setting: str) -> str | None:
    """Why ``path`` cannot hold a SQLite database: it exists and is not a regular file (a
    FIFO, whose read waits for a writer for ever; a device such as /dev/null, on which SQLite
    fails with a disk I/O error, taken for the disk's and retried for ever), and the fix
    (``setting``: what names it). None when it is a file, or no file yet, or cannot be looked
    at (opening it then says why)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    kind = next((k for test, k in _KINDS if test(mode)), "a special file")
    return (
        f"it is {kind}, not a regular file: set {setting} to a file of its own (one that does "
        "not exist yet is created)"
    )


def beside(path: Path, end: str) -> Path:
    """``<store><end>`` (``-wal``, ``-shm``, ``.lock``) beside the file ``path`` resolves to
    (links followed; a file not made yet too: its directory's), where SQLite keeps its -wal
    and -shm and the lease its lock, not beside a link to it."""
    real = Path(os.path.realpath(path))
    return real.with_name(real.name + end)


def access_fault(path: Path, *also: Path) -> str | None:
    """What keeps this process's user out of the SQLite file ``path``: the directory it
    cannot enter or write, or the file (or its -wal, -shm, .lock, or one of ``also``, e.g. the
    ``dlq replay`` lock) it cannot read and write, and the fix; None when nothing does
    (now). Through a link, the directory and files of the file it resolves to (a directory
    this user cannot enter stops the resolving there: that one is named)."""
    user = f"the daemon's user (uid {os.geteuid()})"
    real = Path(os.path.realpath(path))
    folder = real.parent
    for d in (*reversed(folder.parents), folder):
        if not os.path.isdir(d):  # created at the first start: its parent must let us
            if not os.access(d.parent, os.W_OK | os.X_OK, effective_ids=True):
                return f"cannot create directory {d}: make {d.parent} writable by {user}"
            return None
        if not os.access(d, os.X_OK, effective_ids=True):
            return (
                f"cannot enter directory {d}: let {user} search it (chmod/chown), or set "
                "[state] path elsewhere"
            )
    files = [beside(path, end) for end in ("-wal", "-shm", ".lock")]
    for f in dict.fromkeys((real, *files, *also)):
        if f.exists() and not os.access(f, os.R_OK | os.W_OK, effective_ids=True):
            return (
                f"{'it' if f == real else f} is not readable and writable by {user}: chown it "
                "to that user (a command run as another user, root say, may have left it), or "
                "set [state] path elsewhere"
            )
    if not os.access(folder, os.W_OK, effective_ids=True):
        return (
            f"cannot create files in directory {folder} (SQLite keeps its -wal and -shm files "
            f"beside the store): make it writable by {user}, or set [state] path elsewhere"
        )
    return None
