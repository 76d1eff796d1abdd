"""The PostgreSQL sink and an existing table of another shape, against a real server (fixtures in
tests/pg.py): a mistake that concerns every event is refused at open (``ConfigError`` naming
``sink.table``: exit 78 before consuming), never found write after write."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
from log_capture import captured_logs, records
from pg import sql
from test_postgres_sink import event, rows, settings

from consumer.errors import ConfigError, PermanentSinkError, TransientSinkError
from consumer.sinks.postgres import PostgresSink, shape_problems

# Our columns, as the sink creates them.
OURS = (
    'unique_event_id TEXT PRIMARY KEY, stream TEXT NOT NULL, "offset" TEXT NOT NULL, '
    "event_name TEXT, module_name TEXT, primary_key TEXT, hotel_id TEXT, event_timestamp TEXT, "
    "detail JSONB NOT NULL, resource JSONB, written_at DOUBLE PRECISION NOT NULL"
)


@pytest.fixture
def table() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


async def create(dsn: str, table: str, columns: str) -> None:
    await sql(dsn, "execute", f'CREATE TABLE "{table}" ({columns})')


@pytest.mark.parametrize("in_state_transaction", [False, True])
async def test_an_extra_not_null_column_without_a_default_is_refused_at_open(
    postgres_dsn, table, in_state_transaction
):
    """Was: open accepted our columns plus an operator's ``tenant TEXT NOT NULL``; every write
    then failed with 23502 (class 23), taken for the event's own fault: every event of the
    stream dead-lettered while the checkpoint moved on. In the state transaction every commit
    failed, and the exit 78 blamed the state store, not sink.table."""
    await create(postgres_dsn, table, f"{OURS}, tenant TEXT NOT NULL")
    sink = PostgresSink(settings(postgres_dsn, table), in_state_transaction=in_state_transaction)
    with pytest.raises(ConfigError) as info:
        await sink.open(None)
    await sink.close()
    message = str(info.value)
    assert message.startswith("sink.table: ")
    assert "tenant is NOT NULL without a default" in message
    assert "use another table name" in message


async def test_extra_columns_the_server_fills_are_accepted(postgres_dsn, table):
    """A NOT NULL column with a default or an identity, and a nullable one: the server fills
    them, so the sink writes its rows."""
    await create(
        postgres_dsn,
        table,
        f"{OURS}, tenant TEXT NOT NULL DEFAULT 'hq', seq BIGINT GENERATED ALWAYS AS IDENTITY, "
        "note TEXT",
    )
    sink = PostgresSink(settings(postgres_dsn, table))
    await sink.open(None)
    try:
        await sink.write("main", [event(1)])
    finally:
        await sink.close()
    row = (await rows(postgres_dsn, table))["u1"]
    assert (row["tenant"], row["seq"], row["note"]) == ("hq", 1, None)


@pytest.mark.parametrize(
    ("shape", "columns", "problem"),
    [
        (
            "written_at timestamptz",
            OURS.replace("written_at DOUBLE PRECISION", "written_at TIMESTAMPTZ"),
            "written_at is timestamp with time zone, not double precision",
        ),
        ("offset bigint", OURS.replace('"offset" TEXT', '"offset" BIGINT'), "offset is bigint"),
        ("detail json", OURS.replace("detail JSONB", "detail JSON"), "detail is json, not jsonb"),
        (
            "hotel_id NOT NULL",
            OURS.replace("hotel_id TEXT", "hotel_id TEXT NOT NULL"),
            "hotel_id is NOT NULL (an event may have none)",
        ),
        (
            "deferrable unique key",
            OURS.replace("TEXT PRIMARY KEY", "TEXT") + ", UNIQUE (unique_event_id) DEFERRABLE",
            "not DEFERRABLE",
        ),
    ],
)
async def test_a_table_the_upsert_cannot_use_is_refused_at_open(
    postgres_dsn, table, shape, columns, problem
):
    """Was: open checked the column names and that a unique index exists; a column of another
    type (42804) or a DEFERRABLE key, which ON CONFLICT cannot use (55000), then failed every
    write as a TransientSinkError, retried for ever with the stream stalled."""
    await create(postgres_dsn, table, columns)
    sink = PostgresSink(settings(postgres_dsn, table))
    with pytest.raises(ConfigError) as info:
        await sink.open(None)
    await sink.close()
    assert str(info.value).startswith("sink.table: "), shape
    assert problem in str(info.value), shape


async def test_an_invalid_unique_index_is_refused_at_open(postgres_dsn, table):
    """A unique index left invalid (a CREATE UNIQUE INDEX CONCURRENTLY that failed): ON CONFLICT
    cannot infer it."""
    await create(postgres_dsn, table, OURS.replace("TEXT PRIMARY KEY", "TEXT"))
    index = f"{table}_u"
    await sql(
        postgres_dsn,
        "execute",
        f"""INSERT INTO "{table}" (unique_event_id, stream, "offset", detail, written_at)
        VALUES ('u1', 'main', '1', '[]', 0), ('u1', 'main', '2', '[]', 0)""",
    )
    with pytest.raises(asyncpg.UniqueViolationError):  # leaves the index behind, invalid
        await sql(
            postgres_dsn,
            "execute",
            f'CREATE UNIQUE INDEX CONCURRENTLY "{index}" ON "{table}" (unique_event_id)',
        )
    await sql(postgres_dsn, "execute", f"""DELETE FROM "{table}" WHERE "offset" = '2'""")
    sink = PostgresSink(settings(postgres_dsn, table))
    with pytest.raises(ConfigError, match=r"^sink\.table: .*valid and not DEFERRABLE"):
        await sink.open(None)
    await sink.close()


async def test_a_not_null_column_added_after_open_is_retried_not_dead_lettered(postgres_dsn, table):
    """Was: 23502 is class 23, so a column an operator adds (NOT NULL, no default) while the
    daemon runs made every event the event's fault (PermanentSinkError: dead-lettered). A NULL
    in a column the sink never fills concerns every event: retried while it is fixed. The
    server's DETAIL ("Failing row contains (…)": the event's data) is in no error or log."""
    sink = PostgresSink(settings(postgres_dsn, table))
    await sink.open(None)
    try:
        await sql(postgres_dsn, "execute", f'ALTER TABLE "{table}" ADD COLUMN tenant TEXT NOT NULL')
        with captured_logs() as buffer, pytest.raises(TransientSinkError, match="tenant") as info:
            await sink.write("main", [event(1)])
        logs = records(buffer)
        assert "Failing row" not in str(info.value) and "Zo" not in str(info.value)
        assert logs and "Failing row" not in repr(logs) and "Zo" not in repr(logs)
        await sql(
            postgres_dsn, "execute", f'ALTER TABLE "{table}" ALTER COLUMN event_name SET NOT NULL'
        )
        await sql(postgres_dsn, "execute", f'ALTER TABLE "{table}" DROP COLUMN tenant')
        with pytest.raises(TransientSinkError, match="event_name"):
            await sink.write("main", [event(2, eventName=None)])
        await sql(
            postgres_dsn, "execute", f'ALTER TABLE "{table}" ALTER COLUMN event_name DROP NOT NULL'
        )
        await sink.write("main", [event(1)])  # fixed: the retry goes through
    finally:
        await sink.close()
    assert set(await rows(postgres_dsn, table)) == {"u1"}


async def test_a_generated_not_null_column_added_after_open_dead_letters_that_event(
    postgres_dsn, table
):
    """A generated column computes from the row: NULL in one (an event without a hotelId) is
    that event's, not the table's: PermanentSinkError naming the column, without the server's
    DETAIL (the row). Was: taken for a column the sink never fills, retried for ever (the
    stream stuck on that event), the DETAIL logged at each try."""
    sink = PostgresSink(settings(postgres_dsn, table))
    await sink.open(None)
    try:
        await sql(
            postgres_dsn,
            "execute",
            f'ALTER TABLE "{table}" ADD COLUMN hotel TEXT '
            "GENERATED ALWAYS AS (hotel_id) STORED NOT NULL",
        )
        await sink.write("main", [event(1)])
        with captured_logs() as buffer, pytest.raises(PermanentSinkError) as info:
            await sink.write("main", [event(2, hotelId=None)])
        await sink.write("main", [event(3)])
    finally:
        await sink.close()
    message = str(info.value)
    assert info.value.unique_event_id == "u2"
    assert "generated column 'hotel' is NOT NULL" in message and "dlq replay" in message
    logs = buffer.getvalue()
    assert "Failing row" not in message + logs and "Zo" not in message + logs
    assert set(await rows(postgres_dsn, table)) == {"u1", "u3"}


def test_shape_problems_name_each_column() -> None:
    ours = [
        ("unique_event_id", "text", True, False),
        ("stream", "text", True, False),
        ("offset", "text", True, False),
        ("event_name", "text", False, False),
        ("module_name", "text", False, False),
        ("primary_key", "text", False, False),
        ("hotel_id", "text", False, False),
        ("event_timestamp", "text", False, False),
        ("detail", "jsonb", True, False),
        ("resource", "jsonb", False, False),
        ("written_at", "double precision", True, False),
    ]
    assert shape_problems(ours) == []
    assert shape_problems([*ours, ("id", "bigint", True, True), ("x", "text", False, False)]) == []
    assert shape_problems([*ours[1:], ("tenant", "text", True, False)]) == [
        "no column unique_event_id",
        "column tenant is NOT NULL without a default (the sink never sets it)",
    ]
