"""A staged row refused at COMMIT, not at its statement: a deferred constraint (PostgreSQL
``DEFERRABLE INITIALLY DEFERRED`` foreign key, unique or exclusion constraint, a ``CREATE
CONSTRAINT TRIGGER … DEFERRABLE INITIALLY DEFERRED`` failing on one row's data; SQLite's
deferred foreign key, enforced by the state store's ``foreign_keys=ON``), in a table open
cannot see from the sink's (an audit trigger's table, a function a trigger calls). The same
rules as a statement's refusal (:func:`staged_row_fault`): the commit's staged rows go through
the sink's own path, that event is dead-lettered alone (the refusal names no row: the own path
bisects), every other event written once, the checkpoint past them, the stream on.

Was: the store took the failed COMMIT for an error of its own (class 22/23: not retriable), and
the daemon exited 78, and again at every start on the same event.

What no row's data causes, met at COMMIT (a deferred constraint trigger's audit insert drawing
from a sequence at its MAXVALUE), stays the database's: retried, nothing dead-lettered. (A
deferred check that the store's own rows fail is theirs: PostgreSQL tells by making the checks
immediate, see test_postgres_sink_staged.py.) Real PostgreSQL, real SQLite files, the sandbox
gateway, the daemon in-process."""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from operator_support import query
from pg import sql
from sink_tables import LITE, PG
from support import committed, make_settings, newest_offset, running, wait_until
from test_staged_row_refusals import (
    EVENTS_ONCE,
    GOOD,
    HOSTILE_KEY,
    assert_named_without_data,
    assert_once_each,
    dead_lettered_metric,
    life,
    lite_letters,
    pg_checkpoint,
    pg_letters,
    with_hostile_event,
)

from consumer.core.records import CommitBatch, Staged
from consumer.errors import StagedRowRefused, StoreError
from consumer.sinks.postgres import OWN_POOL, STATE_TRANSACTION
from consumer.state import PostgresStore, SqliteStore

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")


# --- the stores: the failed COMMIT is the staged row's refusal --------------------------------

# name -> (the table "rows" (k, stream) and what refuses HOSTILE_KEY's row at COMMIT; what the
# refusal says: the error's kind, and the constraint or function). {s}: the schema.
PG_DEFERRED = {
    "foreign key": (
        'CREATE TABLE "{s}".parents (k TEXT PRIMARY KEY); '
        "INSERT INTO \"{s}\".parents VALUES ('1'); "
        'CREATE TABLE "{s}".rows (k TEXT CONSTRAINT rows_parent REFERENCES "{s}".parents '
        "DEFERRABLE INITIALLY DEFERRED, stream TEXT)",
        ("ForeignKeyViolationError", "constraint 'rows_parent'"),
    ),
    "unique": (
        'CREATE TABLE "{s}".rows (k TEXT CONSTRAINT rows_once UNIQUE DEFERRABLE INITIALLY '
        "DEFERRED, stream TEXT); "
        f"INSERT INTO \"{{s}}\".rows VALUES ('{HOSTILE_KEY}', 'earlier')",
        ("UniqueViolationError", "constraint 'rows_once'"),
    ),
    "exclusion": (
        'CREATE TABLE "{s}".rows (k TEXT, stream TEXT, CONSTRAINT rows_apart EXCLUDE USING '
        "btree (k WITH =) DEFERRABLE INITIALLY DEFERRED); "
        f"INSERT INTO \"{{s}}\".rows VALUES ('{HOSTILE_KEY}', 'earlier')",
        ("ExclusionViolationError", "constraint 'rows_apart'"),
    ),
    "constraint trigger": (
        'CREATE TABLE "{s}".rows (k TEXT, stream TEXT); '
        'CREATE FUNCTION "{s}".vet() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN '
        "IF NEW.k !~ '^[0-9]+$' THEN RAISE EXCEPTION 'not a key of ours'; END IF; "
        "RETURN NULL; END $$; "
        'CREATE CONSTRAINT TRIGGER vet AFTER INSERT ON "{s}".rows DEFERRABLE INITIALLY '
        'DEFERRED FOR EACH ROW EXECUTE FUNCTION "{s}".vet()',
        ("RaiseError", "PL/pgSQL function {s}.vet()"),
    ),
    "constraint trigger's cast": (
        'CREATE TABLE "{s}".rows (k TEXT, stream TEXT); '
        'CREATE FUNCTION "{s}".vet() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN '
        "PERFORM NEW.k::int; RETURN NULL; END $$; "
        'CREATE CONSTRAINT TRIGGER vet AFTER INSERT ON "{s}".rows DEFERRABLE INITIALLY '
        'DEFERRED FOR EACH ROW EXECUTE FUNCTION "{s}".vet()',
        ("22P02", "PL/pgSQL function {s}.vet()"),
    ),
}


@pytest.mark.parametrize("kind", list(PG_DEFERRED))
async def test_the_postgres_store_says_a_staged_row_was_refused_at_commit(
    postgres_dsn: str, schema: str, kind: str
):
    """The statements all succeed; COMMIT fails on the deferred check of HOSTILE_KEY's row:
    :class:`StagedRowRefused` naming the error and the constraint or the function, never
    the row; nothing committed; the store commits the next batch. A deferred check failing
    for what no row's data causes (a constraint trigger writing to a table that is gone, or
    drawing from a sequence at its limit: retried) is no refusal of a row: a plain
    :class:`StoreError`, as before."""
    store = await PostgresStore.open(postgres_dsn, schema=schema)
    try:
        ddl, (said, named) = PG_DEFERRED[kind]
        await sql(postgres_dsn, "execute", ddl.format(s=schema))
        statement = f'INSERT INTO "{schema}".rows VALUES ($1, $2)'
        batch = CommitBatch(
            processed={"main": ["a", "b"]},
            staged=[Staged(statement, [("1", "main"), (HOSTILE_KEY, "main")])],
        )
        with pytest.raises(StagedRowRefused) as info:
            await store.commit(batch)
        assert await store.seen("main", ["a", "b"]) == set()  # nothing committed
        assert await store.commit(
            CommitBatch(processed={"main": ["a"]}, staged=[Staged(statement, [("1", "main")])])
        )
        assert await store.seen("main", ["a", "b"]) == {"a"}
        # What no row's data causes, met at COMMIT: a deferred constraint trigger writing to
        # a table that is gone (42P01), or drawing from a sequence at its MAXVALUE (2200H,
        # retried): the store's error, as at a statement.
        await sql(
            postgres_dsn,
            "execute",
            f'CREATE TABLE "{schema}".gone (k TEXT); '
            f'CREATE SEQUENCE "{schema}".full MAXVALUE 2 START 2; '
            f"SELECT nextval('\"{schema}\".full'); "
            f'CREATE FUNCTION "{schema}".log() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN '
            f'INSERT INTO "{schema}".gone VALUES (NEW.k); RETURN NULL; END $$; '
            f'CREATE FUNCTION "{schema}".draw() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN '
            f"PERFORM nextval('\"{schema}\".full'); RETURN NULL; END $$; "
            f'CREATE TABLE "{schema}".logged (k TEXT, stream TEXT); '
            f'CREATE CONSTRAINT TRIGGER log AFTER INSERT ON "{schema}".logged DEFERRABLE '
            f'INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION "{schema}".log(); '
            f'CREATE TABLE "{schema}".drawn (k TEXT, stream TEXT); '
            f'CREATE CONSTRAINT TRIGGER draw AFTER INSERT ON "{schema}".drawn DEFERRABLE '
            f'INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION "{schema}".draw(); '
            f'DROP TABLE "{schema}".gone',
        )
        others: list[StoreError] = []
        for into in ("logged", "drawn"):
            every = Staged(f'INSERT INTO "{schema}".{into} VALUES ($1, $2)', [("2", "main")])
            with pytest.raises(StoreError) as other:
                await store.commit(CommitBatch(staged=[every]))
            others.append(other.value)
    finally:
        await store.close()
    message = str(info.value)
    assert said in message and named.format(s=schema) in message, message
    assert "COMMIT" in message, message
    assert HOSTILE_KEY not in message and "Failing row" not in message, message
    gone, full = others
    assert not isinstance(gone, StagedRowRefused) and "gone" in str(gone), gone
    assert not isinstance(full, StagedRowRefused) and "2200H" in str(full), full
    assert full.retriable


async def test_the_sqlite_store_says_a_staged_row_was_refused_at_commit(tmp_path: Path):
    """SQLite: a deferred foreign key (the store runs with foreign_keys=ON) fails the COMMIT,
    not the INSERT: :class:`StagedRowRefused`, nothing committed, the transaction rolled back
    (the next commit goes through on the same connection)."""
    state = tmp_path / "state.db"
    store = await SqliteStore.open(state)
    try:
        with contextlib.closing(sqlite3.connect(state)) as db:
            db.executescript(
                "CREATE TABLE parents (k TEXT PRIMARY KEY); INSERT INTO parents VALUES ('1'); "
                "CREATE TABLE rows (k TEXT REFERENCES parents (k) DEFERRABLE INITIALLY "
                "DEFERRED, stream TEXT)"
            )
        statement = "INSERT INTO rows VALUES (?, ?)"
        batch = CommitBatch(
            processed={"main": ["a", "b"]},
            staged=[Staged(statement, [("1", "main"), (HOSTILE_KEY, "main")])],
        )
        with pytest.raises(StagedRowRefused, match="FOREIGN KEY constraint failed") as info:
            await store.commit(batch)
        assert "COMMIT" in str(info.value) and HOSTILE_KEY not in str(info.value)
        assert await store.seen("main", ["a", "b"]) == set()
        assert await store.commit(
            CommitBatch(processed={"main": ["a"]}, staged=[Staged(statement, [("1", "main")])])
        )
        assert await store.seen("main", ["a", "b"]) == {"a"}
    finally:
        await store.close()
    assert query(state, "SELECT k FROM rows") == [("1",)]


# --- the committer: the refusal names no row -------------------------------------------------


def state_file_with_deferred_key(state: Path, known: list[str]) -> None:
    """The sink's table in the state file, its audit trigger (which cannot RAISE: open keeps
    the table) writing each insert into ``audit``, whose key is a deferred foreign key to
    ``known``: a row of a key not there fails the COMMIT, not its statement."""
    with contextlib.closing(sqlite3.connect(state)) as db:
        db.executescript(
            f"CREATE TABLE opera_events ({LITE}); CREATE TABLE known (k TEXT PRIMARY KEY); "
            "CREATE TABLE audit (uid TEXT NOT NULL, k TEXT CONSTRAINT audit_known "
            "REFERENCES known (k) DEFERRABLE INITIALLY DEFERRED); "
            "CREATE TRIGGER audit AFTER INSERT ON opera_events "
            "BEGIN INSERT INTO audit VALUES (NEW.unique_event_id, NEW.primary_key); END"
        )
        db.executemany("INSERT INTO known VALUES (?)", [(k,) for k in known])
        db.commit()


async def test_a_row_refused_at_commit_is_set_aside_the_rest_committed_once(tmp_path: Path):
    """The batch's COMMIT fails on ``bad``'s key (not in ``known``; the refusal names no row):
    the rows go through the sink's own path, which bisects the batch, dead-letters ``bad``
    alone and writes the others once; the checkpoint passes all four."""
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    state_file_with_deferred_key(
        state, [e.primary_key for e in EVENTS_ONCE if e.unique_event_id != "bad"]
    )
    async with life(state) as (_, sink, committer):
        assert await committer.flush()
        assert committer.aside_dead_letters == 1
        assert sink.waits  # its own path from now on
    await assert_once_each(state)
    assert sorted(r[0] for r in query(state, "SELECT uid FROM audit")) == GOOD
    letter = (await lite_letters(state))[0]
    assert "FOREIGN KEY constraint failed" in letter.error, letter.error


# --- the daemon: that event dead-lettered, the rest written once, the stream on --------------


async def test_a_deferred_foreign_key_in_the_state_file_dead_letters_that_event(
    sandbox_factory: Any, tmp_path: Path
):
    """SQLite, the sink's table in the state store's file; the hostile event's key is not in
    ``known``, and its audit row's deferred foreign key fails the COMMIT. That event is
    dead-lettered naming the table; every other event is in the table, inserted once; the
    checkpoint reaches the last offset; the daemon keeps running."""
    gw, ids, bad = await with_hostile_event(sandbox_factory)
    state = tmp_path / "state.db"
    await (await SqliteStore.open(state)).close()
    state_file_with_deferred_key(state, sorted({e["primaryKey"] for e in gw.events("DEMO")}))
    settings = make_settings(tmp_path, gw.url, sink={"type": "sqlite"})
    async with running(settings) as daemon:
        await wait_until(lambda: committed(state, newest_offset(gw)))
        assert not daemon._stop.is_set()
        assert daemon.committer.aside_dead_letters == 1
        assert daemon.pipelines["main"].dead_lettered == 1
        assert dead_lettered_metric(daemon) == 1
    assert daemon.exit_code == 0
    written = [r[0] for r in query(state, "SELECT unique_event_id FROM opera_events")]
    assert sorted(written) == sorted(ids)
    assert Counter(r[0] for r in query(state, "SELECT uid FROM audit")) == Counter(ids)
    letters = await lite_letters(state)
    assert [(d.unique_event_id, d.primary_key, d.reason) for d in letters] == [
        (bad, HOSTILE_KEY, "sink_rejected")
    ]
    assert_named_without_data(letters[0], "'opera_events'", "FOREIGN KEY constraint failed")


def pg_deferred_table(table: str, kind: str) -> tuple[str, str]:
    """The sink's table and an audit of the writes that committed (its trigger cannot RAISE:
    open keeps the rows in the state transaction), and what refuses the hostile event's row
    at COMMIT only: the audit's deferred foreign key to the keys ``known`` (filled by the
    caller), or a deferred constraint trigger whose function calls one that RAISEs on a key
    that is not a number. Returns the DDL and what the dead letter names."""
    audit = (
        f"CREATE FUNCTION {table}_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f'INSERT INTO "{table}_audit" VALUES (NEW.unique_event_id, NEW.primary_key); '
        "RETURN NULL; END $$; "
        f'CREATE TRIGGER audit AFTER INSERT OR UPDATE ON "{table}" '
        f"FOR EACH ROW EXECUTE FUNCTION {table}_audit(); "
    )
    if kind == "foreign key":
        return (
            f'CREATE TABLE "{table}" ({PG}); CREATE TABLE "{table}_known" (k TEXT PRIMARY KEY); '
            f'CREATE TABLE "{table}_audit" (uid TEXT NOT NULL, k TEXT CONSTRAINT '
            f'{table}_known_key REFERENCES "{table}_known" DEFERRABLE INITIALLY DEFERRED); '
            + audit,
            f"FOREIGN KEY constraint '{table}_known_key'",
        )
    return (
        f'CREATE TABLE "{table}" ({PG}); CREATE TABLE "{table}_audit" (uid TEXT NOT NULL, k TEXT); '
        f"CREATE FUNCTION {table}_key(k TEXT) RETURNS void LANGUAGE plpgsql AS $$ BEGIN "
        "IF k !~ '^[0-9A-Za-z]+$' THEN RAISE EXCEPTION 'not a key of ours'; END IF; END $$; "
        f"CREATE FUNCTION {table}_vet() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"PERFORM {table}_key(NEW.primary_key); RETURN NULL; END $$; "
        f'CREATE CONSTRAINT TRIGGER vet AFTER INSERT OR UPDATE ON "{table}" DEFERRABLE '
        f"INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {table}_vet(); " + audit,
        f"PL/pgSQL function {table}_vet()",
    )


@pytest.mark.parametrize("kind", ["foreign key", "constraint trigger"])
async def test_a_deferred_check_in_the_state_transaction_dead_letters_that_event(
    sandbox_factory: Any, tmp_path: Path, postgres_dsn: str, kind: str
):
    """PostgreSQL, the sink on the state's DSN (in the state transaction: open sees nothing
    that may refuse a row). The hostile event's row fails a deferred check at COMMIT: the
    audit row's foreign key, or a constraint trigger's RAISE. That event is dead-lettered
    naming the table and the constraint or function, never the key; every other event is in
    the table, each written once; the checkpoint reaches the last offset; the daemon keeps
    running, the sink on its own pool."""
    gw, ids, bad = await with_hostile_event(sandbox_factory)
    table = f"t_{uuid.uuid4().hex[:12]}"
    schema = f"s_{table}"
    ddl, named = pg_deferred_table(table, kind)
    await sql(postgres_dsn, "execute", ddl)
    if kind == "foreign key":
        keys = sorted({e["primaryKey"] for e in gw.events("DEMO")})
        await sql(
            postgres_dsn,
            "execute",
            f'INSERT INTO "{table}_known" SELECT unnest($1::text[])',
            keys,
        )
    state = {"backend": "postgres", "dsn": postgres_dsn, "schema": schema}
    sink = {"type": "postgres", "dsn": postgres_dsn, "table": table}
    settings = make_settings(tmp_path, gw.url, sink=sink, state=state)
    async with running(settings) as daemon:
        assert daemon.sink.mode == STATE_TRANSACTION  # type: ignore[attr-defined]
        await pg_checkpoint(daemon, newest_offset(gw))
        assert not daemon._stop.is_set()
        assert daemon.sink.mode == OWN_POOL  # type: ignore[attr-defined]
        assert daemon.committer.aside_dead_letters == 1
        assert daemon.pipelines["main"].dead_lettered == 1
        assert dead_lettered_metric(daemon) == 1
    assert daemon.exit_code == 0
    written = [
        r[0] for r in await sql(postgres_dsn, "fetch", f'SELECT unique_event_id FROM "{table}"')
    ]
    assert sorted(written) == sorted(ids)
    audit = Counter(
        r[0] for r in await sql(postgres_dsn, "fetch", f'SELECT uid FROM "{table}_audit"')
    )
    assert audit == Counter(ids)  # each written once
    letters = await pg_letters(postgres_dsn, schema)
    assert [(d.unique_event_id, d.primary_key, d.reason) for d in letters] == [
        (bad, HOSTILE_KEY, "sink_rejected")
    ]
    assert_named_without_data(letters[0], repr(table), named)
