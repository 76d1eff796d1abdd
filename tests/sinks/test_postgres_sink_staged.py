"""The PostgreSQL sink in the state store's transaction (issue #11): with the state in
PostgreSQL on the very same DSN, the rows commit with the checkpoint, against a real server
(fixtures in tests/pg.py; skipped without the server binaries)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from log_capture import log_records
from pg import PostgresServer, sql
from support import make_settings, newest_offset, running, truth_ids, wait_until

from consumer.config import PostgresSinkSettings
from consumer.core.events import Event
from consumer.core.protocol import Next, decode
from consumer.core.records import CommitBatch
from consumer.core.watermark import Position
from consumer.errors import PermanentSinkError, StoreError, TransientSinkError
from consumer.runtime.assembly import build_sink
from consumer.runtime.committer import Committer
from consumer.sinks.orchestration import OrchestratingSink
from consumer.sinks.postgres import OWN_POOL, STATE_TRANSACTION, PostgresSink
from consumer.state.postgres import PostgresStore


def event(i: int, *, detail: Any = None, resource: Any = None, **header: Any) -> Event:
    raw: dict[str, Any] = {
        "metadata": {"offset": f"{i:06d}", "uniqueEventId": f"u{i}"},
        "eventName": "UPDATE RESERVATION",
        "moduleName": "Reservation",
        "primaryKey": f"pk{i % 7}",
        "hotelId": "HOTEL1",
        "timestamp": "2024-05-01 10:00:00.000",
        "detail": [{"elementName": "Name", "newValue": f"Zoë «{i}»"}] if detail is None else detail,
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
        resource=resource,
        fetched=resource is not None,
    )


def settings(dsn: str, table: str) -> PostgresSinkSettings:
    return PostgresSinkSettings(type="postgres", dsn=dsn, table=table, timeout_s=5.0)  # type: ignore[arg-type]


async def fetch(dsn: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    return list(await sql(dsn, "fetch", statement, *args))


async def rows(dsn: str, table: str) -> dict[str, asyncpg.Record]:
    return {r["unique_event_id"]: r for r in await fetch(dsn, f'SELECT * FROM "{table}"')}


async def execute(dsn: str, statement: str) -> None:
    await sql(dsn, "execute", statement)


@pytest.fixture
def table() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def schema() -> str:
    return f"s_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(postgres_dsn: str, schema: str) -> AsyncIterator[PostgresStore]:
    s = await PostgresStore.open(postgres_dsn, schema=schema, timeout_s=5.0)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def staged_sink(postgres_dsn: str, table: str) -> AsyncIterator[PostgresSink]:
    s = PostgresSink(settings(postgres_dsn, table), in_state_transaction=True)
    await s.open(None)
    try:
        yield s
    finally:
        await s.close()


# --- the mode --------------------------------------------------------------------------------


STATE_DSN = "postgresql://u:pw-1@db:5432/ev"


@pytest.mark.parametrize(
    ("state", "sink_dsn", "staged"),
    [
        ({"backend": "postgres", "dsn": STATE_DSN}, STATE_DSN, True),
        # Another database, another password, another spelling of the same server: not the
        # state's DSN, so the sink keeps its own pool (as it does with an SQLite state).
        ({"backend": "postgres", "dsn": STATE_DSN}, "postgresql://u:pw-1@db:5432/other", False),
        ({"backend": "postgres", "dsn": STATE_DSN}, "postgresql://u:pw-2@db:5432/ev", False),
        ({"backend": "postgres", "dsn": STATE_DSN}, "postgresql://u:pw-1@db/ev", False),
        ({"backend": "sqlite"}, STATE_DSN, False),
    ],
)
async def test_the_assembly_stages_only_on_the_state_dsn(
    tmp_path: Path, state: dict[str, Any], sink_dsn: str, staged: bool
) -> None:
    cfg = make_settings(
        tmp_path, "http://127.0.0.1:9", state=state, sink={"type": "postgres", "dsn": sink_dsn}
    )
    async with aiohttp.ClientSession() as http:
        sink = build_sink(cfg, http)
        assert isinstance(sink, PostgresSink)
        assert sink.in_state_transaction is staged
        assert sink.mode == (STATE_TRANSACTION if staged else OWN_POOL)
        # With orchestration around it: the same decision.
        orchestrated = cfg.model_copy(
            update={"orchestration": cfg.orchestration.model_copy(update={"enabled": True})}
        )
        outer = build_sink(orchestrated, http)
        assert isinstance(outer, OrchestratingSink)
        assert isinstance(outer.inner, PostgresSink)
        assert outer.inner.in_state_transaction is staged


async def test_open_logs_the_mode_and_never_the_dsn(postgres_server: PostgresServer, table):
    dsn = postgres_server.dsn()
    where = f"127.0.0.1:{postgres_server.port}/opera_test"
    for staged, mode in ((True, STATE_TRANSACTION), (False, OWN_POOL)):
        sink = PostgresSink(settings(dsn, table), in_state_transaction=staged)
        with log_records() as logs:
            await sink.open(None)
        await sink.close()
        opened = [e for e in logs if e["event"] == "postgres sink open"]
        assert len(opened) == 1
        assert opened[0]["mode"] == mode
        assert opened[0]["server"] == where
        assert postgres_server.password not in repr(logs)
        assert dsn not in repr(logs)


# --- writing ---------------------------------------------------------------------------------


async def test_write_only_stages_rows(staged_sink: PostgresSink, postgres_dsn, table):
    assert staged_sink._pool is None  # open's connection is closed: no pool of its own
    await staged_sink.write("main", [event(1), event(2)])
    await staged_sink.write("other", [event(3, resource={"r": 3})])
    await staged_sink.write("main", [])
    assert await rows(postgres_dsn, table) == {}  # nothing written by the sink itself
    staged = staged_sink.staged()
    assert staged is not None
    assert [(r[0], r[1]) for r in staged.rows] == [("u1", "main"), ("u2", "main"), ("u3", "other")]
    # Named with the schema open() found the table in, in PostgreSQL's dialect.
    assert f'INSERT INTO "public"."{table}"' in staged.statement
    assert staged.document and "$1::jsonb" in staged.statement and "?" not in staged.statement
    assert staged_sink.staged() is None  # taken: the buffer is empty
    assert staged_sink.position() is None


async def test_a_sink_not_open_refuses_writes(postgres_dsn, table):
    sink = PostgresSink(settings(postgres_dsn, table), in_state_transaction=True)
    with pytest.raises(TransientSinkError, match="not open"):
        await sink.write("main", [event(1)])
    assert sink.staged() is None


async def test_rows_postgres_cannot_store_are_refused_at_write(
    staged_sink: PostgresSink, store: PostgresStore, postgres_dsn, table
):
    """A row the server would refuse must not reach the commit (it would fail the checkpoint
    with it, again at every retry): write names the culprit, even in a batch."""
    nul_json = event(2, detail=[{"elementName": "Comment", "newValue": "a\u0000b"}])
    nul_text = event(4, eventName="BAD\x00NAME")
    nul_key = event(5, resource={"k\u0000": 1})
    for poison, column in ((nul_json, "detail"), (nul_text, "event_name"), (nul_key, "resource")):
        with pytest.raises(PermanentSinkError) as info:
            await staged_sink.write("main", [event(1), poison, event(3)])
        assert info.value.unique_event_id == poison.unique_event_id
        assert column in str(info.value)
        assert staged_sink.staged() is None  # all or none
    # A backslash followed by "u0000" is text like any other.
    fine = event(6, detail=[{"elementName": "Path", "newValue": "C:\\u0000\\x"}])
    await staged_sink.write("main", [event(1), fine])
    staged = staged_sink.staged()
    assert staged is not None
    await store.commit(CommitBatch(staged=[staged]))
    got = await rows(postgres_dsn, table)
    assert set(got) == {"u1", "u6"}
    assert json.loads(got["u6"]["detail"])[0]["newValue"] == "C:\\u0000\\x"


async def test_rows_commit_in_the_state_transaction_or_not_at_all(
    staged_sink: PostgresSink, store: PostgresStore, postgres_dsn, schema, table
):
    """(a) A commit that fails after the staged rows ran leaves no row and no checkpoint;
    the next commit writes both, in one transaction."""
    committer = Committer(store, staged_sink, max_events=1000, interval_s=60.0)
    events = [event(i, resource={"i": i}) for i in range(1, 6)]
    seqs = [committer.arrived("main", Position(ev.offset, ev.unique_event_id)) for ev in events]
    await staged_sink.write("main", events)
    committer.processed("main", [ev.unique_event_id for ev in events], seqs)
    # Fails at COMMIT, once every statement ran (deferred): it reports the sink rows it sees.
    await execute(
        postgres_dsn,
        f"""
        CREATE FUNCTION "{schema}".refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'refused with % sink rows', (SELECT count(*) FROM public."{table}");
        END $$;
        CREATE CONSTRAINT TRIGGER refuse AFTER INSERT OR UPDATE ON "{schema}".checkpoints
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION "{schema}".refuse();
        """,
    )
    with pytest.raises(StoreError, match="refused with 5 sink rows"):
        await committer.flush()
    assert await rows(postgres_dsn, table) == {}
    assert await store.checkpoint("main") is None
    assert await store.seen("main", [ev.unique_event_id for ev in events]) == set()

    await execute(postgres_dsn, f'DROP TRIGGER refuse ON "{schema}".checkpoints')
    assert await committer.flush()  # the failed batch, restored
    got = await rows(postgres_dsn, table)
    assert set(got) == {ev.unique_event_id for ev in events}
    assert all(json.loads(got[f"u{i}"]["resource"]) == {"i": i} for i in range(1, 6))
    cp = await store.checkpoint("main")
    assert cp is not None and (cp.offset, cp.unique_event_id) == ("000005", "u5")
    assert await store.seen("main", [ev.unique_event_id for ev in events]) == set(got)
    # One transaction wrote the rows, the processed ids and the checkpoint.
    xmins = await fetch(
        postgres_dsn,
        f'SELECT xmin::text AS x FROM public."{table}" UNION '
        f'SELECT xmin::text FROM "{schema}".checkpoints UNION '
        f'SELECT xmin::text FROM "{schema}".processed_events',
    )
    assert len(xmins) == 1


async def test_one_id_in_two_streams_of_a_commit_is_one_row_the_last_written(
    staged_sink: PostgresSink, store: PostgresStore, postgres_dsn, table
):
    """A commit's rows go as one statement, whose upsert may not touch a row twice: the same
    uniqueEventId from two streams (hostile, or two chains) is one row, the last written, as
    one statement a row left it; the commit goes through, every column as written."""
    committer = Committer(store, staged_sink, max_events=1000, interval_s=60.0)
    first, again = event(1), event(1, resource={"from": "other"})
    for stream, ev in (("main", first), ("other", again), ("main", event(2))):
        seq = committer.arrived(stream, Position(ev.offset, ev.unique_event_id))
        await staged_sink.write(stream, [ev])
        committer.processed(stream, [ev.unique_event_id], [seq])
    assert await committer.flush()
    got = await rows(postgres_dsn, table)
    assert set(got) == {"u1", "u2"}
    assert got["u1"]["stream"] == "other"
    assert json.loads(got["u1"]["resource"]) == {"from": "other"}
    assert json.loads(got["u2"]["detail"]) == [{"elementName": "Name", "newValue": "Zoë «2»"}]
    assert got["u2"]["resource"] is None  # SQL NULL, not JSON null
    assert (got["u2"]["offset"], got["u2"]["event_timestamp"]) == (
        "000002",
        "2024-05-01 10:00:00.000",
    )
    assert await store.seen("main", ["u1", "u2"]) == {"u1", "u2"}
    assert await store.seen("other", ["u1"]) == {"u1"}


async def test_an_encoding_that_cannot_hold_every_character_keeps_the_own_pool(
    postgres_server: PostgresServer, table
):
    """A LATIN1 database would refuse some characters at commit time, failing the checkpoint:
    the sink then writes on its own pool (and the server's refusal is one event's)."""
    db = f"latin_{uuid.uuid4().hex[:8]}"
    postgres_server.execute(
        f"CREATE DATABASE {db} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    )
    dsn = postgres_server.dsn(db)
    sink = PostgresSink(settings(dsn, table), in_state_transaction=True)
    with log_records() as logs:
        await sink.open(None)
    try:
        assert sink.in_state_transaction is False
        assert sink.mode == OWN_POOL
        assert [e.get("encoding") for e in logs if e["level"] == "warning"] == ["LATIN1"]
        assert [e["mode"] for e in logs if e["event"] == "postgres sink open"] == [OWN_POOL]
        await sink.write("main", [event(1)])
        assert sink.staged() is None
        assert set(await rows(dsn, table)) == {"u1"}
        with pytest.raises(PermanentSinkError):  # no LATIN1 for it: refused, one event's
            await sink.write("main", [event(2, detail=[{"newValue": "\u4e2d"}])])
    finally:
        await sink.close()


async def test_a_sql_ascii_database_keeps_the_own_pool_and_refuses_escapes_past_ascii(
    postgres_server: PostgresServer, table
):
    """SQL_ASCII text takes any byte, but its jsonb refuses a \\u escape past ASCII (0A000):
    staged, such an event failed the state commit (the daemon stopped, and met it again at
    each start); on the own pool 0A000 was retried for ever. Now: the own pool, and the
    refusal is the event's (dead-lettered)."""
    db = f"ascii_{uuid.uuid4().hex[:8]}"
    postgres_server.execute(
        f"CREATE DATABASE {db} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    )
    dsn = postgres_server.dsn(db)
    sink = PostgresSink(settings(dsn, table), in_state_transaction=True)
    await sink.open(None)
    try:
        assert sink.mode == OWN_POOL
        await sink.write("main", [event(1, detail=[{"newValue": "Zoe"}])])
        # As received: the decoder keeps the detail's text, escapes and all.
        frame = {"id": "1", "type": "next", "payload": {"data": {"newEvent": event(2).raw}}}
        decoded = decode(json.dumps(frame).encode())  # ensure_ascii: "Zo\\u00eb \\u00ab2\\u00bb"
        assert isinstance(decoded, Next)
        escaped = decoded.event
        assert escaped.detail_text is not None
        assert b"\\u00eb" in escaped.detail_text
        with pytest.raises(PermanentSinkError):
            await sink.write("main", [escaped])
        assert set(await rows(dsn, table)) == {"u1"}
    finally:
        await sink.close()


async def test_commits_are_durable_on_a_database_set_to_acknowledge_before_the_disk(
    postgres_server: PostgresServer, table
):
    """synchronous_commit = off (a database's or role's tuning) acknowledges a commit before
    its WAL is on disk: a crash of the server then loses rows whose ids we recorded as done.
    The sink's and the store's sessions commit with it on."""
    db = f"async_{uuid.uuid4().hex[:8]}"
    postgres_server.execute(f"CREATE DATABASE {db}")
    postgres_server.execute(f"ALTER DATABASE {db} SET synchronous_commit = off")
    dsn = postgres_server.dsn(db)
    assert [r[0] for r in await fetch(dsn, "SHOW synchronous_commit")] == ["off"]
    sink = PostgresSink(settings(dsn, table), in_state_transaction=False)
    await sink.open(None)
    store = await PostgresStore.open(dsn, schema=f"s_{uuid.uuid4().hex[:8]}", timeout_s=5.0)
    try:
        async with sink._pool.acquire() as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
        async with store.pool.acquire() as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
            await conn.execute("RESET ALL")  # the pool's reset on release: still on
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
    finally:
        await store.close()
        await sink.close()


# --- the daemon ------------------------------------------------------------------------------


async def test_the_daemon_commits_rows_with_their_checkpoint(
    sandbox_factory, tmp_path: Path, postgres_dsn, schema, table
):
    """(b) The daemon, assembled from its settings, with state and sink on one DSN: every
    sandbox event once, and every row written in the transaction that wrote its processed id
    and the checkpoint (triggers record ``txid_current()``), never by a pool of the sink."""
    # The schema and the table exist before the daemon starts, so the triggers can be made.
    await (await PostgresStore.open(postgres_dsn, schema=schema, timeout_s=5.0)).close()
    pre = PostgresSink(settings(postgres_dsn, table))
    await pre.open(None)
    await pre.close()
    audit = f'"{schema}".audit'
    await execute(
        postgres_dsn,
        f"""
        CREATE TABLE {audit} (what TEXT NOT NULL, id TEXT, tx BIGINT NOT NULL, app TEXT);
        CREATE FUNCTION "{schema}".sink_audit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {audit} VALUES ('sink', NEW.unique_event_id, txid_current(),
                current_setting('application_name'));
            RETURN NULL;
        END $$;
        CREATE FUNCTION "{schema}".processed_audit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {audit} VALUES ('processed', NEW.event_id, txid_current(),
                current_setting('application_name'));
            RETURN NULL;
        END $$;
        CREATE FUNCTION "{schema}".statement_audit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {audit} VALUES ('checkpoint', NULL, txid_current(),
                current_setting('application_name'));
            RETURN NULL;
        END $$;
        CREATE TRIGGER audit AFTER INSERT OR UPDATE ON public."{table}"
            FOR EACH ROW EXECUTE FUNCTION "{schema}".sink_audit();
        CREATE TRIGGER audit AFTER INSERT ON "{schema}".processed_events
            FOR EACH ROW EXECUTE FUNCTION "{schema}".processed_audit();
        CREATE TRIGGER audit AFTER INSERT OR UPDATE ON "{schema}".checkpoints
            FOR EACH STATEMENT EXECUTE FUNCTION "{schema}".statement_audit();
        """,
    )
    gw = await sandbox_factory(backlog=300)
    cfg = make_settings(
        tmp_path,
        gw.url,
        # Commits every 20 ms (make_settings): several transactions, each must hold whole
        # events. (Not a small commit_max_events: a wake-up racing the shutdown's cancel is
        # swallowed by Python 3.11's wait_for in Committer.run, and the daemon never stops.)
        state={"backend": "postgres", "dsn": postgres_dsn, "schema": schema},
        sink={"type": "postgres", "dsn": postgres_dsn, "table": table},
    )
    async with running(cfg) as daemon:
        assert isinstance(daemon.sink, PostgresSink)
        assert daemon.sink.in_state_transaction
        pipeline = daemon.pipelines["main"]
        # The backlog's last event durable (not "one more commit": the last may have been
        # done before the count was read, and then no other ever comes).
        last = newest_offset(gw)
        async with asyncio.timeout(30):
            while (cp := await daemon.store.checkpoint("main")) is None or cp.offset != last:
                await asyncio.sleep(0.02)
        gw.append("DEMO", 40)  # live events after the backlog: other transactions
        await wait_until(lambda: pipeline.delivered >= 340)
    assert daemon.exit_code == 0
    events = gw.events("DEMO")
    truth = truth_ids(events)
    assert len(truth) == 340

    got = await rows(postgres_dsn, table)
    assert sorted(got) == sorted(truth)  # one row each (the key is unique)
    assert Counter(truth) == Counter(set(truth))
    by_id = {e["metadata"]["uniqueEventId"]: e for e in events}
    for uid, r in got.items():
        assert r["stream"] == "main"
        assert r["offset"] == by_id[uid]["metadata"]["offset"]
        assert json.loads(r["detail"]) == (by_id[uid].get("detail") or [])

    log = await fetch(postgres_dsn, f"SELECT what, id, tx, app FROM {audit}")
    sink_rows = [r for r in log if r["what"] == "sink"]
    assert Counter(r["id"] for r in sink_rows) == Counter(truth)  # each written once
    # The store's pool wrote them (the sink's own connections have no application_name) ...
    assert {r["app"] for r in sink_rows} == {"opera-consumer"}
    # ... in transactions that wrote the checkpoint ...
    checkpoint_txs = {r["tx"] for r in log if r["what"] == "checkpoint"}
    assert {r["tx"] for r in sink_rows} <= checkpoint_txs
    # ... and each with exactly the events marked processed in that same transaction.
    per_tx: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for r in log:
        if r["id"] is not None:
            per_tx[r["what"]][r["tx"]].add(r["id"])
    assert per_tx["sink"] == per_tx["processed"]
    assert len(per_tx["sink"]) > 1  # several commits

    store = await PostgresStore.open(postgres_dsn, schema=schema, timeout_s=5.0)
    try:
        assert await store.dead_letters() == []
        cp = await store.checkpoint("main")
        assert cp is not None and cp.offset == events[-1]["metadata"]["offset"]
    finally:
        await store.close()
