"""The sqlite sink in a file of its own and a row its table refuses by other means than a
constraint: a generated column's or a trigger's expression failing on the row (``malformed
JSON``, a plain SQLITE_ERROR raised as an OperationalError, as a locked file's), or a trigger's
``RAISE``. That event alone is dead-lettered, naming the cause; what every event meets (the
table dropped or altered, a trigger writing to a table that is gone: the upsert no longer
compiles) is retried, nothing dead-lettered, until the operator fixes it. Real SQLite files,
the sandbox gateway, the daemon in-process (helpers: test_sink_refusals.py).

Was: every OperationalError was taken for a busy, full or failing file and retried for ever,
the stream stuck on that event; and a trigger writing to a table created meanwhile kept
failing ("no such table") on the sink's connection, which had not read the new schema."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from log_capture import captured_logs, records
from operator_support import query, settled
from sink_tables import LITE
from support import committed, make_settings, newest_offset, running, truth_ids, wait_until
from test_postgres_sink import event
from test_sink_refusals import (
    EVENTS,
    FAST_RETRIES,
    RETRYING,
    assert_refused_alone,
    dead_letters,
    retried,
    sqlite_ddl,
)

from consumer.errors import TransientSinkError
from consumer.sinks.sqlite import SqliteSink

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")


@pytest.mark.parametrize(
    ("where", "words"),
    [
        ("generated column", ["malformed JSON"]),
        ("trigger expression", ["malformed JSON"]),
        ("trigger RAISE", ["not that one"]),
    ],
)
async def test_a_row_the_sqlite_tables_expression_or_trigger_refuses_dead_letters_that_event(
    sandbox_factory, tmp_path: Path, where: str, words: list[str]
):
    """In a file of its own: a STORED generated column's ``json_extract`` of text that is not
    JSON, or a trigger's, on one event's row (a plain SQLITE_ERROR, as an OperationalError), or
    a trigger's ``RAISE(ABORT, …)`` (an IntegrityError: was already the event's). Was: the
    expression's error was taken for a locked or full file and retried for ever."""
    gw = await sandbox_factory(backlog=EVENTS)
    ids = truth_ids(gw.events("DEMO"))
    bad = ids[7]
    table = f"t_{uuid.uuid4().hex[:12]}"

    def not_json(row: str) -> str:  # the event's detail, but not JSON for the bad one
        return f"CASE WHEN {row}unique_event_id = '{bad}' THEN 'not json' ELSE {row}detail END"

    if where == "generated column":
        extra = f"x TEXT GENERATED ALWAYS AS (json_extract({not_json('')}, '$[0]')) STORED"
        ddl = f"CREATE TABLE {table} ({LITE}, {extra})"
    else:
        ddl = f"CREATE TABLE {table} ({LITE}); CREATE TRIGGER audit BEFORE INSERT ON {table} "
        if where == "trigger expression":
            ddl += f"BEGIN SELECT json_extract({not_json('NEW.')}, '$[0]'); END"
        else:
            ddl += f"WHEN NEW.unique_event_id = '{bad}' "
            ddl += "BEGIN SELECT RAISE(ABORT, 'not that one'); END"
    db = tmp_path / "sink.db"
    sqlite_ddl(db, ddl)
    sink = {"type": "sqlite", "table": table, "path": db}
    settings = make_settings(tmp_path, gw.url, sink=sink)
    with captured_logs() as buffer:
        async with running(settings) as daemon:
            await wait_until(settled(daemon, "main", EVENTS))
            pipeline = daemon.pipelines["main"]
            assert (pipeline.delivered, pipeline.dead_lettered) == (EVENTS - 1, 1)
            await wait_until(lambda: committed(tmp_path / "state.db", newest_offset(gw)))
    assert daemon.exit_code == 0
    written = [r[0] for r in query(db, f"SELECT unique_event_id FROM {table}")]
    letters = await dead_letters(None, tmp_path)
    assert_refused_alone(written, letters, ids, bad, table, *words)
    assert not [e for e in records(buffer) if e["event"] == RETRYING]


async def test_a_sqlite_table_every_write_fails_on_is_retried_until_fixed(
    sandbox_factory, tmp_path: Path
):
    """A trigger that writes to a table that is not there ("no such table": the upsert no
    longer compiles) fails every event the same way, a plain SQLITE_ERROR too: retried,
    nothing dead-lettered, until the operator creates the table; then every event is written."""
    gw = await sandbox_factory(backlog=EVENTS)
    ids = truth_ids(gw.events("DEMO"))
    table = f"t_{uuid.uuid4().hex[:12]}"
    db = tmp_path / "sink.db"
    sqlite_ddl(
        db,
        f"CREATE TABLE {table} ({LITE}); CREATE TRIGGER audit AFTER INSERT ON {table} "
        "BEGIN INSERT INTO audit_log VALUES (NEW.unique_event_id); END",
    )
    sink = {"type": "sqlite", "table": table, "path": db}
    settings = make_settings(tmp_path, gw.url, sink=sink, pipeline=FAST_RETRIES)
    with captured_logs() as buffer:
        async with running(settings) as daemon:
            pipeline = daemon.pipelines["main"]
            await wait_until(retried(buffer, 3))
            assert (pipeline.delivered, pipeline.dead_lettered) == (0, 0)
            sqlite_ddl(db, "CREATE TABLE audit_log (id TEXT)")
            await wait_until(settled(daemon, "main", EVENTS))
            assert (pipeline.delivered, pipeline.dead_lettered) == (EVENTS, 0)
            await wait_until(lambda: committed(tmp_path / "state.db", newest_offset(gw)))
    assert daemon.exit_code == 0
    assert sorted(r[0] for r in query(db, f"SELECT unique_event_id FROM {table}")) == sorted(ids)
    assert sorted(r[0] for r in query(db, "SELECT id FROM audit_log")) == sorted(ids)
    assert await dead_letters(None, tmp_path) == []
    retries = [e for e in records(buffer) if e["event"] == RETRYING]
    assert "no such table: main.audit_log" in retries[0]["error"], retries[0]


@pytest.mark.parametrize("change", ["dropped", "a column renamed"])
async def test_a_sqlite_table_dropped_or_altered_under_the_sink_is_transient(
    tmp_path: Path, change: str
):
    """The table dropped or altered while the sink runs: every event's, a TransientSinkError
    (retried), not the event's; written again once the table is back."""
    db, table = tmp_path / "sink.db", "opera_events"
    sink = SqliteSink(db, table)
    await sink.open(None)
    try:
        await sink.write("main", [event(1)])
        if change == "dropped":
            sqlite_ddl(db, f"DROP TABLE {table}")
            fix = f"CREATE TABLE {table} ({LITE})"
        else:
            sqlite_ddl(db, f"ALTER TABLE {table} RENAME COLUMN hotel_id TO hotel")
            fix = f"ALTER TABLE {table} RENAME COLUMN hotel TO hotel_id"
        with pytest.raises(TransientSinkError, match=table):
            await sink.write("main", [event(2)])
        sqlite_ddl(db, fix)
        await sink.write("main", [event(2)])
    finally:
        await sink.close()
    ids = {r[0] for r in query(db, f"SELECT unique_event_id FROM {table}")}
    assert ids == ({"u1", "u2"} if change != "dropped" else {"u2"})
