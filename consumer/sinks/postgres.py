"""PostgreSQL sink: one row per event (see :mod:`.rows`), upserted by ``uniqueEventId``.

Exactly-once in effect, without being part of the checkpoint: each ``write`` is one statement,
so one transaction, and it returns only once PostgreSQL has committed it. The daemon commits its
checkpoint (in its SQLite state store) after the sink write returns, so a crash between the two
replays those events after the restart; ``unique_event_id`` is the primary key and the write is
an upsert (``INSERT … ON CONFLICT (unique_event_id) DO UPDATE``), so the replay rewrites the same
rows instead of adding new ones. Readers never see an event twice; ``written_at`` tells the
latest write.

A batch is sent as one ``INSERT … SELECT FROM unnest(…)`` with one array per column: one round
trip whatever the batch size.

Errors: a broken connection, a timeout, a server that is starting, stopping, out of resources
or of connections, a serialization failure or a deadlock are :class:`TransientSinkError` (the
batch is retried with backoff). Data the server rejects (a ``\\u0000`` in JSON text, invalid
text) is :class:`PermanentSinkError`, naming the event when the batch holds one: the pipeline
then writes the batch's events one at a time to find the culprit. Other server errors (a table
altered or dropped under us, a missing privilege) concern every event, not one: they are
transient too, so nothing is dead-lettered while an operator fixes the database.

The DSN is a secret (it may hold a password): messages name the host, port and database only.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import structlog

from ..config import PostgresSinkSettings
from ..core.events import Event
from ..errors import ConfigError, PermanentSinkError, TransientSinkError
from ..pg_target import Target
from .base import PlainSink
from .rows import COLUMNS, row

log = structlog.get_logger(__name__)

# PostgreSQL type of each column of rows.COLUMNS.
_TYPES: dict[str, str] = {
    "unique_event_id": "TEXT PRIMARY KEY",
    "stream": "TEXT NOT NULL",
    "offset": "TEXT NOT NULL",
    "event_name": "TEXT",
    "module_name": "TEXT",
    "primary_key": "TEXT",
    "hotel_id": "TEXT",
    "event_timestamp": "TEXT",
    "detail": "JSONB NOT NULL",
    "resource": "JSONB",
    "written_at": "DOUBLE PRECISION NOT NULL",
}
_JSON = frozenset({"detail", "resource"})

# SQLSTATE classes that concern one event's data: 22 data exception, 23 integrity violation.
_PERMANENT_CLASSES = ("22", "23")
# Classes that mean the server cannot accept our credentials or database.
_CONFIG_STATES = ("28", "3D")


def _q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def create_table_sql(table: str) -> str:
    cols = ", ".join(f"{_q(c)} {_TYPES[c]}" for c in COLUMNS)
    return f"CREATE TABLE IF NOT EXISTS {_q(table)} ({cols})"


def create_index_sql(table: str) -> str:
    return (
        f"CREATE INDEX IF NOT EXISTS {_q(index_name(table))} ON {_q(table)} (stream, primary_key)"
    )


def index_name(table: str) -> str:
    """``<table>_key``, kept within PostgreSQL's 63 bytes without colliding."""
    name = f"{table}_key"
    if len(name) <= 63:
        return name
    digest = hashlib.sha1(table.encode()).hexdigest()[:8]
    return f"{table[:50]}_{digest}_key"


def upsert_sql(table: str) -> str:
    """One statement for a whole batch: parameter ``$i`` is the array of column ``i``."""
    cols = ", ".join(_q(c) for c in COLUMNS)
    arrays = ", ".join(
        f"${i}::{'float8' if c == 'written_at' else 'text'}[]" for i, c in enumerate(COLUMNS, 1)
    )
    values = ", ".join(f"u.{_q(c)}::jsonb" if c in _JSON else f"u.{_q(c)}" for c in COLUMNS)
    updates = ", ".join(f"{_q(c)} = EXCLUDED.{_q(c)}" for c in COLUMNS[1:])
    return (
        f"INSERT INTO {_q(table)} ({cols}) SELECT {values} FROM unnest({arrays}) AS u({cols}) "
        f"ON CONFLICT (unique_event_id) DO UPDATE SET {updates}"
    )


class PostgresSink(PlainSink):
    name = "postgres"

    def __init__(self, settings: PostgresSinkSettings) -> None:
        self.settings = settings
        self.table = settings.table
        self._target = Target(settings.dsn.get_secret_value())
        self._pool: Any = None  # asyncpg.Pool (untyped)
        self._upsert = upsert_sql(self.table)

    def __repr__(self) -> str:
        return f"PostgresSink(table={self.table!r}, server={self._target.where!r})"

    def _describe(self, exc: BaseException) -> str:
        return self._target.describe(exc)

    async def open(self, committed: str | None) -> None:
        s = self.settings
        where = self._target.where
        if s.pool_min > s.pool_max:
            raise ConfigError(f"sink.pool_min ({s.pool_min}) is above sink.pool_max ({s.pool_max})")
        try:
            pool = await asyncpg.create_pool(
                s.dsn.get_secret_value(),
                min_size=s.pool_min,
                max_size=s.pool_max,
                command_timeout=s.timeout_s,
                timeout=s.timeout_s,  # connect
            )
        except (asyncpg.exceptions.ClientConfigurationError, ValueError) as exc:
            raise ConfigError(f"sink.dsn: invalid PostgreSQL DSN: {self._describe(exc)}") from None
        except asyncpg.exceptions.PostgresError as exc:
            state = exc.sqlstate or ""
            if state.startswith(_CONFIG_STATES):
                raise ConfigError(
                    f"sink.dsn: PostgreSQL at {where} refused us: {self._describe(exc)}"
                ) from None
            raise TransientSinkError(
                f"sink.dsn: cannot connect to PostgreSQL at {where}: {self._describe(exc)}"
            ) from None
        except (OSError, TimeoutError, asyncpg.exceptions.InterfaceError) as exc:
            raise TransientSinkError(
                f"sink.dsn: cannot connect to PostgreSQL at {where}: {self._describe(exc)}"
            ) from None
        try:
            await self._prepare_table(pool)
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool
        log.info("postgres sink open", server=where, table=self.table)

    async def _prepare_table(self, pool: Any) -> None:
        where, table = self._target.where, self.table
        try:
            async with pool.acquire(timeout=self.settings.timeout_s) as conn, conn.transaction():
                # Two daemons starting at once: CREATE … IF NOT EXISTS is not race-free.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext($1))", f"opera-consumer:{table}"
                )
                await conn.execute(create_table_sql(table))
                # The table may have been there already: is it one of ours?
                columns = {
                    r["attname"]
                    for r in await conn.fetch(
                        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass($1) "
                        "AND attnum > 0 AND NOT attisdropped",
                        _q(table),
                    )
                }
                missing = [c for c in COLUMNS if c not in columns]
                if missing:
                    raise ConfigError(
                        f"sink.table: table {table!r} in {where} exists without the columns "
                        f"{', '.join(missing)}; use another table name"
                    )
                unique = await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a "
                    "ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
                    "WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indnkeyatts = 1 "
                    "AND i.indpred IS NULL AND a.attname = 'unique_event_id')",
                    _q(table),
                )
                if not unique:
                    raise ConfigError(
                        f"sink.table: table {table!r} in {where} has no unique index on "
                        "unique_event_id alone (the upsert needs one); use another table name"
                    )
                await conn.execute(create_index_sql(table))
        except asyncpg.exceptions.InsufficientPrivilegeError as exc:
            raise ConfigError(
                f"sink.table: cannot create or read table {table!r} in {where}: "
                f"{self._describe(exc)}"
            ) from None
        except (
            asyncpg.exceptions.PostgresError,
            asyncpg.exceptions.InterfaceError,
            OSError,
            TimeoutError,
        ) as exc:
            raise TransientSinkError(
                f"postgres sink at {where}: preparing table {table!r}: {self._describe(exc)}"
            ) from None

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        pool = self._pool
        if pool is None:
            raise TransientSinkError("postgres sink is not open")
        if not events:
            return
        now = time.time()
        # One row per id (the last wins): an upsert may not touch a row twice in a statement.
        rows: dict[str, tuple[Any, ...]] = {}
        for ev in events:
            try:
                rows[ev.unique_event_id] = row(stream, ev, now)
            except (TypeError, ValueError) as exc:  # not JSON-serializable (orjson)
                raise PermanentSinkError(
                    f"postgres sink: event {ev.unique_event_id}: {self._describe(exc)}",
                    unique_event_id=ev.unique_event_id,
                ) from exc
        columns = [list(c) for c in zip(*rows.values(), strict=True)]
        try:
            async with pool.acquire(timeout=self.settings.timeout_s) as conn:
                await conn.execute(self._upsert, *columns)
        except (
            asyncpg.exceptions.PostgresError,
            asyncpg.exceptions.InterfaceError,  # connection lost or closed, pool closing
            asyncpg.exceptions.InternalClientError,  # a cached statement gone stale
            OSError,
            TimeoutError,  # command_timeout, or no connection free in time
        ) as exc:
            raise self._classify(exc, events) from exc

    def _classify(self, exc: Exception, events: Sequence[Event]) -> Exception:
        where = self._target.where
        only = events[0].unique_event_id if len(events) == 1 else None
        if isinstance(exc, asyncpg.exceptions.PostgresError):
            state = exc.sqlstate or ""
            if state.startswith(_PERMANENT_CLASSES):
                return PermanentSinkError(
                    f"postgres sink at {where} rejected the data: {self._describe(exc)}",
                    unique_event_id=only,
                )
            if not isinstance(
                exc,
                (
                    asyncpg.exceptions.PostgresConnectionError,
                    asyncpg.exceptions.TransactionRollbackError,  # serialization, deadlock
                    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk
                    asyncpg.exceptions.OperatorInterventionError,  # shutdown, cannot connect now
                ),
            ):
                log.error(
                    "postgres sink: server error, retrying",
                    server=where,
                    table=self.table,
                    error=self._describe(exc),
                )
        elif isinstance(exc, asyncpg.exceptions._base.DataError):  # client side: bad input
            return PermanentSinkError(
                f"postgres sink: invalid data for {where}: {self._describe(exc)}",
                unique_event_id=only,
            )
        return TransientSinkError(f"postgres sink at {where}: {self._describe(exc)}")

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=self.settings.timeout_s)
        except (TimeoutError, OSError, asyncpg.exceptions.InterfaceError):
            pool.terminate()
