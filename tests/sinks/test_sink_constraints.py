"""An operator's own constraint on the sink's table (a CHECK, a FOREIGN KEY) that refuses one
event's row: that event is dead-lettered, its reason naming the constraint and the way back
(fix the table, then ``dlq replay``), and the other events of its batch are written. Real
PostgreSQL, real SQLite files, the sandbox gateway, the daemon in-process.

Was: in the state store's transaction (the sqlite sink in the state file, the postgres sink on
the state store's DSN) the refused row failed the whole commit: the daemon stopped with exit
78 blaming the state store, and stopped again at each start on the same event."""

from __future__ import annotations

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
    make_settings,
    running,
    spawn_daemon,
    tail,
    toml_config,
    truth_ids,
    wait_exit,
    wait_until,
)

from consumer.config import PostgresSinkSettings
from consumer.core.records import DeadLetterRow
from consumer.errors import ConfigError
from consumer.sinks.postgres import OWN_POOL, STATE_TRANSACTION, PostgresSink
from consumer.sinks.sqlite import StoreTableSink
from consumer.state import PostgresStore, SqliteStore

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")

EVENTS = 20


def sqlite_ddl(db: Path, ddl: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.executescript(ddl)


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("postgres, own pool", "CHECK"),
        ("postgres, own pool", "FOREIGN KEY"),
        ("postgres, the state store's dsn", "CHECK"),
        ("postgres, the state store's dsn", "FOREIGN KEY"),
        ("sqlite, a file of its own", "CHECK"),
    ],
)
async def test_a_row_the_tables_constraint_refuses_dead_letters_that_event_alone(
    sandbox_factory, tmp_path: Path, postgres_dsn, mode: str, kind: str
):
    gw = await sandbox_factory(backlog=EVENTS)
    ids = truth_ids(gw.events("DEMO"))
    bad = ids[7]
    table = f"t_{uuid.uuid4().hex[:12]}"
    state: dict[str, Any] | None = None
    if mode.startswith("postgres"):
        if kind == "CHECK":
            guard = f"CONSTRAINT not_that_one CHECK (unique_event_id <> '{bad}')"
        else:
            await sql(postgres_dsn, "execute", f'CREATE TABLE "{table}_ok" (id TEXT PRIMARY KEY)')
            await sql(
                postgres_dsn,
                "execute",
                f'INSERT INTO "{table}_ok" SELECT unnest($1::text[])',
                [i for i in ids if i != bad],
            )
            guard = f'CONSTRAINT not_that_one FOREIGN KEY (unique_event_id) REFERENCES "{table}_ok"'
        await sql(postgres_dsn, "execute", f'CREATE TABLE "{table}" ({PG}, {guard})')
        sink: dict[str, Any] = {"type": "postgres", "dsn": postgres_dsn, "table": table}
        if mode.endswith("dsn"):
            state = {"backend": "postgres", "dsn": postgres_dsn, "schema": f"s_{table}"}
    else:
        db = tmp_path / "sink.db"
        guard = f"CONSTRAINT not_that_one CHECK (unique_event_id <> '{bad}')"
        sqlite_ddl(db, f"CREATE TABLE {table} ({LITE}, {guard})")
        sink = {"type": "sqlite", "table": table, "path": db}
    settings = make_settings(tmp_path, gw.url, sink=sink, state=state)
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", EVENTS))
        pipeline = daemon.pipelines["main"]
        assert (pipeline.delivered, pipeline.dead_lettered) == (EVENTS - 1, 1)
    assert daemon.exit_code == 0
    written, letters = await outcome(mode, postgres_dsn, state, table, tmp_path)
    assert sorted(written) == sorted(i for i in ids if i != bad)
    assert [(d.unique_event_id, d.reason) for d in letters] == [(bad, "sink_rejected")]
    error = letters[0].error
    assert "not_that_one" in error, error
    if mode.startswith("postgres"):
        assert f"{kind} constraint 'not_that_one'" in error, error
        assert "Failing row" not in error  # the server's DETAIL repeats the row
    assert "refused the event's row" in error and "dlq replay" in error, error
    assert len(error) <= 1000


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("postgres, own pool", "cast"),
        ("postgres, own pool", "NOT NULL"),
        ("postgres, the state store's dsn", "cast"),
        ("postgres, the state store's dsn", "NOT NULL"),
        ("sqlite, a file of its own", "NOT NULL"),
    ],
)
async def test_a_row_the_tables_generated_column_refuses_dead_letters_that_event_alone(
    sandbox_factory, tmp_path: Path, postgres_dsn, mode: str, kind: str
):
    """A generated column computes from the row: its expression may fail on one event's data
    (``((detail->0->>'newValue')::int)`` on "n/a"), or yield NULL where it is NOT NULL (an
    event without the field). That event alone is dead-lettered, naming the column; the
    server's DETAIL (``Failing row contains (…)``: the event's data) in no error or log.

    Was: on the state store's DSN the row stayed in the state transaction (generated columns
    were not among the guards) and failed the whole commit: exit 78 blaming the state store,
    at every start. On the own pool a NOT NULL generated column was taken for one the sink
    leaves empty: retried for ever, the stream stuck, the DETAIL logged at each try."""
    gw = await sandbox_factory(backlog=EVENTS)
    ids = truth_ids(gw.events("DEMO"))
    bad = ids[7]
    table = f"t_{uuid.uuid4().hex[:12]}"
    state: dict[str, Any] | None = None
    if kind == "cast":  # stands for an extracted field's cast failing on one event's value
        column = "as_number"
        extra = (
            "as_number INT GENERATED ALWAYS AS "
            f"((CASE WHEN unique_event_id = '{bad}' THEN 'n/a' ELSE '1' END)::int) STORED"
        )
    else:  # stands for hotel_id of an event without a hotelId
        column = "hotel"
        value = f"CASE WHEN unique_event_id = '{bad}' THEN NULL ELSE hotel_id END"
        stored = "STORED" if mode.startswith("postgres") else "VIRTUAL"
        extra = f"hotel TEXT GENERATED ALWAYS AS ({value}) {stored} NOT NULL"
    if mode.startswith("postgres"):
        await sql(postgres_dsn, "execute", f'CREATE TABLE "{table}" ({PG}, {extra})')
        sink: dict[str, Any] = {"type": "postgres", "dsn": postgres_dsn, "table": table}
        if mode.endswith("dsn"):
            state = {"backend": "postgres", "dsn": postgres_dsn, "schema": f"s_{table}"}
    else:
        db = tmp_path / "sink.db"
        sqlite_ddl(db, f"CREATE TABLE {table} ({LITE}, {extra})")
        sink = {"type": "sqlite", "table": table, "path": db}
    settings = make_settings(tmp_path, gw.url, sink=sink, state=state)
    with captured_logs() as buffer:
        async with running(settings) as daemon:
            await wait_until(settled(daemon, "main", EVENTS))
            pipeline = daemon.pipelines["main"]
            assert (pipeline.delivered, pipeline.dead_lettered) == (EVENTS - 1, 1)
    assert daemon.exit_code == 0
    logs = records(buffer)
    assert logs and not [e for e in logs if "Failing row" in repr(e)]
    written, letters = await outcome(mode, postgres_dsn, state, table, tmp_path)
    assert sorted(written) == sorted(i for i in ids if i != bad)
    assert [(d.unique_event_id, d.reason) for d in letters] == [(bad, "sink_rejected")]
    error = letters[0].error
    assert column in error and "dlq replay" in error, error
    assert "Failing row" not in error and len(error) <= 1000, error
    if mode.startswith("postgres") and kind == "NOT NULL":
        assert f"generated column '{column}' is NOT NULL" in error, error


@pytest.mark.parametrize(
    ("extra", "found"),
    [
        ("n INT GENERATED ALWAYS AS ((detail->0->>'newValue')::int) STORED", "generated column n"),
        ("hotel TEXT GENERATED ALWAYS AS (hotel_id) STORED NOT NULL", "generated column hotel"),
        ("PARTITION BY HASH (unique_event_id)", "partitioning"),
        ("tenant TEXT NOT NULL DEFAULT 'hq', id BIGINT GENERATED ALWAYS AS IDENTITY", None),
    ],
)
async def test_a_postgres_table_that_may_refuse_a_row_keeps_it_out_of_the_state_transaction(
    postgres_dsn, extra: str, found: str | None
):
    """Generated columns, and partitioning (a row may fit no partition), keep the rows on the
    sink's own pool; columns filled by a default or an identity, the same for every event,
    do not."""
    table = f"t_{uuid.uuid4().hex[:12]}"
    if found == "partitioning":
        await sql(postgres_dsn, "execute", f'CREATE TABLE "{table}" ({PG}) {extra}')
        await sql(
            postgres_dsn,
            "execute",
            f'CREATE TABLE "{table}_0" PARTITION OF "{table}" FOR VALUES WITH (MODULUS 1, '
            "REMAINDER 0)",
        )
    else:
        await sql(postgres_dsn, "execute", f'CREATE TABLE "{table}" ({PG}, {extra})')
    sink = PostgresSink(
        PostgresSinkSettings(type="postgres", dsn=postgres_dsn, table=table),  # type: ignore[arg-type]
        in_state_transaction=True,
    )
    with captured_logs() as buffer:
        await sink.open(None)
    await sink.close()
    logs = records(buffer)
    assert sink.mode == (STATE_TRANSACTION if found is None else OWN_POOL)
    warned = [e for e in logs if "generated columns of its own" in e["event"]]
    if found is not None:
        assert found in warned[0]["found"], warned


@pytest.mark.parametrize(
    "extra",
    [
        "CONSTRAINT not_that_one CHECK (hotel_id <> 'X')",
        "CONSTRAINT to_hotels FOREIGN KEY (hotel_id) REFERENCES hotels (code)",
        "CONSTRAINT one_per_offset UNIQUE (stream, offset)",
        "hotel TEXT GENERATED ALWAYS AS (hotel_id) VIRTUAL NOT NULL",
        "n INT GENERATED ALWAYS AS (json_extract(detail, '$[0].newValue')) STORED",
    ],
)
async def test_a_table_in_the_state_store_with_its_own_constraints_is_refused(
    tmp_path: Path, extra: str
):
    """In the state store's file a refused row fails the checkpoint's commit: refused at open
    (exit 78 naming sink.table), with the fix: a file of its own (see the test above). A
    generated column too (PRAGMA table_info does not show it; table_xinfo does)."""
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    sqlite_ddl(
        state,
        f"CREATE TABLE hotels (code TEXT PRIMARY KEY); CREATE TABLE opera_events ({LITE}, {extra})",
    )
    sink = StoreTableSink(state, "opera_events")
    with pytest.raises(ConfigError) as info:
        await sink.open(None)
    message = str(info.value)
    assert message.startswith("sink.table: table 'opera_events' in the state store "), message
    assert "set sink.path to a file of its own" in message
    if "GENERATED" in extra:
        assert f"generated column {extra.split(maxsplit=1)[0]}" in message, message


async def test_the_daemon_stops_at_start_on_a_generated_column_in_the_state_file(
    sandbox_factory, tmp_path: Path
):
    """``opera-consumer run``: exit 78 before consuming, naming sink.table and the fix."""
    gw = await sandbox_factory(backlog=5)
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    sqlite_ddl(
        state,
        f"CREATE TABLE opera_events ({LITE}, "
        "hotel TEXT GENERATED ALWAYS AS (hotel_id) VIRTUAL NOT NULL)",
    )
    config = toml_config(tmp_path, gw.url, sink='[sink]\ntype = "sqlite"\n')
    log = tmp_path / "daemon.log"
    assert await wait_exit(spawn_daemon(config, log)) == 78, tail(log)
    text = log.read_text()
    assert "sink.table: table 'opera_events' in the state store" in text, tail(log)
    assert "generated column hotel" in text and "set sink.path to a file of its own" in text
    assert query(state, "SELECT count(*) FROM opera_events") == [(0,)]


async def outcome(
    mode: str, dsn: str, state: dict[str, Any], table: str, tmp_path: Path
) -> tuple[list[str], list[DeadLetterRow]]:
    """The ids in the sink's table (PostgreSQL, or tmp_path/sink.db) and the dead letters in
    the state store after a run."""
    if mode.startswith("postgres"):
        rows = await sql(dsn, "fetch", f'SELECT unique_event_id FROM "{table}"')
    else:
        rows = query(tmp_path / "sink.db", f"SELECT unique_event_id FROM {table}")
    store: Any = (
        await PostgresStore.open(dsn, schema=state["schema"])
        if state
        else await SqliteStore.open(tmp_path / "state.db")
    )
    try:
        return [r[0] for r in rows], await store.dead_letters()
    finally:
        await store.close()
