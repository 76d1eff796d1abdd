"""A row the state store's transaction refuses for its data, where open could not see it coming:
a trigger with no RAISE of its own whose cast (PostgreSQL ``PERFORM NEW.primary_key::int``) or
expression (SQLite ``json_extract`` of text that is not JSON) fails on one hostile event's row.
The committer writes that commit's staged rows through the sink's own path (its pool, or a
connection of its own to the state file), where the refused event is dead-lettered alone,
naming the table or the trigger's function and never the row; every other event is written
once, the checkpoint passes them all, the stream goes on and the sink writes through its own
path from then on. Real PostgreSQL, real SQLite files, the sandbox gateway, the daemon
in-process.

Was: the staged row failed the whole commit (every stream's checkpoint, processed ids and dead
letters): the daemon exited 78, and again at each start on the same event.

And: a trigger whose cast fails for every event is the rows' data too, dead-lettered each, as
on the sink's own pool; a crash between the rows written aside and the commit of the rest
replays them once in effect; the own path failing for a while retries the commit, nothing
dead-lettered meanwhile. Those dead letters are the stream's as the pipeline's own are: in
``events_dead_lettered`` and, with park-key, their resource parked (its later events in that
commit and after it dead-lettered ``parked``, never written after it), also those the
pipeline wrote while that commit ran (the sink stages them until the pipeline was told).

What no row's data causes (an audit trigger's sequence at its limit, 2200H) is retried, in the
state transaction and on the own pool alike, nothing dead-lettered.

Fleet mode: a stream lost and taken again while the rows go aside commits nothing of the old
lease (the fence is the one the batch was sent under)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from operator_support import query
from pg import sql
from prometheus_client.parser import text_string_to_metric_families
from sink_tables import LITE, PG
from support import committed, make_settings, newest_offset, running, truth_ids, wait_until

from consumer.config import PostgresSinkSettings
from consumer.core.events import Event
from consumer.core.protocol import event_from_raw
from consumer.core.records import CommitBatch, DeadLetterRow, Fence, Staged
from consumer.errors import StagedRowRefused, StoreError, TransientSinkError
from consumer.runtime.committer import Committer
from consumer.runtime.pipeline import StreamPipeline
from consumer.sinks.postgres import OWN_POOL, STATE_TRANSACTION, PostgresSink
from consumer.sinks.sqlite import StoreTableSink
from consumer.state import PostgresStore, SqliteStore
from consumer.state.postgres import staged_row_fault as pg_row_fault
from consumer.state.sqlite import staged_row_fault as lite_row_fault

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")

EVENTS = 20
HOSTILE_KEY = "HOSTILE-KEY-7c1e"  # not a number, nor JSON: the trigger fails on its row


def hostile_event(offset: str, uid: str, name: str = "UPDATE_RESERVATION") -> str:
    return json.dumps(
        {
            "metadata": {"offset": offset, "uniqueEventId": uid},
            "moduleName": "Reservation",
            "eventName": name,
            "primaryKey": HOSTILE_KEY,
            "hotelId": "HOTEL1",
            "detail": [],
        }
    )


async def with_hostile_event(
    sandbox_factory: Any, name: str = "UPDATE_RESERVATION"
) -> tuple[Any, list[str], str]:
    """The gateway: a backlog, one hostile event (its primaryKey not a number; its eventName
    ``name``), more events; the valid ones' ids, and the hostile one's."""
    gw = await sandbox_factory(backlog=EVENTS)
    bad = f"hostile-{uuid.uuid4().hex[:8]}"
    offset = gw.events("DEMO")[-1]["metadata"]["offset"]
    gw.inject_event("DEMO", hostile_event(offset, bad, name))
    gw.append("DEMO", EVENTS)
    return gw, truth_ids(gw.events("DEMO")), bad


async def pg_letters(dsn: str, schema: str) -> list[DeadLetterRow]:
    store = await PostgresStore.open(dsn, schema=schema)
    try:
        return list(await store.dead_letters())
    finally:
        await store.close()


async def lite_letters(state: Path) -> list[DeadLetterRow]:
    store = await SqliteStore.open(state)
    try:
        return list(await store.dead_letters())
    finally:
        await store.close()


async def pg_checkpoint(daemon: Any, offset: str) -> None:
    async with asyncio.timeout(30):
        while (cp := await daemon.store.checkpoint("main")) is None or cp.offset != offset:
            await asyncio.sleep(0.02)


def dead_lettered_metric(daemon: Any, stream: str = "main") -> float:
    """``opera_consumer_events_dead_lettered_total`` of the stream, as /metrics says it."""
    assert daemon.metrics is not None
    for family in text_string_to_metric_families(daemon.metrics.scrape().decode()):
        for s in family.samples:
            if s.name == "opera_consumer_events_dead_lettered_total" and s.labels == {
                "stream": stream
            }:
                return float(s.value)
    raise AssertionError("no opera_consumer_events_dead_lettered_total for the stream")


def assert_named_without_data(letter: DeadLetterRow, *names: str) -> None:
    error = letter.error
    assert all(n in error for n in names), error
    assert HOSTILE_KEY not in error and "Failing row" not in error, error
    assert "dlq replay" in error and len(error) <= 1000, error


# --- the decisions (pure) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sqlstate", "raised_by", "row"),
    [
        ("22P02", "pg_strtoint32", True),  # a cast of the row's data in a trigger
        ("22012", "int4div", True),  # a function the trigger calls dividing by zero
        ("23514", None, True),  # a CHECK added after open
        ("23505", None, True),
        ("P0001", None, True),  # RAISE
        ("P0004", None, True),  # ASSERT
        ("XX999", "exec_stmt_raise", True),  # a RAISE of any SQLSTATE
        ("0A000", None, True),
        ("42501", None, False),  # a privilege revoked: every event's
        ("42P01", None, False),  # a table the trigger writes to, gone
        ("42883", None, False),  # a function it calls, gone
        ("P0002", None, False),  # SELECT INTO STRICT over the operator's tables
        ("40001", None, False),  # serialization failure (the caller's retried ones)
        ("2200H", "nextval_internal", False),  # a sequence at its limit: every row's
        ("2200H", "exec_stmt_raise", True),  # unless an operator's RAISE chose that SQLSTATE
    ],
)  # fmt: skip
def test_which_postgres_failures_of_a_staged_row_are_its_data(
    sqlstate: str, raised_by: str | None, row: bool
):
    assert pg_row_fault(sqlstate, raised_by) is row


@pytest.mark.parametrize(
    ("code", "compiles", "row"),
    [
        (sqlite3.SQLITE_CONSTRAINT, False, True),  # a constraint, a trigger's RAISE
        (sqlite3.SQLITE_ERROR, True, True),  # "malformed JSON": an expression on the row
        (sqlite3.SQLITE_ERROR, False, False),  # "no such table": the table dropped
        (sqlite3.SQLITE_TOOBIG, False, True),
        (sqlite3.SQLITE_MISMATCH, False, True),
        (sqlite3.SQLITE_BUSY, True, False),
        (sqlite3.SQLITE_FULL, True, False),
        (sqlite3.SQLITE_IOERR, True, False),
        (None, True, False),
    ],
)  # fmt: skip
def test_which_sqlite_failures_of_a_staged_row_are_its_data(
    code: int | None, compiles: bool, row: bool
):
    assert lite_row_fault(code, compiles) is row


# --- the stores: a distinct error, naming what refused, never the row ------------------------


async def test_the_postgres_store_says_a_staged_row_was_refused(postgres_dsn: str, schema: str):
    table = f"t_{uuid.uuid4().hex[:12]}"
    store = await PostgresStore.open(postgres_dsn, schema=schema)
    try:
        await sql(
            postgres_dsn,
            "execute",
            f'CREATE TABLE "{schema}".{table} (k TEXT PRIMARY KEY, stream TEXT); '
            f"CREATE FUNCTION {table}_f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"PERFORM NEW.k::int; RETURN NEW; END $$; "
            f'CREATE TRIGGER cast_key BEFORE INSERT ON "{schema}".{table} '
            f"FOR EACH ROW EXECUTE FUNCTION {table}_f()",
        )
        statement = f'INSERT INTO "{schema}".{table} VALUES ($1, $2)'
        batch = CommitBatch(
            processed={"main": ["a", "b"]},
            staged=[Staged(statement, [("1", "main"), (HOSTILE_KEY, "main")])],
        )
        with pytest.raises(StagedRowRefused) as info:
            await store.commit(batch)
        assert await store.seen("main", ["a", "b"]) == set()  # nothing committed
        missing = Staged(f'INSERT INTO "{schema}".gone VALUES ($1, $2)', [("1", "main")])
        with pytest.raises(StoreError) as other:  # every event's: not the row's
            await store.commit(CommitBatch(staged=[missing]))
    finally:
        await store.close()
    message = str(info.value)
    assert f"PL/pgSQL function {table}_f()" in message and "22P02" in message, message
    assert HOSTILE_KEY not in message, message
    assert not isinstance(other.value, StagedRowRefused)


async def test_the_sqlite_store_says_a_staged_row_was_refused(tmp_path: Path):
    state = tmp_path / "state.db"
    store = await SqliteStore.open(state)
    try:
        with contextlib.closing(sqlite3.connect(state)) as db:
            db.executescript(
                "CREATE TABLE rows (k TEXT PRIMARY KEY, stream TEXT); CREATE TRIGGER j BEFORE "
                "INSERT ON rows BEGIN SELECT json_extract(NEW.k, '$'); END"
            )
        batch = CommitBatch(
            processed={"main": ["a", "b"]},
            staged=[Staged("INSERT INTO rows VALUES (?, ?)", [("1", "main"), ("{x", "main")])],
        )
        with pytest.raises(StagedRowRefused, match="malformed JSON"):
            await store.commit(batch)
        assert await store.seen("main", ["a", "b"]) == set()
        with pytest.raises(StoreError, match="no such table") as other:
            await store.commit(CommitBatch(staged=[Staged("INSERT INTO gone VALUES (?)", [(1,)])]))
        assert not isinstance(other.value, StagedRowRefused)
    finally:
        await store.close()


# --- the daemon: that event dead-lettered, the rest written once, the stream on --------------


async def test_a_trigger_cast_failing_on_one_row_in_the_state_transaction_dead_letters_it(
    sandbox_factory, tmp_path: Path, postgres_dsn: str
):
    """The trigger has no RAISE (open keeps the rows in the state transaction): its cast of
    the hostile event's primaryKey fails there (22P02). That event is dead-lettered naming
    the table and the function, never the key; every other event is in the table, each
    written once (an audit trigger counts the writes that committed); the checkpoint reaches
    the last offset; the daemon keeps running and the sink writes through its own pool."""
    gw, ids, bad = await with_hostile_event(sandbox_factory)
    table = f"t_{uuid.uuid4().hex[:12]}"
    schema = f"s_{table}"
    function = f"{table}_cast"
    await sql(
        postgres_dsn,
        "execute",
        f'CREATE TABLE "{table}_audit" (uid TEXT NOT NULL); '
        f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM NEW.primary_key::int; RETURN NEW; END $$; "
        f"CREATE FUNCTION {table}_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f'INSERT INTO "{table}_audit" VALUES (NEW.unique_event_id); RETURN NULL; END $$; '
        f'CREATE TABLE "{table}" ({PG}); '
        f'CREATE TRIGGER cast_key BEFORE INSERT OR UPDATE ON "{table}" '
        f"FOR EACH ROW EXECUTE FUNCTION {function}(); "
        f'CREATE TRIGGER audit AFTER INSERT OR UPDATE ON "{table}" '
        f"FOR EACH ROW EXECUTE FUNCTION {table}_audit()",
    )
    state = {"backend": "postgres", "dsn": postgres_dsn, "schema": schema}
    sink = {"type": "postgres", "dsn": postgres_dsn, "table": table}
    settings = make_settings(tmp_path, gw.url, sink=sink, state=state)
    async with running(settings) as daemon:
        assert daemon.sink.mode == STATE_TRANSACTION  # type: ignore[attr-defined]
        await pg_checkpoint(daemon, newest_offset(gw))
        assert not daemon._stop.is_set()
        assert daemon.sink.mode == OWN_POOL  # type: ignore[attr-defined]
        assert daemon.committer.aside_dead_letters == 1
        # The stream's dead letter, as the pipeline's own (was: 0 in both).
        assert daemon.pipelines["main"].dead_lettered == 1
        assert dead_lettered_metric(daemon) == 1
    assert daemon.exit_code == 0
    written = [
        r[0] for r in await sql(postgres_dsn, "fetch", f'SELECT unique_event_id FROM "{table}"')
    ]
    assert sorted(written) == sorted(ids)
    audit = Counter(
        r[0] for r in await sql(postgres_dsn, "fetch", f'SELECT uid FROM "{table}_audit"')
    )
    assert audit == Counter(ids)  # each written once
    letters = await pg_letters(postgres_dsn, schema)
    assert [(d.unique_event_id, d.primary_key, d.reason) for d in letters] == [
        (bad, HOSTILE_KEY, "sink_rejected")
    ]
    assert json.loads(letters[0].payload)["metadata"]["uniqueEventId"] == bad  # replayable
    assert_named_without_data(letters[0], repr(table), f"PL/pgSQL function {function}()")


async def test_a_trigger_expression_failing_on_one_row_in_the_state_file_dead_letters_it(
    sandbox_factory, tmp_path: Path
):
    """SQLite: the sink's table in the state store's file, with a trigger that cannot RAISE
    (open keeps it) whose json_extract fails on the hostile event's primaryKey ("malformed
    JSON"). That event is dead-lettered naming the table; every other event is in the table,
    inserted once (an audit trigger counts them); the checkpoint reaches the last offset."""
    gw, ids, bad = await with_hostile_event(sandbox_factory)
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    with contextlib.closing(sqlite3.connect(state)) as db:
        db.executescript(
            f"CREATE TABLE opera_events ({LITE}); CREATE TABLE audit (uid TEXT NOT NULL); "
            "CREATE TRIGGER key_json BEFORE INSERT ON opera_events "
            "BEGIN SELECT json_extract(NEW.primary_key, '$'); END; "
            "CREATE TRIGGER audit AFTER INSERT ON opera_events "
            "BEGIN INSERT INTO audit VALUES (NEW.unique_event_id); END"
        )
    settings = make_settings(tmp_path, gw.url, sink={"type": "sqlite"})
    async with running(settings) as daemon:
        await wait_until(lambda: committed(state, newest_offset(gw)))
        assert not daemon._stop.is_set()
        assert daemon.committer.aside_dead_letters == 1
        assert daemon.pipelines["main"].dead_lettered == 1
        assert dead_lettered_metric(daemon) == 1
    assert daemon.exit_code == 0
    written = [r[0] for r in query(state, "SELECT unique_event_id FROM opera_events")]
    assert sorted(written) == sorted(ids)
    assert Counter(r[0] for r in query(state, "SELECT uid FROM audit")) == Counter(ids)
    letters = await lite_letters(state)
    assert [(d.unique_event_id, d.primary_key, d.reason) for d in letters] == [
        (bad, HOSTILE_KEY, "sink_rejected")
    ]
    assert_named_without_data(letters[0], "'opera_events'", "malformed JSON")


@pytest.mark.parametrize("placement", ["state transaction", "own pool"])
async def test_a_trigger_cast_failing_on_every_row_dead_letters_each_as_the_own_pool_does(
    sandbox_factory, tmp_path: Path, postgres_dsn: str, placement: str
):
    """A cast every event's data fails (the hotelId, never a number) is the rows' data, not the
    table's: on the sink's own pool each event was dead-lettered, and in the state transaction
    now too (each named by the function, logged), the checkpoint past them: the same outcome in
    both placements. (What every event meets whatever its data, a privilege or a table gone,
    is no data exception: retried, as before.)"""
    gw = await sandbox_factory(backlog=EVENTS)
    ids = truth_ids(gw.events("DEMO"))
    table = f"t_{uuid.uuid4().hex[:12]}"
    schema = f"s_{table}"
    await sql(
        postgres_dsn,
        "execute",
        f"CREATE FUNCTION {table}_cast() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM NEW.hotel_id::int; RETURN NEW; END $$; "
        f'CREATE TABLE "{table}" ({PG}); '
        f'CREATE TRIGGER cast_hotel BEFORE INSERT OR UPDATE ON "{table}" '
        f"FOR EACH ROW EXECUTE FUNCTION {table}_cast()",
    )
    # Another spelling of the same server: the sink's own pool.
    dsn = postgres_dsn if placement == "state transaction" else postgres_dsn + "?"
    state = {"backend": "postgres", "dsn": postgres_dsn, "schema": schema}
    sink = {"type": "postgres", "dsn": dsn, "table": table}
    settings = make_settings(tmp_path, gw.url, sink=sink, state=state)
    async with running(settings) as daemon:
        await pg_checkpoint(daemon, newest_offset(gw))
        assert not daemon._stop.is_set()
    assert daemon.exit_code == 0
    assert await sql(postgres_dsn, "fetch", f'SELECT unique_event_id FROM "{table}"') == []
    letters = await pg_letters(postgres_dsn, schema)
    assert sorted(d.unique_event_id for d in letters) == sorted(ids)
    for letter in letters:
        assert letter.reason == "sink_rejected" and letter.attempts == 1
        assert f"PL/pgSQL function {table}_cast()" in letter.error, letter.error


# --- the committer: a crash, or the own path down, between the rows aside and the commit -----


def event(offset: int, uid: str, key: str, name: str = "UPDATE_RESERVATION") -> Event:
    return event_from_raw(
        {
            "metadata": {"offset": str(offset), "uniqueEventId": uid},
            "primaryKey": key,
            "eventName": name,
            "detail": [],
        }
    )


EVENTS_ONCE = [event(1, "e1", "1"), event(2, "e2", "2"), event(3, "bad", "{x"), event(4, "e4", "4")]
GOOD = ["e1", "e2", "e4"]


def state_file_with_json_trigger(state: Path) -> None:
    """The sink's table in the state file: a trigger whose json_extract fails on the key
    ``{x`` (not JSON), and an audit of the inserts that committed."""
    with contextlib.closing(sqlite3.connect(state)) as db:
        db.executescript(
            f"CREATE TABLE opera_events ({LITE}); CREATE TABLE audit (uid TEXT NOT NULL); "
            "CREATE TRIGGER key_json BEFORE INSERT ON opera_events "
            "BEGIN SELECT json_extract(NEW.primary_key, '$'); END; "
            "CREATE TRIGGER audit AFTER INSERT ON opera_events "
            "BEGIN INSERT INTO audit VALUES (NEW.unique_event_id); END"
        )


HOSTILE_NAME = "HOSTILE_UPDATE"


def state_file_with_hostile_name_trigger(state: Path) -> None:
    """The sink's table in the state file: a trigger whose json_extract of the primaryKey
    runs (and fails: ``K`` is not JSON) for an event named :data:`HOSTILE_NAME` only, so the
    later events of the same resource are rows the table takes."""
    with contextlib.closing(sqlite3.connect(state)) as db:
        db.executescript(
            f"CREATE TABLE opera_events ({LITE}); CREATE TRIGGER key_json BEFORE INSERT ON "
            f"opera_events BEGIN SELECT CASE WHEN NEW.event_name = '{HOSTILE_NAME}' "
            "THEN json_extract(NEW.primary_key, '$') END; END"
        )


@contextlib.asynccontextmanager
async def life(
    state: Path, events: Sequence[Event] = EVENTS_ONCE, parked: dict[str, str] | None = None
) -> AsyncIterator[tuple[SqliteStore, StoreTableSink, Committer]]:
    """One daemon's life, in parts: the store, the sink in its file, a committer; the events
    delivered through a pipeline (``parked`` given: a park-key stream's) before the body
    runs. ``lives[state]``: that pipeline."""
    store = await SqliteStore.open(state)
    sink = StoreTableSink(state, "opera_events")
    await sink.open(None)
    committer = Committer(store, sink, max_events=1000, interval_s=3600)
    pipeline = StreamPipeline(
        "main",
        sink=sink,
        committer=committer,
        workers=1,
        queue_size=10,
        batch_max=10,
        retry_initial_s=0.01,
        retry_max_s=0.01,
        park_key=parked is not None,
    )
    lives[state] = pipeline
    pipeline.start()
    try:
        for e in events:
            await pipeline.put(e)
        async with asyncio.timeout(10):
            await pipeline.drained()
        yield store, sink, committer
    finally:
        await pipeline.stop()
        await sink.close()
        await store.close()


lives: dict[Path, StreamPipeline] = {}


async def assert_once_each(state: Path) -> None:
    written = [r[0] for r in query(state, "SELECT unique_event_id FROM opera_events")]
    assert sorted(written) == GOOD
    assert sorted(r[0] for r in query(state, "SELECT uid FROM audit")) == GOOD  # inserted once
    letters = await lite_letters(state)
    assert [(d.unique_event_id, d.reason, d.attempts) for d in letters] == [
        ("bad", "sink_rejected", 1)
    ]
    assert query(state, "SELECT offset, processed_count FROM checkpoints") == [("4", 3)]


async def test_a_crash_between_the_rows_aside_and_the_commit_replays_them_once(tmp_path: Path):
    """The rows written aside are durable and the commit of the rest is not (the process
    killed then): the restart gets the same events again (nothing was recorded as processed),
    the state transaction refuses the same row, the rows go aside again (the upsert rewrites
    them: one row each, inserted once), the dead letter is written once, with its
    checkpoint."""
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    state_file_with_json_trigger(state)
    async with life(state) as (store, _, committer):
        real = store.commit
        calls = 0

        async def killed(batch: CommitBatch, now: float | None = None) -> bool:
            nonlocal calls
            calls += 1
            if calls == 1:
                return await real(batch, now)  # refused: the rows go aside
            raise asyncio.CancelledError  # the commit of the rest: never done

        store.commit = killed  # type: ignore[method-assign]
        with pytest.raises(asyncio.CancelledError):
            await committer.flush()
        assert calls == 2
    written = [r[0] for r in query(state, "SELECT unique_event_id FROM opera_events")]
    assert sorted(written) == GOOD  # durable before the checkpoint
    assert query(state, "SELECT count(*) FROM checkpoints") == [(0,)]
    assert await lite_letters(state) == []
    async with life(state) as (_, _, committer):
        assert await committer.flush()
    await assert_once_each(state)


async def test_the_own_path_failing_for_a_while_retries_the_commit_nothing_dead_lettered(
    tmp_path: Path,
):
    """The sink's own path fails for every event (here: its connection cannot be had), after
    some of its writes went through: a transient failure, the commit retried as any (nothing
    dead-lettered, nothing committed meanwhile); the retry sets the rows aside again and
    commits. One row, one insert, one dead letter each."""
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    state_file_with_json_trigger(state)
    async with life(state) as (store, sink, committer):
        real = sink._write_aside
        calls = 0

        async def down_after_one(stream: str, events: Sequence[Event]) -> None:
            nonlocal calls
            calls += 1
            if calls == 3:  # all four (refused), e1 and e2 (written), then down
                raise TransientSinkError("sqlite sink: database is locked")
            await real(stream, events)

        sink._write_aside = down_after_one  # type: ignore[method-assign]
        # The staged rows are taken at the first flush, with the aside bound then.
        with pytest.raises(TransientSinkError):
            await committer.flush()
        assert committer.failures == 1
        assert await store.seen("main", GOOD) == set() and await lite_letters(state) == []
        assert query(state, "SELECT uid FROM audit") == [("e1",), ("e2",)]
        assert await committer.flush()  # the failed batch, sent again first and alone
    await assert_once_each(state)


# --- park-key: the resource of such a dead letter waits behind it ----------------------------


async def test_park_key_holds_a_resource_behind_a_dead_letter_the_set_aside_made(tmp_path: Path):
    """park-key, the sink's table in the state file: the state transaction refuses the row of
    ``bad`` (resource K), and the sink's own path too: ``bad`` is dead-lettered. The later
    event of K in that commit (``k2``, a row the table takes) is dead-lettered ``parked``
    behind it, never written after it; so is one sent after that commit (``k3``), while the
    other resources flow; the pipeline counts the three dead letters as its own.

    Was: ``k2`` was written by the set-aside and ``k3`` delivered (the pipeline never heard
    of the dead letter: its key unparked until a restart), K applied out of order; and the
    pipeline counted no dead letter."""
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    state_file_with_hostile_name_trigger(state)
    first = [
        event(1, "e1", "1"),
        event(2, "bad", "K", HOSTILE_NAME),
        event(3, "k2", "K"),
        event(4, "e4", "4"),
    ]
    async with life(state, first, parked={}) as (_, _, committer):
        assert await committer.flush()
        pipeline = lives[state]
        assert pipeline.dead_lettered == 2
        assert pipeline._parking is not None and pipeline._parking.behind("K") == "bad"
        for e in (event(5, "k3", "K"), event(6, "e6", "6")):
            await pipeline.put(e)
        async with asyncio.timeout(10):
            await pipeline.drained()
        assert await committer.flush()
        assert pipeline.dead_lettered == 3
        assert committer.aside_dead_letters == 2
    written = sorted(r[0] for r in query(state, "SELECT unique_event_id FROM opera_events"))
    assert written == ["e1", "e4", "e6"]
    letters = await lite_letters(state)
    assert [(d.unique_event_id, d.primary_key, d.reason) for d in letters] == [
        ("bad", "K", "sink_rejected"),
        ("k2", "K", "parked"),
        ("k3", "K", "parked"),
    ]
    assert letters[1].error == letters[2].error == "primaryKey K is parked behind bad"
    # Dead letters are handled, not delivered: the checkpoint passes them, counting three.
    assert query(state, "SELECT offset, processed_count FROM checkpoints") == [("6", 3)]


async def test_without_park_key_the_later_events_of_that_resource_are_written(tmp_path: Path):
    """The default (``dead-letter``): only the refused event is dead-lettered, the later
    events of its resource are written, in that commit and after."""
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    state_file_with_hostile_name_trigger(state)
    first = [event(1, "bad", "K", HOSTILE_NAME), event(2, "k2", "K")]
    async with life(state, first) as (_, _, committer):
        assert await committer.flush()
        pipeline = lives[state]
        await pipeline.put(event(3, "k3", "K"))
        async with asyncio.timeout(10):
            await pipeline.drained()
        assert await committer.flush()
        assert pipeline.dead_lettered == 1
    written = sorted(r[0] for r in query(state, "SELECT unique_event_id FROM opera_events"))
    assert written == ["k2", "k3"]
    assert [d.unique_event_id for d in await lite_letters(state)] == ["bad"]


def rows_of(state: Path, key: str) -> list[str]:
    """The table's rows of resource ``key``, in the order they were inserted."""
    return [
        r[0]
        for r in query(
            state,
            f"SELECT unique_event_id FROM opera_events WHERE primary_key = '{key}' ORDER BY rowid",
        )
    ]


async def test_without_park_key_an_event_staged_during_the_set_aside_keeps_its_order(
    tmp_path: Path,
) -> None:
    """The default (``dead-letter``). While the set-aside writes the refused commit's rows
    through the sink's own path, the pipeline writes ``m1`` (resource M): staged (the sink
    switches at the set-aside's end). The set-aside writes it through the own path before the
    sink switches, so M's next event ``m2``, written through the own path and in the table at
    once, comes after it: the table never holds ``m2`` without ``m1``, and ``m1`` is inserted
    first. Each once, ``bad`` dead-lettered, the checkpoint past them all.

    Was: ``m1`` stayed staged until the next state transaction; the table held ``m2`` alone
    until then (for good on a crash in between), and ``m1``'s row was inserted after it."""
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    state_file_with_hostile_name_trigger(state)
    first = [event(1, "e1", "1"), event(2, "bad", "K", HOSTILE_NAME), event(3, "e3", "3")]
    async with life(state, first) as (_, sink, committer):
        pipeline = lives[state]
        real = sink._write_aside
        calls = 0

        async def pipeline_writes_meanwhile(stream: str, events: Sequence[Event]) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:  # the own path is a thread: the pipeline goes on meanwhile
                await pipeline.put(event(4, "m1", "M"))
                async with asyncio.timeout(10):
                    await pipeline.drained()
            await real(stream, events)

        sink._write_aside = pipeline_writes_meanwhile  # type: ignore[method-assign]
        assert await committer.flush()  # refused, set aside: bad dead-lettered
        assert sink.waits  # its own path now
        assert rows_of(state, "M") == ["m1"]  # in the table before the sink switched
        await pipeline.put(event(5, "m2", "M"))
        async with asyncio.timeout(10):
            await pipeline.drained()
        assert rows_of(state, "M") == ["m1", "m2"]  # m2 in at once, after m1
        assert await committer.flush()
        assert pipeline.dead_lettered == 1
    assert rows_of(state, "M") == ["m1", "m2"]
    written = sorted(r[0] for r in query(state, "SELECT unique_event_id FROM opera_events"))
    assert written == ["e1", "e3", "m1", "m2"]
    assert [(d.unique_event_id, d.reason) for d in await lite_letters(state)] == [
        ("bad", "sink_rejected")
    ]
    assert query(state, "SELECT offset, processed_count FROM checkpoints") == [("5", 4)]


async def test_without_park_key_postgres_sink_writes_what_was_staged_meanwhile_first(
    postgres_dsn: str,
) -> None:
    """The same on PostgreSQL, the sink on the state's DSN (the default ``dead-letter``):
    ``m1``, staged while the set-aside writes through the sink's own pool, is in the table
    once the set-aside is done, before M's next event ``m2`` goes through the own pool; an
    audit of the inserts shows ``m1`` first.

    Was: ``m2`` was in the table alone, and inserted before ``m1`` (the next commit's)."""
    table = f"t_{uuid.uuid4().hex[:12]}"
    schema = f"s_{table}"
    await sql(
        postgres_dsn,
        "execute",
        f"CREATE FUNCTION {table}_cast() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.event_name = '{HOSTILE_NAME}' THEN PERFORM NEW.primary_key::int; END IF; "
        f'RETURN NEW; END $$; CREATE TABLE "{table}" ({PG}); '
        f'CREATE TABLE "{table}_audit" (n bigserial PRIMARY KEY, uid TEXT NOT NULL); '
        f"CREATE FUNCTION {table}_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f'INSERT INTO "{table}_audit" (uid) VALUES (NEW.unique_event_id); RETURN NULL; END $$; '
        f'CREATE TRIGGER cast_key BEFORE INSERT OR UPDATE ON "{table}" '
        f"FOR EACH ROW EXECUTE FUNCTION {table}_cast(); "
        f'CREATE TRIGGER audit AFTER INSERT ON "{table}" '
        f"FOR EACH ROW EXECUTE FUNCTION {table}_audit()",
    )

    async def inserted(key: str) -> list[str]:
        rows = await sql(
            postgres_dsn,
            "fetch",
            f'SELECT a.uid FROM "{table}_audit" a JOIN "{table}" t '
            f"ON t.unique_event_id = a.uid WHERE t.primary_key = '{key}' ORDER BY a.n",
        )
        return [r[0] for r in rows]

    store = await PostgresStore.open(postgres_dsn, schema=schema)
    sink = PostgresSink(
        PostgresSinkSettings(type="postgres", dsn=postgres_dsn, table=table, timeout_s=5.0),  # type: ignore[arg-type]
        in_state_transaction=True,
    )
    await sink.open(None)
    committer = Committer(store, sink, max_events=1000, interval_s=3600)
    pipeline = StreamPipeline(
        "main",
        sink=sink,
        committer=committer,
        workers=1,
        queue_size=10,
        batch_max=10,
        retry_initial_s=0.01,
        retry_max_s=0.01,
    )
    pipeline.start()
    modes: list[str] = []
    try:
        for e in (event(1, "e1", "1"), event(2, "bad", "K", HOSTILE_NAME)):
            await pipeline.put(e)
        async with asyncio.timeout(10):
            await pipeline.drained()
        real = sink._write_aside

        async def pipeline_writes_meanwhile(stream: str, events: Sequence[Event]) -> None:
            if not modes:
                modes.append(sink.mode)
                await pipeline.put(event(3, "m1", "M"))
                async with asyncio.timeout(10):
                    await pipeline.drained()
            await real(stream, events)

        sink._write_aside = pipeline_writes_meanwhile  # type: ignore[method-assign]
        assert await committer.flush()
        assert sink.mode == OWN_POOL
        assert await inserted("M") == ["m1"]
        await pipeline.put(event(4, "m2", "M"))
        async with asyncio.timeout(10):
            await pipeline.drained()
        assert await inserted("M") == ["m1", "m2"]
        assert await committer.flush()
        checkpoint = await store.checkpoint("main")
    finally:
        await pipeline.stop()
        await sink.close()
        await store.close()
    assert modes == [STATE_TRANSACTION]  # m1 was staged: the sink had not switched yet
    assert await inserted("M") == ["m1", "m2"]
    assert [(d.unique_event_id, d.reason) for d in await pg_letters(postgres_dsn, schema)] == [
        ("bad", "sink_rejected")
    ]
    assert checkpoint is not None and checkpoint.offset == "4"


async def test_park_key_daemon_holds_the_resource_behind_the_set_aside_dead_letter(
    sandbox_factory, tmp_path: Path
):
    """The daemon, park-key, the sink's table in the state file, the sandbox gateway: the
    hostile event (its row refused in the state transaction, then on the sink's own path) is
    dead-lettered; an event of its resource sent once that is committed is dead-lettered
    ``parked`` behind it, not written; /metrics counts both for the stream.

    Was: that later event was written (the running pipeline never parked the key), and
    /metrics said 0."""
    gw, _, bad = await with_hostile_event(sandbox_factory, HOSTILE_NAME)
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    state_file_with_hostile_name_trigger(state)
    settings = make_settings(
        tmp_path, gw.url, sink={"type": "sqlite"}, on_permanent_failure="park-key"
    )
    later = f"later-{uuid.uuid4().hex[:8]}"
    async with running(settings) as daemon:
        await wait_until(lambda: committed(state, newest_offset(gw)))
        assert daemon.pipelines["main"].dead_lettered == 1
        offset = gw.events("DEMO")[-1]["metadata"]["offset"]
        gw.inject_event("DEMO", hostile_event(offset, later, name="UPDATE_RESERVATION"))
        gw.append("DEMO", 5)
        await wait_until(lambda: committed(state, newest_offset(gw)))
        assert not daemon._stop.is_set()
        assert daemon.pipelines["main"].dead_lettered == 2
        assert dead_lettered_metric(daemon) == 2
    assert daemon.exit_code == 0
    written = {r[0] for r in query(state, "SELECT unique_event_id FROM opera_events")}
    assert later not in written and bad not in written
    assert written == set(truth_ids(gw.events("DEMO"))) - {later}
    letters = await lite_letters(state)
    assert [(d.unique_event_id, d.primary_key, d.reason) for d in letters] == [
        (bad, HOSTILE_KEY, "sink_rejected"),
        (later, HOSTILE_KEY, "parked"),
    ]


async def test_park_key_an_event_staged_while_the_refused_commit_runs_waits_behind_it(
    tmp_path: Path,
):
    """park-key. The commit holding ``bad`` (resource K) is under way (the store's thread)
    while the pipeline goes on, as during any commit, and writes ``k2`` (resource K, a row the
    table takes): staged for the next commit. The state transaction refuses ``bad``'s row; the
    set-aside dead-letters it and parks K; ``k2``, staged before the pipeline heard of it, is
    dead-lettered ``parked`` behind it, never written; the pipeline counts it.

    Was: the next commit wrote ``k2``: K's later event applied after its dead-lettered
    earlier one (a `dlq replay` of ``bad`` then overwrites the newer state)."""
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    state_file_with_hostile_name_trigger(state)
    first = [event(1, "e1", "1"), event(2, "bad", "K", HOSTILE_NAME), event(3, "e3", "3")]
    async with life(state, first, parked={}) as (store, _, committer):
        pipeline = lives[state]
        real = store.commit
        calls = 0

        async def commit_while_pipeline_runs(batch: CommitBatch, now: float | None = None) -> bool:
            nonlocal calls
            calls += 1
            if calls == 1:  # the pipeline takes events while this commit is under way
                for e in (event(4, "k2", "K"), event(5, "e5", "5")):
                    await pipeline.put(e)
                async with asyncio.timeout(10):
                    await pipeline.drained()
            return await real(batch, now)

        store.commit = commit_while_pipeline_runs  # type: ignore[method-assign]
        assert await committer.flush()  # refused, set aside: bad dead-lettered, K parked
        assert pipeline._parking is not None and pipeline._parking.behind("K") == "bad"
        assert await committer.flush()  # what the pipeline wrote meanwhile
        assert pipeline.dead_lettered == 2
    written = sorted(r[0] for r in query(state, "SELECT unique_event_id FROM opera_events"))
    assert written == ["e1", "e3", "e5"]
    letters = await lite_letters(state)
    assert [(d.unique_event_id, d.reason, d.error) for d in letters] == [
        ("bad", "sink_rejected", letters[0].error),
        ("k2", "parked", "primaryKey K is parked behind bad"),
    ]
    assert query(state, "SELECT offset, processed_count FROM checkpoints") == [("5", 3)]


async def test_park_key_an_event_written_while_the_rows_go_aside_waits_behind_it(
    tmp_path: Path,
):
    """park-key. While the set-aside writes the refused commit's rows through the sink's own
    path (and before the pipeline has heard of ``bad``'s dead letter), the pipeline writes
    ``k2`` (resource K) and ``bad2`` then ``j2`` (resource J; ``bad2``'s row refused there
    too): the sink keeps staging until the pipeline was told, so ``k2`` is dead-lettered
    ``parked`` behind ``bad``, ``bad2`` dead-lettered and ``j2`` parked behind it; then the
    sink writes through its own path, and K's and J's later events wait behind them.

    Was: the sink wrote through its own path from the set-aside's first write on: ``k2`` and
    ``j2`` were in the table after their resources' dead letters."""
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    state_file_with_hostile_name_trigger(state)
    first = [event(1, "e1", "1"), event(2, "bad", "K", HOSTILE_NAME), event(3, "e3", "3")]
    during = [
        event(4, "k2", "K"),
        event(5, "bad2", "J", HOSTILE_NAME),
        event(6, "j2", "J"),
        event(7, "e7", "7"),
    ]
    async with life(state, first, parked={}) as (_, sink, committer):
        pipeline = lives[state]
        real = sink._write_aside
        calls = 0

        async def pipeline_writes_meanwhile(stream: str, events: Sequence[Event]) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                for e in during:
                    await pipeline.put(e)
                async with asyncio.timeout(10):
                    await pipeline.drained()
            await real(stream, events)

        sink._write_aside = pipeline_writes_meanwhile  # type: ignore[method-assign]
        assert await committer.flush()
        assert sink.waits  # its own path now
        for e in (event(8, "k3", "K"), event(9, "j3", "J"), event(10, "e10", "10")):
            await pipeline.put(e)
        async with asyncio.timeout(10):
            await pipeline.drained()
        assert await committer.flush()
        assert pipeline.dead_lettered == 6
    written = sorted(r[0] for r in query(state, "SELECT unique_event_id FROM opera_events"))
    assert written == ["e1", "e10", "e3", "e7"]
    letters = await lite_letters(state)
    assert sorted(
        (d.unique_event_id, d.reason, d.error) for d in letters if d.reason == "parked"
    ) == [
        ("j2", "parked", "primaryKey J is parked behind bad2"),
        ("j3", "parked", "primaryKey J is parked behind bad2"),
        ("k2", "parked", "primaryKey K is parked behind bad"),
        ("k3", "parked", "primaryKey K is parked behind bad"),
    ]
    assert sorted(d.unique_event_id for d in letters if d.reason == "sink_rejected") == [
        "bad",
        "bad2",
    ]
    assert query(state, "SELECT offset, processed_count FROM checkpoints") == [("10", 4)]


async def test_park_key_postgres_sink_stages_until_the_pipeline_heard_of_the_dead_letter(
    postgres_dsn: str,
):
    """The same on PostgreSQL, the sink on the state's DSN: while the set-aside writes the
    refused commit's rows through the sink's own pool, the sink still stages (its mode stays
    the state transaction), so ``k2`` (resource K, written by the pipeline meanwhile) is
    dead-lettered ``parked`` behind ``bad``; the sink writes through its own pool after.

    Was: the sink switched to its own pool at the set-aside's first write, and ``k2`` went
    straight into the table after ``bad``'s dead letter."""
    table = f"t_{uuid.uuid4().hex[:12]}"
    schema = f"s_{table}"
    await sql(
        postgres_dsn,
        "execute",
        f"CREATE FUNCTION {table}_cast() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.event_name = '{HOSTILE_NAME}' THEN PERFORM NEW.primary_key::int; END IF; "
        f'RETURN NEW; END $$; CREATE TABLE "{table}" ({PG}); '
        f'CREATE TRIGGER cast_key BEFORE INSERT OR UPDATE ON "{table}" '
        f"FOR EACH ROW EXECUTE FUNCTION {table}_cast()",
    )
    store = await PostgresStore.open(postgres_dsn, schema=schema)
    sink = PostgresSink(
        PostgresSinkSettings(type="postgres", dsn=postgres_dsn, table=table, timeout_s=5.0),  # type: ignore[arg-type]
        in_state_transaction=True,
    )
    await sink.open(None)
    committer = Committer(store, sink, max_events=1000, interval_s=3600)
    pipeline = StreamPipeline(
        "main",
        sink=sink,
        committer=committer,
        workers=1,
        queue_size=10,
        batch_max=10,
        retry_initial_s=0.01,
        retry_max_s=0.01,
        park_key=True,
    )
    pipeline.start()
    modes: list[str] = []
    try:
        for e in (event(1, "e1", "1"), event(2, "bad", "K", HOSTILE_NAME)):
            await pipeline.put(e)
        async with asyncio.timeout(10):
            await pipeline.drained()
        real = sink._write_aside

        async def pipeline_writes_meanwhile(stream: str, events: Sequence[Event]) -> None:
            if not modes:
                modes.append(sink.mode)
                for e in (event(3, "k2", "K"), event(4, "e4", "4")):
                    await pipeline.put(e)
                async with asyncio.timeout(10):
                    await pipeline.drained()
                modes.append(sink.mode)
            await real(stream, events)

        sink._write_aside = pipeline_writes_meanwhile  # type: ignore[method-assign]
        assert await committer.flush()
        assert sink.mode == OWN_POOL
        await pipeline.put(event(5, "k3", "K"))
        async with asyncio.timeout(10):
            await pipeline.drained()
        assert await committer.flush()
        assert pipeline.dead_lettered == 3
    finally:
        await pipeline.stop()
        await sink.close()
        await store.close()
    assert modes == [STATE_TRANSACTION, STATE_TRANSACTION]
    written = [
        r[0] for r in await sql(postgres_dsn, "fetch", f'SELECT unique_event_id FROM "{table}"')
    ]
    assert sorted(written) == ["e1", "e4"]
    letters = await pg_letters(postgres_dsn, schema)
    assert [(d.unique_event_id, d.reason) for d in letters] == [
        ("bad", "sink_rejected"),
        ("k2", "parked"),
        ("k3", "parked"),
    ]


# --- what every event meets is no row's fault: retried, nothing dead-lettered ----------------


async def exhausted_audit(dsn: str, table: str) -> str:
    """``table`` with an audit trigger (no RAISE: open keeps a sink on the state's DSN in the
    state transaction) whose insert draws from a sequence at its MAXVALUE (an int4 serial after
    2**31 audit rows; here 2, reached): every write fails with 2200H, no row's data the
    cause. Returns the statement that fixes it."""
    await sql(
        dsn,
        "execute",
        f"CREATE SEQUENCE {table}_seq MAXVALUE 2 START 2; SELECT nextval('{table}_seq'); "
        f"CREATE TABLE \"{table}_audit\" (id int NOT NULL DEFAULT nextval('{table}_seq'), "
        "uid TEXT NOT NULL); "
        f"CREATE FUNCTION {table}_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f'INSERT INTO "{table}_audit" (uid) VALUES (NEW.unique_event_id); RETURN NULL; END $$; '
        f'CREATE TABLE "{table}" ({PG}); '
        f'CREATE TRIGGER audit AFTER INSERT OR UPDATE ON "{table}" '
        f"FOR EACH ROW EXECUTE FUNCTION {table}_audit()",
    )
    return f"ALTER SEQUENCE {table}_seq MAXVALUE 1000000"


async def test_a_sequence_at_its_limit_in_the_state_transaction_is_retried_not_dead_lettered(
    sandbox_factory, tmp_path: Path, postgres_dsn: str
):
    """The postgres sink in the state transaction; its table's audit trigger draws from a
    sequence at its limit (2200H). No event's data causes that: the commit is retried, its
    error naming the SQLSTATE and the trigger's function, nothing dead-lettered; once the
    operator raises the limit, every event is written and committed, the stream on.

    Was: 2200H is class 22, taken for the row's data: the rows went through the own pool,
    which dead-lettered every event."""
    gw = await sandbox_factory(backlog=EVENTS)
    ids = truth_ids(gw.events("DEMO"))
    table = f"t_{uuid.uuid4().hex[:12]}"
    schema = f"s_{table}"
    fix = await exhausted_audit(postgres_dsn, table)
    state = {"backend": "postgres", "dsn": postgres_dsn, "schema": schema}
    sink = {"type": "postgres", "dsn": postgres_dsn, "table": table}
    settings = make_settings(tmp_path, gw.url, sink=sink, state=state)
    async with running(settings) as daemon:
        await wait_until(lambda: daemon.committer.failures >= 1, timeout=10)
        error = daemon.committer.last_error
        assert "2200H" in error and f"PL/pgSQL function {table}_audit()" in error, error
        assert "retrying" in error, error
        await sql(postgres_dsn, "execute", fix)
        await pg_checkpoint(daemon, newest_offset(gw))
        assert not daemon._stop.is_set()
        assert daemon.committer.aside_dead_letters == 0
        assert daemon.sink.mode == STATE_TRANSACTION  # type: ignore[attr-defined]
    assert daemon.exit_code == 0
    assert await pg_letters(postgres_dsn, schema) == []
    written = [
        r[0] for r in await sql(postgres_dsn, "fetch", f'SELECT unique_event_id FROM "{table}"')
    ]
    assert sorted(written) == sorted(ids)


async def test_a_sequence_at_its_limit_on_the_own_pool_is_retried_not_dead_lettered(
    sandbox_factory, tmp_path: Path, postgres_dsn: str
):
    """The postgres sink on its own pool (the state in a sqlite file), the same audit trigger
    drawing from a sequence at its limit: each write is retried (no event's fault), nothing
    dead-lettered; once the limit is raised every event is written.

    Was: a class 22 error in the trigger's function dead-lettered every event."""
    gw = await sandbox_factory(backlog=EVENTS)
    ids = truth_ids(gw.events("DEMO"))
    table = f"t_{uuid.uuid4().hex[:12]}"
    fix = await exhausted_audit(postgres_dsn, table)
    sink = {"type": "postgres", "dsn": postgres_dsn, "table": table}
    settings = make_settings(tmp_path, gw.url, sink=sink)
    async with running(settings) as daemon:
        assert daemon.sink.mode == OWN_POOL  # type: ignore[attr-defined]
        await wait_until(lambda: daemon.pipelines["main"].sink_retries >= 1, timeout=10)
        await sql(postgres_dsn, "execute", fix)
        await wait_until(lambda: committed(tmp_path / "state.db", newest_offset(gw)))
        assert not daemon._stop.is_set()
        assert daemon.pipelines["main"].dead_lettered == 0
    assert daemon.exit_code == 0
    assert await lite_letters(tmp_path / "state.db") == []
    written = [
        r[0] for r in await sql(postgres_dsn, "fetch", f'SELECT unique_event_id FROM "{table}"')
    ]
    assert sorted(written) == sorted(ids)


# --- fleet mode: the set-aside awaits long before the commit of the rest ----------------------


async def test_a_stream_lost_and_taken_again_during_the_set_aside_commits_nothing_of_the_old_lease(
    postgres_dsn: str,
):
    """Fleet mode, the sink on the state's DSN: while the set-aside writes the refused
    commit's rows aside, this member loses the stream's lease and takes it again (a new
    epoch; the stream forgotten here meanwhile). The commit of the rest is the old lease's
    work: refused by the fence it was sent under, nothing of it committed (no checkpoint, no
    processed id, no dead letter); the new lease replays it from the store.

    Was: the fence was read again for the commit of the rest, with the new epoch, and the old
    lease's checkpoint, processed ids and dead letter committed under it."""
    table = f"t_{uuid.uuid4().hex[:12]}"
    schema = f"s_{table}"
    await sql(
        postgres_dsn,
        "execute",
        f"CREATE FUNCTION {table}_cast() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.event_name = '{HOSTILE_NAME}' THEN PERFORM NEW.primary_key::int; END IF; "
        f'RETURN NEW; END $$; CREATE TABLE "{table}" ({PG}); '
        f'CREATE TRIGGER cast_key BEFORE INSERT OR UPDATE ON "{table}" '
        f"FOR EACH ROW EXECUTE FUNCTION {table}_cast()",
    )
    store = await PostgresStore.open(postgres_dsn, schema=schema)
    await sql(
        postgres_dsn,
        "execute",
        f"INSERT INTO \"{schema}\".stream_leases (stream, holder, epoch) VALUES ('main', 'm1', 1)",
    )
    sink = PostgresSink(
        PostgresSinkSettings(type="postgres", dsn=postgres_dsn, table=table, timeout_s=5.0),  # type: ignore[arg-type]
        in_state_transaction=True,
    )
    await sink.open(None)
    committer = Committer(store, sink, max_events=1000, interval_s=3600)
    epoch = {"main": 1}
    fenced: list[frozenset[str]] = []
    committer.configure_fence(lambda: Fence("m1", dict(epoch)), fenced.append)
    pipeline = StreamPipeline(
        "main",
        sink=sink,
        committer=committer,
        workers=1,
        queue_size=10,
        batch_max=10,
        retry_initial_s=0.01,
        retry_max_s=0.01,
    )
    pipeline.start()
    try:
        for e in (event(1, "e1", "1"), event(2, "bad", "K", HOSTILE_NAME)):
            await pipeline.put(e)
        async with asyncio.timeout(10):
            await pipeline.drained()
        await pipeline.stop()
        real = sink._write_aside

        async def lease_lost_and_taken_again(stream: str, events: Sequence[Event]) -> None:
            if epoch["main"] == 1:
                committer.forget("main")
                await sql(
                    postgres_dsn,
                    "execute",
                    f"UPDATE \"{schema}\".stream_leases SET epoch = 2 WHERE stream = 'main'",
                )
                epoch["main"] = 2
            await real(stream, events)

        sink._write_aside = lease_lost_and_taken_again  # type: ignore[method-assign]
        assert not await committer.flush()  # all of it the old lease's: refused, dropped
        assert committer.fencing_rejections == 1
        assert await store.checkpoint("main") is None
        assert await store.seen("main", ["e1", "bad"]) == set()
    finally:
        await pipeline.stop()
        await sink.close()
        await store.close()
    assert await pg_letters(postgres_dsn, schema) == []
