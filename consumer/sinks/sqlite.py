"""SQLite sinks: one row per event (see :mod:`.rows`), upserted by ``uniqueEventId``.

Two placements:

* :class:`StoreTableSink`, the default: a table in the state store's own file. ``write`` only
  buffers rows; the committer puts them in the same SQLite transaction as the checkpoint and
  the processed ids, so no crash can separate an event's row from its checkpoint.
* :class:`SqliteSink`: a table in another file. Each ``write`` is its own transaction; a crash
  before the checkpoint commits replays those events, and the upsert rewrites the same rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from ..core.events import Event
from ..core.evidence import prefix
from ..core.records import Staged
from ..errors import PermanentSinkError, TransientSinkError
from ..sqlite_tx import in_thread, sync_transaction, write_rows
from .base import PlainSink
from .rows import COLUMNS, row


def create_table_sql(table: str) -> str:
    return (
        f'CREATE TABLE IF NOT EXISTS "{table}" ('
        "unique_event_id TEXT PRIMARY KEY, stream TEXT NOT NULL, offset TEXT NOT NULL, "
        "event_name TEXT, module_name TEXT, primary_key TEXT, hotel_id TEXT, "
        "event_timestamp TEXT, detail TEXT NOT NULL, resource TEXT, written_at REAL NOT NULL"
        f'); CREATE INDEX IF NOT EXISTS "{table}_key" ON "{table}" '
        "(stream, primary_key);"
    )


def upsert_sql(table: str, rows: int = 1) -> str:
    """The upsert of ``rows`` rows in one statement (a later row of the same id wins, as one
    statement per row would)."""
    cols = ", ".join(COLUMNS)
    marks = "(" + ", ".join("?" * len(COLUMNS)) + ")"
    updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
    return (
        f'INSERT INTO "{table}" ({cols}) VALUES {", ".join([marks] * rows)} '
        f"ON CONFLICT (unique_event_id) DO UPDATE SET {updates}"
    )


def _rows(stream: str, events: Sequence[Event]) -> list[tuple[Any, ...]]:
    """The events' rows; one that cannot be serialized (orjson: an integer past 64 bits, as
    Python's json reads a replayed dead letter) is that event's permanent failure."""
    now = time.time()
    rows = []
    for ev in events:
        try:
            rows.append(row(stream, ev, now))
        except (TypeError, ValueError) as exc:
            raise PermanentSinkError(
                f"sqlite sink: event {prefix(ev.unique_event_id, 100)}: {prefix(str(exc), 300)}",
                unique_event_id=ev.unique_event_id,
            ) from exc
    return rows


class StoreTableSink(PlainSink):
    """Rows in the state store's file, committed with the checkpoint (see the module doc)."""

    name = "sqlite"
    transactional = True
    waits = False

    def __init__(self, state_path: Path, table: str) -> None:
        self.path = state_path
        self.table = table
        self._many = functools.partial(upsert_sql, table)
        self._upsert = self._many(1)
        self._rows: list[tuple[Any, ...]] = []

    async def open(self, committed: str | None) -> None:
        # The store has created the file; the table is ours. A short-lived connection keeps
        # the DDL out of the store's writer (it runs before the first commit).
        with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as db:
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(create_table_sql(self.table))

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        # No await: what the committer takes is exactly the writes that returned.
        rows = _rows(stream, events)  # all or none: one may not serialize
        self._rows.extend(rows)

    def staged(self) -> Staged | None:
        """The rows written since the last call, for the committer's transaction."""
        if not self._rows:
            return None
        rows, self._rows = self._rows, []
        return Staged(self._upsert, rows, self._many)


class SqliteSink(PlainSink):
    """Rows in a file of their own, one transaction per write."""

    name = "sqlite"

    def __init__(self, path: Path, table: str) -> None:
        self.path = path
        self.table = table
        self._db: aiosqlite.Connection | None = None
        self._many = functools.partial(upsert_sql, table)
        self._upsert = self._many(1)
        self._lock = asyncio.Lock()  # workers share the connection: one transaction at a time

    async def open(self, committed: str | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600 before SQLite does, like the state store (-wal/-shm take its mode).
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db.executescript(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;"
                + create_table_sql(self.table)
            )
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        db = self._db
        assert db is not None, "sink not open"
        rows = _rows(stream, events)
        try:
            async with self._lock:
                await in_thread(db, lambda conn: self._write_now(conn, rows))
        except sqlite3.OperationalError as exc:  # locked, disk full, I/O: may clear
            raise TransientSinkError(f"sqlite sink {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            only = events[0].unique_event_id if len(events) == 1 else None
            raise PermanentSinkError(
                f"sqlite sink {self.path}: {exc}", unique_event_id=only
            ) from exc

    def _write_now(self, db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        with sync_transaction(db):
            write_rows(db, self._upsert, rows, self._many)

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()
