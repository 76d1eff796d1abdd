"""SQLite sinks: one row per event (see :mod:`.rows`), upserted by ``uniqueEventId``.

Two placements:

* :class:`StoreTableSink`, the default: a table in the state store's own file. ``write`` only
  buffers rows; the committer puts them in the same SQLite transaction as the checkpoint and
  the processed ids, so no crash can separate an event's row from its checkpoint.
* :class:`SqliteSink`: a table in another file. Each ``write`` is its own transaction; a crash
  before the checkpoint commits replays those events, and the upsert rewrites the same rows.

``open`` creates the table, or checks the one it finds (``CREATE TABLE IF NOT EXISTS`` keeps any
table of that name): our columns, a unique key on ``unique_event_id`` alone (the upsert's
conflict target), our nullable columns nullable, no other NOT NULL column without a default,
and our text columns of a type that keeps text as given (TEXT, BLOB or none). A table of
another shape would fail every write, retried for ever or dead-lettering every event, or (a
column of INTEGER, REAL or NUMERIC affinity) silently store text that looks like a number as
one: an opaque offset "000001" read back as 1. It is a :class:`ConfigError` naming
``sink.table`` (exit 78 before consuming), as is any SQLite error at open but a busy or full
database (transient).

A write to a file of its own that fails: a row the table refuses (a constraint, a trigger's
``RAISE``, a generated column's or trigger's expression failing on it: ``malformed JSON``) is
that event's (:class:`PermanentSinkError`, dead-lettered alone); a failure every event would
hit (busy, locked, I/O, disk full, the table dropped or altered under us: the upsert no longer
compiles) is :class:`TransientSinkError`, retried until it clears. A row a trigger's
``RAISE(IGNORE)`` drops is that event's too (each write checks that every event has its row
when the table had such a trigger at open): otherwise the checkpoint would commit without it.
In the state store's file such a table (a trigger that may RAISE included; one that cannot,
an audit's, is fine) is refused at open (:func:`check_store_guards`). A trigger that cannot
RAISE may still fail on a row (its ``json_extract`` of text that is not JSON): the committer
then writes that commit's rows through :attr:`Staged.aside`, and the sink writes each batch
on a connection of its own to the state file from then on, as :class:`SqliteSink` does (with
foreign keys enforced, as the store's connections enforce them: an audit table's deferred
key, checked at COMMIT, refuses that event there too).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from ..core.events import Event
from ..core.evidence import prefix
from ..core.records import Staged
from ..errors import ConfigError, PermanentSinkError, SinkUnusable, TransientSinkError
from ..files import DISK_FIX, identity, identity_at, make_dirs, may_clear
from ..sqlite_tx import in_thread, sync_transaction, write_rows
from ..state.sqlite import MIGRATIONS, not_a_file
from .base import PlainSink
from .rows import COLUMNS, row

log = structlog.get_logger(__name__)

# Columns the sink may write NULL into (an event without a hotelId...).
_NULLABLE = frozenset(
    {"event_name", "module_name", "primary_key", "hotel_id", "event_timestamp", "resource"}
)
# Columns of text (opaque: an offset or id is never transformed), and the affinities that
# store text as given. A column of INTEGER, REAL or NUMERIC affinity converts text that looks
# like a number ("000001" becomes 1, "1e3" 1000.0), silently.
_TEXT = frozenset(COLUMNS) - {"written_at"}
_KEEPS_TEXT = frozenset({"TEXT", "BLOB"})
# The state store's own tables: a sink in its file must not take one of their names.
STORE_TABLES = frozenset(
    name.lower() for name in re.findall(r"CREATE TABLE (\w+)", "".join(MIGRATIONS))
)
# Primary result codes of an error at open that may clear by itself (the file busy, the disk
# full or failing): transient; any other is the configuration's.
_TRANSIENT_CODES = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL}
)

# ... and those of a file that cannot be used at all (the key that names it is at fault).
_FILE_CODES = frozenset(
    {
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_AUTH,
        sqlite3.SQLITE_NOTADB,
        sqlite3.SQLITE_CORRUPT,
    }
)


# Primary result codes of a failed write that are one row's: too big, a datatype mismatch. (A
# constraint's is an IntegrityError; a plain SQLITE_ERROR is the row's only if the statement
# still compiles.) Any other code concerns every event (busy, locked, I/O, full, no memory, the
# file unusable): retried.
_ROW_CODES = frozenset({sqlite3.SQLITE_TOOBIG, sqlite3.SQLITE_MISMATCH})


class _UpsertFailed(Exception):
    """The upsert itself failed (not the transaction's BEGIN or COMMIT), with ``error``."""

    def __init__(self, error: sqlite3.Error) -> None:
        super().__init__(str(error))
        self.error = error


def _code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code of ``exc``; None for the module's own errors."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def _q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def open_error(exc: sqlite3.Error, table: str, path: Path, key: str) -> Exception:
    """What an SQLite error at open is: transient if it may clear by itself, else a
    :class:`ConfigError` naming the keys (``key``: the one that names the file)."""
    code = exc.sqlite_errorcode & 0xFF
    if code in _TRANSIENT_CODES:
        return TransientSinkError(f"sqlite sink {path}: opening table {table!r}: {exc}")
    if code in _FILE_CODES or not isinstance(exc, sqlite3.OperationalError):
        return ConfigError(
            f"{key}: {path} cannot be used as an SQLite database ({exc}): check its and its "
            f"directory's permissions, or set {key} to another file"
        )
    return ConfigError(  # the table, its name or its schema
        f"sink.table: cannot create or check table {table!r} in {path}: {exc}: set "
        f"sink.table to another name, or {key} to another file"
    )


def create_table_sql(table: str) -> str:
    return (
        f'CREATE TABLE IF NOT EXISTS "{table}" ('
        "unique_event_id TEXT PRIMARY KEY, stream TEXT NOT NULL, offset TEXT NOT NULL, "
        "event_name TEXT, module_name TEXT, primary_key TEXT, hotel_id TEXT, "
        "event_timestamp TEXT, detail TEXT NOT NULL, resource TEXT, written_at REAL NOT NULL)"
    )


def create_index_sql(table: str) -> str:
    return f'CREATE INDEX IF NOT EXISTS "{table}_key" ON "{table}" (stream, primary_key)'


def affinity(declared: str) -> str:
    """The type affinity SQLite gives a column of this declared type (its rules, in order)."""
    kind = declared.upper()
    if "INT" in kind:
        return "INTEGER"
    if any(word in kind for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in kind or not kind.strip():
        return "BLOB"
    if any(word in kind for word in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def shape_problems(
    columns: Sequence[tuple[str, str, bool, bool, int]], keys: Sequence[Sequence[str]]
) -> list[str]:
    """Why rows cannot be upserted into a table of these columns (``PRAGMA table_info``: name,
    declared type, NOT NULL, has a default, position in the primary key) and unique keys (each
    the column names of a unique index without a WHERE), or nothing."""
    found = {
        name.lower(): (kind, not_null, default) for name, kind, not_null, default, _ in columns
    }
    problems = [f"no column {c}" for c in COLUMNS if c not in found]
    # The one column of the primary key, declared INTEGER, is the rowid: SQLite fills it.
    primary = [name.lower() for name, _, _, _, pk in columns if pk]
    for name, (kind, not_null, default) in found.items():
        if name in COLUMNS:
            if name in _TEXT and affinity(kind) not in _KEEPS_TEXT:
                # Text that looks like a number is stored as one: offset "000001" reads 1.
                problems.append(
                    f"column {name} is declared {kind} ({affinity(kind)} affinity: SQLite "
                    f"would store a {name} like '000001' as the number 1); it must be TEXT"
                )
            if not_null and name in _NULLABLE:
                problems.append(f"column {name} is NOT NULL (an event may have none)")
        elif not_null and not default and not (primary == [name] and kind.upper() == "INTEGER"):
            problems.append(f"column {name} is NOT NULL without a default (the sink never sets it)")
    if not any([k.lower() for k in key] == ["unique_event_id"] for key in keys):
        problems.append("no unique key on unique_event_id alone (the upsert needs one)")
    return problems


def check_table(db: sqlite3.Connection, table: str, path: Path) -> None:
    """Raise :class:`ConfigError` if the table of that name is not one the sink can write to;
    nothing if there is none (the sink creates it). Only reads: ``preflight`` runs it on a
    read-only connection."""
    columns = [
        (str(r[1]), str(r[2]), bool(r[3]), r[4] is not None, int(r[5]))
        for r in db.execute(f"PRAGMA table_info({_q(table)})")
    ]
    if not columns:
        return
    keys = [
        [str(c[2]) for c in db.execute(f"PRAGMA index_info({_q(index[1])})")]
        for index in db.execute(f"PRAGMA index_list({_q(table)})")
        if index[2] and not index[4]  # unique, not partial
    ]
    problems = shape_problems(columns, keys)
    if problems:
        raise ConfigError(
            f"sink.table: table {table!r} in {path} is not one the sink can write to: "
            f"{'; '.join(problems)}; set sink.table to another name (the sink creates it), "
            "or recreate the table with the sink's columns"
        )


_CHECK = re.compile(r"\bCHECK\s*\(", re.IGNORECASE)
# A trigger's RAISE (ABORT, FAIL or ROLLBACK refuse the row; IGNORE drops it, silently), read
# in the trigger's whole text: a comment or a string that says RAISE counts too, erring
# towards a guard.
_RAISE = re.compile(r"\bRAISE\b", re.IGNORECASE)
_IGNORE = re.compile(r"\bRAISE\s*\(\s*IGNORE\b", re.IGNORECASE)
# A trigger that fires on DELETE alone (the sink never deletes): its header up to ON.
_ON_DELETE = re.compile(
    r"\s*CREATE\s+(?:TEMP\s+|TEMPORARY\s+)?TRIGGER\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    r"(?:\"[^\"]*\"|\[[^\]]*\]|`[^`]*`|\S+)\s+"
    r"(?:BEFORE\s+|AFTER\s+|INSTEAD\s+OF\s+)?DELETE\s+ON\b",
    re.IGNORECASE,
)


def raising_triggers(db: sqlite3.Connection, table: str, pattern: re.Pattern[str]) -> list[str]:
    """The names of the table's triggers that fire on INSERT or UPDATE (one whose header
    cannot be read counts too) and whose text ``pattern`` finds."""
    return [
        str(name)
        for name, sql in db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
            "AND tbl_name = ? COLLATE NOCASE ORDER BY name",
            (table,),
        ).fetchall()
        if sql and pattern.search(str(sql)) and not _ON_DELETE.match(str(sql))
    ]


def guards(db: sqlite3.Connection, table: str) -> list[str]:
    """What of the table's own may refuse one event's row: a CHECK, a FOREIGN KEY (the state
    store enforces them), a unique index but the upsert's, a generated column (computed from
    the row: NOT NULL, or its expression failing, refuses that event's), a trigger that RAISEs
    (ABORT, FAIL, ROLLBACK; and IGNORE, which drops the row while its checkpoint commits: the
    event lost). Not a trigger that cannot RAISE (an audit's is common), nor another column:
    its default cannot read the row."""
    found = [f"trigger {prefix(name, 100)} (RAISE)" for name in raising_triggers(db, table, _RAISE)]
    sql = db.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ? COLLATE NOCASE", (table,)
    ).fetchone()
    if sql is not None and sql[0] and _CHECK.search(str(sql[0])):
        found.append("a CHECK constraint")
    if db.execute(f"PRAGMA foreign_key_list({_q(table)})").fetchone() is not None:
        found.append("a FOREIGN KEY")
    for index in db.execute(f"PRAGMA index_list({_q(table)})").fetchall():
        columns = [str(c[2]).lower() for c in db.execute(f"PRAGMA index_info({_q(index[1])})")]
        if index[2] and columns != ["unique_event_id"]:
            found.append(f"unique index {prefix(str(index[1]), 100)}")
    # PRAGMA table_info leaves generated columns out; table_xinfo's "hidden" is 2 or 3 for one.
    for column in db.execute(f"PRAGMA table_xinfo({_q(table)})").fetchall():
        if column[6] in (2, 3):
            found.append(f"generated column {prefix(str(column[1]), 100)}")
    return found


def check_store_guards(db: sqlite3.Connection, table: str, path: Path) -> None:
    """Raise :class:`ConfigError` if the table, in the state store's file, has :func:`guards`:
    its rows commit with the checkpoint, so one row refused would fail every commit (and each
    start again, on the same event). In a file of its own that event alone is dead-lettered."""
    found = guards(db, table)
    if found:
        raise ConfigError(
            f"sink.table: table {table!r} in the state store {path} has "
            f"{prefix(', '.join(found), 500)}, "
            "which may refuse an event's row and with it the checkpoint's commit (or drop "
            "it, RAISE(IGNORE), while the checkpoint commits): set "
            "sink.path to a file of its own (a refused row is then dead-lettered alone), or "
            "drop them"
        )


def check_store_table_name(table: str, path: Path) -> None:
    """Raise :class:`ConfigError` if ``table`` is one of the state store's (``path``)."""
    if table.lower() in STORE_TABLES:
        raise ConfigError(
            f"sink.table: {table!r} is a table of the state store {path}, where the sink's "
            "rows go: set sink.table to another name (e.g. 'opera_events')"
        )


def prepare_table(db: sqlite3.Connection, table: str, path: Path) -> None:
    """Create the table and its index, or check the one found (raises :class:`ConfigError`)."""
    with sync_transaction(db):
        db.execute(create_table_sql(table))
        check_table(db, table, path)
        db.execute(create_index_sql(table))


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

    def __init__(self, state_path: Path, table: str) -> None:
        self.path = state_path
        self.table = table
        self._many = functools.partial(upsert_sql, table)
        self._upsert = self._many(1)
        self._rows: list[tuple[Any, ...]] = []
        self._events: list[Event] = []  # the events of _rows (for Staged.aside)
        # Its own connection to the state file, once the state transaction refused a row
        # (:meth:`_write_aside`); every write goes through it once the committer says so
        # (:meth:`_own_path`): until then writes stay staged.
        self._own: SqliteSink | None = None
        self._own_writes = False

    @property
    def waits(self) -> bool:
        return self._own_writes  # staged rows: write only appends to a list

    async def open(self, committed: str | None) -> None:
        check_store_table_name(self.table, self.path)
        # The store has created the file. A short-lived connection keeps the DDL out of the
        # store's writer (it runs before the first commit).
        try:
            with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as db:
                db.execute("PRAGMA busy_timeout=5000")
                prepare_table(db, self.table, self.path)
                check_store_guards(db, self.table, self.path)
        except sqlite3.Error as exc:
            raise open_error(exc, self.table, self.path, "state.path") from None

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        if self._own_writes and self._own is not None:
            await self._own.write(stream, events)
            return
        # No await: what the committer takes is exactly the writes that returned.
        rows = _rows(stream, events)  # all or none: one may not serialize
        self._rows.extend(rows)
        self._events.extend(events)

    def staged(self) -> Staged | None:
        """The rows written since the last call, for the committer's transaction."""
        if not self._rows:
            return None
        rows, self._rows = self._rows, []
        events, self._events = self._events, []
        return Staged(self._upsert, rows, self._many, events, self._write_aside, self._own_path)

    async def _write_aside(self, stream: str, events: Sequence[Event]) -> None:
        """:attr:`Staged.aside`: the state transaction refused a staged row for its data (a
        trigger's expression failing on it, which open cannot read: ``malformed JSON``). The
        committer writes the rows, each batch its own transaction, on a connection of the
        sink's own to the state file, as a file of its own is written: a row the table
        refuses is then that event's dead letter, not every stream's commit. (A replay after
        a crash upserts the same rows again.) :meth:`write` keeps staging until the committer
        calls :meth:`_own_path`."""
        if self._own is None:
            # Foreign keys enforced as the state store's connections enforce them: a row its
            # transaction refused for one (a deferred key, at COMMIT) is refused here too, that
            # event dead-lettered, never written past the check.
            own = SqliteSink(self.path, self.table, foreign_keys=True)
            await own.open(None)
            if self._own is not None:  # cannot be: the committer's one call at a time
                await own.close()
            else:
                self._own = own
        await self._own.write(stream, events)

    def _own_path(self) -> None:
        """:attr:`Staged.switch`: every write on the sink's own connection from now on."""
        if self._own is not None and not self._own_writes:
            self._own_writes = True
            log.warning(
                "sqlite sink: the state transaction refused a row of the table; writing "
                "each batch in a transaction of its own from now on, so such an event is "
                "dead-lettered alone",
                path=str(self.path),
                table=self.table,
            )

    async def close(self) -> None:
        own, self._own = self._own, None
        if own is not None:
            await own.close()


class SqliteSink(PlainSink):
    """Rows in a file of their own, one transaction per write."""

    name = "sqlite"

    def __init__(self, path: Path, table: str, *, foreign_keys: bool = False) -> None:
        self.path = path
        self.table = table
        # PRAGMA foreign_keys (SQLite's default: off): on for a connection to the state
        # store's file (StoreTableSink's own path), whose connections enforce them.
        self._foreign_keys = foreign_keys
        self._db: aiosqlite.Connection | None = None
        self._many = functools.partial(upsert_sql, table)
        self._upsert = self._many(1)
        self._lock = asyncio.Lock()  # workers share the connection: one transaction at a time
        # The table's triggers that may RAISE(IGNORE) a row (read at open): each write then
        # checks that every event has its row.
        self._ignoring: list[str] = []
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened

    async def open(self, committed: str | None) -> None:
        # A FIFO or a device: SQLite's disk I/O error there was taken for the disk's (exit 1,
        # restarted for ever); an operator's to fix.
        if (fault := not_a_file(self.path, "sink.path")) is not None:
            raise ConfigError(f"sink.path: {self.path}: {fault}")
        try:
            make_dirs(self.path.parent)
            # Created 0600 before SQLite does, like the state store (-wal/-shm take its mode).
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            if may_clear(exc):  # a full disk, a failing device: a restart may go on (exit 1)
                raise TransientSinkError(
                    f"sqlite sink: cannot create or open {self.path} "
                    f"({exc.strerror or exc}): {DISK_FIX}"
                ) from None
            raise ConfigError(
                f"sink.path: cannot create or open {self.path} ({exc.strerror or exc}): set "
                "sink.path to a file in a directory the daemon's user can write"
            ) from None
        try:
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise open_error(exc, self.table, self.path, "sink.path") from None
        try:
            await db.executescript(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;"
                + (" PRAGMA foreign_keys=ON;" if self._foreign_keys else "")
            )
            await in_thread(db, lambda conn: prepare_table(conn, self.table, self.path))
            self._ignoring = await in_thread(
                db, lambda conn: raising_triggers(conn, self.table, _IGNORE)
            )
            # The file it opened (its schema was read through it just now): each commit checks
            # that the path still names it.
            self._identity = identity(os.stat(self.path))
        except OSError as exc:  # removed since the connect: as the write would find it
            await db.close()
            raise self._gone(exc) from None
        except sqlite3.Error as exc:
            await db.close()
            raise open_error(exc, self.table, self.path, "sink.path") from None
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        db = self._db
        assert db is not None, "sink not open"
        rows = _rows(stream, events)
        async with self._lock:
            for again in (False, True):
                try:
                    await in_thread(db, lambda conn: self._write_now(conn, rows))
                    return
                except _UpsertFailed as exc:
                    failed, compiles = exc.error, True
                except sqlite3.Error as exc:  # BEGIN's or COMMIT's
                    failed, compiles = exc, False
                code = _code(failed)
                if code != sqlite3.SQLITE_ERROR or not compiles or again:
                    break
                # The upsert's plain SQLITE_ERROR is the statement's (the table dropped or
                # altered under us: "no such table", "has no column named") or this row's (an
                # expression failing on it): the statement compiles with the table's triggers
                # and generated columns. This connection may have compiled it with a schema
                # another has changed since (it notices only when a statement runs, not when
                # one fails to compile), so: compiled afresh; if it compiles now, written once
                # more, and failing again it is the row's.
                compiles = await in_thread(db, self._compiles)
                if not compiles:
                    break
        raise self._classify(failed, code, compiles, events) from failed

    def _classify(
        self, exc: sqlite3.Error, code: int | None, compiles: bool, events: Sequence[Event]
    ) -> Exception:
        """What a failed write is. ``code``: SQLite's primary result code; ``compiles``: the
        upsert itself failed, and still compiles against the table."""
        only = events[0].unique_event_id if len(events) == 1 else None
        what = prefix(str(exc), 300)
        if isinstance(exc, sqlite3.IntegrityError) or (code == sqlite3.SQLITE_ERROR and compiles):
            # The table's own constraint, a trigger's RAISE (SQLITE_CONSTRAINT_TRIGGER), or its
            # generated column's or trigger's expression failing on this row ("malformed
            # JSON"): that event's, as in PostgreSQL. Not SQLite's words alone: they may be a
            # RAISE's, whatever the operator wrote, so bounded.
            return PermanentSinkError(
                f"sqlite sink {self.path}: table {self.table!r} refused the event's row: "
                f"{what}; fix the table (its constraint, trigger or generated column), then "
                "`opera-consumer dlq replay`",
                unique_event_id=only,
            )
        if code is not None and code not in _ROW_CODES:
            # Busy, locked, I/O, full, out of memory, the file unusable, or the table dropped
            # or altered under us ("no such table", "has no column named"): every event's,
            # retried until it clears or the operator fixes it; nothing dead-lettered meanwhile.
            return TransientSinkError(f"sqlite sink {self.path}: table {self.table!r}: {what}")
        return PermanentSinkError(f"sqlite sink {self.path}: {what}", unique_event_id=only)

    def _write_now(self, db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        with sync_transaction(db):
            try:
                write_rows(db, self._upsert, rows, self._many)
            except sqlite3.Error as exc:  # rolled back, as any failure
                raise _UpsertFailed(exc) from exc
            if self._ignoring:
                self._check_ignored(db, [str(r[0]) for r in rows])
            self._check_file()

    def _check_file(self) -> None:
        """Before each COMMIT: the path still names the file the connection writes. Removed
        or replaced underneath (shipped away, archived), SQLite would go on committing into
        the deleted inode, the checkpoint past its rows, and they would go with it at the
        close: lost. :class:`SinkUnusable` instead (the transaction rolled back): the daemon
        stops, and its restart replays them into the file the path names then. One stat per
        transaction (a few microseconds; a transaction is a batch)."""
        try:
            now = identity_at(self.path)
        except OSError as exc:
            raise TransientSinkError(f"sqlite sink {self.path}: {exc.strerror or exc}") from None
        if now != self._identity:
            raise self._gone(None)

    def _gone(self, exc: OSError | None) -> SinkUnusable:
        why = f" ({exc.strerror or exc})" if exc is not None else ""
        return SinkUnusable(
            f"sqlite sink file {self.path} was removed or replaced while the daemon wrote to "
            f"it{why}: this write was rolled back, its events not committed; restart the "
            "daemon: it replays them into the file the path names then (move the file away "
            "only while the daemon is stopped)"
        )

    def _check_ignored(self, db: sqlite3.Connection, ids: list[str]) -> None:
        """Raise :class:`PermanentSinkError` (the transaction rolled back) naming the first
        event without a row: a trigger's RAISE(IGNORE) dropped it, and its checkpoint would
        commit without it (the event lost). A row there from an earlier write (an update
        ignored) is that event's, delivered."""
        found: set[str] = set()
        for start in range(0, len(ids), 500):  # within SQLite's variable limit
            part = ids[start : start + 500]
            marks = ", ".join("?" * len(part))
            found.update(
                str(r[0])
                for r in db.execute(
                    f"SELECT unique_event_id FROM {_q(self.table)} "
                    f"WHERE unique_event_id IN ({marks})",
                    part,
                )
            )
        missing = next((uid for uid in ids if uid not in found), None)
        if missing is not None:
            names = ", ".join(repr(prefix(n, 100)) for n in self._ignoring[:5])
            raise PermanentSinkError(
                f"sqlite sink {self.path}: table {self.table!r} did not keep the event's row: "
                f"a trigger's RAISE(IGNORE) dropped it (triggers {names}); fix the trigger, "
                "then `opera-consumer dlq replay`",
                unique_event_id=missing,
            )

    def _compiles(self, db: sqlite3.Connection) -> bool:
        """Whether the upsert compiles (EXPLAIN: prepared, not run) against the table as it
        is now, with its triggers and generated columns."""
        try:
            # A statement that runs reads the schema afresh if another connection changed it.
            db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            db.execute(f"EXPLAIN {self._upsert}", (None,) * len(COLUMNS)).fetchall()
        except sqlite3.Error:
            return False
        return True

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()
