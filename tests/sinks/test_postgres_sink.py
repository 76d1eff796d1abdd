"""The PostgreSQL sink against a real PostgreSQL server on loopback (fixtures in tests/pg.py)."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from log_capture import log_records
from pg import PostgresServer, sql
from pydantic import ValidationError
from sink_tables import PG
from support import as_received, make_settings, running, truth_ids, wait_until

from consumer.config import PostgresSinkSettings
from consumer.core.events import Event
from consumer.errors import ConfigError, PermanentSinkError, TransientSinkError
from consumer.sinks.postgres import PostgresSink
from consumer.sinks.rows import COLUMNS
from consumer.state import SqliteStore as Store


def event(i: int, *, detail: Any = None, resource: Any = None, **header: Any) -> Event:
    raw: dict[str, Any] = {
        "metadata": {"offset": f"{i:06d}", "uniqueEventId": f"u{i}"},
        "eventName": "UPDATE RESERVATION",
        "moduleName": "Reservation",
        "primaryKey": f"pk{i % 7}",
        "hotelId": "HOTEL1",
        "timestamp": "2024-05-01 10:00:00.000",
        "detail": [{"elementName": "Name", "newValue": f"Zoë «{i}»", "oldValue": None}]
        if detail is None
        else detail,
        **header,
    }
    return Event(
        f"{i:06d}",
        f"u{i}",
        raw["eventName"],
        raw["moduleName"],
        raw["primaryKey"],
        raw["hotelId"],
        raw["timestamp"],
        raw,
        resource=resource,  # by keyword: the positional slot after raw is now ``frame``
        fetched=resource is not None,
    )


def settings(dsn: str, table: str, **kw: Any) -> PostgresSinkSettings:
    return PostgresSinkSettings(type="postgres", dsn=dsn, table=table, timeout_s=5.0, **kw)  # type: ignore[arg-type]


async def fetch(dsn: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    return list(await sql(dsn, "fetch", statement, *args))


async def rows(dsn: str, table: str) -> dict[str, asyncpg.Record]:
    return {r["unique_event_id"]: r for r in await fetch(dsn, f'SELECT * FROM "{table}"')}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


@pytest.fixture
def table() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


@pytest.fixture
async def sink(postgres_dsn: str, table: str) -> AsyncIterator[PostgresSink]:
    s = PostgresSink(settings(postgres_dsn, table))
    await s.open(None)
    try:
        yield s
    finally:
        await s.close()


async def test_open_creates_the_table_with_its_index(sink: PostgresSink, postgres_dsn, table):
    cols = await fetch(
        postgres_dsn,
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_name = $1 ORDER BY ordinal_position",
        table,
    )
    assert [(c["column_name"], c["data_type"], c["is_nullable"]) for c in cols] == [
        ("unique_event_id", "text", "NO"),
        ("stream", "text", "NO"),
        ("offset", "text", "NO"),
        ("event_name", "text", "YES"),
        ("module_name", "text", "YES"),
        ("primary_key", "text", "YES"),
        ("hotel_id", "text", "YES"),
        ("event_timestamp", "text", "YES"),
        ("detail", "jsonb", "NO"),
        ("resource", "jsonb", "YES"),
        ("written_at", "double precision", "NO"),
    ]
    assert [c["column_name"] for c in cols] == list(COLUMNS)
    indexes = {
        r["indexdef"]
        for r in await fetch(
            postgres_dsn, "SELECT indexdef FROM pg_indexes WHERE tablename = $1", table
        )
    }
    assert any("UNIQUE" in d and "(unique_event_id)" in d for d in indexes)  # the primary key
    assert any("(stream, primary_key)" in d for d in indexes)
    # Opening again (a restart) keeps the table and its rows.
    await sink.write("main", [event(1)])
    again = PostgresSink(settings(postgres_dsn, table))
    await again.open(None)
    await again.close()
    assert set(await rows(postgres_dsn, table)) == {"u1"}


@pytest.mark.parametrize("kept_as", ["parsed", "text"])
async def test_rows_hold_every_column(sink: PostgresSink, postgres_dsn, table, kept_as):
    plain = event(1)
    fetched = event(2, resource={"reservation": {"id": 42, "guest": "Zoë"}})
    bare = Event("000003", "u3", "NEW PROFILE", "Profile", "p3", None, None, {"metadata": {}})
    if kept_as == "text":  # as the daemon reads them: the header typed, the rest as text
        plain, fetched = (
            as_received(plain.raw),
            as_received(fetched.raw)._replace(resource=fetched.resource, fetched=True),
        )
        bare = as_received({"metadata": {"offset": "000003", "uniqueEventId": "u3"}})
        bare = bare._replace(event_name="NEW PROFILE", module_name="Profile", primary_key="p3")
    before = time.time()
    await sink.write("main", [plain, fetched])
    await sink.write("other", [bare])
    after = time.time()
    assert sink.position() is None
    await sink.sync(None)
    got = await rows(postgres_dsn, table)
    assert set(got) == {"u1", "u2", "u3"}
    for stream, ev in (("main", plain), ("main", fetched), ("other", bare)):
        r = got[ev.unique_event_id]
        assert r["stream"] == stream
        assert r["offset"] == ev.offset
        assert r["event_name"] == ev.event_name
        assert r["module_name"] == ev.module_name
        assert r["primary_key"] == ev.primary_key
        assert r["hotel_id"] == ev.hotel_id
        assert r["event_timestamp"] == ev.timestamp
        assert json.loads(r["detail"]) == (ev.raw.get("detail") or [])
        assert (None if r["resource"] is None else json.loads(r["resource"])) == ev.resource
        assert before <= r["written_at"] <= after
    assert got["u1"]["hotel_id"] == "HOTEL1"
    assert got["u1"]["event_timestamp"] == "2024-05-01 10:00:00.000"
    assert json.loads(got["u1"]["detail"])[0]["newValue"] == "Zoë «1»"
    assert got["u1"]["resource"] is None
    assert json.loads(got["u3"]["detail"]) == []
    # JSON columns are jsonb, queryable as such.
    [hit] = await fetch(
        postgres_dsn,
        f"SELECT unique_event_id FROM \"{table}\" WHERE resource->'reservation'->>'id' = '42'",
    )
    assert hit["unique_event_id"] == "u2"


async def test_writing_the_same_events_again_is_an_upsert(sink: PostgresSink, postgres_dsn, table):
    first = [event(i) for i in range(5)]
    await sink.write("main", first)
    written = {k: r["written_at"] for k, r in (await rows(postgres_dsn, table)).items()}
    # A replay after a crash: the same events, now with the fetched resource.
    again = [event(i, resource={"n": i}) for i in range(5)]
    await sink.write("main", again)
    await sink.write("main", again[:2])
    got = await rows(postgres_dsn, table)
    [count] = await fetch(postgres_dsn, f'SELECT count(*) AS n FROM "{table}"')
    assert count["n"] == 5
    assert set(got) == {f"u{i}" for i in range(5)}
    for i in range(5):
        assert json.loads(got[f"u{i}"]["resource"]) == {"n": i}
        assert got[f"u{i}"]["written_at"] >= written[f"u{i}"]
    # The same id twice in one batch: one row, the later event wins.
    await sink.write("main", [event(9, resource={"v": 1}), event(9, resource={"v": 2})])
    got = await rows(postgres_dsn, table)
    assert json.loads(got["u9"]["resource"]) == {"v": 2}
    assert len(got) == 6


async def test_a_batch_of_1000_events_in_one_call(sink: PostgresSink, postgres_dsn, table):
    """Issue #9 item 12: no time bound (the project asserts no speed); that the batch is one
    statement shows as one inserting transaction for all its rows."""
    batch = [event(i, resource={"i": i}) for i in range(1000)]
    await sink.write("main", batch)
    got = await rows(postgres_dsn, table)
    assert set(got) == {ev.unique_event_id for ev in batch}
    assert all(json.loads(got[f"u{i}"]["resource"]) == {"i": i} for i in range(1000))
    # one statement, so one transaction: every row has the same inserting transaction (xmin)
    [tx] = await fetch(postgres_dsn, f'SELECT count(DISTINCT xmin::text) AS n FROM "{table}"')
    assert tx["n"] == 1


async def test_a_batch_is_one_round_trip_with_no_session_reset_after_it(
    postgres_dsn: str, table: str
) -> None:
    """The pool's default release (``RESET ALL; UNLISTEN *; …``) was a second round trip after
    every batch. The sink keeps no session state, so its connection's last statement is the
    upsert itself, idle, with no transaction left open."""
    sink = PostgresSink(settings(postgres_dsn, table, pool_min=1, pool_max=1))
    await sink.open(None)
    try:
        for start in (0, 10, 20):
            await sink.write("main", [event(i) for i in range(start, start + 10)])
        after = await fetch(
            postgres_dsn,
            "SELECT query, state FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
            "AND query LIKE $1",
            f'INSERT INTO "{table}"%',
        )
        assert [r["state"] for r in after] == ["idle"]
        assert len(await rows(postgres_dsn, table)) == 30
    finally:
        await sink.close()


async def test_a_fresh_batch_is_a_plain_insert_and_a_replayed_one_an_upsert(
    postgres_dsn: str, table: str
) -> None:
    """The speculative insertion of ``ON CONFLICT`` cost the server about 12% more CPU a row
    (measured) on every batch, though a catch-up conflicts with nothing: a batch goes as a
    plain INSERT, and only one that meets a row already there (a replay) is sent again as the
    upsert, which rewrites those rows and adds the rest, once each."""
    sink = PostgresSink(settings(postgres_dsn, table, pool_min=1, pool_max=1))
    await sink.open(None)

    async def last_statement() -> str:
        [found] = await fetch(
            postgres_dsn,
            "SELECT query FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND query LIKE $1",
            f'INSERT INTO "{table}"%',
        )
        return str(found["query"])

    try:
        await sink.write("main", [event(i) for i in range(10)])
        assert "ON CONFLICT" not in await last_statement()
        before = await rows(postgres_dsn, table)
        # A replay of 5..9 with their resource now, and 10..14 new.
        await sink.write("main", [event(i, resource={"n": i}) for i in range(5, 15)])
        assert "ON CONFLICT (unique_event_id) DO UPDATE" in await last_statement()
        got = await rows(postgres_dsn, table)
        [count] = await fetch(postgres_dsn, f'SELECT count(*) AS n FROM "{table}"')
        assert count["n"] == 15 and set(got) == {f"u{i}" for i in range(15)}
        assert all(got[f"u{i}"]["resource"] is None for i in range(5))
        assert all(json.loads(got[f"u{i}"]["resource"]) == {"n": i} for i in range(5, 15))
        assert all(got[f"u{i}"]["written_at"] >= before[f"u{i}"]["written_at"] for i in range(10))
        await sink.write("main", [event(i) for i in range(15, 20)])
        assert "ON CONFLICT" not in await last_statement()
        assert len(await rows(postgres_dsn, table)) == 20
    finally:
        await sink.close()


async def test_another_unique_index_refusing_a_row_is_that_events_permanent_error(
    postgres_dsn: str, table: str
) -> None:
    """The plain INSERT's unique violation is retried as the upsert; one from an index of the
    operator's (here one offset per stream) fails that too, and stays the event's refusal,
    naming the constraint, as before: the pipeline dead-letters that event alone."""
    await sql(
        postgres_dsn,
        "execute",
        f'CREATE TABLE "{table}" ({PG}, CONSTRAINT one_per_offset UNIQUE (stream, "offset"))',
    )
    await sql(
        postgres_dsn,
        "execute",
        f"""INSERT INTO "{table}" (unique_event_id, stream, "offset", detail, written_at)
        VALUES ('other', 'main', '000003', '[]', 0)""",
    )
    sink = PostgresSink(settings(postgres_dsn, table))
    await sink.open(None)
    try:
        with pytest.raises(PermanentSinkError) as info:
            await sink.write("main", [event(3)])
        assert info.value.unique_event_id == "u3"
        assert "unique constraint 'one_per_offset'" in str(info.value), info.value
        assert "Failing row" not in str(info.value)
        await sink.write("main", [event(i) for i in (1, 2, 4)])
        assert set(await rows(postgres_dsn, table)) == {"other", "u1", "u2", "u4"}
    finally:
        await sink.close()


async def test_a_nul_in_json_text_is_a_permanent_error(sink: PostgresSink, postgres_dsn, table):
    poison = event(2, detail=[{"elementName": "Comment", "newValue": "a\u0000b"}])
    batch = [event(1), poison, event(3)]
    with pytest.raises(PermanentSinkError) as info:
        await sink.write("main", batch)
    assert info.value.unique_event_id is None  # unknown culprit in a batch: one at a time
    assert await rows(postgres_dsn, table) == {}  # the batch is one transaction
    with pytest.raises(PermanentSinkError) as info:
        await sink.write("main", [poison])
    assert info.value.unique_event_id == "u2"
    assert "\\u0000" in str(info.value)  # says what is wrong
    # What the pipeline then does: the other events, written separately, are stored.
    for ev in batch:
        if ev is not poison:
            await sink.write("main", [ev])
    assert set(await rows(postgres_dsn, table)) == {"u1", "u3"}


async def test_a_nul_in_a_text_column_is_a_permanent_error(sink: PostgresSink, postgres_dsn, table):
    poison = event(5, eventName="BAD\x00NAME")
    assert poison.event_name == "BAD\x00NAME"
    with pytest.raises(PermanentSinkError) as info:
        await sink.write("main", [poison])
    assert info.value.unique_event_id == "u5"
    await sink.write("main", [event(6)])
    assert set(await rows(postgres_dsn, table)) == {"u6"}


async def test_a_stopped_server_is_transient_and_writes_resume(
    postgres_server: PostgresServer, postgres_dsn, table
):
    sink = PostgresSink(settings(postgres_dsn, table))
    await sink.open(None)
    try:
        await sink.write("main", [event(1)])
        postgres_server.stop()
        try:
            with pytest.raises(TransientSinkError) as broken:  # the pooled connection is gone
                await sink.write("main", [event(2)])
            with pytest.raises(TransientSinkError) as refused:  # and no new one is possible
                await sink.write("main", [event(2)])
        finally:
            if not postgres_server.running:
                postgres_server.start()
        for exc in (broken.value, refused.value):
            assert f"127.0.0.1:{postgres_server.port}/opera_test" in str(exc)
            assert postgres_server.password not in str(exc)
            assert postgres_server.password not in repr(exc)
        await sink.write("main", [event(2)])  # the pool reconnects by itself
    finally:
        await sink.close()
    assert set(await rows(postgres_dsn, table)) == {"u1", "u2"}


async def test_open_on_a_closed_port_is_transient_and_keeps_the_password(table):
    port = closed_port()
    password = "hunter2-Very-Secret"
    dsn = f"postgresql://opera:{password}@127.0.0.1:{port}/events"
    sink = PostgresSink(settings(dsn, table))
    assert password not in repr(sink)
    assert f"127.0.0.1:{port}/events" in repr(sink)
    with log_records() as logs, pytest.raises(TransientSinkError) as info:
        await sink.open(None)
    message = str(info.value)
    assert "sink.dsn" in message
    assert f"127.0.0.1:{port}/events" in message
    assert password not in message
    assert password not in repr(info.value)
    assert info.value.__cause__ is None or password not in str(info.value.__cause__)
    assert password not in repr(logs)
    with pytest.raises(TransientSinkError, match="not open"):
        await sink.write("main", [event(1)])
    await sink.close()
    await sink.close()  # idempotent


async def test_open_with_a_wrong_password_is_a_config_error(postgres_server, table):
    wrong = "not-the-right-password"
    sink = PostgresSink(settings(postgres_server.dsn(password=wrong), table))
    with pytest.raises(ConfigError) as info:
        await sink.open(None)
    assert "sink.dsn" in str(info.value)
    assert "password authentication failed" in str(info.value)
    assert wrong not in str(info.value)
    assert postgres_server.password not in str(info.value)
    assert wrong not in repr(sink)


async def test_open_on_a_missing_database_is_a_config_error(postgres_server, table):
    sink = PostgresSink(settings(postgres_server.dsn("no_such_db"), table))
    with pytest.raises(ConfigError) as info:
        await sink.open(None)
    assert "sink.dsn" in str(info.value)
    assert "no_such_db" in str(info.value)
    assert postgres_server.password not in str(info.value)


async def test_a_foreign_table_of_that_name_is_a_config_error(postgres_dsn, table):
    conn = await asyncpg.connect(postgres_dsn, timeout=5)
    try:
        await conn.execute(f'CREATE TABLE "{table}" (unique_event_id TEXT, payload TEXT)')
    finally:
        await conn.close()
    sink = PostgresSink(settings(postgres_dsn, table))
    with pytest.raises(
        ConfigError, match=r"sink\.table: .* exists without the columns stream, offset"
    ):
        await sink.open(None)
    await sink.close()


async def test_the_daemon_writes_each_sandbox_event_once(
    sandbox_factory, tmp_path: Path, postgres_dsn, table
):
    sink_cfg = {"type": "postgres", "dsn": postgres_dsn, "table": table}

    async def run_until_all_delivered() -> list[dict[str, Any]]:
        gw = await sandbox_factory(backlog=300)  # same seed: the same events each time
        events = gw.events("DEMO")
        cfg = make_settings(tmp_path, gw.url, sink=sink_cfg)
        assert isinstance(cfg.sink, PostgresSinkSettings)
        async with running(cfg, sink=PostgresSink(cfg.sink)) as daemon:
            pipeline = daemon.pipelines["main"]
            await wait_until(lambda: pipeline.delivered >= len(events))
        assert daemon.exit_code == 0
        store = await Store.open(tmp_path / "state.db")
        try:
            assert await store.dead_letters() == []
        finally:
            await store.close()
        return events

    async def table_ids() -> Counter[str]:
        return Counter(
            r["unique_event_id"]
            for r in await fetch(postgres_dsn, f'SELECT unique_event_id FROM "{table}"')
        )

    events = await run_until_all_delivered()
    truth = truth_ids(events)
    assert len(truth) == 300
    assert await table_ids() == Counter(truth)
    first = await rows(postgres_dsn, table)

    # The checkpoint lost (the worst replay): every event is written again, still one row each.
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    assert truth_ids(await run_until_all_delivered()) == truth
    assert await table_ids() == Counter(truth)
    by_id = {e["metadata"]["uniqueEventId"]: e for e in events}
    for uid, r in (await rows(postgres_dsn, table)).items():
        assert r["written_at"] > first[uid]["written_at"]  # rewritten, not added
        assert r["offset"] == by_id[uid]["metadata"]["offset"]
        assert r["event_name"] == by_id[uid].get("eventName")
        assert json.loads(r["detail"]) == (by_id[uid].get("detail") or [])


@pytest.mark.parametrize(
    ("dsn", "password", "where"),
    [
        (
            "postgresql://opera:s3cret-pw@db.example:5433/events",
            "s3cret-pw",
            "db.example:5433/events",
        ),
        ("postgresql://opera:p%40ssw0rd@db/ev", "p@ssw0rd", "db:5432/ev"),  # default port named
        ("postgresql:///ev?host=/run/pg&password=qwerty123", "qwerty123", "/run/pg/ev"),
    ],
)
def test_messages_name_the_server_never_the_password(dsn: str, password: str, where: str):
    sink = PostgresSink(settings(dsn, "t"))
    assert repr(sink) == f"PostgresSink(table='t', server={where!r})"
    assert password not in repr(sink)
    # Whatever a driver puts in its error text, ours goes through the same filter.
    described = sink._describe(RuntimeError(f"cannot use {dsn} with {password}"))
    assert password not in described
    assert dsn not in described


def test_a_dsn_the_driver_would_misread_is_refused_without_quoting_it() -> None:
    # A raw / and @ in the password: refused by the settings (as run and check-config do),
    # and pydantic's error text, which quotes the input otherwise, holds no piece of it.
    with pytest.raises(ValidationError) as info:
        settings("postgres://opera:pa/ss@word@db:5432/ev?sslmode=require", "t")
    text = f"{info.value} {info.value!r}"
    assert "dsn" in text and "percent-encode" in text
    assert "pa/ss" not in text and "ss@word" not in text


async def test_an_event_no_json_writer_takes_is_named_in_a_batch(
    sink: PostgresSink, postgres_dsn, table
):
    """The batch travels as one JSON document: an event that cannot be written as JSON (a lone
    surrogate) is named, so the pipeline dead-letters it alone."""
    poison = event(2, eventName="BAD\ud800NAME")
    with pytest.raises(PermanentSinkError) as info:
        await sink.write("main", [event(1), poison, event(3)])
    assert info.value.unique_event_id == "u2"
    assert await rows(postgres_dsn, table) == {}
    await sink.write("main", [event(1), event(3)])
    assert set(await rows(postgres_dsn, table)) == {"u1", "u3"}
