"""What only the PostgreSQL state store has: migrations that two daemons may run at once, a
server that is away or refuses us, prunes in bounded statements, the backend choice
(``open_store``). Against the throwaway server of tests/pg.py; the semantics shared with
SQLite are in test_store.py."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from log_capture import log_records
from pg import DATABASE, PostgresServer
from store_backends import PostgresBackend
from support import sink_length, until

import consumer.state.postgres as store_module
from consumer.cli import main
from consumer.config import StateSettings
from consumer.core.records import CommitBatch
from consumer.core.watermark import Position
from consumer.errors import LeaseHeld, StoreError
from consumer.state import PostgresStore, SqliteStore, acquire, current_holder, open_store
from consumer.state.postgres import MIGRATIONS, Target, migration_lock_key


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


def assert_secret_kept(exc: BaseException, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in str(exc)
        assert secret not in repr(exc)
        assert exc.__cause__ is None or secret not in str(exc.__cause__)


# --- migrations --------------------------------------------------------------------------------


async def test_the_schema_and_its_version(pg_backend: PostgresBackend) -> None:
    s = await pg_backend.open()
    await s.close()
    rows = await pg_backend.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 "
        "ORDER BY table_name",
        pg_backend.schema,
    )
    assert [r[0] for r in rows] == [
        "checkpoints",
        "commit_marks",
        "completed_subscriptions",
        "dead_letters",
        "fleet_members",
        "processed_events",
        "schema_version",
        "sink_state",
        "start_overrides",
        "stream_leases",
    ]
    versions = await pg_backend.fetch(f"SELECT version FROM {pg_backend.q}.schema_version")
    assert [r[0] for r in versions] == list(range(1, len(MIGRATIONS) + 1))
    # the hot lookups are on indexes
    indexes = {
        r[0]
        for r in await pg_backend.fetch(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = $1", pg_backend.schema
        )
    }
    assert any("processed_events" in d and "(stream, event_id)" in d for d in indexes)
    assert any("processed_events" in d and "(processed_at)" in d for d in indexes)
    assert any("dead_letters" in d and "(stream, primary_key, id)" in d for d in indexes)
    assert any("UNIQUE" in d and "(stream, dedup_key)" in d for d in indexes)


async def test_two_daemons_migrating_at_once_wait_for_each_other(
    pg_backend: PostgresBackend,
) -> None:
    """Both reach the migration lock while a third session holds it; released, one migrates
    and the other finds the schema current."""
    key = migration_lock_key(pg_backend.schema)
    holder = await asyncpg.connect(pg_backend.dsn, timeout=10)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", key)
        opening = [asyncio.create_task(pg_backend.open()) for _ in range(2)]

        async def both_waiting() -> bool:
            waiting = await holder.fetchval(
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = $1",
                key,
            )
            return int(waiting) == 2

        await until(both_waiting)
        assert not any(t.done() for t in opening)
        await holder.execute("SELECT pg_advisory_unlock($1)", key)
        stores = await asyncio.gather(*opening)
    finally:
        await holder.close()
    try:
        versions = await pg_backend.fetch(f"SELECT version FROM {pg_backend.q}.schema_version")
        assert sorted(r[0] for r in versions) == list(range(1, len(MIGRATIONS) + 1))
        await stores[0].commit(CommitBatch(processed={"s": ["a"]}))
        assert await stores[1].seen("s", ["a"]) == {"a"}
    finally:
        for s in stores:
            await s.close()


async def test_many_daemons_starting_at_once_on_a_fresh_schema(pg_backend: PostgresBackend) -> None:
    stores = await asyncio.gather(*(pg_backend.open() for _ in range(5)))
    try:
        assert await pg_backend.version() == len(MIGRATIONS)
        assert await pg_backend.count("schema_version") == len(MIGRATIONS)
    finally:
        for s in stores:
            await s.close()


async def test_without_create_an_empty_database_gets_no_schema(pg_backend: PostgresBackend) -> None:
    with pytest.raises(StoreError, match="has no state") as raised:
        await pg_backend.open(create=False)
    assert pg_backend.where in str(raised.value)
    assert pg_backend.schema in str(raised.value)
    rows = await pg_backend.fetch(
        "SELECT 1 FROM pg_namespace WHERE nspname = $1", pg_backend.schema
    )
    assert rows == []


async def test_a_schema_name_with_capitals_is_its_own_schema(postgres_server) -> None:
    b = PostgresBackend(postgres_server.dsn(), "", schema=f"Opera_{uuid.uuid4().hex[:8]}")
    try:
        s = await b.open()
        try:
            await s.commit(CommitBatch(checkpoints={"s": Position("1", "u1")}))
            assert (await s.checkpoint("s")) is not None
        finally:
            await s.close()
        rows = await b.fetch("SELECT 1 FROM pg_namespace WHERE nspname = $1", b.schema)
        assert len(rows) == 1
    finally:
        await b.drop()


# --- prune -------------------------------------------------------------------------------------


async def test_prune_deletes_in_bounded_statements(
    pg_backend: PostgresBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement-level trigger records how many rows each DELETE removed."""
    monkeypatch.setattr(store_module, "PRUNE_CHUNK", 100)
    store = await pg_backend.open()
    try:
        await store.commit(CommitBatch(processed={"s": [f"a{i}" for i in range(1050)]}), now=10.0)
        await store.commit(CommitBatch(processed={"t": [f"b{i}" for i in range(20)]}), now=10.0)
        await store.commit(CommitBatch(processed={"s": [f"k{i}" for i in range(30)]}), now=99.0)
        q = pg_backend.q
        await pg_backend.execute(
            f"CREATE TABLE {q}.prune_log (n BIGINT NOT NULL);"
            f"CREATE FUNCTION {q}.log_prune() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"INSERT INTO {q}.prune_log SELECT COUNT(*) FROM gone; RETURN NULL; END $$;"
            f"CREATE TRIGGER log_prune AFTER DELETE ON {q}.processed_events "
            f"REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION {q}.log_prune()"
        )
        assert await store.prune_processed(older_than=50.0) == 1070
        counts = [int(r[0]) for r in await pg_backend.fetch(f"SELECT n FROM {q}.prune_log")]
        assert max(counts) == 100
        assert sum(counts) == 1070
        assert len(counts) == 11  # ten full statements and one of 70
        assert await pg_backend.count("processed_events") == 30
        assert await store.seen("s", ["a0", "k0"]) == {"k0"}
    finally:
        await store.close()


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(n for child in plan.get("Plans", []) for n in _plan_nodes(child))]


def _rows_read(plan: dict[str, Any], table: str) -> int:
    """What an EXPLAIN ANALYZE plan's scans of ``table`` read: the rows they returned and
    those they filtered out."""
    on_table = [n for n in _plan_nodes(plan) if n.get("Relation Name") == table]
    assert on_table, plan
    return sum(
        n["Actual Rows"] * n["Actual Loops"]
        + n.get("Rows Removed by Filter", 0)
        + n.get("Rows Removed by Index Recheck", 0)
        for n in on_table
    )


@pytest.mark.parametrize("analyzed", [False, True], ids=["no-statistics", "analyzed"])
async def test_the_dedup_lookup_probes_each_id_however_many_the_stream_has(
    pg_backend: PostgresBackend, analyzed: bool
) -> None:
    """30,000 ids of the stream; a lookup of 50 (a batch) reads at most 50 index entries, with
    or without the table's statistics (autovacuum off, as before it runs on a new table).
    Before, without them, the planner scanned the index on the stream alone and filtered all
    30,000 rows: each lookup as slow as the stream was long."""
    store = await pg_backend.open()
    try:
        q = pg_backend.q
        await pg_backend.execute(
            f"ALTER TABLE {q}.processed_events SET (autovacuum_enabled = false)"
        )
        for k in range(30):
            ids = [f"a{k * 1000 + i}" for i in range(1000)]
            await store.commit(CommitBatch(processed={"s": ids}), now=1.0)
        await store.commit(CommitBatch(processed={"t": ["z1"]}), now=1.0)
        if analyzed:
            await pg_backend.execute(f"ANALYZE {q}.processed_events")
        lookup = [f"a{i}" for i in range(0, 30000, 1200)] + [f"z{i}" for i in range(25)]
        explain = "EXPLAIN (ANALYZE, FORMAT JSON) " + store_module.seen_sql(q)
        plan = json.loads((await pg_backend.fetch(explain, "s", lookup))[0][0])[0]["Plan"]
        assert _rows_read(plan, "processed_events") <= len(lookup), plan
        assert await store.seen("s", lookup) == set(lookup[:25])
        assert await store.seen("t", ["a0", "z1"]) == {"z1"}
    finally:
        await store.close()


@pytest.mark.parametrize("analyzed", [False, True], ids=["no-statistics", "analyzed"])
async def test_the_parked_lookup_probes_each_key_however_many_dead_letters(
    pg_backend: PostgresBackend, analyzed: bool
) -> None:
    """20,000 dead letters of the stream (4 for each of 5,000 resources) and 3,000 of one
    parked resource: park-key's lookup of 52 resources reads one dead letter a key and one for
    the marker, with or without statistics. Before, it read every dead letter of the stream
    (without) or of the table (with)."""
    store = await pg_backend.open()
    try:
        q = pg_backend.q
        await pg_backend.execute(f"ALTER TABLE {q}.dead_letters SET (autovacuum_enabled = false)")
        columns = "stream, dedup_key, primary_key, reason, error, payload, first_at, last_at"
        await pg_backend.execute(
            f"INSERT INTO {q}.dead_letters ({columns}) SELECT 'main', 'd' || g, "
            "CASE WHEN g < 20000 THEN 'pk' || (g % 5000) ELSE 'hot' END, 'r', 'e', 'p', 1, 1 "
            "FROM generate_series(0, 22999) AS g"
        )
        if analyzed:
            await pg_backend.execute(f"ANALYZE {q}.dead_letters")
        keys = [f"zz{i}" for i in range(50)] + ["pk7", "hot"]
        explain = "EXPLAIN (ANALYZE, FORMAT JSON) " + store_module.parked_sql(q)
        plan = json.loads((await pg_backend.fetch(explain, "main", keys))[0][0])[0]["Plan"]
        assert _rows_read(plan, "dead_letters") <= len(keys) + 1, plan
        assert await store.parked_among("main", [*keys, "pk7"]) == (
            {"pk7": "d7", "hot": "d20000"},
            True,
        )
        assert await store.parked_among("other", ["pk7"]) == ({}, False)
    finally:
        await store.close()


async def test_the_migration_to_the_parked_index_keeps_the_dead_letters(
    pg_backend: PostgresBackend,
) -> None:
    """A store of the version before: its dead letters are there after the upgrade, the index
    is (stream, primary_key, id) under its old name, and park-key's lookup finds the oldest."""
    await pg_backend.create_at(len(MIGRATIONS) - 1)
    await pg_backend.execute(
        f"INSERT INTO {pg_backend.q}.dead_letters (stream, dedup_key, primary_key, reason, "
        "error, payload, first_at, last_at) VALUES ('main', 'd1', 'a', 'r', 'e', 'p', 1, 1), "
        "('main', 'd2', 'a', 'r', 'e', 'p', 1, 1), ('main', 'd3', 'b', 'r', 'e', 'p', 1, 1)"
    )
    store = await pg_backend.open()
    try:
        assert await store.parked_among("main", ["a", "b", "c"]) == ({"a": "d1", "b": "d3"}, True)
    finally:
        await store.close()
    assert await pg_backend.version() == len(MIGRATIONS)
    rows = await pg_backend.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1 "
        "AND tablename = 'dead_letters' AND indexdef LIKE '%(stream, primary_key%'",
        pg_backend.schema,
    )
    assert [(r[0], r[1].split(" USING ")[1]) for r in rows] == [
        ("dead_letters_key", "btree (stream, primary_key, id)")
    ]


# --- the server away, or refusing us ------------------------------------------------------------


async def test_an_unreachable_server_is_retriable_and_names_host_and_port() -> None:
    port = closed_port()
    password = "hunter2-Very-Secret"
    dsn = f"postgresql://opera:{password}@127.0.0.1:{port}/events"
    with log_records() as logs, pytest.raises(StoreError) as raised:
        await PostgresStore.open(dsn, timeout_s=5.0)
    assert raised.value.retriable
    message = str(raised.value)
    assert f"127.0.0.1:{port}/events" in message
    assert "retry later" in message
    assert_secret_kept(raised.value, password, dsn)
    assert password not in repr(logs)


async def test_a_server_stopping_under_the_store_is_retriable_and_it_recovers(
    postgres_server: PostgresServer, pg_backend: PostgresBackend
) -> None:
    store = await pg_backend.open()
    try:
        await store.commit(CommitBatch(processed={"s": ["before"]}))
        postgres_server.stop()
        try:
            with pytest.raises(StoreError) as raised:
                await store.commit(CommitBatch(processed={"s": ["during"]}))
            assert raised.value.retriable
            assert pg_backend.where in str(raised.value)
            assert_secret_kept(raised.value, postgres_server.password)
        finally:
            postgres_server.start()

        async def committed() -> bool:
            try:
                await store.commit(CommitBatch(processed={"s": ["after"]}))
            except StoreError as exc:
                assert exc.retriable, exc  # a stale pooled connection at most
                return False
            return True

        await until(committed)
        assert await store.seen("s", ["before", "during", "after"]) == {"before", "after"}
    finally:
        await store.close()


async def test_a_wrong_password_is_not_retriable(postgres_server: PostgresServer) -> None:
    wrong = "not-the-right-password"
    with pytest.raises(StoreError, match="refused our credentials") as raised:
        await PostgresStore.open(postgres_server.dsn(password=wrong), timeout_s=5.0)
    assert not raised.value.retriable
    assert f"{postgres_server.host}:{postgres_server.port}/{DATABASE}" in str(raised.value)
    assert_secret_kept(raised.value, wrong, postgres_server.password)


async def test_an_unknown_database_is_not_retriable(postgres_server: PostgresServer) -> None:
    with pytest.raises(StoreError, match="no such database") as raised:
        await PostgresStore.open(postgres_server.dsn("no_such_db"), timeout_s=5.0)
    assert not raised.value.retriable
    assert f"{postgres_server.port}/no_such_db" in str(raised.value)
    assert_secret_kept(raised.value, postgres_server.password)


async def test_a_user_without_privileges_is_not_retriable(
    postgres_server: PostgresServer, pg_backend: PostgresBackend
) -> None:
    """A user without CREATE on the database cannot make the schema (not retriable); given
    a schema of its own, made by an administrator, it needs nothing more."""
    role, password = f"r_{uuid.uuid4().hex[:12]}", "limited-Secret-42"
    await pg_backend.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    try:
        dsn = (
            f"postgresql://{role}:{password}@{postgres_server.host}:{postgres_server.port}/"
            f"{DATABASE}"
        )
        with pytest.raises(StoreError, match="missing privilege") as raised:
            await PostgresStore.open(dsn, schema=pg_backend.schema, timeout_s=5.0)
        assert not raised.value.retriable
        assert "own the schema" in str(raised.value)
        assert_secret_kept(raised.value, password)
        await pg_backend.execute(f"CREATE SCHEMA {pg_backend.q} AUTHORIZATION {role}")
        store = await PostgresStore.open(dsn, schema=pg_backend.schema, timeout_s=5.0)
        try:
            await store.commit(CommitBatch(checkpoints={"s": Position("1", "u1")}))
            assert await store.checkpoint("s") is not None
        finally:
            await store.close()
    finally:
        await pg_backend.drop()
        await pg_backend.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://u:pw-Secret-9@h:notaport/db", "mysql://u:pw-Secret-9@h/db"],
)
async def test_an_invalid_dsn_is_not_retriable(dsn: str) -> None:
    with pytest.raises(StoreError, match=r"invalid \[state\] dsn") as raised:
        await PostgresStore.open(dsn, timeout_s=5.0)
    assert not raised.value.retriable
    assert_secret_kept(raised.value, "pw-Secret-9", dsn)


def test_messages_name_the_server_never_the_password() -> None:
    for dsn, password, where in [
        (
            "postgresql://u:pw-Secret-1@db.example.com:6432/hotel",
            "pw-Secret-1",
            "db.example.com:6432/hotel",
        ),
        ("postgresql://u:p%40ss-Secret@db/hotel", "p@ss-Secret", "db:5432/hotel"),
        ("postgres://u:a/b@c-Secret@[::1]/x", "a/b@c-Secret", "[::1]:5432/x"),
        ("postgresql:///ev?host=/run/pg&password=qwerty123", "qwerty123", "/run/pg/ev"),
    ]:
        target = Target(dsn)
        assert target.where == where
        described = target.describe(RuntimeError(f"cannot use {dsn} with {password}"))
        assert password not in described
        assert dsn not in described


async def test_repr_names_the_server_and_schema_only(pg_backend: PostgresBackend) -> None:
    store = await pg_backend.open()
    try:
        assert repr(store) == (
            f"PostgresStore(server={pg_backend.where!r}, schema={pg_backend.schema!r})"
        )
        assert "pg-test-secret" not in repr(store)
    finally:
        await store.close()


# --- open_store picks the backend ---------------------------------------------------------------


async def test_open_store_picks_the_backend(pg_backend: PostgresBackend, tmp_path: Path) -> None:
    settings = StateSettings(
        backend="postgres",
        dsn=pg_backend.dsn,  # type: ignore[arg-type]
        schema=pg_backend.schema,
        pool_min=1,
        pool_max=2,
    )
    store = await open_store(settings)
    try:
        assert isinstance(store, PostgresStore)
        assert store.schema == pg_backend.schema
        await store.anchor("s", Position("1", "u1"))
    finally:
        await store.close()
    assert await pg_backend.count("checkpoints") == 1
    sqlite = await open_store(StateSettings(path=tmp_path / "s.db"))
    try:
        assert isinstance(sqlite, SqliteStore)
    finally:
        await sqlite.close()


# --- the lease: one daemon per schema, whatever its host ------------------------------------------


def _state(pg_backend: PostgresBackend) -> StateSettings:
    return StateSettings(backend="postgres", dsn=pg_backend.dsn, schema=pg_backend.schema)  # type: ignore[arg-type]


async def test_a_second_holder_of_the_schema_is_refused_naming_the_first(
    pg_backend: PostgresBackend,
) -> None:
    """Two daemons on two hosts share nothing local: the lease lives in PostgreSQL (a session
    advisory lock), names its holder, and is free again once released."""
    st = _state(pg_backend)
    assert await current_holder(st) is None
    first = await acquire(st, ["main"], role="daemon")
    try:
        who = await current_holder(st)
        assert who is not None and who["pid"] == str(os.getpid()) and who["role"] == "daemon"
        with pytest.raises(LeaseHeld) as refused:
            await acquire(st, ["main"], role="offset")
        said = str(refused.value)
        assert f"pid {os.getpid()}" in said and pg_backend.schema in said
        assert_secret_kept(refused.value, pg_backend.dsn)
        # Another schema is another store: its lease is free.
        other = await acquire(_state(PostgresBackend(pg_backend.dsn, pg_backend.where)), [])
        await other.release()
    finally:
        await first.release()
    assert await current_holder(st) is None
    again = await acquire(st, ["main"])
    await again.release()
    await again.release()  # idempotent


async def test_a_daemon_runs_on_a_postgres_state_store(
    pg_backend: PostgresBackend, sandbox_factory: Any, tmp_path: Path
) -> None:
    """Issue #11's building block end to end: checkpoints, processed ids and the jsonl sink's
    position land in PostgreSQL; a restart resumes there and delivers nothing twice."""
    from support import count_lines, make_settings, running, sink_ids, truth_ids, wait_until

    gw = await sandbox_factory(backlog=120)
    state = {"backend": "postgres", "dsn": pg_backend.dsn, "schema": pg_backend.schema}
    settings = make_settings(tmp_path, gw.url, state=state)
    sink = tmp_path / "events.jsonl"
    async with running(settings):
        await wait_until(lambda: count_lines(sink) >= 120)
    gw.append("DEMO", 30)
    async with running(settings) as daemon:
        await wait_until(lambda: count_lines(sink) >= 150)
        assert daemon.pipelines["main"].duplicates <= 1  # the inclusive replay of the checkpoint
    assert sorted(sink_ids(sink)) == sorted(truth_ids(gw.events("DEMO")))
    store = await pg_backend.open()
    try:
        cp = await store.checkpoint("main")
        assert cp is not None and cp.offset == gw.events("DEMO")[-1]["metadata"]["offset"]
        assert sink_length(await store.sink_state("jsonl")) == sink.stat().st_size
    finally:
        await store.close()


async def test_the_operator_commands_read_a_postgres_state_store(
    pg_backend: PostgresBackend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """status and offset look for no SQLite file when the state lives in PostgreSQL."""
    store = await pg_backend.open()
    try:
        await store.anchor("main", Position("4711", "u4711"))
    finally:
        await store.close()
    config = tmp_path / "config.toml"
    config.write_text(
        f"""[streams.main]
gateway_url = "http://127.0.0.1:9"
chain_code = "DEMO"
app_key = "key-0001"
[streams.main.auth]
client_id = "cid"
client_secret = "secret-0002"
[state]
backend = "postgres"
dsn = "{pg_backend.dsn}"
schema = "{pg_backend.schema}"
path = "{tmp_path / "absent.db"}"
[metrics]
enabled = false
"""
    )
    for command in (["offset", "show"], ["status"]):
        code = await asyncio.to_thread(main, [*command, "--json", "--config", str(config)])
        assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.count('"4711"') == 2
    assert not (tmp_path / "absent.db").exists()
