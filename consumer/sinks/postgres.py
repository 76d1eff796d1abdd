"""PostgreSQL sink: one row per event (see :mod:`.rows`), upserted by ``uniqueEventId``.

Two modes, chosen when the daemon is assembled (:func:`consumer.runtime.assembly.build_sink`):

* **In the state transaction** (``[state] backend = "postgres"`` and the sink's ``dsn`` the very
  same string as ``[state] dsn``): the rows commit in the state store's own transaction, with
  the checkpoint and the processed ids, as the SQLite sink does in the SQLite state store.
  ``open`` creates and checks the table through a pool of one connection (closed before it
  returns); ``write`` only buffers rows (no I/O, no await) after checking that PostgreSQL can
  store them, and :meth:`PostgresSink.staged` hands them to the committer, whose
  ``PostgresStore.commit`` runs their upsert in its transaction (one statement of one JSON
  document, as the other mode's). No crash can separate a
  row from its checkpoint, and a failed commit leaves neither. A database whose encoding cannot
  hold every character (any but UTF8: SQL_ASCII's jsonb refuses a ``\\u`` escape past ASCII)
  falls back to the other mode: a row the server refused would otherwise fail every commit. So
  does a table with constraints, generated columns or row-level security of its own, or a
  trigger that may RAISE (:data:`_GUARDS`; an audit trigger that cannot refuse a row keeps the
  rows in the state transaction): one event's row they refuse is then dead-lettered alone,
  naming the constraint, column, policy or function. What open cannot read (a cast of the
  row's data in a trigger, a function it calls) and the state transaction refuses anyway:
  the committer writes that commit's rows through :attr:`Staged.aside` (``_write_aside``),
  which opens the own pool and moves the sink to it for good.
* **On its own pool** (any other configuration): exactly-once in effect without being part of
  the checkpoint. Each ``write`` is one statement, so one transaction, and it returns only once
  PostgreSQL has committed it. The daemon commits its checkpoint after the sink write returns,
  so a crash between the two replays those events after the restart; ``unique_event_id`` is the
  primary key, and a batch whose plain ``INSERT`` meets a row already there is written again
  as an upsert (``INSERT … ON CONFLICT (unique_event_id) DO UPDATE``), so the replay rewrites
  the same rows instead of adding new ones. Readers never see
  an event twice; ``written_at`` tells the latest write. A batch is sent as one ``INSERT …
  SELECT FROM jsonb_array_elements($1)`` of one JSON document (:func:`insert_sql`): one round
  trip whatever the batch size (two for a replayed one).

Errors (own pool): a broken connection, a timeout, a server that is starting, stopping, out of
resources or of connections, a serialization failure or a deadlock are
:class:`TransientSinkError` (the batch is retried with backoff). Data the server rejects (a
``\\u0000`` in JSON text, invalid text) is :class:`PermanentSinkError`, naming the event when the
batch holds one: the pipeline then writes the batch's events one at a time to find the culprit.
Other server errors (a table altered or dropped under us, a missing privilege) concern every
event, not one: they are transient too, so nothing is dead-lettered while an operator fixes the
database; so is a NOT NULL violation (class 23) in a column the sink leaves empty (one not
ours, or one of ours an event may lack), which no event's data causes; but one in a generated
column is that event's (its value is computed from the row): dead-lettered, naming the column.
So is a row a row-level security policy's WITH CHECK refuses (42501 while the user keeps its
privileges on the table and some policy admits rows: :data:`_ROW_SECURITY`, read after the
error; a privilege revoked, or policies admitting no row at all, concern every event:
retried), and a row the operator's own code refuses: a trigger's, or a function's a generated
column or CHECK calls, RAISE or ASSERT (class P0 or any SQLSTATE a RAISE chose but a retried
one), taken at its word as a constraint's refusal is, even if it refuses every event: each is
dead-lettered, for ``dlq replay`` once fixed. The message of a violation, a policy's refusal
or a RAISE is the server's alone, never its DETAIL (``Failing row contains (…)`` repeats the
row: event data).

``open`` refuses (:class:`ConfigError` naming ``sink.table``, exit 78 before consuming) an
existing table every write would fail on: our columns missing or of another type than the sink
writes (``format_type``), one of our nullable columns NOT NULL, another column NOT NULL without
a default, or no valid, immediate (not DEFERRABLE) unique index on ``unique_event_id`` alone for
``ON CONFLICT``. TLS: see :mod:`consumer.pg_target` (verified by default off this machine).

In the state transaction the same data checks run in ``write`` (a NUL character, a
``\\u0000`` in JSON, text that is not Unicode): :class:`PermanentSinkError` naming the event.

The DSN is a secret (it may hold a password): messages name the host, port and database only.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson
import structlog

from ..config import PostgresSinkSettings
from ..core.events import Event
from ..core.evidence import prefix
from ..core.records import Staged
from ..errors import ConfigError, PermanentSinkError, TransientSinkError
from ..pg_target import DURABLE_COMMITS, Target
from ..pg_text import unstorable_char
from ..state.postgres import no_row_fault, raised_in
from .base import PlainSink
from .rows import COLUMNS, json_row, row

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
# Each column's type as format_type() spells it: what the upsert's values are cast to. A
# column of another type (written_at timestamptz, offset bigint) fails every write (42804).
_FORMATS: dict[str, str] = {
    c: {"TEXT": "text", "JSONB": "jsonb", "DOUBLE": "double precision"}[t.split()[0]]
    for c, t in _TYPES.items()
}
# Columns the sink may write NULL into (an event without a hotelId...).
_NULLABLE = frozenset(c for c, t in _TYPES.items() if "NOT NULL" not in t and "PRIMARY" not in t)

# SQLSTATEs that concern one event's data: classes 22 data exception and 23 integrity
# violation, and 0A000 (feature not supported: SQL_ASCII's jsonb given a \u escape past ASCII;
# the statement is fixed, so only its data can be at fault).
_PERMANENT_CLASSES = ("22", "23", "0A000")
# Classes that mean the server cannot accept our credentials or database.
_CONFIG_STATES = ("28", "3D")
# Database encodings that store any text without a NUL (asyncpg always sends UTF-8): the
# condition for staging rows into the state transaction, where no row may fail on the server.
# Not SQL_ASCII: its text takes any byte, but its jsonb refuses "\u00eb" (0A000).
_ANY_TEXT_ENCODINGS = frozenset({"UTF8"})
# A ``\u0000`` escape in JSON text (not an escaped backslash, then "u0000"): jsonb refuses it.
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# The table's generated columns (computed from the row): what follows a SELECT of attname.
_GENERATED_COLUMNS = (
    "FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped "
    "AND attgenerated <> ''"
)
# What of the table's own may refuse one event's row: a CHECK, FOREIGN KEY or EXCLUDE
# constraint, a unique index but the upsert's, a generated column (computed from the row: its
# expression may fail on one event's data, 22xxx, or yield NULL where it is NOT NULL, 23502), a
# partitioned table (a row may fit no partition; its partitions may have constraints of their
# own), row-level security that applies to the sink's user (a policy's WITH CHECK), a trigger
# that may refuse a row (:data:`_TRIGGERS`, :func:`trigger_may_refuse`). Not another column:
# its default cannot read the row, so it is the same for every event (and one NOT NULL without
# a default is refused at open). In the state transaction such a refusal would fail the whole
# commit (every stream's checkpoint; the daemon stopping at each start on the same event); on
# the own pool it dead-letters that event alone.
_GUARDS = (
    "SELECT format('%s constraint %I', CASE contype WHEN 'c' THEN 'CHECK' "
    "WHEN 'f' THEN 'FOREIGN KEY' ELSE 'EXCLUDE' END, conname) FROM pg_constraint "
    "WHERE conrelid = to_regclass($1) AND contype IN ('c', 'f', 'x') "
    "UNION ALL SELECT format('unique index %I', c.relname) FROM pg_index i "
    "JOIN pg_class c ON c.oid = i.indexrelid "
    "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
    "WHERE i.indrelid = to_regclass($1) AND i.indisunique "
    "AND NOT (i.indnkeyatts = 1 AND a.attname = 'unique_event_id') "
    f"UNION ALL SELECT format('generated column %I', attname) {_GENERATED_COLUMNS} "
    "UNION ALL SELECT 'partitioning' FROM pg_class WHERE oid = to_regclass($1) AND relkind = 'p' "
    "UNION ALL SELECT 'row-level security' WHERE row_security_active(to_regclass($1))"
)
# The table's enabled triggers that fire on INSERT or UPDATE (tgtype bits 4 and 16; before or
# after, row or statement; not the server's own, such as a foreign key's): name, function,
# language, source. Which may refuse a row is :func:`trigger_may_refuse`'s to say.
_TRIGGERS = (
    "SELECT t.tgname::text, t.tgfoid::regprocedure::text, l.lanname::text, p.prosrc "
    "FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_language l ON l.oid = p.prolang "
    "WHERE t.tgrelid = to_regclass($1) AND NOT t.tgisinternal AND t.tgenabled <> 'D' "
    "AND t.tgtype & 20 <> 0 ORDER BY t.tgname"
)
# A PL/pgSQL statement that raises an error: RAISE but at a level that only reports (RAISE
# alone re-raises; RAISE 'text', RAISE SQLSTATE '…', RAISE a_condition, RAISE USING … are
# EXCEPTION), and ASSERT. Read in the raw source: a comment or a string that says "raise"
# counts too (as does a comment between RAISE and its level), erring towards a guard.
_RAISES = re.compile(
    r"\b(?:raise\b(?!\s+(?:debug|log|info|notice|warning)\b)|assert\b)", re.IGNORECASE
)


def trigger_may_refuse(language: str, source: str) -> bool:
    """Whether a trigger function in ``language`` with this ``source`` may refuse a row by
    raising: a PL/pgSQL one with a RAISE at EXCEPTION level or an ASSERT (one that only
    RAISEs NOTICE or the like, an audit's, does not); an SQL one cannot RAISE; one in any
    other language (C, internal, PL/Python…) cannot be read, so it may. (A function the
    trigger calls, or a cast of the row's data, may fail too: not read.)"""
    if language == "sql":
        return False
    if language != "plpgsql":
        return True
    return _RAISES.search(source) is not None


# The table's generated columns now (one may have been added since open): a NOT NULL
# violation in one is the event's, not the table's.
_GENERATED = f"SELECT attname {_GENERATED_COLUMNS} ORDER BY attnum LIMIT 20"
# Read after a 42501 (insufficient privilege: a privilege revoked, or a row-level security
# policy refusing the new row): whether it can be one row's, and the policies that may have
# refused it. Only when the user still has INSERT and UPDATE on the table, row security
# applies to it (not its owner without FORCE, nor a superuser or BYPASSRLS role; not with
# row_security off, which refuses every statement), and a permissive policy admits some row
# for each command every upsert needs: INSERT, and SELECT (ON CONFLICT reads the new row).
# With none, the policies refuse every row: the table's, retried. (UPDATE's policies are met
# only by a row written again: a replay's.)
_POLICY_APPLIES = (
    "(0::oid = ANY (polroles) OR EXISTS (SELECT FROM unnest(polroles) AS r "
    "WHERE r <> 0 AND pg_has_role(r, 'MEMBER')))"
)
_ROW_SECURITY = (
    "WITH p AS (SELECT polname, polcmd, polpermissive FROM pg_policy "
    f"WHERE polrelid = to_regclass($1) AND {_POLICY_APPLIES}) "
    "SELECT coalesce(has_table_privilege(to_regclass($1), 'INSERT') "
    "AND has_table_privilege(to_regclass($1), 'UPDATE') "
    "AND row_security_active(to_regclass($1)) AND current_setting('row_security')::bool "
    "AND EXISTS (SELECT FROM p WHERE polpermissive AND polcmd IN ('a', '*')) "
    "AND EXISTS (SELECT FROM p WHERE polpermissive AND polcmd IN ('r', '*')), false), "
    "ARRAY(SELECT polname::text FROM p WHERE polcmd IN ('a', 'w', '*') ORDER BY polname LIMIT 6)"
)
# Where PostgreSQL raises a row-level security policy's refusal of a new row (execMain.c); a
# privilege's is aclcheck_error. When the server names it (not localized), it must be this.
_POLICY_CHECK = "ExecWithCheckOptions"
# Where PL/pgSQL raises RAISE EXCEPTION and ASSERT (pl_exec.c): the operator's code, a trigger's
# or a function's a generated column or CHECK calls, refusing the row, whatever its SQLSTATE.
_RAISED_BY = frozenset({"exec_stmt_raise", "exec_stmt_assert"})
# RAISE's and ASSERT's own SQLSTATEs (raise_exception, assert_failure), when the server does not
# say where it raised. Not the rest of class P0: PL/pgSQL raises P0002 (no_data_found) and P0003
# (too_many_rows) itself, for a SELECT INTO STRICT that reads the operator's tables: their state
# for every event, not one row's (retried, as a table the trigger writes to being gone is).
_RAISE_STATES = frozenset({"P0001", "P0004"})
# What a server error may be that clears by itself (retried without an error log; also when an
# operator's RAISE chose such a SQLSTATE: taken at its word).
_RETRIED = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.TransactionRollbackError,  # serialization, deadlock
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, cannot connect now
)
# Integrity violations a table's own constraint raises: named, with the fix, in the dead letter.
_VIOLATIONS = {
    "23514": "CHECK",
    "23503": "FOREIGN KEY",
    "23505": "unique",
    "23P01": "EXCLUDE",
}
STATE_TRANSACTION = "state-transaction"
OWN_POOL = "own-pool"


async def _keep_session(conn: Any) -> None:
    """The pool's reset on release (after asyncpg's own: an open transaction rolled back,
    listeners dropped): nothing. The sink sets no session state (no SET, LISTEN, cursor or
    session advisory lock), and the default ``RESET ALL; UNLISTEN *; …`` was a round trip
    after every batch."""


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


def shape_problems(columns: Sequence[tuple[str, str, bool, bool]]) -> list[str]:
    """Why rows cannot be upserted into a table of these columns (name, format_type, NOT NULL,
    filled: a default, identity or generated value), or nothing. Each problem concerns every
    event, not one: a write would fail for ever (a type) or dead-letter every event (a NOT NULL
    column the sink leaves empty), so the table is refused at open."""
    found = {name: (kind, not_null, filled) for name, kind, not_null, filled in columns}
    problems = [f"no column {c}" for c in COLUMNS if c not in found]
    for name, (kind, not_null, filled) in found.items():
        if name not in _FORMATS:
            if not_null and not filled:
                problems.append(
                    f"column {name} is NOT NULL without a default (the sink never sets it)"
                )
        elif kind != _FORMATS[name]:
            problems.append(f"column {name} is {kind}, not {_FORMATS[name]}")
        elif not_null and name in _NULLABLE:
            problems.append(f"column {name} is NOT NULL (an event may have none)")
    return problems


def insert_sql(table: str, schema: str | None = None) -> str:
    """One statement for a whole batch: ``$1`` is a JSON array of rows, each the array of
    :func:`.rows.row`'s columns with ``detail`` and ``resource`` as JSON values. PostgreSQL
    parses it in its own process: measured, that costs this process's event loop a third of
    encoding one array parameter per column (asyncpg checks every element's type). A plain
    insert: what the sink sends first (see :func:`upsert_sql`). With ``schema``, the table is
    named in it (the state transaction's statement must not depend on its connections'
    ``search_path``)."""
    cols = ", ".join(_q(c) for c in COLUMNS)
    name = _q(table) if schema is None else f"{_q(schema)}.{_q(table)}"

    def value(i: int, column: str) -> str:
        if column == "resource":  # None is SQL NULL, not the JSON null
            return f"NULLIF(r->{i}, 'null'::jsonb)"
        if column in _JSON:
            return f"r->{i}"
        if column == "written_at":
            return f"(r->>{i})::float8"
        return f"r->>{i}"

    values = ", ".join(value(i, c) for i, c in enumerate(COLUMNS))
    return f"INSERT INTO {name} ({cols}) SELECT {values} FROM jsonb_array_elements($1::jsonb) AS r"


def upsert_sql(table: str, schema: str | None = None) -> str:
    """:func:`insert_sql` rewriting the rows already there: what a batch is written with once
    its plain insert met one (a replay after a crash, ``dlq replay``). Not the first try: the
    speculative insertion ``ON CONFLICT`` needs cost the server about 12% more CPU a row
    (measured, 100,000 rows in batches of 200 and of 1,000), and a fresh catch-up conflicts
    with nothing. In the state transaction every commit's rows go this way (a failed insert
    there would fail the transaction)."""
    updates = ", ".join(f"{_q(c)} = EXCLUDED.{_q(c)}" for c in COLUMNS[1:])
    return f"{insert_sql(table, schema)} ON CONFLICT (unique_event_id) DO UPDATE SET {updates}"


def unstorable(values: tuple[Any, ...]) -> str | None:
    """Why PostgreSQL (a UTF8 database) would refuse this row, or None. A row
    staged into the state transaction must not fail there: it would fail the checkpoint too."""
    for column, value in zip(COLUMNS, values, strict=True):
        if value is None or isinstance(value, float):
            continue
        if not isinstance(value, str):
            return f"{column}: a {type(value).__name__}, not text"
        problem = unstorable_char(value)
        if problem is not None:
            return f"{column}: {problem}"
        # The substring first: the pattern, a lookbehind at every position, cost 24 µs on a
        # 400-character detail (a third of a staged write's CPU); this 0.2.
        if column in _JSON and "\\u0000" in value and _JSON_NUL.search(value):
            return f"{column}: \\u0000 in JSON (PostgreSQL jsonb cannot hold it)"
    return None


class PostgresSink(PlainSink):
    """``in_state_transaction``: the state store is PostgreSQL on this very DSN, so the rows go
    into its commit (see the module doc); the assembly decides."""

    name = "postgres"

    def __init__(
        self, settings: PostgresSinkSettings, *, in_state_transaction: bool = False
    ) -> None:
        self.settings = settings
        self.table = settings.table
        self._target = Target(settings.dsn.get_secret_value())
        self._pool: Any = None  # asyncpg.Pool (untyped)
        self._insert = insert_sql(self.table)
        self._upsert = upsert_sql(self.table)
        # The mode: may fall back to the own pool at open (a database encoding, see there).
        self.in_state_transaction = in_state_transaction
        self._staged_upsert: str | None = None  # set by open, in the state transaction
        self._rows: list[tuple[Any, ...]] = []  # written, not yet taken by staged()
        self._events: list[Event] = []  # the events of _rows (for Staged.aside)
        self._opened = False  # in the state transaction (the own pool has _pool)

    @property
    def waits(self) -> bool:
        return not self.in_state_transaction  # staged rows: write only appends to a list

    @property
    def mode(self) -> str:
        return STATE_TRANSACTION if self.in_state_transaction else OWN_POOL

    def __repr__(self) -> str:
        return f"PostgresSink(table={self.table!r}, server={self._target.where!r})"

    def _describe(self, exc: BaseException) -> str:
        # The server's message alone for a violation, a privilege's or policy's refusal and an
        # operator's RAISE: a violation's DETAIL repeats the row or its key ("Failing row
        # contains (…)": an event's data), a RAISE's may. A data exception's DETAIL says what
        # is wrong ("\u0000 cannot be converted to text."): kept.
        whole = not isinstance(
            exc,
            asyncpg.exceptions.IntegrityConstraintViolationError
            | asyncpg.exceptions.InsufficientPrivilegeError,
        ) and (getattr(exc, "server_source_function", None) not in _RAISED_BY)
        return self._target.describe(exc, detail=whole)

    async def open(self, committed: str | None) -> None:
        s = self.settings
        where = self._target.where
        if self.in_state_transaction:
            # The table is ours to create and check; the rows go through the store's pool.
            pool = await self._create_pool(1, 1)
            try:
                schema, encoding, guards = await self._prepare_table(pool, staging=True)
            except BaseException:
                pool.terminate()
                raise
            await self._close_pool(pool)
            if encoding in _ANY_TEXT_ENCODINGS and not guards:
                self._staged_upsert = upsert_sql(self.table, schema)
                self._opened = True
                log.info(
                    "postgres sink open",
                    server=where,
                    table=self.table,
                    mode=self.mode,
                    writes="rows commit in the state store's transaction, with the checkpoint",
                )
                return
            if guards:
                log.warning(
                    "postgres sink: the table has constraints or generated columns of its own, "
                    "row-level security or a trigger that may raise, which may refuse one "
                    "event's row; writing through "
                    "the sink's own pool (upsert), not in the state transaction, so such an "
                    "event is dead-lettered alone",
                    server=where,
                    table=self.table,
                    found=", ".join(guards)[:500],
                )
            else:
                log.warning(
                    "postgres sink: the database encoding cannot hold every character; "
                    "writing through the sink's own pool (upsert), not in the state transaction",
                    server=where,
                    encoding=encoding,
                )
            self.in_state_transaction = False
        pool = await self._create_pool(s.pool_min, s.pool_max)
        try:
            await self._prepare_table(pool)
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool
        log.info(
            "postgres sink open",
            server=where,
            table=self.table,
            mode=self.mode,
            writes="each batch is its own transaction (insert; a replayed batch is upserted)",
        )

    async def _create_pool(self, min_size: int, max_size: int) -> Any:
        s = self.settings
        try:
            return await asyncpg.create_pool(
                self._target.dsn(),
                min_size=min_size,
                max_size=max_size,
                command_timeout=s.timeout_s,
                timeout=s.timeout_s,  # connect
                reset=_keep_session,
                server_settings=DURABLE_COMMITS,
                ssl=self._target.tls(),  # verified by default off this machine (pg_target)
            )
        except (
            asyncpg.exceptions.PostgresError,
            asyncpg.exceptions.InterfaceError,  # ClientConfigurationError too
            OSError,
            TimeoutError,
            ValueError,
        ) as exc:
            raise self._connect_error(exc) from None

    def _connect_error(self, exc: BaseException) -> Exception:
        where = self._target.where
        # First: a certificate that does not verify is a ValueError too, not a parse error.
        if (refusal := self._target.tls_refusal(exc, "sink.dsn")) is not None:
            return ConfigError(refusal)
        if isinstance(exc, asyncpg.exceptions.ClientConfigurationError | ValueError):
            # The driver's parse errors quote the DSN's pieces (a password's too): never shown.
            return ConfigError(f"postgres sink at {where}: {Target.unparsable('sink.dsn')}")
        if isinstance(exc, asyncpg.exceptions.PostgresError) and (exc.sqlstate or "").startswith(
            _CONFIG_STATES
        ):
            return ConfigError(f"sink.dsn: PostgreSQL at {where} refused us: {self._describe(exc)}")
        return TransientSinkError(
            f"sink.dsn: cannot connect to PostgreSQL at {where}: {self._describe(exc)}"
        )

    async def _prepare_table(
        self, pool: Any, *, staging: bool = False
    ) -> tuple[str, str, list[str]]:
        """Create or check the table; with ``staging``: (its schema, the database encoding,
        the table's own constraints that may refuse a row: :data:`_GUARDS`)."""
        where, table = self._target.where, self.table
        try:
            async with pool.acquire(timeout=self.settings.timeout_s) as conn, conn.transaction():
                # Two daemons starting at once: CREATE … IF NOT EXISTS is not race-free.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext($1))", f"opera-consumer:{table}"
                )
                await conn.execute(create_table_sql(table))
                # The table may have been there already: is it one of ours?
                columns = await conn.fetch(
                    "SELECT attname, format_type(atttypid, atttypmod), attnotnull, "
                    "atthasdef OR attidentity <> '' FROM pg_attribute "
                    "WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
                    _q(table),
                )
                missing = [c for c in COLUMNS if c not in {r[0] for r in columns}]
                if missing:
                    raise ConfigError(
                        f"sink.table: table {table!r} in {where} exists without the columns "
                        f"{', '.join(missing)}; use another table name"
                    )
                problems = shape_problems([(r[0], r[1], r[2], r[3]) for r in columns])
                if problems:
                    raise ConfigError(
                        f"sink.table: table {table!r} in {where} is not one the sink can write "
                        f"to: {'; '.join(problems)}; use another table name (the sink creates "
                        "it) or alter the table"
                    )
                # ON CONFLICT takes only a valid, immediate (not DEFERRABLE) unique index.
                unique = await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a "
                    "ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
                    "WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indnkeyatts = 1 "
                    "AND i.indimmediate AND i.indisvalid AND i.indpred IS NULL "
                    "AND a.attname = 'unique_event_id')",
                    _q(table),
                )
                if not unique:
                    raise ConfigError(
                        f"sink.table: table {table!r} in {where} has no unique index on "
                        "unique_event_id alone that is valid and not DEFERRABLE (the upsert "
                        "needs one); use another table name"
                    )
                await conn.execute(create_index_sql(table))
                if not staging:
                    return "", "", []
                found = await conn.fetchrow(
                    "SELECT n.nspname, current_setting('server_encoding') FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
                    _q(table),
                )
                if found is None:  # cannot be: the table was just created or found
                    raise TransientSinkError(f"postgres sink at {where}: table {table!r} vanished")
                guards = [str(r[0]) for r in await conn.fetch(_GUARDS, _q(table))]
                guards += [
                    f"trigger {prefix(str(name), 100)} (function {prefix(str(function), 200)})"
                    for name, function, language, source in await conn.fetch(_TRIGGERS, _q(table))
                    if trigger_may_refuse(str(language), str(source or ""))
                ]
                return str(found[0]), str(found[1]), guards
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
        if self.in_state_transaction:
            # No await: what the committer takes is exactly the writes that returned (the
            # pipeline marks them processed before it next suspends).
            self._stage(stream, events)
            return
        await self._write_pool(stream, events)

    async def _write_pool(self, stream: str, events: Sequence[Event]) -> None:
        """The upsert of ``events`` through the sink's own pool."""
        pool = self._pool
        if pool is None:
            raise TransientSinkError("postgres sink is not open")
        if not events:
            return
        now = time.time()
        # One row per id (the last wins): an upsert may not touch a row twice in a statement.
        rows = {ev.unique_event_id: json_row(stream, ev, now) for ev in events}
        try:
            doc = orjson.dumps(list(rows.values())).decode()
        except TypeError as batch_error:  # not JSON-serializable (orjson): name the event
            for uid, r in rows.items():
                try:
                    orjson.dumps([r])  # at its depth in the batch
                except TypeError as exc:
                    raise PermanentSinkError(
                        f"postgres sink: event {uid}: {self._describe(exc)}",
                        unique_event_id=uid,
                    ) from exc
            raise PermanentSinkError(  # not expected: then the pipeline finds it one by one
                f"postgres sink: batch cannot be written as JSON: {self._describe(batch_error)}"
            ) from batch_error
        try:
            async with pool.acquire(timeout=self.settings.timeout_s) as conn:
                try:
                    await conn.execute(self._insert, doc)
                except asyncpg.exceptions.UniqueViolationError:
                    # A row is there already (a replay), or another unique index of the
                    # table refuses one: the upsert rewrites the former; the latter fails it
                    # again, and is classified below as before.
                    await conn.execute(self._upsert, doc)
        except (
            asyncpg.exceptions.PostgresError,
            asyncpg.exceptions.InterfaceError,  # connection lost or closed, pool closing
            asyncpg.exceptions.InternalClientError,  # a cached statement gone stale
            OSError,
            TimeoutError,  # command_timeout, or no connection free in time
        ) as exc:
            if isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
                # Every pooled session may be on the read-only server (a demoted primary, a
                # session-level read-only setting): the retry connects anew.
                await pool.expire_connections()
            generated: list[str] = []
            policies: list[str] | None = None
            if isinstance(exc, asyncpg.exceptions.PostgresError) and (
                (exc.sqlstate or "").startswith("22")
                or (exc.sqlstate == "23502" and getattr(exc, "column_name", None) not in _TYPES)
            ):
                generated = await self._generated(pool)
            elif isinstance(exc, asyncpg.exceptions.InsufficientPrivilegeError) and getattr(
                exc, "server_source_function", None
            ) in (None, _POLICY_CHECK):
                policies = await self._policies(pool)
            raise self._classify(exc, events, generated, policies) from exc

    async def _generated(self, pool: Any) -> list[str]:
        """The table's generated columns (:data:`_GENERATED`); none if they cannot be read
        (a NOT NULL violation is then retried: the next try reads them again)."""
        try:
            async with pool.acquire(timeout=self.settings.timeout_s) as conn:
                return [str(r[0]) for r in await conn.fetch(_GENERATED, _q(self.table))]
        except (
            asyncpg.exceptions.PostgresError,
            asyncpg.exceptions.InterfaceError,
            OSError,
            TimeoutError,
        ):
            return []

    async def _policies(self, pool: Any) -> list[str] | None:
        """After a 42501: the names of the row-level security policies that may have refused
        one event's row (:data:`_ROW_SECURITY`), or None if it cannot be one row's (a privilege
        missing, no policy admitting any row) or that cannot be read (retried: the next try
        reads it again)."""
        try:
            async with pool.acquire(timeout=self.settings.timeout_s) as conn:
                found = await conn.fetchrow(_ROW_SECURITY, _q(self.table))
        except (
            asyncpg.exceptions.PostgresError,
            asyncpg.exceptions.InterfaceError,
            OSError,
            TimeoutError,
        ):
            return None
        if found is None or not found[0]:
            return None
        return [str(name) for name in found[1]]

    def _stage(self, stream: str, events: Sequence[Event]) -> None:
        if not self._opened:
            raise TransientSinkError("postgres sink is not open")
        now = time.time()
        rows: list[tuple[Any, ...]] = []  # all or none: a later event may be refused
        for ev in events:
            try:
                values = row(stream, ev, now)  # as text: what unstorable checks
            except (TypeError, ValueError) as exc:  # not JSON-serializable (orjson)
                raise PermanentSinkError(
                    f"postgres sink: event {ev.unique_event_id}: {self._describe(exc)}",
                    unique_event_id=ev.unique_event_id,
                ) from exc
            problem = unstorable(values)
            if problem is not None:
                raise PermanentSinkError(
                    f"postgres sink: event {ev.unique_event_id}: PostgreSQL cannot store {problem}",
                    unique_event_id=ev.unique_event_id,
                )
            # As the own pool's: JSON values, the commit's rows one document (column 1 is
            # the stream: the committer's filter).
            rows.append(tuple(json_row(stream, ev, now)))
        self._rows.extend(rows)
        self._events.extend(events)

    def staged(self) -> Staged | None:
        """In the state transaction: the rows written since the last call, for the
        committer's transaction (its ``PostgresStore.commit`` runs them)."""
        if not self._rows or self._staged_upsert is None:
            return None
        rows, self._rows = self._rows, []
        events, self._events = self._events, []
        return Staged(
            self._staged_upsert,
            rows,
            events=events,
            aside=self._write_aside,
            switch=self._own_pool,
            document=True,
        )

    async def _write_aside(self, stream: str, events: Sequence[Event]) -> None:
        """:attr:`Staged.aside`: the state transaction refused a staged row for its data (a
        trigger's cast or a function it calls failing on it: what open cannot read). The
        committer writes the rows through the sink's own pool, as when open finds a guard: a
        row the table refuses is then that event's dead letter, not every stream's commit.
        :meth:`write` keeps staging until the committer calls :meth:`_own_pool`."""
        if self._pool is None:
            if not self._opened:
                raise TransientSinkError("postgres sink is not open")
            pool = await self._create_pool(self.settings.pool_min, self.settings.pool_max)
            if self._pool is not None:  # cannot be: the committer's one call at a time
                await self._close_pool(pool)
            else:
                self._pool = pool
        await self._write_pool(stream, events)

    def _own_pool(self) -> None:
        """:attr:`Staged.switch`: every write through the own pool from now on."""
        if self.in_state_transaction and self._pool is not None:
            self.in_state_transaction = False
            log.warning(
                "postgres sink: the state transaction refused a row of the table; writing "
                "through the sink's own pool (upsert) from now on, so such an event is "
                "dead-lettered alone",
                server=self._target.where,
                table=self.table,
            )

    def _classify(
        self,
        exc: Exception,
        events: Sequence[Event],
        generated: Sequence[str] = (),
        policies: Sequence[str] | None = None,
    ) -> Exception:
        """What a failed write is; ``generated``: the table's generated columns, read after a
        data exception or a NOT NULL violation outside our columns; ``policies``: after a
        42501 that can be one row's (:meth:`_policies`), the policies that may have refused
        it."""
        where = self._target.where
        only = events[0].unique_event_id if len(events) == 1 else None
        if isinstance(exc, asyncpg.exceptions.PostgresError):
            state = exc.sqlstate or ""
            column = getattr(exc, "column_name", None)
            refused = f"postgres sink at {where}: table {self.table!r} refused the event's row"
            if policies is not None:
                # A row-level security policy's WITH CHECK refused this row (the user has its
                # privileges, and some policy admits rows): that event's, as a CHECK's refusal.
                names = ", ".join(repr(prefix(p, 63)) for p in policies[:5])
                more = ", …" if len(policies) > 5 else ""
                return PermanentSinkError(
                    f"{refused}: a row-level security policy does not admit it "
                    f"({self._describe(exc)}; its INSERT and UPDATE policies: {names}{more}); "
                    "fix the policy, then `opera-consumer dlq replay`",
                    unique_event_id=only,
                )
            if (
                state in _RAISE_STATES or getattr(exc, "server_source_function", None) in _RAISED_BY
            ) and not isinstance(exc, _RETRIED):
                # The operator's own code refused the row: a trigger's (or a function's that a
                # generated column or CHECK calls) RAISE or ASSERT. Taken at its word, as a
                # constraint's refusal is: that event's, even if it refuses every event (each
                # is dead-lettered, for `dlq replay` once it is fixed). Its last context line
                # names the function the table called.
                context = str(getattr(exc, "context", None) or "").strip().splitlines()
                origin = prefix(context[-1], 200) if context else "its trigger or function"
                return PermanentSinkError(
                    f"{refused}: {origin} raised {prefix(state, 5)}: {self._describe(exc)}; "
                    "fix the function or the trigger, then `opera-consumer dlq replay`",
                    unique_event_id=only,
                )
            function = raised_in(exc)
            if no_row_fault(state, getattr(exc, "server_source_function", None)):
                # No row's data causes it (a sequence a trigger draws from at its limit):
                # every event meets it, so retried (never each event dead-lettered), named.
                log.error(
                    "postgres sink: server error, retrying",
                    server=where,
                    table=self.table,
                    sqlstate=state,
                    function=function,
                    error=self._describe(exc),
                )
                return TransientSinkError(
                    f"postgres sink at {where}: table {self.table!r}: "
                    f"{function + ' failed' if function else 'failed'} ({state} "
                    f"{type(exc).__name__}), which no event's data causes: fix the database "
                    "(a sequence at its MAXVALUE: ALTER SEQUENCE … AS bigint MAXVALUE …); "
                    "retrying"
                )
            if state.startswith("22") and function is not None:
                # Raised in the operator's code (a trigger's function, or one that it or a
                # generated column calls: a cast of the row's data, a division by zero) on
                # this event's row. Named by the function the table called, not by the
                # server's message: a cast's quotes the value (event data).
                return PermanentSinkError(
                    f"{refused}: {function} failed on it ({prefix(state, 5)} "
                    f"{type(exc).__name__}); fix the function or the trigger, then "
                    "`opera-consumer dlq replay`",
                    unique_event_id=only,
                )
            if state == "23502" and column in generated:
                # Computed from this event's row: that event's, named by the column.
                return PermanentSinkError(
                    f"{refused}: generated column {prefix(str(column), 100)!r} is NOT NULL and "
                    "computes NULL from this event (23502); fix the column, then "
                    "`opera-consumer dlq replay`",
                    unique_event_id=only,
                )
            # NULL in a column the sink never fills (one added or altered after open): every
            # event would fail the same way, so it is retried, not dead-lettered.
            foreign = state == "23502" and (column not in _TYPES or column in _NULLABLE)
            if state in _VIOLATIONS:
                # The operator's table refused this row: its constraint, not the server's words
                # (their DETAIL repeats the row), and the way back.
                name = prefix(str(getattr(exc, "constraint_name", None) or "?"), 100)
                return PermanentSinkError(
                    f"{refused}: {_VIOLATIONS[state]} constraint {name!r} ({state}); fix the "
                    "table or the constraint, then `opera-consumer dlq replay`",
                    unique_event_id=only,
                )
            if state.startswith(_PERMANENT_CLASSES) and not foreign:
                suspects = ""
                if generated and state.startswith("22"):
                    # The server does not say which expression failed: name the candidates.
                    names = ", ".join(repr(prefix(c, 63)) for c in generated[:5])
                    more = ", …" if len(generated) > 5 else ""
                    suspects = (
                        f"; table {self.table!r} computes generated columns from the row "
                        f"({names}{more}): if one's expression failed on this event, fix it, "
                        "then `opera-consumer dlq replay`"
                    )
                return PermanentSinkError(
                    f"postgres sink at {where} rejected the data: {self._describe(exc)}{suspects}",
                    unique_event_id=only,
                )
            if not isinstance(exc, _RETRIED):
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
        # Rows still buffered stay for a last staged() (the daemon's final commit).
        self._opened = False
        pool, self._pool = self._pool, None
        if pool is not None:
            await self._close_pool(pool)

    async def _close_pool(self, pool: Any) -> None:
        try:
            await asyncio.wait_for(pool.close(), timeout=self.settings.timeout_s)
        except (TimeoutError, OSError, asyncpg.exceptions.InterfaceError):
            pool.terminate()
