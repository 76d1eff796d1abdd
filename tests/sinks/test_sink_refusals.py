"""The postgres sink and a row its table refuses by other means than a constraint: a
row-level security policy's WITH CHECK, a trigger's or a generated column's function that
RAISEs. That event alone is dead-lettered, its reason naming the cause and the way back (``dlq
replay``), the other events written, the checkpoint past it; never the server's DETAIL (event
data) in an error or a log line. Real PostgreSQL, the sandbox gateway, the daemon in-process.
(The sqlite sink's cases: test_sqlite_sink_refusals.py.)

Was: each was retried for ever (a policy's refusal is SQLSTATE 42501, a privilege's class; a
RAISE P0001), the stream stuck on that event, the DETAIL logged at each try.

And the errors every event would hit stay retried, nothing dead-lettered while they last: a
privilege revoked, policies admitting no row; once the operator fixes it, every event is
written. A row refused in the state store's transaction leaves no DETAIL in its StoreError."""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from log_capture import captured_logs, records
from operator_support import settled
from pg import sql
from sink_tables import PG
from support import committed, make_settings, newest_offset, running, truth_ids, wait_until

from consumer.core.records import CommitBatch, DeadLetterRow, Staged
from consumer.errors import StoreError
from consumer.sinks.postgres import OWN_POOL
from consumer.state import PostgresStore, SqliteStore

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")

EVENTS = 20
MARK = "DETAIL-MARK"  # what a RAISE puts in its DETAIL, after the row's data
FAST_RETRIES = {"sink_retry_initial_s": 0.05, "sink_retry_max_s": 0.2}
RETRYING = "sink write failed; retrying"


@dataclass
class Role:
    """A login role that is no superuser (row-level security does not apply to one), with a
    schema of its own, first in its search_path (``"$user"``): the sink's table goes there."""

    name: str
    dsn: str


@pytest.fixture
async def role(postgres_dsn: str) -> AsyncIterator[Role]:
    name, password = f"r_{uuid.uuid4().hex[:12]}", "role-Secret-31"
    await sql(postgres_dsn, "execute", f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    await sql(postgres_dsn, "execute", f"CREATE SCHEMA AUTHORIZATION {name}")
    parts = urlsplit(postgres_dsn)
    netloc = f"{name}:{password}@{parts.netloc.rpartition('@')[2]}"
    yield Role(name, urlunsplit(parts._replace(netloc=netloc)))
    await sql(postgres_dsn, "execute", f"DROP OWNED BY {name} CASCADE")
    await sql(postgres_dsn, "execute", f"DROP ROLE {name}")


def sqlite_ddl(db: Path, ddl: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.executescript(ddl)


async def pg_outcome(
    admin: str, table: str, state: dict[str, Any] | None, tmp_path: Path
) -> tuple[list[str], list[DeadLetterRow]]:
    """The ids in the sink's table (``table`` qualified as needed) and the dead letters."""
    rows = await sql(admin, "fetch", f"SELECT unique_event_id FROM {table}")
    return [r[0] for r in rows], await dead_letters(state and admin, tmp_path, state)


async def dead_letters(
    admin: str | None, tmp_path: Path, state: dict[str, Any] | None = None
) -> list[DeadLetterRow]:
    """The dead letters: in PostgreSQL (``admin``, the ``state``'s schema), else in the
    SQLite state store under ``tmp_path``."""
    store: Any = (
        await PostgresStore.open(admin, schema=state["schema"])
        if admin and state
        else await SqliteStore.open(tmp_path / "state.db")
    )
    try:
        return list(await store.dead_letters())
    finally:
        await store.close()


def retried(buffer: StringIO, times: int) -> Callable[[], bool]:
    """True once the pipeline has retried a failing write ``times`` times."""

    def check() -> bool:
        attempts = [r.get("attempt", 0) for r in records(buffer) if r["event"] == RETRYING]
        return max(attempts, default=0) >= times

    return check


def assert_refused_alone(
    written: list[str], letters: list[DeadLetterRow], ids: list[str], bad: str, *words: str
) -> str:
    assert sorted(written) == sorted(i for i in ids if i != bad)
    assert [(d.unique_event_id, d.reason) for d in letters] == [(bad, "sink_rejected")]
    error = letters[0].error
    for word in words:
        assert word in error, error
    assert "refused the event's row" in error and "dlq replay" in error, error
    assert MARK not in error and "Failing row" not in error and len(error) <= 1000, error
    return error


@pytest.mark.parametrize("mode", ["own pool", "the state store's dsn"])
async def test_a_row_a_row_level_security_policy_refuses_dead_letters_that_event_alone(
    sandbox_factory, tmp_path: Path, postgres_dsn: str, role: Role, mode: str
):
    """A policy's WITH CHECK refusing one event's row (42501, as a privilege's refusal) is
    that event's: dead-lettered, naming the policy. On the state store's DSN, row-level
    security keeps the rows on the sink's own pool (as a constraint does): in the state
    transaction the refusal failed the whole commit (exit 78 blaming the state store)."""
    gw = await sandbox_factory(backlog=EVENTS)
    ids = truth_ids(gw.events("DEMO"))
    bad = ids[7]
    table = f"t_{uuid.uuid4().hex[:12]}"
    await sql(role.dsn, "execute", f'CREATE TABLE "{table}" ({PG})')
    await sql(
        role.dsn,
        "execute",
        f'ALTER TABLE "{table}" ENABLE ROW LEVEL SECURITY; '
        f'ALTER TABLE "{table}" FORCE ROW LEVEL SECURITY; '
        f'CREATE POLICY not_that_one ON "{table}" USING (true) '
        f"WITH CHECK (unique_event_id <> '{bad}')",
    )
    sink = {"type": "postgres", "dsn": role.dsn, "table": table}
    state: dict[str, Any] | None = None
    if mode.endswith("dsn"):
        state = {"backend": "postgres", "dsn": role.dsn, "schema": f"s_{table}"}
        await sql(postgres_dsn, "execute", f"CREATE SCHEMA s_{table} AUTHORIZATION {role.name}")
    settings = make_settings(tmp_path, gw.url, sink=sink, state=state)
    with captured_logs() as buffer:
        async with running(settings) as daemon:
            await wait_until(settled(daemon, "main", EVENTS))
            pipeline = daemon.pipelines["main"]
            assert (pipeline.delivered, pipeline.dead_lettered) == (EVENTS - 1, 1)
            if state is None:
                await wait_until(lambda: committed(tmp_path / "state.db", newest_offset(gw)))
            assert daemon.sink.mode == OWN_POOL  # type: ignore[attr-defined]
    assert daemon.exit_code == 0
    written, letters = await pg_outcome(postgres_dsn, f'{role.name}."{table}"', state, tmp_path)
    assert_refused_alone(
        written, letters, ids, bad, "row-level security policy", "'not_that_one'", table
    )
    logs = records(buffer)
    assert logs and not [e for e in logs if bad in repr(e) and e["event"] == RETRYING]


@pytest.mark.parametrize("where", ["trigger", "generated column"])
async def test_a_row_the_operators_function_refuses_with_raise_dead_letters_that_event_alone(
    sandbox_factory, tmp_path: Path, postgres_dsn: str, where: str
):
    """A trigger's PL/pgSQL RAISE (P0001), or that of an immutable function a generated
    column calls, refusing one event's row: taken at its word, as a CHECK's refusal is. The
    dead letter names the function and carries its message, never its DETAIL (a RAISE's may
    hold the row's data: here the event's id after a mark)."""
    gw = await sandbox_factory(backlog=EVENTS)
    ids = truth_ids(gw.events("DEMO"))
    bad = ids[7]
    table = f"t_{uuid.uuid4().hex[:12]}"
    function = f"{table}_refuse"
    check = f"IF id = '{bad}' THEN RAISE EXCEPTION 'refused by the audit rule' USING "
    check += f"DETAIL = '{MARK} ' || id, HINT = '{MARK} hint'; END IF;"
    if where == "trigger":
        await sql(
            postgres_dsn,
            "execute",
            f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"DECLARE id text := NEW.unique_event_id; BEGIN {check} RETURN NEW; END $$; "
            f'CREATE TABLE "{table}" ({PG}); '
            f'CREATE TRIGGER audit BEFORE INSERT OR UPDATE ON "{table}" '
            f"FOR EACH ROW EXECUTE FUNCTION {function}()",
        )
    else:
        await sql(
            postgres_dsn,
            "execute",
            f"CREATE FUNCTION {function}(id text) RETURNS text IMMUTABLE LANGUAGE plpgsql AS $$ "
            f"BEGIN {check} RETURN id; END $$; "
            f'CREATE TABLE "{table}" ({PG}, '
            f"checked TEXT GENERATED ALWAYS AS ({function}(unique_event_id)) STORED)",
        )
    sink = {"type": "postgres", "dsn": postgres_dsn, "table": table}
    settings = make_settings(tmp_path, gw.url, sink=sink)
    with captured_logs() as buffer:
        async with running(settings) as daemon:
            await wait_until(settled(daemon, "main", EVENTS))
            pipeline = daemon.pipelines["main"]
            assert (pipeline.delivered, pipeline.dead_lettered) == (EVENTS - 1, 1)
            await wait_until(lambda: committed(tmp_path / "state.db", newest_offset(gw)))
    assert daemon.exit_code == 0
    written, letters = await pg_outcome(postgres_dsn, f'"{table}"', None, tmp_path)
    assert_refused_alone(
        written, letters, ids, bad, f"PL/pgSQL function {function}(", "raised P0001",
        "refused by the audit rule", "fix the function or the trigger",
    )  # fmt: skip
    logs = records(buffer)
    assert logs and not [e for e in logs if MARK in repr(e)]


@pytest.mark.parametrize("fault", ["privilege revoked", "no policy admits a row"])
async def test_a_refusal_every_event_meets_is_retried_until_fixed_never_dead_lettered(
    sandbox_factory, tmp_path: Path, postgres_dsn: str, role: Role, fault: str
):
    """Also 42501, but no event's fault: INSERT revoked from the sink's user (row-level
    security on, a policy admitting every row), or row-level security with no policy at all.
    Retried, nothing dead-lettered, until the operator grants it back or adds a policy; then
    every event is written."""
    gw = await sandbox_factory(backlog=EVENTS)
    ids = truth_ids(gw.events("DEMO"))
    table = f"t_{uuid.uuid4().hex[:12]}"
    await sql(role.dsn, "execute", f'CREATE TABLE "{table}" ({PG})')
    rls = (
        f'ALTER TABLE "{table}" ENABLE ROW LEVEL SECURITY; '
        f'ALTER TABLE "{table}" FORCE ROW LEVEL SECURITY'
    )
    if fault == "privilege revoked":
        rls += f'; CREATE POLICY every_row ON "{table}" USING (true) WITH CHECK (true)'
        fix = f'GRANT INSERT ON {role.name}."{table}" TO {role.name}'
    else:
        fix = f'CREATE POLICY every_row ON {role.name}."{table}" USING (true) WITH CHECK (true)'
    await sql(role.dsn, "execute", rls)
    if fault == "privilege revoked":
        await sql(
            postgres_dsn, "execute", f'REVOKE INSERT ON {role.name}."{table}" FROM {role.name}'
        )
    sink = {"type": "postgres", "dsn": role.dsn, "table": table}
    settings = make_settings(tmp_path, gw.url, sink=sink, pipeline=FAST_RETRIES)
    with captured_logs() as buffer:
        async with running(settings) as daemon:
            pipeline = daemon.pipelines["main"]
            await wait_until(retried(buffer, 3))
            assert (pipeline.delivered, pipeline.dead_lettered) == (0, 0)
            await sql(postgres_dsn, "execute", fix)
            await wait_until(settled(daemon, "main", EVENTS))
            assert (pipeline.delivered, pipeline.dead_lettered) == (EVENTS, 0)
            await wait_until(lambda: committed(tmp_path / "state.db", newest_offset(gw)))
    assert daemon.exit_code == 0
    written, letters = await pg_outcome(postgres_dsn, f'{role.name}."{table}"', None, tmp_path)
    assert sorted(written) == sorted(ids) and letters == []
    errors = [e for e in records(buffer) if e["event"] == "postgres sink: server error, retrying"]
    assert errors and table in repr(errors[0]), errors[:1]


async def test_an_error_plpgsql_raises_for_every_event_is_retried_not_dead_lettered(
    sandbox_factory, tmp_path: Path, postgres_dsn: str
):
    """A trigger with no RAISE of its own reads a setting with SELECT ... INTO STRICT from the
    operator's config table, which is empty: PL/pgSQL raises P0002 (no_data_found) for every
    event, the table's state and not a row's. Retried until the table is filled, nothing
    dead-lettered (class P0 was all taken for an operator's RAISE: each event dead-lettered)."""
    gw = await sandbox_factory(backlog=EVENTS)
    ids = truth_ids(gw.events("DEMO"))
    table = f"t_{uuid.uuid4().hex[:12]}"
    await sql(
        postgres_dsn,
        "execute",
        f'CREATE TABLE "{table}_cfg" (region text NOT NULL); '
        f"CREATE FUNCTION {table}_stamp() RETURNS trigger LANGUAGE plpgsql AS $$ "
        f'DECLARE r text; BEGIN SELECT region INTO STRICT r FROM "{table}_cfg"; '
        "RETURN NEW; END $$; "
        f'CREATE TABLE "{table}" ({PG}); '
        f'CREATE TRIGGER stamp BEFORE INSERT OR UPDATE ON "{table}" '
        f"FOR EACH ROW EXECUTE FUNCTION {table}_stamp()",
    )
    sink = {"type": "postgres", "dsn": postgres_dsn, "table": table}
    settings = make_settings(tmp_path, gw.url, sink=sink, pipeline=FAST_RETRIES)
    with captured_logs() as buffer:
        async with running(settings) as daemon:
            pipeline = daemon.pipelines["main"]
            await wait_until(retried(buffer, 3))
            assert (pipeline.delivered, pipeline.dead_lettered) == (0, 0)
            await sql(postgres_dsn, "execute", f"INSERT INTO \"{table}_cfg\" VALUES ('eu')")
            await wait_until(settled(daemon, "main", EVENTS))
            assert (pipeline.delivered, pipeline.dead_lettered) == (EVENTS, 0)
    written, letters = await pg_outcome(postgres_dsn, f'"{table}"', None, tmp_path)
    assert sorted(written) == sorted(ids) and letters == []


async def test_a_row_refused_in_the_state_transaction_leaves_no_detail_in_the_store_error(
    postgres_dsn: str, schema: str
):
    """A staged row the server refuses in the state store's commit (a constraint added to
    the sink's table after open): the StoreError (logged, the daemon's exit line) carries the
    server's message, never its DETAIL (``Failing row contains (…)``: the event's data)."""
    store = await PostgresStore.open(postgres_dsn, schema=schema)
    try:
        await sql(
            postgres_dsn,
            "execute",
            f'CREATE TABLE "{schema}".rows (id TEXT PRIMARY KEY, stream TEXT, note TEXT, '
            "CONSTRAINT no_secrets CHECK (note NOT LIKE 'secret%'))",
        )
        statement = f'INSERT INTO "{schema}".rows VALUES ($1, $2, $3)'
        batch = CommitBatch(staged=[Staged(statement, [("u1", "main", "secret guest data")])])
        with pytest.raises(StoreError) as info:
            await store.commit(batch)
    finally:
        await store.close()
    message = str(info.value)
    assert "no_secrets" in message, message
    assert "Failing row" not in message and "guest data" not in message, message
