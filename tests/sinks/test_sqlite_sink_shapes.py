"""The SQLite sink and an existing table of another shape, in a file of its own or in the state
store's (real SQLite files): ``CREATE TABLE IF NOT EXISTS`` keeps whatever table has that name,
so open checks it as the PostgreSQL sink does, and a mistake that concerns every event is a
``ConfigError`` naming the key (exit 78 before consuming)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from operator_support import query, write_config
from support import spawn_daemon, tail, wait_exit
from test_postgres_sink import event

from consumer.errors import ConfigError
from consumer.sinks.sqlite import SqliteSink, StoreTableSink
from consumer.state import SqliteStore

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")

OURS = (
    "unique_event_id TEXT PRIMARY KEY, stream TEXT NOT NULL, offset TEXT NOT NULL, "
    "event_name TEXT, module_name TEXT, primary_key TEXT, hotel_id TEXT, event_timestamp TEXT, "
    "detail TEXT NOT NULL, resource TEXT, written_at REAL NOT NULL"
)


def create(db: Path, ddl: str) -> None:
    with sqlite3.connect(db) as c:
        c.executescript(ddl)


@pytest.mark.parametrize(
    ("shape", "ddl", "problem"),
    [
        (
            "our columns, no unique key",
            f"CREATE TABLE opera_events ({OURS.replace(' PRIMARY KEY', '')})",
            "no unique key on unique_event_id alone",
        ),
        (
            "a unique key with another column",
            f"CREATE TABLE opera_events ({OURS.replace(' PRIMARY KEY', '')}, "
            "UNIQUE (unique_event_id, stream))",
            "no unique key on unique_event_id alone",
        ),
        (
            "a partial unique index only",
            f"CREATE TABLE opera_events ({OURS.replace(' PRIMARY KEY', '')}); "
            "CREATE UNIQUE INDEX u ON opera_events (unique_event_id) WHERE stream = 'main'",
            "no unique key on unique_event_id alone",
        ),
        (
            "our columns but one",
            f"CREATE TABLE opera_events ({OURS.replace('module_name TEXT, ', '')})",
            "no column module_name",
        ),
        (
            "another application's table",
            "CREATE TABLE opera_events (id INTEGER PRIMARY KEY, body TEXT)",
            "no column unique_event_id",
        ),
        (
            "our table plus a NOT NULL column",
            f"CREATE TABLE opera_events ({OURS}, tenant TEXT NOT NULL)",
            "tenant is NOT NULL without a default",
        ),
        (
            "hotel_id NOT NULL",
            "CREATE TABLE opera_events "
            f"({OURS.replace('hotel_id TEXT', 'hotel_id TEXT NOT NULL')})",
            "hotel_id is NOT NULL (an event may have none)",
        ),
        (
            "a view of that name",
            "CREATE TABLE t (x); CREATE VIEW opera_events AS SELECT x FROM t",
            "no column unique_event_id",
        ),
    ],
)
async def test_a_table_of_another_shape_in_a_file_of_its_own_is_a_config_error(
    tmp_path: Path, shape, ddl, problem
):
    """Was: open checked nothing. A table without our columns raised a bare
    sqlite3.OperationalError (the daemon: exit 70, "unexpected internal error", a traceback); one
    without a unique key on unique_event_id made every write a TransientSinkError retried for
    ever (the stream stalled); one with an extra NOT NULL column dead-lettered every event."""
    db = tmp_path / "sink.db"
    create(db, ddl)
    sink = SqliteSink(db, "opera_events")
    with pytest.raises(ConfigError) as info:
        await sink.open(None)
    await sink.close()
    message = str(info.value)
    assert message.startswith("sink.table: "), shape
    assert problem in message, shape
    assert "set sink.table to another name" in message, shape


async def test_extra_columns_sqlite_fills_are_accepted(tmp_path: Path):
    """A rowid of the operator's, a NOT NULL column with a default, a nullable one, and a
    unique constraint on unique_event_id instead of the primary key: rows are written."""
    db = tmp_path / "sink.db"
    create(
        db,
        f"CREATE TABLE opera_events (id INTEGER PRIMARY KEY, "
        f"{OURS.replace(' PRIMARY KEY', ' UNIQUE')}, tenant TEXT NOT NULL DEFAULT 'hq', note TEXT)",
    )
    sink = SqliteSink(db, "opera_events")
    await sink.open(None)
    try:
        await sink.write("main", [event(1), event(2)])
        await sink.write("main", [event(1)])  # the upsert: the same row
    finally:
        await sink.close()
    got = query(
        db, "SELECT id, unique_event_id, tenant, note, detail FROM opera_events ORDER BY id"
    )
    assert [r[:4] for r in got] == [(1, "u1", "hq", None), (2, "u2", "hq", None)]
    assert json.loads(got[0][4])[0]["elementName"] == "Name"


async def test_a_file_that_is_not_a_database_is_a_config_error(tmp_path: Path):
    """Was: a bare sqlite3.DatabaseError at open (exit 70 with a traceback)."""
    db = tmp_path / "sink.db"
    db.write_bytes(b"not an SQLite file, but some text of another program\n" * 100)
    sink = SqliteSink(db, "opera_events")
    with pytest.raises(ConfigError, match=r"^sink\.path: .*sink\.db cannot be used as an SQLite"):
        await sink.open(None)
    await sink.close()


async def test_a_foreign_table_in_a_file_of_its_own_exits_78_not_70(sandbox_factory, tmp_path):
    """The daemon's view: was exit 70 with a traceback (a bug: restart it) where an operator
    must act (78, RestartPreventExitStatus), before any event is consumed."""
    gw = await sandbox_factory(backlog=5)
    db = tmp_path / "sink.db"
    create(db, "CREATE TABLE opera_events (id INTEGER PRIMARY KEY, body TEXT)")
    config = write_config(tmp_path, gw.url, sink={"type": "sqlite", "path": str(db)})
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(config, log)
    try:
        code = await wait_exit(proc, 30)
    finally:
        proc.kill()
    assert code == 78, f"exit {code}: {tail(log, 600)}"
    assert "sink.table" in tail(log, 3000)
    assert query(db, "SELECT COUNT(*) FROM opera_events") == [(0,)]


@pytest.fixture
async def state(tmp_path: Path) -> Path:
    path = tmp_path / "state.db"
    store = await SqliteStore.open(path)
    await store.close()
    return path


@pytest.mark.parametrize(
    "table",
    [
        "checkpoints",
        "processed_events",
        "Dead_Letters",
        "sink_state",
        "start_overrides",
        "commit_marks",
    ],
)
async def test_the_state_stores_own_tables_are_refused(state: Path, table: str):
    """Was: a sqlite sink in the state store's file with ``table = "checkpoints"`` (or any of
    the store's tables) kept the store's table and raised a bare sqlite3.OperationalError at
    open, or would have written event rows beside the store's own."""
    before = query(state, "SELECT name, sql FROM sqlite_master ORDER BY name")
    sink = StoreTableSink(state, table)
    with pytest.raises(ConfigError, match=r"^sink\.table: .* is a table of the state store"):
        await sink.open(None)
    assert query(state, "SELECT name, sql FROM sqlite_master ORDER BY name") == before


async def test_a_foreign_table_in_the_state_store_is_a_config_error(state: Path):
    create(state, f"CREATE TABLE opera_events ({OURS}, tenant TEXT NOT NULL)")
    sink = StoreTableSink(state, "opera_events")
    with pytest.raises(ConfigError, match=r"^sink\.table: .*tenant is NOT NULL without a default"):
        await sink.open(None)
    # Ours is created there, with its index, and opened again.
    sink = StoreTableSink(state, "guest_events")
    await sink.open(None)
    await sink.open(None)
    names = {r[0] for r in query(state, "SELECT name FROM sqlite_master")}
    assert {"guest_events", "guest_events_key"} <= names


@pytest.mark.parametrize(
    ("column", "declared", "affinity"),
    [
        ("offset", "INTEGER", "INTEGER"),
        ("offset", "BIGINT", "INTEGER"),
        ("offset", "NUMERIC", "NUMERIC"),
        ("offset", "STRING", "NUMERIC"),  # not a type SQLite knows: NUMERIC, not TEXT
        ("offset", "DECIMAL(20)", "NUMERIC"),
        ("offset", "REAL", "REAL"),
        ("offset", "DOUBLE PRECISION", "REAL"),
        ("unique_event_id", "BIGINT", "INTEGER"),  # "INTEGER PRIMARY KEY": the rowid, no key
        ("hotel_id", "NUMERIC", "NUMERIC"),
        ("primary_key", "INT", "INTEGER"),
    ],
)
@pytest.mark.parametrize("placement", ["own file", "state store"])
async def test_a_text_column_sqlite_would_turn_into_a_number_is_refused(
    tmp_path: Path, column: str, declared: str, affinity: str, placement: str
):
    """Was: the check looked at the columns' names, not their types. With ``offset INTEGER``
    (or NUMERIC, REAL affinity) SQLite's type affinity stored the opaque offset "000001" as
    the number 1 (and an id "0042" as 42), silently: every row's offset corrupted."""
    db = tmp_path / ("sink.db" if placement == "own file" else "state.db")
    if placement == "state store":
        await (await SqliteStore.open(db)).close()
    ours = OURS.replace(f"{column} TEXT", f"{column} {declared}", 1)
    assert ours != OURS
    create(db, f"CREATE TABLE opera_events ({ours})")
    sink = (
        SqliteSink(db, "opera_events")
        if placement == "own file"
        else StoreTableSink(db, "opera_events")
    )
    try:
        await sink.open(None)
    except ConfigError as exc:
        message = str(exc)
    else:  # the old code: what SQLite made of the event's text
        ev = event(1)
        ev = ev._replace(unique_event_id="0042", hotel_id="007", primary_key="0815")
        await sink.write("main", [ev])
        if isinstance(sink, StoreTableSink):
            staged = sink.staged()
            assert staged is not None
            with sqlite3.connect(db) as c:
                c.executemany(staged.statement, staged.rows)
        await sink.close()
        stored = query(db, f"SELECT {column}, typeof({column}) FROM opera_events")
        pytest.fail(f"opened; {column} stored as {stored!r}")
    await sink.close()
    assert message.startswith("sink.table: "), message
    assert f"column {column} is declared {declared} ({affinity} affinity" in message
    assert "it must be TEXT" in message
    assert query(db, "SELECT COUNT(*) FROM opera_events") == [(0,)]


@pytest.mark.parametrize(
    "declared", ["VARCHAR(64)", "CHARACTER VARYING(40)", "CLOB", "TEXT COLLATE NOCASE", "BLOB", ""]
)
async def test_text_columns_of_a_type_that_keeps_text_are_accepted(tmp_path: Path, declared):
    """TEXT affinity (any type naming CHAR, CLOB or TEXT), BLOB or no type: text stays text,
    byte for byte, however much it looks like a number."""
    db = tmp_path / "sink.db"
    ours = OURS
    for column in ("unique_event_id", "offset", "hotel_id", "primary_key"):
        ours = ours.replace(f"{column} TEXT", f"{column} {declared}", 1)
    create(db, f"CREATE TABLE opera_events ({ours})")
    sink = SqliteSink(db, "opera_events")
    await sink.open(None)
    try:
        ev = event(1)._replace(unique_event_id="0042", hotel_id="007", primary_key="1e3")
        await sink.write("main", [ev])
    finally:
        await sink.close()
    assert query(
        db,
        "SELECT unique_event_id, offset, hotel_id, primary_key, typeof(offset) FROM opera_events",
    ) == [("0042", "000001", "007", "1e3", "text")]
