"""``opera-consumer preflight`` and a table already under the sink's name that ``run`` would
refuse at open (exit 78 naming ``sink.table``): preflight FAILs its sink line with the sink's
own words (its check, run rolled back in PostgreSQL, read-only in SQLite), and changes nothing.
Through the CLI, against the sandbox gateway, real PostgreSQL and real SQLite files."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from pathlib import Path

import pytest
from pg import sql
from support import toml_config
from test_preflight import levels, postgres_config, preflight

from consumer.config import PostgresSinkSettings
from consumer.errors import ConfigError
from consumer.sinks.postgres import PostgresSink
from consumer.sinks.sqlite import SqliteSink, StoreTableSink
from consumer.state import SqliteStore

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")

# The columns each sink creates (as in tests/sinks/test_*_sink_shapes.py).
PG_OURS = (
    'unique_event_id TEXT PRIMARY KEY, stream TEXT NOT NULL, "offset" TEXT NOT NULL, '
    "event_name TEXT, module_name TEXT, primary_key TEXT, hotel_id TEXT, event_timestamp TEXT, "
    "detail JSONB NOT NULL, resource JSONB, written_at DOUBLE PRECISION NOT NULL"
)
SQLITE_OURS = (
    "unique_event_id TEXT PRIMARY KEY, stream TEXT NOT NULL, offset TEXT NOT NULL, "
    "event_name TEXT, module_name TEXT, primary_key TEXT, hotel_id TEXT, event_timestamp TEXT, "
    "detail TEXT NOT NULL, resource TEXT, written_at REAL NOT NULL"
)


def sink_line(out: str) -> str:
    return next(line for line in out.splitlines() if line[19:37].strip() == "sink")


@pytest.mark.parametrize("state", ["sqlite", "postgres, the same dsn"])
async def test_a_postgres_table_run_would_refuse_fails_preflight(
    sandbox_factory, tmp_path: Path, postgres_dsn, state: str
):
    """``offset bigint``: ``run`` stops at open (exit 78); preflight says so, in the same
    words, and leaves the table as it was (no index added). With the state store on the same
    DSN the sink's rows would go into the store's transaction: the same check."""
    gw = await sandbox_factory(backlog=5)
    table = f"t_{uuid.uuid4().hex[:16]}"
    columns = PG_OURS.replace('"offset" TEXT', '"offset" BIGINT')
    await sql(postgres_dsn, "execute", f'CREATE TABLE "{table}" ({columns})')
    sink = f'[sink]\ntype = "postgres"\ndsn = "{postgres_dsn}"\ntable = "{table}"\n'
    if state == "sqlite":
        config = toml_config(tmp_path, gw.url, sink=sink)
    else:
        schema = f"s_{uuid.uuid4().hex[:12]}"
        config = postgres_config(tmp_path, gw.url, postgres_dsn, schema, sink=sink)
    refused = PostgresSink(
        PostgresSinkSettings(type="postgres", dsn=postgres_dsn, table=table)  # type: ignore[arg-type]
    )
    with pytest.raises(ConfigError) as info:
        await refused.open(None)
    await refused.close()
    done = await asyncio.to_thread(preflight, config)
    assert done.returncode == 1, done.stdout + done.stderr
    assert levels(done.stdout)["sink"] == "FAIL", done.stdout
    assert "column offset is bigint, not text" in str(info.value)
    assert sink_line(done.stdout).endswith(f"postgres: {info.value}"), done.stdout
    indexes = await sql(
        postgres_dsn, "fetchval", "SELECT count(*) FROM pg_indexes WHERE tablename = $1", table
    )
    assert indexes == 1  # its primary key's only: the sink's own index was never created


def sqlite_table(db: Path, ddl: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as c:  # closed: the -wal checkpointed
        c.executescript(ddl)


@pytest.mark.parametrize(
    ("placement", "ddl", "problem"),
    [
        (
            "own file",
            f"CREATE TABLE opera_events ({SQLITE_OURS.replace('offset TEXT', 'offset INTEGER')})",
            "column offset is declared INTEGER (INTEGER affinity",
        ),
        (
            "own file",
            f"CREATE TABLE opera_events ({SQLITE_OURS}, tenant TEXT NOT NULL)",
            "tenant is NOT NULL without a default",
        ),
        (
            "state store",
            "CREATE TABLE opera_events "
            f"({SQLITE_OURS.replace('hotel_id TEXT', 'hotel_id NUMERIC')})",
            "column hotel_id is declared NUMERIC (NUMERIC affinity",
        ),
        ("state store, its own table's name", "", "is a table of the state store"),
        (
            "state store",
            f"CREATE TABLE opera_events ({SQLITE_OURS}, CHECK (hotel_id <> 'X'))",
            "has a CHECK constraint, which may refuse an event's row",
        ),
        (
            "state store",
            f"CREATE TABLE opera_events ({SQLITE_OURS}, "
            "hotel TEXT GENERATED ALWAYS AS (hotel_id) VIRTUAL NOT NULL)",
            "has generated column hotel, which may refuse an event's row",
        ),
    ],
)
async def test_a_sqlite_table_run_would_refuse_fails_preflight(
    sandbox_factory, tmp_path: Path, placement: str, ddl: str, problem: str
):
    """Was: the sqlite sink's line looked at the file only (writable, or creatable): PASS, and
    ``run`` then stopped at open with exit 78 naming sink.table."""
    gw = await sandbox_factory(backlog=5)
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    table = "checkpoints" if placement.endswith("name") else "opera_events"
    if placement == "own file":
        db = tmp_path / "sink.db"
        config_sink = f'[sink]\ntype = "sqlite"\npath = "{db}"\n'
        refused: SqliteSink | StoreTableSink = SqliteSink(db, table)
    else:
        db = state
        config_sink = f'[sink]\ntype = "sqlite"\ntable = "{table}"\n'
        refused = StoreTableSink(db, table)
    if ddl:
        sqlite_table(db, ddl)
    before = db.read_bytes()
    done = await asyncio.to_thread(preflight, toml_config(tmp_path, gw.url, sink=config_sink))
    assert done.returncode == 1, done.stdout + done.stderr
    assert levels(done.stdout)["sink"] == "FAIL", done.stdout
    assert db.read_bytes() == before  # read only: not even the sink's index
    assert not db.with_name(db.name + "-wal").exists()
    with pytest.raises(ConfigError) as info:  # what run's open says
        await refused.open(None)
    await refused.close()
    assert problem in str(info.value)
    assert sink_line(done.stdout).endswith(f"sqlite: {info.value}"), done.stdout


async def test_a_sqlite_table_run_takes_passes_preflight(sandbox_factory, tmp_path: Path):
    """Columns of TEXT affinity under other names (VARCHAR), extra columns SQLite fills."""
    gw = await sandbox_factory(backlog=5)
    db = tmp_path / "sink.db"
    sqlite_table(
        db,
        f"CREATE TABLE opera_events ({SQLITE_OURS.replace('offset TEXT', 'offset VARCHAR(40)')}, "
        "tenant TEXT NOT NULL DEFAULT 'hq')",
    )
    config = toml_config(tmp_path, gw.url, sink=f'[sink]\ntype = "sqlite"\npath = "{db}"\n')
    done = await asyncio.to_thread(preflight, config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert levels(done.stdout)["sink"] == "PASS", done.stdout
