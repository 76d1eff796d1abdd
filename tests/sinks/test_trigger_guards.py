"""A trigger on the sink's table that may refuse a row (a PL/pgSQL RAISE at EXCEPTION level or
an ASSERT, a function in a language the sink cannot read; in SQLite a RAISE) is a guard, as a
constraint is: the postgres sink on the state store's DSN writes through its own pool (that
event alone dead-lettered), and a sqlite sink's table in the state file is refused at open. An
audit trigger that cannot refuse a row keeps the rows in the state transaction. A SQLite
trigger's RAISE(IGNORE), which drops a row silently, is that event's dead letter in a file of
its own. Real PostgreSQL, real SQLite files, the sandbox gateway, the daemon in-process.

Was: a validating trigger's RAISE refused one event's row inside the state store's commit:
the whole commit failed, the daemon exited 78, and again at each start on the same event. A
RAISE(IGNORE) dropped the row while its checkpoint committed: the event lost."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
from log_capture import captured_logs, records
from operator_support import query, settled
from pg import sql
from sink_tables import LITE, PG
from support import (
    committed,
    make_settings,
    newest_offset,
    running,
    spawn_daemon,
    tail,
    toml_config,
    truth_ids,
    wait_exit,
    wait_until,
)

from consumer.config import PostgresSinkSettings
from consumer.errors import ConfigError
from consumer.sinks.postgres import OWN_POOL, STATE_TRANSACTION, PostgresSink, trigger_may_refuse
from consumer.sinks.sqlite import StoreTableSink
from consumer.state import PostgresStore, SqliteStore

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")

EVENTS = 20
WARNED = "generated columns of its own"  # the own-pool fallback's warning


def sqlite_ddl(db: Path, ddl: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.executescript(ddl)


@pytest.mark.parametrize(
    ("source", "refuses"),
    [
        ("BEGIN IF NEW.x THEN RAISE EXCEPTION 'no'; END IF; RETURN NEW; END", True),
        ("BEGIN RAISE 'no %', NEW.x; END", True),  # no level: EXCEPTION
        ("BEGIN raise sqlstate '22012'; END", True),
        ("BEGIN RAISE division_by_zero; END", True),
        ("BEGIN RAISE USING MESSAGE = 'no'; END", True),
        ("BEGIN NULL; EXCEPTION WHEN others THEN RAISE; END", True),  # re-raise
        ("BEGIN ASSERT NEW.x IS NOT NULL; RETURN NEW; END", True),
        ("BEGIN RAISE /* quiet */ NOTICE 'x'; END", True),  # unread: erring towards a guard
        ("BEGIN INSERT INTO a VALUES (NEW.x); RAISE NOTICE 'saw %', NEW.x; END", False),
        ("BEGIN RAISE\n  WARNING 'x'; RAISE LOG 'x'; RAISE info 'x'; RAISE DEBUG 'x'; END", False),
        ("BEGIN raise_count := raise_count + 1; RETURN NEW; END", False),
    ],
)  # fmt: skip
def test_which_plpgsql_trigger_functions_may_refuse_a_row(source: str, refuses: bool):
    assert trigger_may_refuse("plpgsql", source) is refuses


def test_a_trigger_function_the_sink_cannot_read_may_refuse_a_row():
    assert trigger_may_refuse("c", "suppress_redundant_updates_trigger")
    assert trigger_may_refuse("internal", "")
    assert trigger_may_refuse("plpython3u", "plpy.notice('x')")
    assert not trigger_may_refuse("sql", "SELECT 1")


async def open_staging(dsn: str, table: str) -> tuple[str, list[dict[str, Any]]]:
    """The mode a postgres sink on the state store's DSN takes for ``table``, and the
    fallback's warnings."""
    sink = PostgresSink(
        PostgresSinkSettings(type="postgres", dsn=dsn, table=table),  # type: ignore[arg-type]
        in_state_transaction=True,
    )
    with captured_logs() as buffer:
        await sink.open(None)
    await sink.close()
    return sink.mode, [e for e in records(buffer) if WARNED in e["event"]]


@pytest.mark.parametrize(
    ("trigger", "body", "guard"),
    [
        ("BEFORE INSERT OR UPDATE", "RAISE EXCEPTION 'no'; RETURN NEW;", True),
        ("AFTER UPDATE", "ASSERT NEW.hotel_id IS NOT NULL; RETURN NULL;", True),
        ("AFTER INSERT|STATEMENT", "RAISE SQLSTATE '23514'; RETURN NULL;", True),
        ("BEFORE DELETE", "RAISE EXCEPTION 'append only'; RETURN OLD;", False),
        ("AFTER INSERT OR UPDATE", "RAISE NOTICE 'audit %', TG_OP; RETURN NULL;", False),
    ],
)
async def test_a_trigger_that_may_raise_keeps_the_rows_out_of_the_state_transaction(
    postgres_dsn: str, trigger: str, body: str, guard: bool
):
    """Fired on INSERT or UPDATE (row or statement, before or after) and raising at EXCEPTION
    level or asserting: the sink's own pool, the trigger and its function named in the
    warning. One on DELETE alone (the sink never deletes), or one that only reports, does not
    move the rows."""
    table = f"t_{uuid.uuid4().hex[:12]}"
    trigger, _, each = trigger.partition("|")
    await sql(
        postgres_dsn,
        "execute",
        f"CREATE FUNCTION {table}_check() RETURNS trigger LANGUAGE plpgsql AS $$ "
        f"BEGIN {body} END $$; "
        f'CREATE TABLE "{table}" ({PG}); '
        f'CREATE TRIGGER validate {trigger} ON "{table}" FOR EACH {each or "ROW"} '
        f"EXECUTE FUNCTION {table}_check()",
    )
    mode, warned = await open_staging(postgres_dsn, table)
    assert mode == (OWN_POOL if guard else STATE_TRANSACTION)
    if guard:
        assert f"trigger validate (function {table}_check())" in warned[0]["found"], warned
    else:
        assert warned == []


async def test_a_disabled_trigger_is_no_guard_but_one_in_c_is(postgres_dsn: str):
    """A disabled trigger never fires; one whose function the sink cannot read (C, here the
    server's suppress_redundant_updates_trigger) may refuse a row: a guard, named."""
    table = f"t_{uuid.uuid4().hex[:12]}"
    await sql(
        postgres_dsn,
        "execute",
        f"CREATE FUNCTION {table}_no() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN RAISE EXCEPTION 'no'; END $$; "
        f'CREATE TABLE "{table}" ({PG}); '
        f'CREATE TRIGGER refuse BEFORE INSERT ON "{table}" FOR EACH ROW '
        f"EXECUTE FUNCTION {table}_no(); "
        f'ALTER TABLE "{table}" DISABLE TRIGGER refuse',
    )
    assert await open_staging(postgres_dsn, table) == (STATE_TRANSACTION, [])
    await sql(
        postgres_dsn,
        "execute",
        f'CREATE TRIGGER same BEFORE UPDATE ON "{table}" FOR EACH ROW '
        "EXECUTE FUNCTION suppress_redundant_updates_trigger()",
    )
    mode, warned = await open_staging(postgres_dsn, table)
    assert mode == OWN_POOL
    assert "trigger same (function suppress_redundant_updates_trigger())" in warned[0]["found"]


async def test_a_validating_trigger_on_the_state_dsn_dead_letters_that_event_alone(
    sandbox_factory, tmp_path: Path, postgres_dsn: str
):
    """A BEFORE trigger RAISEs for one event's row, the state store on the very same DSN: the
    rows go through the sink's own pool, that event is dead-lettered naming the function, the
    others are written, the checkpoint passes it, the daemon keeps running (exit 0). Was: the
    row was staged, its refusal failed the state store's commit, exit 78."""
    gw = await sandbox_factory(backlog=EVENTS)
    ids = truth_ids(gw.events("DEMO"))
    bad = ids[7]
    table = f"t_{uuid.uuid4().hex[:12]}"
    function = f"{table}_validate"
    await sql(
        postgres_dsn,
        "execute",
        f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.unique_event_id = '{bad}' THEN RAISE EXCEPTION 'not this event'; END IF; "
        "RETURN NEW; END $$; "
        f'CREATE TABLE "{table}" ({PG}); '
        f'CREATE TRIGGER validate BEFORE INSERT OR UPDATE ON "{table}" '
        f"FOR EACH ROW EXECUTE FUNCTION {function}()",
    )
    state = {"backend": "postgres", "dsn": postgres_dsn, "schema": f"s_{table}"}
    sink = {"type": "postgres", "dsn": postgres_dsn, "table": table}
    settings = make_settings(tmp_path, gw.url, sink=sink, state=state)
    last = newest_offset(gw)
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", EVENTS))
        pipeline = daemon.pipelines["main"]
        assert (pipeline.delivered, pipeline.dead_lettered) == (EVENTS - 1, 1)
        async with asyncio.timeout(30):
            while (cp := await daemon.store.checkpoint("main")) is None or cp.offset != last:
                await asyncio.sleep(0.02)
        assert daemon.sink.mode == OWN_POOL  # type: ignore[attr-defined]
    assert daemon.exit_code == 0
    written = [
        r[0] for r in await sql(postgres_dsn, "fetch", f'SELECT unique_event_id FROM "{table}"')
    ]
    assert sorted(written) == sorted(i for i in ids if i != bad)
    store = await PostgresStore.open(postgres_dsn, schema=state["schema"])
    try:
        letters = list(await store.dead_letters())
    finally:
        await store.close()
    assert [(d.unique_event_id, d.reason) for d in letters] == [(bad, "sink_rejected")]
    error = letters[0].error
    assert f"PL/pgSQL function {function}()" in error and "not this event" in error, error
    assert "dlq replay" in error and len(error) <= 1000, error


async def test_an_audit_trigger_on_the_state_dsn_keeps_every_write_in_the_state_transaction(
    sandbox_factory, tmp_path: Path, postgres_dsn: str
):
    """An audit trigger (it records each write, RAISEs NOTICE at most) cannot refuse a row:
    the rows stay staged in the state store's commit, each written once, in the transaction
    that committed its checkpoint (the audit records txid_current(), as the checkpoint's
    trigger does)."""
    gw = await sandbox_factory(backlog=EVENTS)
    ids = truth_ids(gw.events("DEMO"))
    table = f"t_{uuid.uuid4().hex[:12]}"
    schema = f"s_{table}"
    await (await PostgresStore.open(postgres_dsn, schema=schema)).close()
    await sql(
        postgres_dsn,
        "execute",
        f'CREATE TABLE "{table}_audit" (uid TEXT, tx BIGINT NOT NULL); '
        f"CREATE FUNCTION {table}_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f'INSERT INTO "{table}_audit" VALUES (NEW.unique_event_id, txid_current()); '
        "RAISE NOTICE 'audited %', TG_OP; RETURN NULL; END $$; "
        f"CREATE FUNCTION {table}_cp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f'INSERT INTO "{table}_audit" VALUES (NULL, txid_current()); RETURN NULL; END $$; '
        f'CREATE TABLE "{table}" ({PG}); '
        f'CREATE TRIGGER audit AFTER INSERT OR UPDATE ON "{table}" '
        f"FOR EACH ROW EXECUTE FUNCTION {table}_audit(); "
        f'CREATE TRIGGER audit AFTER INSERT OR UPDATE ON "{schema}".checkpoints '
        f"FOR EACH STATEMENT EXECUTE FUNCTION {table}_cp()",
    )
    state = {"backend": "postgres", "dsn": postgres_dsn, "schema": schema}
    sink = {"type": "postgres", "dsn": postgres_dsn, "table": table}
    settings = make_settings(tmp_path, gw.url, sink=sink, state=state)
    last = newest_offset(gw)
    async with running(settings) as daemon:
        assert daemon.sink.mode == STATE_TRANSACTION  # type: ignore[attr-defined]
        async with asyncio.timeout(30):
            while (cp := await daemon.store.checkpoint("main")) is None or cp.offset != last:
                await asyncio.sleep(0.02)
    assert daemon.exit_code == 0
    audit = await sql(postgres_dsn, "fetch", f'SELECT uid, tx FROM "{table}_audit"')
    rows = [(r[0], r[1]) for r in audit if r[0] is not None]
    assert sorted(uid for uid, _ in rows) == sorted(ids)  # each written once
    checkpoint_txs = {r[1] for r in audit if r[0] is None}
    assert {tx for _, tx in rows} <= checkpoint_txs


@pytest.mark.parametrize("action", ["ABORT", "FAIL", "ROLLBACK", "IGNORE"])
async def test_a_raising_trigger_in_the_state_file_is_refused_at_open(tmp_path: Path, action: str):
    """In the state store's file a row a RAISE refuses fails the checkpoint's commit, and one
    RAISE(IGNORE) drops is lost while its checkpoint commits: refused at open (exit 78 naming
    sink.table), the trigger named, with the fix: a file of its own."""
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    args = "IGNORE" if action == "IGNORE" else f"{action}, 'not that one'"
    sqlite_ddl(
        state,
        f"CREATE TABLE opera_events ({LITE}); CREATE TRIGGER [no hotel] BEFORE INSERT ON "
        f"opera_events WHEN NEW.hotel_id IS NULL BEGIN SELECT RAISE({args}); END",
    )
    with pytest.raises(ConfigError) as info:
        await StoreTableSink(state, "opera_events").open(None)
    message = str(info.value)
    assert message.startswith("sink.table: table 'opera_events' in the state store "), message
    assert "trigger no hotel (RAISE)" in message, message
    assert "set sink.path to a file of its own" in message, message


@pytest.mark.parametrize(
    "trigger",
    [
        "AFTER INSERT ON opera_events BEGIN INSERT INTO audit VALUES (NEW.unique_event_id); END",
        "BEFORE DELETE ON opera_events BEGIN SELECT RAISE(ABORT, 'append only'); END",
    ],
)
async def test_an_audit_trigger_in_the_state_file_is_no_guard(tmp_path: Path, trigger: str):
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    sqlite_ddl(
        state,
        f"CREATE TABLE opera_events ({LITE}); CREATE TABLE audit (uid TEXT); "
        f"CREATE TRIGGER audit {trigger}",
    )
    sink = StoreTableSink(state, "opera_events")
    await sink.open(None)
    await sink.close()


async def test_the_daemon_stops_at_start_on_a_raising_trigger_in_the_state_file(
    sandbox_factory, tmp_path: Path
):
    """``opera-consumer run``: exit 78 before consuming, naming the trigger and the fix.
    (Set PYTHONPATH to check a worktree's code: the subprocess runs from another cwd.)"""
    gw = await sandbox_factory(backlog=5)
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    sqlite_ddl(
        state,
        f"CREATE TABLE opera_events ({LITE}); CREATE TRIGGER validate BEFORE INSERT ON "
        "opera_events BEGIN SELECT RAISE(ABORT, 'no') WHERE NEW.hotel_id IS NULL; END",
    )
    config = toml_config(tmp_path, gw.url, sink='[sink]\ntype = "sqlite"\n')
    log = tmp_path / "daemon.log"
    assert await wait_exit(spawn_daemon(config, log)) == 78, tail(log)
    text = log.read_text()
    assert "sink.table: table 'opera_events' in the state store" in text, tail(log)
    assert "trigger validate (RAISE)" in text and "set sink.path to a file of its own" in text
    assert query(state, "SELECT count(*) FROM opera_events") == [(0,)]


async def test_a_row_a_trigger_ignores_in_a_file_of_its_own_is_that_events_dead_letter(
    sandbox_factory, tmp_path: Path
):
    """A BEFORE INSERT trigger's RAISE(IGNORE) drops one event's row without an error: that
    event is dead-lettered naming the trigger, the others (of its batch too) are written, the
    checkpoint passes it. Was: the write returned, the checkpoint committed, the event lost."""
    gw = await sandbox_factory(backlog=EVENTS)
    ids = truth_ids(gw.events("DEMO"))
    bad = ids[7]
    table = f"t_{uuid.uuid4().hex[:12]}"
    db = tmp_path / "sink.db"
    sqlite_ddl(
        db,
        f"CREATE TABLE {table} ({LITE}); CREATE TRIGGER skip BEFORE INSERT ON {table} "
        f"WHEN NEW.unique_event_id = '{bad}' BEGIN SELECT RAISE(IGNORE); END",
    )
    sink = {"type": "sqlite", "table": table, "path": db}
    settings = make_settings(tmp_path, gw.url, sink=sink)
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", EVENTS))
        pipeline = daemon.pipelines["main"]
        assert (pipeline.delivered, pipeline.dead_lettered) == (EVENTS - 1, 1)
        await wait_until(lambda: committed(tmp_path / "state.db", newest_offset(gw)))
    assert daemon.exit_code == 0
    written = [r[0] for r in query(db, f"SELECT unique_event_id FROM {table}")]
    assert sorted(written) == sorted(i for i in ids if i != bad)
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        letters = list(await store.dead_letters())
    finally:
        await store.close()
    assert [(d.unique_event_id, d.reason) for d in letters] == [(bad, "sink_rejected")]
    error = letters[0].error
    assert "RAISE(IGNORE)" in error and "'skip'" in error and "dlq replay" in error, error
