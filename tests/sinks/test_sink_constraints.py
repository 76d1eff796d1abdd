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
from operator_support import query, settled
from pg import sql
from support import make_settings, running, truth_ids, wait_until

from consumer.errors import ConfigError
from consumer.sinks.sqlite import StoreTableSink
from consumer.state import PostgresStore, SqliteStore

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")

PG = (
    'unique_event_id TEXT PRIMARY KEY, stream TEXT NOT NULL, "offset" TEXT NOT NULL, '
    "event_name TEXT, module_name TEXT, primary_key TEXT, hotel_id TEXT, event_timestamp TEXT, "
    "detail JSONB NOT NULL, resource JSONB, written_at DOUBLE PRECISION NOT NULL"
)
LITE = (
    "unique_event_id TEXT PRIMARY KEY, stream TEXT NOT NULL, offset TEXT NOT NULL, "
    "event_name TEXT, module_name TEXT, primary_key TEXT, hotel_id TEXT, event_timestamp TEXT, "
    "detail TEXT NOT NULL, resource TEXT, written_at REAL NOT NULL"
)
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
    if mode.startswith("postgres"):
        written = await sql(postgres_dsn, "fetch", f'SELECT unique_event_id FROM "{table}"')
        store: Any = (
            await PostgresStore.open(postgres_dsn, schema=state["schema"]) if state else None
        )
    else:
        written = query(db, f"SELECT unique_event_id FROM {table}")
    assert sorted(r[0] for r in written) == sorted(i for i in ids if i != bad)
    if state is None:
        store = await SqliteStore.open(tmp_path / "state.db")
    try:
        letters = await store.dead_letters()
    finally:
        await store.close()
    assert [(d.unique_event_id, d.reason) for d in letters] == [(bad, "sink_rejected")]
    error = letters[0].error
    assert "not_that_one" in error, error
    if mode.startswith("postgres"):
        assert f"{kind} constraint 'not_that_one'" in error, error
        assert "Failing row" not in error  # the server's DETAIL repeats the row
    assert "refused the event's row" in error and "dlq replay" in error, error
    assert len(error) <= 1000


@pytest.mark.parametrize(
    "extra",
    [
        "CONSTRAINT not_that_one CHECK (hotel_id <> 'X')",
        "CONSTRAINT to_hotels FOREIGN KEY (hotel_id) REFERENCES hotels (code)",
        "CONSTRAINT one_per_offset UNIQUE (stream, offset)",
    ],
)
async def test_a_table_in_the_state_store_with_its_own_constraints_is_refused(
    tmp_path: Path, extra: str
):
    """In the state store's file a refused row fails the checkpoint's commit: refused at open
    (exit 78 naming sink.table), with the fix: a file of its own (see the test above)."""
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
