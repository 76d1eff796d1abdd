"""The PostgreSQL state store: the same tables and semantics as the SQLite store, in a schema of
its own (``[state] schema``, default ``opera_consumer``) of a PostgreSQL database, through an
asyncpg pool.

* Every table is named with its schema (no ``search_path``, which a pooler may not keep).
  Times are epoch seconds (``DOUBLE PRECISION``), as in SQLite.
* Migrations are versioned in ``<schema>.schema_version`` (one row per applied version, its
  own series: not SQLite's ``user_version``), and applied in one transaction under a
  transaction-scoped advisory lock, so two daemons starting together do not race: the second
  waits, then finds the schema current. A version above this code's is :class:`SchemaTooNew`.
* :meth:`PostgresStore.commit` is one transaction: processed ids (one ``INSERT … SELECT FROM
  unnest($2::text[])`` per stream), dead letters, checkpoints, resolved dead letters, the
  rows a sink staged (each :class:`~consumer.core.records.Staged` statement is in PostgreSQL's
  dialect, ``$1…``, run with ``executemany``, or once with every row as one JSON document) and
  the sink's position.
* The hot lookups (``seen``, ``parked_among``, ``has_dead_letters``) are one query each;
  ``seen`` and ``parked_among`` pass the ids or keys as one array, and probe an index once
  per id or key whatever the planner's statistics (:func:`seen_sql`, :func:`parked_sql`).
* Text from the wire (ids, offsets, names, keys, a dead letter's payload and error) may hold a
  NUL, which PostgreSQL text cannot: every such column is written through
  :func:`consumer.pg_text.to_text` (an injective, reversible escape of the rare value that
  needs it) and read back through :func:`~consumer.pg_text.from_text`, so a NUL-bearing frame
  is dead-lettered and the stream goes on, and dedup stays exact.
* :meth:`PostgresStore.prune_processed` deletes by age in statements of at most
  ``PRUNE_CHUNK`` rows, each its own transaction: a busy stream adds millions of ids a day,
  and one huge DELETE would hold its locks and WAL for minutes.

Errors are translated where they enter (:func:`store_error`): a lost or refused connection,
a timeout, a serialization failure or deadlock, too many connections, a server starting or
stopping are retriable :class:`StoreError`; refused credentials, an unknown database, a
missing privilege or anything else are not. A staged row refused for its data (a trigger's
cast, a constraint: :func:`staged_row_fault`), at its statement or at COMMIT (a deferred
constraint: a foreign key, a unique or exclusion constraint, a constraint trigger), is
:class:`StagedRowRefused`, which the committer goes round. The DSN is a secret: messages name
the server (``host:port/database``) and the schema, never the DSN or its password.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import re
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import asyncpg

from ..config import StateSettings
from ..core.evidence import prefix
from ..core.records import Checkpoint, CommitBatch, DeadLetterRow, Fence, dead_letter_row
from ..core.watermark import Position
from ..errors import Fenced, LeaseHeld, SchemaTooNew, StagedRowRefused, StoreError
from ..pg_target import DURABLE_COMMITS, Target
from ..pg_text import from_text, from_text_or_none, to_text, to_text_or_none
from .base import PRUNE_CHUNK

# The database's clock (epoch seconds): what fleet members on different hosts agree on.
_DB_NOW = "EXTRACT(EPOCH FROM clock_timestamp())::float8"


def seen_sql(s: str) -> str:
    """The lookup of :meth:`PostgresStore.seen` (``$1`` the stream, ``$2`` the ids), in schema
    ``s``: one probe of the primary key per id, whatever the planner's statistics say. As
    ``event_id = ANY($2)``, a planner without fresh ones (a new store, a stream new to it:
    autovacuum analyzes a table after a tenth of it changed) scanned the index on the stream
    alone and filtered every id of the stream, each lookup slower than the one before (a
    100,000-event catch-up with a postgres sink in the state transaction: 1,304 events/s,
    12,932 as here). LIMIT keeps the subquery a probe per id, never a hash of the stream's."""
    return (
        f"SELECT e.id FROM unnest($2::text[]) AS e(id), LATERAL (SELECT FROM "
        f"{s}.processed_events p WHERE p.stream = $1 AND p.event_id = e.id LIMIT 1) AS hit"
    )


def parked_sql(s: str) -> str:
    """The lookup of :meth:`PostgresStore.parked_among` (``$1`` the stream, ``$2`` the keys,
    each once), in schema ``s``: per key one probe of ``dead_letters_key`` (stream,
    primary_key, id) for its oldest dead letter, and one for the marker. As ``MIN(id) … WHERE
    primary_key = ANY($2) GROUP BY primary_key``, the planner read every dead letter of the
    stream (without statistics: the index on the stream alone, then a filter) or of the table
    (with them: a hash join over a scan of it): 20,000 dead letters, 3 ms a batch."""
    return (
        "SELECT k.pk, COALESCE(d.unique_event_id, d.dedup_key) FROM unnest($2::text[]) AS k(pk), "
        f"LATERAL (SELECT unique_event_id, dedup_key FROM {s}.dead_letters "
        "WHERE stream = $1 AND primary_key = k.pk ORDER BY id LIMIT 1) AS d "
        f"UNION ALL SELECT NULL, NULL WHERE EXISTS (SELECT FROM {s}.dead_letters "
        "WHERE stream = $1 AND primary_key IS NOT NULL)"
    )


MIGRATIONS: tuple[str, ...] = (
    # 1: the schema of the SQLite store's version 3 (the PostgreSQL store began there)
    """
    CREATE TABLE {s}.checkpoints (
        stream          TEXT PRIMARY KEY,
        "offset"        TEXT NOT NULL,
        unique_event_id TEXT NOT NULL,
        updated_at      DOUBLE PRECISION NOT NULL,
        processed_count BIGINT NOT NULL DEFAULT 0,
        last_event_at   DOUBLE PRECISION
    );
    CREATE TABLE {s}.processed_events (
        stream       TEXT NOT NULL,
        event_id     TEXT NOT NULL,
        processed_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (stream, event_id)
    );
    CREATE INDEX processed_events_at ON {s}.processed_events (processed_at);
    CREATE TABLE {s}.dead_letters (
        id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        stream          TEXT NOT NULL,
        dedup_key       TEXT NOT NULL,
        "offset"        TEXT,
        unique_event_id TEXT,
        event_name      TEXT,
        primary_key     TEXT,
        reason          TEXT NOT NULL,
        error           TEXT NOT NULL,
        payload         TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 1,
        first_at        DOUBLE PRECISION NOT NULL,
        last_at         DOUBLE PRECISION NOT NULL,
        payload_size    BIGINT,
        payload_sha256  TEXT,
        UNIQUE (stream, dedup_key)
    );
    CREATE INDEX dead_letters_key ON {s}.dead_letters (stream, primary_key);
    CREATE TABLE {s}.sink_state (
        sink       TEXT PRIMARY KEY,
        state      TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE {s}.start_overrides (
        stream TEXT PRIMARY KEY,
        mode   TEXT NOT NULL CHECK (mode IN ('highest')),
        set_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 2: fleet mode (see consumer.state.fleet): members and their stream leases. Times are
    # the database's clock (epoch seconds), so the members' clocks never matter.
    """
    CREATE TABLE {s}.fleet_members (
        member       TEXT PRIMARY KEY,
        host         TEXT NOT NULL,
        pid          INTEGER NOT NULL,
        weight       DOUBLE PRECISION NOT NULL,
        started_at   DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL,
        expires_at   DOUBLE PRECISION NOT NULL,
        draining     BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE TABLE {s}.stream_leases (
        stream      TEXT PRIMARY KEY,
        holder      TEXT,
        epoch       BIGINT NOT NULL DEFAULT 0,
        acquired_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        expires_at  DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    CREATE INDEX stream_leases_holder ON {s}.stream_leases (holder);
    """,
    # 3: the checkpoint's event time (its event's own timestamp) under its own name. The old
    # column held the commit time (as updated_at does), so none of it is carried over; it
    # stays, unused, because fleet members of the version before may still be committing
    # (they write it) while the others upgrade.
    """
    ALTER TABLE {s}.checkpoints ADD COLUMN event_at DOUBLE PRECISION;
    """,
    # 4: a fleet member's instance (random, one per process): two processes given the same
    # member name notice each other instead of taking each other's streams tick after tick.
    # Members of the version before leave it NULL (their rows are theirs alone by name).
    """
    ALTER TABLE {s}.fleet_members ADD COLUMN instance TEXT;
    """,
    # 5: when the stream's last subscription that we completed was closed (wall clock): the
    # next member or process to subscribe it waits out the rest of resubscribe_gap_s (OHIP:
    # else 4409). Written by whoever completed it, fenced or not: a late write only makes
    # the next wait longer, and that wait is bounded by the gap.
    """
    CREATE TABLE {s}.completed_subscriptions (
        stream    TEXT PRIMARY KEY,
        closed_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 6: the number of each committer's newest commit (see CommitBatch.mark): a commit sent
    # again after its outcome was lost is not applied twice
    """
    CREATE TABLE {s}.commit_marks (
        committer TEXT PRIMARY KEY,
        seq       BIGINT NOT NULL,
        at        DOUBLE PRECISION NOT NULL
    );
    """,
    # 7: when a fleet member last had a stream connected (the database's clock, set by its
    # heartbeat): the evidence another member needs before it hands over a stream it cannot
    # connect (consumer.core.failover); and the streams it handed over so and avoids for now
    # (for `fleet status`). Members of the versions before leave both NULL: no evidence, so
    # nothing is handed over to them for that reason.
    """
    ALTER TABLE {s}.fleet_members ADD COLUMN connected_at DOUBLE PRECISION;
    ALTER TABLE {s}.fleet_members ADD COLUMN avoiding TEXT[];
    """,
    # 8: park-key's lookup of each resource's oldest dead letter (parked_among) is one probe
    # of this index per key: on (stream, primary_key) it read every dead letter of the key (a
    # parked resource gathers them) or, as the planner chose, of the stream.
    """
    CREATE INDEX dead_letters_first ON {s}.dead_letters (stream, primary_key, id);
    DROP INDEX {s}.dead_letters_key;
    ALTER INDEX {s}.dead_letters_first RENAME TO dead_letters_key;
    """,
)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def quote_ident(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def migration_lock_key(schema: str) -> int:
    """The advisory lock (a signed 64-bit key) the migrations of ``schema`` run under."""
    digest = hashlib.sha256(f"opera-consumer:state:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# Server errors that may clear by themselves: connection (08), serialization failure and
# deadlock (40), too many connections or out of resources (53), shutdown, "cannot connect
# now" and cancelled statements (57), I/O errors (58); a read-only server (25006: a standby,
# or a failover under way, its DNS name still on the demoted primary), a lock not had within
# the role's lock_timeout (55P03: a DBA's short maintenance) and an idle transaction ended by
# the server (25P03). Each stopped the daemon with 78, which systemd does not restart; a batch
# sent again is applied once (its mark).
_RETRIABLE_SERVER = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.PostgresSystemError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
)
# A staged statement's failure that may be its row's data (:func:`staged_row_fault`): a data
# exception (22: a cast in a trigger, a function it calls dividing by zero), an integrity
# violation (23), a character the database cannot hold (0A000), a RAISE or an ASSERT (P0001,
# P0004, or any SQLSTATE one chose: where PL/pgSQL raised it says so).
_ROW_CLASSES = ("22", "23")
_ROW_STATES = frozenset({"0A000", "P0001", "P0004"})
_RAISED_BY = frozenset({"exec_stmt_raise", "exec_stmt_assert"})
# Of classes 22 and 23, what no row's data can cause: every write meets it alike, so it is
# retried (the stream held up, a warning naming it) until the operator fixes the database,
# never a row's dead letter. 2200H (sequence_generator_limit_exceeded): a sequence a trigger
# or a default draws from is at its MAXVALUE (an audit table's int4 serial after 2**31 rows),
# whatever the row. Not the others: each checks a value an expression computed (a cast, a
# length, a JSON path, a LIMIT, a setval), which a trigger may take from NEW: they may be the
# row's. (22002, 22010, 22022, 22024 are embedded SQL's, never the server's.)
NOT_ROW_STATES = frozenset({"2200H"})


def no_row_fault(sqlstate: str, raised_by: str | None) -> bool:
    """Whether a failure of class 22 or 23 is one no row's data causes (:data:`NOT_ROW_STATES`),
    unless an operator's RAISE or ASSERT chose that SQLSTATE (taken at its word: the row's)."""
    return sqlstate in NOT_ROW_STATES and raised_by not in _RAISED_BY


def staged_row_fault(sqlstate: str, raised_by: str | None) -> bool:
    """Whether a staged statement that failed with ``sqlstate`` (raised in the server's
    function ``raised_by``) may have failed on its row's data, so that the committer writes
    the rows through the sink's own path, which tells a row's refusal (that event
    dead-lettered) from the table's (retried). Not what every event meets (a privilege, a
    table or a function gone: 42xxx) nor what clears by itself (the caller's
    :data:`_RETRIABLE_SERVER`, even if a RAISE chose it): the commit is retried as before.
    Nor what no row's data can cause (:func:`no_row_fault`: a sequence at its limit)."""
    if no_row_fault(sqlstate, raised_by):
        return False
    return sqlstate.startswith(_ROW_CLASSES) or sqlstate in _ROW_STATES or raised_by in _RAISED_BY


def _row_fault(exc: BaseException) -> bool:
    """:func:`staged_row_fault` of a driver's error (a value asyncpg cannot send is its row's)."""
    if isinstance(exc, asyncpg.exceptions._base.DataError):
        return True
    if isinstance(exc, _RETRIABLE_SERVER) or not isinstance(exc, asyncpg.exceptions.PostgresError):
        return False
    return staged_row_fault(exc.sqlstate or "", getattr(exc, "server_source_function", None))


# A line of an error's CONTEXT naming a function it was raised in ("PL/pgSQL function f() line
# 3 at PERFORM", "SQL function \"f\" statement 1"). Not its other lines: "SQL statement …"
# (the function's own text), "unnamed portal parameter $1", "JSON data, line 1: …" (the row's).
_FUNCTION_CONTEXT = re.compile(r"[\w/]+ function \S")


def raised_in(exc: BaseException) -> str | None:
    """The function the table called (a trigger's) that an error was raised in, bounded: the
    last line of its CONTEXT that names one; None when it names none."""
    context = str(getattr(exc, "context", None) or "")
    named = [line for line in context.splitlines() if _FUNCTION_CONTEXT.match(line)]
    return prefix(named[-1], 200) if named else None


def staged_refusal(
    target: Target, schema: str, exc: BaseException, *, at_commit: bool = False
) -> StagedRowRefused:
    """What the server said of a staged row, bounded, naming what refused it (the table, the
    constraint or column, the function a trigger ran; ``at_commit``: a deferred check, at
    COMMIT); never the row: not the DETAIL (``Failing row contains (…)``), nor a data
    exception's message (a cast's quotes the value), nor asyncpg's of a value it cannot
    send."""
    state = str(getattr(exc, "sqlstate", None) or "")
    names = [
        f"{what} {prefix(str(value), 100)!r}"
        for what, value in (
            ("table", getattr(exc, "table_name", None)),
            ("constraint", getattr(exc, "constraint_name", None)),
            ("column", getattr(exc, "column_name", None)),
        )
        if value
    ]
    function = raised_in(exc)
    if function is not None:
        names.append(f"in {function}")
    said = (
        f"{prefix(state, 5) or 'client'} {type(exc).__name__}"
        if state.startswith("22") or not state
        else target.describe(exc, detail=False)
    )
    return StagedRowRefused(
        f"state store PostgreSQL {target.where} (schema {schema}): committing: a row a sink "
        f"staged was refused{' at COMMIT' if at_commit else ''} "
        f"({said}{'; ' if names else ''}{', '.join(names)}): the sink "
        "writes through its own path instead"
    )


# What asyncpg and the network raise: translated by store_error.
DRIVER_ERRORS = (
    asyncpg.exceptions.PostgresError,
    asyncpg.exceptions.InterfaceError,  # connection closed or lost; client-side bad data
    asyncpg.exceptions.InternalClientError,  # e.g. a cached statement gone stale
    OSError,
    TimeoutError,  # connect or command timeout, no connection free in time
)


def store_error(target: Target, schema: str, exc: BaseException, doing: str) -> StoreError:
    """One line naming the server, the schema, what is wrong and the fix."""
    where = f"state store PostgreSQL {target.where} (schema {schema})"
    # First: a certificate that does not verify is a ValueError too, not a parse error.
    if (refusal := target.tls_refusal(exc, "state.dsn")) is not None:
        return StoreError(f"{where}: {refusal}")
    # Never the server's DETAIL: a row a sink staged in the commit may be the one refused, and
    # a violation's DETAIL repeats it (``Failing row contains (…)``: an event's data).
    text = target.describe(exc, detail=False)
    if isinstance(exc, asyncpg.exceptions.PostgresError):
        state = exc.sqlstate or ""
        if state.startswith("28"):
            return StoreError(
                f"{where}: the server refused our credentials: {text}: fix the user or "
                "password in [state] dsn"
            )
        if state.startswith("3D"):
            return StoreError(
                f"{where}: no such database: {text}: create it, or fix the database in [state] dsn"
            )
        if isinstance(exc, asyncpg.exceptions.InsufficientPrivilegeError):
            return StoreError(
                f"{where}: {doing}: missing privilege: {text}: let the user own the schema "
                "(or grant it CREATE on the database, to create it), or set [state] schema"
            )
        if isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
            return StoreError(
                f"{where}: {doing}: {text}: the server is read-only (a standby, or a failover "
                "under way): retry later; target_session_attrs=read-write in [state] dsn picks "
                "the primary of several hosts",
                retriable=True,
            )
        if isinstance(exc, _RETRIABLE_SERVER):
            return StoreError(f"{where}: {doing}: {text}: retry later", retriable=True)
        if no_row_fault(state, getattr(exc, "server_source_function", None)):
            # The database's state, not a row's (a staged row's trigger drawing from a
            # sequence at its limit): every commit meets it until the operator fixes it.
            function = raised_in(exc)
            return StoreError(
                f"{where}: {doing}: {text} ({state}{', in ' + function if function else ''}): "
                "no event's data causes it; fix the database (a sequence at its MAXVALUE: "
                "ALTER SEQUENCE … AS bigint MAXVALUE …); retrying",
                retriable=True,
            )
        if state.startswith("22"):  # also asyncpg's own, for a value it cannot encode
            return StoreError(f"{where}: {doing}: invalid data: {text}")
        return StoreError(f"{where}: {doing}: {text}")
    if isinstance(exc, asyncpg.exceptions._base.DataError):  # a value asyncpg cannot send
        return StoreError(f"{where}: {doing}: invalid data: {text}")
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError | ValueError):
        # The driver's parse errors quote the DSN's pieces (a password's too): never shown.
        return StoreError(f"{where}: {target.unparsable('[state] dsn')}")
    return StoreError(
        f"{where}: {doing}: cannot reach the server or lost it: {text}: retry later",
        retriable=True,
    )


def _translated(
    doing: str,
) -> Callable[
    [Callable[Concatenate[PostgresStore, _P], Coroutine[Any, Any, _R]]],
    Callable[Concatenate[PostgresStore, _P], Coroutine[Any, Any, _R]],
]:
    """asyncpg's and the network's errors become :class:`StoreError` where they enter."""

    def wrap(
        method: Callable[Concatenate[PostgresStore, _P], Coroutine[Any, Any, _R]],
    ) -> Callable[Concatenate[PostgresStore, _P], Coroutine[Any, Any, _R]]:
        @functools.wraps(method)
        async def translated(store: PostgresStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return await method(store, *args, **kwargs)
            except DRIVER_ERRORS as exc:
                if isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
                    # The pool's sessions may all be on the read-only server (a demoted
                    # primary, a session-level read-only setting): the retry connects anew,
                    # where the DSN now leads.
                    await store.expire_connections()
                raise store_error(store.target, store.schema, exc, doing) from None

        return translated

    return wrap


def _checkpoint(row: Any) -> Checkpoint:
    stream, offset, unique_event_id, updated_at, processed_count, event_at = row
    return Checkpoint(
        stream, from_text(offset), from_text(unique_event_id), updated_at, processed_count, event_at
    )


def _stored_letter(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A :func:`dead_letter_row` with its text from the wire (dedup_key to payload) as
    PostgreSQL can hold it."""
    return (row[0], *(to_text_or_none(v) for v in row[1:9]), *row[9:])


def _dead_letter(row: Any) -> DeadLetterRow:
    values = list(row)
    values[2:9] = [from_text_or_none(v) for v in values[2:9]]  # offset to payload
    return DeadLetterRow(*values)


def _count(status: str) -> int:
    """The row count of a command status (``DELETE 3``)."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


class PostgresStore:
    def __init__(self, pool: Any, target: Target, schema: str, timeout_s: float) -> None:
        self._pool = pool  # asyncpg.Pool (untyped)
        self.target = target
        self.schema = schema
        self._s = quote_ident(schema)
        self._seen_sql = seen_sql(self._s)
        self._parked_sql = parked_sql(self._s)
        self._timeout = timeout_s
        self._closed = False

    async def expire_connections(self) -> None:
        """Replace every pooled session at its next use (asyncpg's expire_connections)."""
        await self._pool.expire_connections()

    def __repr__(self) -> str:
        return f"PostgresStore(server={self.target.where!r}, schema={self.schema!r})"

    @property
    def where(self) -> str:
        return f"PostgreSQL {self.target.where} (schema {self.schema})"

    @property
    def pool(self) -> Any:
        """The asyncpg pool (for the fleet's lease table, :mod:`consumer.state.fleet`)."""
        return self._pool

    @property
    def qualified_schema(self) -> str:
        return self._s

    @property
    def timeout_s(self) -> float:
        return self._timeout

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        schema: str = "opera_consumer",
        pool_min: int = 1,
        pool_max: int = 4,
        timeout_s: float = 10.0,
        create: bool = True,
    ) -> PostgresStore:
        """Connect and migrate (``create``: create the schema if missing, else refuse a
        database without one); :class:`StoreError` names the server, the schema and the fix."""
        target = Target(dsn)
        try:
            pool = await asyncpg.create_pool(
                target.dsn(),
                ssl=target.tls(),  # verified by default off this machine (pg_target)
                min_size=min(pool_min, pool_max),
                max_size=pool_max,
                timeout=timeout_s,  # connect
                command_timeout=timeout_s,
                server_settings={
                    "application_name": "opera-consumer",
                    # A member frozen (SIGSTOP, a VM pause) inside a commit would hold its
                    # lease rows' locks for as long as it sleeps, and no member could take
                    # those streams over: the server ends such a transaction instead.
                    "idle_in_transaction_session_timeout": str(int(timeout_s * 1000)),
                    **DURABLE_COMMITS,
                },
            )
        except (*DRIVER_ERRORS, ValueError) as exc:
            raise store_error(target, schema, exc, "connecting") from None
        store = cls(pool, target, schema, timeout_s)
        try:
            await store._migrate(create)
        except BaseException:
            pool.terminate()
            raise
        return store

    @_translated("preparing the schema")
    async def _migrate(self, create: bool) -> None:
        s, schema = self._s, self.schema
        where = f"state store PostgreSQL {self.target.where}"
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            # Held to the end of the transaction: a second daemon waits here, then finds
            # the schema current. Nothing is looked at before it is held.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", migration_lock_key(schema))
            has_schema = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema
            )
            has_table = bool(has_schema) and await conn.fetchval(
                "SELECT to_regclass($1) IS NOT NULL", f"{s}.schema_version"
            )
            if not has_table and not create:
                raise StoreError(
                    f"{where} has no state in schema {schema}: the daemon has not run with "
                    "this config (or [state] schema names another schema)"
                )
            # Created only when missing: CREATE … IF NOT EXISTS needs the privilege even
            # when there is nothing to create.
            if not has_schema:
                await conn.execute(f"CREATE SCHEMA {s}")
            if not has_table:
                await conn.execute(
                    f"CREATE TABLE {s}.schema_version (version INTEGER PRIMARY KEY, "
                    "applied_at DOUBLE PRECISION NOT NULL)"
                )
            version = int(
                await conn.fetchval(f"SELECT COALESCE(MAX(version), 0) FROM {s}.schema_version")
            )
            if version > len(MIGRATIONS):
                raise SchemaTooNew(
                    f"{where}: schema {schema} is at version {version}, written by a newer "
                    f"opera-consumer (this one knows {len(MIGRATIONS)}): upgrade "
                    "opera-consumer, or set [state] schema to another schema"
                )
            for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
                await conn.execute(script.format(s=s))
                await conn.execute(
                    f"INSERT INTO {s}.schema_version (version, applied_at) VALUES ($1, $2)",
                    target,
                    time.time(),
                )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self._pool.close(), timeout=self._timeout)
        except (TimeoutError, OSError, asyncpg.exceptions.InterfaceError):
            self._pool.terminate()

    # --- reads ----------------------------------------------------------------------------

    @_translated("reading a checkpoint")
    async def checkpoint(self, stream: str) -> Checkpoint | None:
        row = await self._pool.fetchrow(
            'SELECT stream, "offset", unique_event_id, updated_at, processed_count, '
            f"event_at FROM {self._s}.checkpoints WHERE stream = $1",
            stream,
        )
        return _checkpoint(row) if row else None

    @_translated("reading the checkpoints")
    async def checkpoints(self) -> list[Checkpoint]:
        rows = await self._pool.fetch(
            'SELECT stream, "offset", unique_event_id, updated_at, processed_count, '
            f"event_at FROM {self._s}.checkpoints ORDER BY stream"
        )
        return [_checkpoint(row) for row in rows]

    @_translated("looking up processed ids")
    async def seen(self, stream: str, event_ids: Sequence[str]) -> set[str]:
        """Which of these ids were already processed (committed) for this stream: one query."""
        if not event_ids:
            return set()
        stored = {to_text(i): i for i in event_ids}
        rows = await self._pool.fetch(self._seen_sql, stream, list(stored))
        return {stored[row[0]] for row in rows}

    @_translated("reading the sink state")
    async def sink_state(self, sink: str) -> str | None:
        value = await self._pool.fetchval(
            f"SELECT state FROM {self._s}.sink_state WHERE sink = $1", sink
        )
        return None if value is None else str(value)

    @_translated("counting dead letters")
    async def dead_letter_counts(self) -> dict[str, int]:
        rows = await self._pool.fetch(
            f"SELECT stream, COUNT(*) FROM {self._s}.dead_letters GROUP BY stream"
        )
        return {str(s): int(n) for s, n in rows}

    @_translated("reading dead letters")
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
            'SELECT id, stream, "offset", unique_event_id, event_name, primary_key, reason, '
            f"error, {payload}, attempts, first_at, last_at, "
            f"payload_size, payload_sha256 FROM {self._s}.dead_letters WHERE TRUE"
        )
        args: list[Any] = []
        for clause, value in (
            (" AND stream = ${}", stream),
            (" AND reason = ${}", to_text_or_none(reason)),
            (" AND last_at >= ${}::float8", since),
            (" AND last_at < ${}::float8", before),
            (" AND id = ANY(${}::bigint[])", None if ids is None else list(ids)),
            (" AND id > ${}::bigint", after),
        ):
            if value is not None:
                args.append(value)
                sql += clause.format(len(args))
        sql += " ORDER BY id"
        if limit is not None:
            args.append(limit)
            sql += f" LIMIT ${len(args)}::bigint"
        rows = await self._pool.fetch(sql, *args)
        return [_dead_letter(row) for row in rows]

    @_translated("reading dead letters")
    async def payload_lengths(self, ids: Sequence[int]) -> dict[int, int]:
        # octet_length: the stored size, without decompressing (a bound on the characters)
        rows = await self._pool.fetch(
            f"SELECT id, octet_length(payload) FROM {self._s}.dead_letters "
            "WHERE id = ANY($1::bigint[])",
            list(ids),
        )
        return {int(r[0]): int(r[1]) for r in rows}

    @_translated("reading dead letters")
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
        args: list[Any] = [[s for s, _ in keys], [to_text(k) for _, k in keys], below]
        chosen = ""
        for clause, value in (
            (" AND d.reason = ${}", to_text_or_none(reason)),
            (" AND d.last_at >= ${}::float8", since),
            (" AND d.last_at < ${}::float8", before),
            (" AND d.id = ANY(${}::bigint[])", None if ids is None else list(ids)),
        ):
            if value is not None:
                args.append(value)
                chosen += clause.format(len(args))
        if not chosen or not keys:
            return {}
        rows = await self._pool.fetch(
            f"SELECT k.s, k.pk, (SELECT MIN(d.id) FROM {self._s}.dead_letters d "
            "WHERE d.stream = k.s AND d.primary_key = k.pk AND d.id < $3::bigint "
            f"AND NOT (TRUE{chosen})) FROM unnest($1::text[], $2::text[]) AS k(s, pk)",
            *args,
        )
        return {(s, from_text(k)): int(i) for s, k, i in rows if i is not None}

    @_translated("looking up parked resources")
    async def parked_among(
        self, stream: str, primary_keys: Sequence[str]
    ) -> tuple[dict[str, str], bool]:
        """Of these resources, those with dead letters -> the uniqueEventId (or dedup key) of
        the oldest; and whether the stream has any dead letter of a resource (see StateStore).
        One query (:func:`parked_sql`): the keys as one array, and a marker row (NULL) when the
        stream has any."""
        rows = await self._pool.fetch(
            self._parked_sql, stream, list(dict.fromkeys(to_text(k) for k in primary_keys))
        )
        found = {from_text(k): from_text(v) for k, v in rows if k is not None}
        return found, len(rows) > len(found)

    @_translated("looking up dead letters")
    async def has_dead_letters(self, stream: str, primary_key: str) -> bool:
        """Does this resource still have dead letters? (one query, on the index)"""
        return bool(
            await self._pool.fetchval(
                f"SELECT EXISTS (SELECT 1 FROM {self._s}.dead_letters "
                "WHERE stream = $1 AND primary_key = $2)",
                stream,
                to_text(primary_key),
            )
        )

    @_translated("reading a start override")
    async def start_override(self, stream: str) -> str | None:
        value = await self._pool.fetchval(
            f"SELECT mode FROM {self._s}.start_overrides WHERE stream = $1", stream
        )
        return None if value is None else str(value)

    @_translated("reading when a subscription was completed")
    async def completed_closed_at(self, stream: str) -> float | None:
        value = await self._pool.fetchval(
            f"SELECT closed_at FROM {self._s}.completed_subscriptions WHERE stream = $1", stream
        )
        return None if value is None else float(value)

    @_translated("reading when a subscription was completed")
    async def completed_close(self, stream: str) -> tuple[float | None, float]:
        row = await self._pool.fetchrow(
            f"SELECT (SELECT closed_at FROM {self._s}.completed_subscriptions WHERE stream = $1) "
            f"AS closed_at, {_DB_NOW} AS now",
            stream,
        )
        closed_at = row["closed_at"]
        return (None if closed_at is None else float(closed_at)), float(row["now"])

    # --- writes ---------------------------------------------------------------------------

    @_translated("committing")
    async def commit(self, batch: CommitBatch, now: float | None = None) -> bool:
        """Everything in ``batch`` becomes durable together, or not at all."""
        return await self._commit(batch, time.time() if now is None else now)

    async def _commit(self, batch: CommitBatch, now: float) -> bool:
        async with self._pool.acquire(timeout=self._timeout) as db:
            written = False  # every statement ran: a failure after it is the COMMIT's
            try:
                async with db.transaction():
                    if not await self._write(db, batch, now):
                        return False
                    written = True
                return True
            except DRIVER_ERRORS as exc:
                if not (written and any(st.rows for st in batch.staged)) or not _row_fault(exc):
                    raise
                failed = exc
            # A deferred check (DEFERRABLE INITIALLY DEFERRED: a foreign key, a unique or
            # exclusion constraint, a constraint trigger) failed at COMMIT, for a row's data,
            # naming no statement (the server rolled the transaction back). Whose row: the
            # batch once more, its checks made immediate once the store's own rows are in, so
            # that a staged row's fails at its statement (StagedRowRefused, as a statement's
            # refusal) and the store's own rows' is the failure above. Only after a failure:
            # a commit is still one transaction.
            async with db.transaction():
                return await self._write(db, batch, now, failed)

    async def _write(
        self, db: Any, batch: CommitBatch, now: float, failed: BaseException | None = None
    ) -> bool:
        """The batch's statements, in the transaction; False: applied before. ``failed``: the
        failure of its COMMIT that this try finds the cause of (see :meth:`_commit`)."""
        s = self._s
        # Before the fence: a batch applied while the lease was held stays applied.
        if batch.mark is not None and not await self._mark(db, batch.mark, now):
            return False
        if batch.fence is not None:
            await self._check_fence(db, batch.fence, batch.streams())
        for stream, ids in batch.processed.items():
            # One statement for the whole batch, the ids as one array.
            await db.execute(
                f"INSERT INTO {s}.processed_events (stream, event_id, processed_at) "
                "SELECT $1, e, $3 FROM unnest($2::text[]) AS e "
                "ON CONFLICT (stream, event_id) DO NOTHING",
                stream,
                list(dict.fromkeys(map(to_text, ids))),
                now,
            )
        if batch.dead_letters:
            # One execution per letter: the same letter twice in a batch is two attempts.
            await db.executemany(
                f'INSERT INTO {s}.dead_letters AS d (stream, dedup_key, "offset", '
                "unique_event_id, event_name, primary_key, reason, error, payload, first_at, "
                "last_at, payload_size, payload_sha256) VALUES ($1, $2, $3, $4, $5, $6, $7, "
                "$8, $9, $10, $11, $12, $13) "
                "ON CONFLICT (stream, dedup_key) DO UPDATE SET attempts = d.attempts + 1, "
                "last_at = EXCLUDED.last_at, error = EXCLUDED.error, "
                "reason = EXCLUDED.reason",
                [_stored_letter(dead_letter_row(d, now)) for d in batch.dead_letters],
            )
        moved: list[tuple[Any, ...]] = []
        counted: list[tuple[Any, ...]] = []
        for stream in set(batch.checkpoints) | set(batch.done_counts):
            pos = batch.checkpoints.get(stream)
            count = batch.done_counts.get(stream, 0)
            if pos is not None:
                at = batch.event_at.get(stream)
                offset, uid = to_text(pos.offset), to_text(pos.unique_event_id)
                moved.append((stream, offset, uid, now, count, at))
            elif count:
                counted.append((count, stream))
        if moved:
            await db.executemany(
                f'INSERT INTO {s}.checkpoints AS c (stream, "offset", unique_event_id, '
                "updated_at, processed_count, event_at) VALUES ($1, $2, $3, $4, $5, $6) "
                'ON CONFLICT (stream) DO UPDATE SET "offset" = EXCLUDED."offset", '
                "unique_event_id = EXCLUDED.unique_event_id, "
                "updated_at = EXCLUDED.updated_at, "
                "processed_count = c.processed_count + EXCLUDED.processed_count, "
                "event_at = EXCLUDED.event_at",
                moved,
            )
        if counted:
            await db.executemany(
                f"UPDATE {s}.checkpoints SET processed_count = processed_count + $1 "
                "WHERE stream = $2",
                counted,
            )
        if batch.resolved:
            await db.execute(
                f"DELETE FROM {s}.dead_letters WHERE id = ANY($1::bigint[])",
                list(batch.resolved),
            )
        if batch.checkpoints:
            # A checkpoint written by the stream supersedes an operator's pending reset.
            await db.execute(
                f"DELETE FROM {s}.start_overrides WHERE stream = ANY($1::text[])",
                list(batch.checkpoints),
            )
        if failed is not None:
            try:
                # Checks the store's own rows now; each staged statement's at its end.
                await db.execute("SET CONSTRAINTS ALL IMMEDIATE")
            except DRIVER_ERRORS as exc:
                if _row_fault(exc):  # the store's own rows': the COMMIT's failure is theirs
                    raise failed from None
                raise
        for staged in batch.staged:
            if staged.rows:
                try:
                    if staged.document:
                        await db.execute(staged.statement, staged.as_document())
                    else:
                        await db.executemany(staged.statement, staged.rows)
                except DRIVER_ERRORS as exc:
                    if not _row_fault(exc):
                        raise
                    at_commit = failed is not None
                    raise staged_refusal(
                        self.target, self.schema, exc, at_commit=at_commit
                    ) from None
        if batch.sink_state is not None:
            await self._put_sink_state(db, *batch.sink_state, now)
        return True

    async def _mark(self, db: Any, mark: tuple[str, int], now: float) -> bool:
        """Record the batch's number as its committer's newest; False: applied before (a
        number not past the newest). Two transactions of one mark: the second waits on the
        row's lock and then sees the first's number."""
        return (
            await db.fetchval(
                f"INSERT INTO {self._s}.commit_marks AS m (committer, seq, at) "
                "VALUES ($1, $2, $3) ON CONFLICT (committer) DO UPDATE SET seq = EXCLUDED.seq, "
                "at = EXCLUDED.at WHERE m.seq < EXCLUDED.seq RETURNING TRUE",
                *mark,
                now,
            )
            is not None
        )

    @_translated("reading the streams' lease epochs")
    async def stream_epochs(self, streams: Iterable[str]) -> dict[str, int]:
        """A daemon outside a fleet: its streams' lease rows' epochs now (a row made when
        missing, as an operator's hold makes it), which its commits are fenced by
        (``Fence("", epochs)``: the rows at these epochs, whoever a row names: a fleet member
        gone before it started may have left its name there). Its advisory
        lease is free while its session is gone (a server restart, a terminated backend) and
        the daemon runs on until its next check: an operator's `offset set/reset` may take it
        then, and moves these epochs (:meth:`~consumer.state.fleet.FleetTable.hold_for_change`),
        so that the daemon's commits after it write no in-memory position over the change."""
        from .fleet import FIRST_EPOCH  # noqa: PLC0415  # it imports this module

        wanted = sorted(set(streams))
        async with self._pool.acquire(timeout=self._timeout) as db:
            await db.execute(
                f"INSERT INTO {self._s}.stream_leases (stream, epoch) "
                f"SELECT unnest($1::text[]), {FIRST_EPOCH} ON CONFLICT (stream) DO NOTHING",
                wanted,
            )
            rows = await db.fetch(
                f"SELECT stream, epoch FROM {self._s}.stream_leases WHERE stream = ANY($1::text[])",
                wanted,
            )
        return {str(r["stream"]): int(r["epoch"]) for r in rows}

    async def _check_fence(
        self, db: Any, fence: Fence, streams: set[str], what: str = "commit"
    ) -> None:
        """Fleet mode: raise :class:`Fenced` (rolling the transaction back) unless this member
        holds every stream's lease at its epoch. ``FOR KEY SHARE`` locks the lease rows until
        this transaction ends: a takeover (``FOR UPDATE SKIP LOCKED``) skips a row so locked
        and takes it on a later try, after this commit, so the new holder reads the checkpoint
        this commit writes; an operator's hold (``FOR UPDATE``) waits for it. The weakest lock
        that does: the member's renewal and release (``FOR NO KEY UPDATE``, changing no key)
        go through meanwhile, so one slow commit holds up no renewal (``FOR SHARE`` did, and a
        healthy member fenced itself); the lock stays on the row a release writes, so the
        takeover still waits for the commit. A daemon outside a fleet (``member`` ""): the rows
        at the epochs it read, whoever they name (:meth:`stream_epochs`)."""
        if not streams:
            return
        rows = await db.fetch(
            f"SELECT stream, holder, epoch FROM {self._s}.stream_leases "
            "WHERE stream = ANY($1::text[]) ORDER BY stream FOR KEY SHARE",
            sorted(streams),
        )
        held = {
            str(r["stream"])
            for r in rows
            if fence.epochs.get(r["stream"]) == r["epoch"]
            and (r["holder"] == fence.member or not fence.member)
        }
        lost = frozenset(streams - held)
        if lost:
            raise Fenced(lost, what)

    @_translated("anchoring a checkpoint")
    async def anchor(self, stream: str, position: Position, fence: Fence | None = None) -> None:
        s = self._s
        async with self._pool.acquire(timeout=self._timeout) as db, db.transaction():
            if fence is not None:
                await self._check_fence(db, fence, {stream}, "anchor")
            # After an operator's reset the stream has a checkpoint row, which the first
            # event of the new session replaces.
            reset = await db.execute(f"DELETE FROM {s}.start_overrides WHERE stream = $1", stream)
            conflict = "DO NOTHING"
            if _count(reset):
                conflict = (
                    'DO UPDATE SET "offset" = EXCLUDED."offset", '
                    "unique_event_id = EXCLUDED.unique_event_id, updated_at = EXCLUDED.updated_at, "
                    "event_at = NULL"
                )
            await db.execute(
                f'INSERT INTO {s}.checkpoints (stream, "offset", unique_event_id, updated_at) '
                f"VALUES ($1, $2, $3, $4) ON CONFLICT (stream) {conflict}",
                stream,
                to_text(position.offset),
                to_text(position.unique_event_id),
                time.time(),
            )

    @_translated("recording when a subscription was completed")
    async def set_completed_closed_at(self, stream: str, at: float | None = None) -> None:
        await self._pool.execute(
            f"INSERT INTO {self._s}.completed_subscriptions (stream, closed_at) "
            f"VALUES ($1, COALESCE($2::float8, {_DB_NOW})) "
            "ON CONFLICT (stream) DO UPDATE SET closed_at = EXCLUDED.closed_at",
            stream,
            at,
        )

    async def _put_sink_state(self, db: Any, sink: str, state: str, now: float) -> None:
        await db.execute(
            f"INSERT INTO {self._s}.sink_state (sink, state, updated_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (sink) DO UPDATE SET state = EXCLUDED.state, "
            "updated_at = EXCLUDED.updated_at",
            sink,
            state,
            now,
        )

    # --- operator changes (the CLI, while no daemon holds the stream) ------------------------

    @_translated("setting an offset")
    async def set_offset(self, stream: str, offset: str) -> None:
        """The next session resumes at ``offset`` (inclusive); clears a pending reset."""
        s = self._s
        async with self._pool.acquire(timeout=self._timeout) as db, db.transaction():
            await db.execute(f"DELETE FROM {s}.start_overrides WHERE stream = $1", stream)
            await db.execute(
                f'INSERT INTO {s}.checkpoints (stream, "offset", unique_event_id, updated_at) '
                "VALUES ($1, $2, '', $3) ON CONFLICT (stream) DO UPDATE SET "
                '"offset" = EXCLUDED."offset", unique_event_id = \'\', '
                "updated_at = EXCLUDED.updated_at, event_at = NULL",
                stream,
                to_text(offset),
                time.time(),
            )

    @_translated("resetting to the highest offset")
    async def reset_to_highest(self, stream: str) -> None:
        """The next session subscribes with ``offsetType: highest`` (skipping the backlog)."""
        await self._pool.execute(
            f"INSERT INTO {self._s}.start_overrides (stream, mode, set_at) "
            "VALUES ($1, 'highest', $2) "
            "ON CONFLICT (stream) DO UPDATE SET mode = EXCLUDED.mode, set_at = EXCLUDED.set_at",
            stream,
            time.time(),
        )

    @_translated("writing the sink state")
    async def set_sink_state(self, sink: str, state: str) -> None:
        """The sink's committed position, recorded before its first write or by an
        operator's ``sink adopt``."""
        await self._put_sink_state(self._pool, sink, state, time.time())

    @_translated("purging dead letters")
    async def purge_dead_letters(self, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        status = await self._pool.execute(
            f"DELETE FROM {self._s}.dead_letters WHERE id = ANY($1::bigint[])", list(ids)
        )
        return _count(status)

    @_translated("reading the newest dead letter's id")
    async def newest_dead_letter_id(self) -> int | None:
        value = await self._pool.fetchval(f"SELECT MAX(id) FROM {self._s}.dead_letters")
        return None if value is None else int(value)

    @_translated("reading the newest processed id's time")
    async def newest_processed_at(self) -> float | None:
        value = await self._pool.fetchval(
            f"SELECT MAX(processed_at) FROM {self._s}.processed_events"
        )
        return None if value is None else float(value)

    @_translated("pruning processed ids")
    async def prune_processed(
        self, older_than: float, *, streams: Sequence[str] | None = None, once: bool = False
    ) -> int:
        """Delete processed ids older than ``older_than`` (epoch seconds), of ``streams``
        only when given: statements of at most ``PRUNE_CHUNK`` rows, each its own short
        transaction (``once``: one of them)."""
        # Marks of committers gone as long (one a process; a live one's moves each commit).
        await self._pool.execute(f"DELETE FROM {self._s}.commit_marks WHERE at < $1", older_than)
        total = 0
        while True:
            chunk = PRUNE_CHUNK
            status = await self._pool.execute(
                f"DELETE FROM {self._s}.processed_events WHERE (stream, event_id) IN ("
                f"SELECT stream, event_id FROM {self._s}.processed_events p "
                "WHERE processed_at < $1 AND ($3::text[] IS NULL OR stream = ANY($3::text[])) "
                # A checkpoint's own event id stays (see the SQLite store's _NOT_A_CHECKPOINT).
                f"AND NOT EXISTS (SELECT 1 FROM {self._s}.checkpoints c "
                "WHERE c.stream = p.stream AND c.unique_event_id = p.event_id) "
                "LIMIT $2)",
                older_than,
                chunk,
                None if streams is None else list(streams),
            )
            deleted = _count(status)
            total += deleted
            if deleted < chunk or once:
                return total


# --- the lease --------------------------------------------------------------------------------

# pg_try_advisory_lock(int4, int4): this constant, and a hash of the schema.
_LEASE_CLASS = 0x4F504552  # "OPER"


def _lease_key(schema: str, purpose: str = "") -> int:
    """The schema's lease; with a purpose, a lock of its own (``dlq replay``'s)."""
    digest = hashlib.sha256(f"opera-consumer:{purpose or 'lease'}:{schema}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# The schema's fleet lock: a daemon outside the fleet holds it exclusively for its whole run (on
# its lease's connection), each fleet member shared on its fleet connection, taken again on
# every new connection before anything else: the two never run side by side, whatever rows
# the fleet's tables hold (a member's row is written at its first tick, and has expired after
# an outage longer than a lease). Operators' commands take the lease, not this lock.
_FLEET_LOCK = "fleet"
FLEET_MEMBER_APP = "opera-consumer fleet "  # a member's fleet connection: this, then its name


def fleet_lock(schema: str) -> tuple[int, int]:
    """The arguments of ``pg_try_advisory_lock[_shared](int4, int4)`` for the fleet lock."""
    return _LEASE_CLASS, _lease_key(schema, _FLEET_LOCK)


async def _lock_holders(conn: Any, key: tuple[int, int]) -> list[tuple[str, str | None]]:
    """The other sessions holding an advisory lock: (application_name, client host)."""
    rows = await conn.fetch(
        "SELECT a.application_name, host(a.client_addr) AS host FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
        "AND l.granted AND l.classid = $1::oid AND l.objid = $2::oid AND l.objsubid = 2 "
        "AND l.pid <> pg_backend_pid() ORDER BY a.application_name",
        *key,
    )
    return [(str(r["application_name"] or ""), r["host"]) for r in rows]


def _said(application_name: str, host: str | None) -> dict[str, Any]:
    """A lease holder as its connection's name says (pid, role), and its host."""
    said = dict(part.split("=", 1) for part in application_name.split() if "=" in part)
    info: dict[str, Any] = {"pid": said.get("pid"), "role": said.get("role")}
    if host:
        info["host"] = host
    return info


async def take_fleet_lock(conn: Any, schema: str) -> dict[str, Any] | None:
    """A fleet member's share of the fleet lock, on ``conn``; None when taken, else who holds
    it exclusively (a daemon outside the fleet: pid, role, host)."""
    key = fleet_lock(schema)
    if await conn.fetchval("SELECT pg_try_advisory_lock_shared($1, $2)", *key):
        return None
    holders = await _lock_holders(conn, key)
    return _said(*holders[0]) if holders else {}


# While our previous session's end is on its way through the server: how often to look.
_PREVIOUS_POLL_S = 0.05


async def _take_locks(
    conn: Any, keys: Sequence[tuple[int, int]], previous: tuple[int, Any] | None
) -> tuple[int, int] | None:
    """Try every lock on ``conn`` in order; None when all are ours, else the first refused.
    One held by ``previous`` (our own earlier session, which a cut left at the server) is
    ours to free: that session is ended, and the lock taken once the server released it
    (the caller's deadline bounds the wait)."""
    ended = False
    for key in keys:
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", *key):
            if previous is None or not await _held_by(conn, key, previous):
                return key
            if not ended:
                await conn.fetchval("SELECT pg_terminate_backend($1)", previous[0])
                ended = True
            await asyncio.sleep(_PREVIOUS_POLL_S)
    return None


async def _held_by(conn: Any, key: tuple[int, int], session: tuple[int, Any]) -> bool:
    """Whether ``session`` (backend pid and start: a pid alone may be another's by now)
    holds the lock ``key``."""
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::oid "
            "AND l.objid = $2::oid AND l.objsubid = 2 AND l.pid = $3 AND a.backend_start = $4",
            *key,
            *session,
        )
    )


def no_answer(target: Target, schema: str, doing: str, timeout_s: float) -> StoreError:
    """A server that accepted the connection and then went silent (a lock, a frozen host)."""
    return StoreError(
        f"state store PostgreSQL {target.where} (schema {schema}): {doing}: no answer within "
        f"{timeout_s:g} s ([state] timeout_s): retry later",
        retriable=True,
    )


async def close_bounded(conn: Any, timeout_s: float) -> None:
    """Close within ``timeout_s``; a server that does not answer the goodbye is cut off."""
    try:
        await conn.close(timeout=timeout_s)
    except DRIVER_ERRORS:
        conn.terminate()


class PostgresLease:
    """One daemon per schema, whatever host it runs on: a session advisory lock, held by a
    connection of its own for as long as the daemon runs. The server drops it when that
    connection ends (the process died, the host went away), so a stale lease clears itself
    once TCP notices. The connection's ``application_name`` says who holds it (pid, role);
    ``pg_stat_activity`` adds the host. A fleet's members take per-stream leases instead
    (:mod:`consumer.state.fleet`).

    The server drops it too when the session ends under a live daemon (a server restart, the
    backend terminated, a cut connection the server gave up on): :meth:`check` finds that out,
    and :meth:`retake` takes the locks again on a new connection, or says who took them.

    Every call ends within ``[state] timeout_s`` (the connect and its statements together),
    plus as long again to say goodbye: a server that accepted the connection and then went
    silent must not hold an operator's command for ever."""

    def __init__(
        self,
        target: Target,
        schema: str,
        timeout_s: float,
        name: str,
        keys: tuple[tuple[int, int], ...],
    ) -> None:
        self._conn: Any = None
        self._target = target
        self._schema = schema
        self._timeout = timeout_s
        self._name = name  # application_name
        self._keys = keys  # the lease's lock, then (outside a fleet) the fleet lock
        # Our holding session as the server knows it (backend pid, backend_start): after a
        # cut, the server may still have it, holding the locks, until it notices.
        self._session: tuple[int, Any] | None = None

    @classmethod
    async def acquire(
        cls,
        settings: StateSettings,
        streams: Iterable[str],
        *,
        role: str = "daemon",
        purpose: str = "",
        outside_fleet: bool = False,
    ) -> PostgresLease:
        """``outside_fleet``: a daemon not in a fleet, which holds the fleet lock (exclusive)
        too, on the same connection: refused while a fleet member holds it."""
        assert settings.dsn is not None, "checked by StateSettings"
        target, schema = Target(settings.dsn.get_secret_value()), settings.schema_
        keys = [(_LEASE_CLASS, _lease_key(schema, purpose))]
        if outside_fleet:
            keys.append(fleet_lock(schema))
        name = f"opera-consumer lease pid={os.getpid()} role={role}"[:63]
        self = cls(target, schema, settings.timeout_s, name, tuple(keys))
        await self._take()
        return self

    async def check(self) -> bool:
        """Whether our connection still holds every lock, asked within ``[state] timeout_s``.
        False when it does not or cannot say (the session ended, no answer): :meth:`retake`."""
        conn = self._conn
        if conn is None or conn.is_closed():
            return False
        try:
            async with asyncio.timeout(self._timeout):
                held = await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND pid = pg_backend_pid() AND classid = $1::oid "
                    "AND objid = ANY($2::oid[]) AND objsubid = 2",
                    _LEASE_CLASS,
                    [key for _, key in self._keys],
                )
        except (*DRIVER_ERRORS, ValueError):
            return False
        return bool(held == len(self._keys))

    async def confirm(self) -> None:
        """:meth:`check`, and :meth:`retake` when the locks are not held (see
        :meth:`consumer.state.lease.Held.confirm`)."""
        if not await self.check():
            await self.retake()

    async def retake(self) -> None:
        """The locks again, on a new connection (the old one is dropped without a goodbye: it
        no longer holds them, or does not answer). Our old session, should the server still
        have it holding them, is ended first. :class:`LeaseHeld` when another process took
        one meanwhile; :class:`StoreError` when the server cannot say now (retry later)."""
        old, self._conn = self._conn, None
        if old is not None:
            old.terminate()
        await self._take()

    async def _take(self) -> None:
        target, schema, timeout_s = self._target, self._schema, self._timeout
        conn: Any = None
        refused: tuple[int, int] | None = None
        holders: list[tuple[str, str | None]] = []
        try:
            async with asyncio.timeout(timeout_s):
                conn = await asyncpg.connect(
                    target.dsn(),
                    ssl=target.tls(),
                    timeout=timeout_s,
                    command_timeout=timeout_s,
                    server_settings={"application_name": self._name},
                )
                refused = await _take_locks(conn, self._keys, self._session)
                if refused is not None:
                    holders = await _lock_holders(conn, refused)
                row = await conn.fetchrow(
                    "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
                )
        except BaseException as exc:
            if conn is not None:
                await close_bounded(conn, timeout_s)
            if isinstance(exc, TimeoutError):
                raise no_answer(target, schema, "taking the lease", timeout_s) from None
            if isinstance(exc, (*DRIVER_ERRORS, ValueError)):
                raise store_error(target, schema, exc, "taking the lease") from None
            raise
        if refused is not None:
            await close_bounded(conn, timeout_s)
            where = f"schema {schema} at {target.where}"
            if refused == self._keys[0]:
                raise LeaseHeld(where, _said(*holders[0]) if holders else None)
            members = [
                app.removeprefix(FLEET_MEMBER_APP)
                for app, _ in holders
                if app.startswith(FLEET_MEMBER_APP)
            ]
            where += " (fleet members; set [fleet] enabled)"
            raise LeaseHeld(where, {"member": ", ".join(members)} if members else None)
        self._conn = conn
        self._session = None if row is None else (row["pid"], row["backend_start"])

    async def release(self) -> None:
        """Idempotent: closing the connection drops the lock."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await close_bounded(conn, self._timeout)

    @staticmethod
    async def holder(settings: StateSettings, purpose: str = "") -> dict[str, Any] | None:
        """Who holds the schema's lease (pid and role as it said, its host), or None."""
        assert settings.dsn is not None, "checked by StateSettings"
        target, schema = Target(settings.dsn.get_secret_value()), settings.schema_
        timeout_s = settings.timeout_s
        doing = "asking who holds the lease"
        conn: Any = None
        try:
            async with asyncio.timeout(timeout_s):
                conn = await asyncpg.connect(
                    target.dsn(), ssl=target.tls(), timeout=timeout_s, command_timeout=timeout_s
                )
                holders = await _lock_holders(conn, (_LEASE_CLASS, _lease_key(schema, purpose)))
        except TimeoutError:
            raise no_answer(target, schema, doing, timeout_s) from None
        except (*DRIVER_ERRORS, ValueError) as exc:
            raise store_error(target, schema, exc, doing) from None
        finally:
            if conn is not None:
                await close_bounded(conn, timeout_s)
        return _said(*holders[0]) if holders else None
