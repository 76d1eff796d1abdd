"""`dlq replay` into a sink that stages its rows in the state transaction (a sqlite sink in the
state file, the postgres sink on the state store's database), when that transaction refuses
one replayed event's row (a trigger failing on its data) and the sink's own path refuses it
too: that event stays in the DLQ, its one letter (the same id, the new reason, one more
attempt), reported failed; the others are delivered, recorded and out of the DLQ.

Was: the committer dead-lettered the refused event afresh in the commit that also removed the
letter the replay had resolved: the INSERT met the original letter (same stream and
uniqueEventId) and counted an attempt on it, then the DELETE of the resolved letter removed it.
The event was in neither the sink nor the DLQ (its id recorded as processed, so OHIP sending it
again was skipped), and the replay had printed it as delivered before the commit ran. Real
SQLite files and real PostgreSQL (skipped without a server)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
from operator_support import cli, write_config
from pg import sql
from sink_tables import LITE, PG
from support import dead_letter

from consumer.config import load_settings
from consumer.core.records import CommitBatch, DeadLetter, DeadLetterRow
from consumer.errors import StoreError
from consumer.state import SqliteStore, open_store

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging", "hermetic_config")

HOSTILE_KEY = "HOSTILE-KEY-3f2a"  # not JSON, nor a number: the trigger fails on its row


def letter(i: int, key: str) -> DeadLetter:
    """The dead letter of event ``uid-<i>`` with primaryKey ``key``."""
    d = dead_letter(i)
    event = json.loads(d.payload)
    event["primaryKey"] = key
    return dataclasses.replace(d, payload=json.dumps(event), primary_key=key)


async def seed_and_read(config: Path, letters: list[DeadLetter] | None = None) -> Any:
    store = await open_store(load_settings(config).state)
    try:
        if letters:
            await store.commit(CommitBatch(dead_letters=letters))
        return list(await store.dead_letters()), await store.seen("main", ["uid-1", "uid-3"])
    finally:
        await store.close()


async def replay_with_one_refused(
    capsys: pytest.CaptureFixture[str], config: Path
) -> tuple[list[DeadLetterRow], list[dict[str, Any]]]:
    """Letters uid-1, uid-2 (hostile), uid-3 of one resource each, replayed: asserts the
    outcome and the DLQ; returns the letters left, and the outcomes."""
    await seed_and_read(config, [letter(1, "1"), letter(2, HOSTILE_KEY), letter(3, "3")])
    before, _ = await seed_and_read(config)
    code, out, err = await cli(capsys, "dlq", "replay", "--all", "--json", "--config", str(config))
    assert code == 1, out + err  # one not delivered
    outcomes = json.loads(out)
    assert [(o["unique_event_id"], o["result"]) for o in outcomes] == [
        ("uid-1", "delivered"),
        ("uid-2", "failed"),
        ("uid-3", "delivered"),
    ]
    left, seen = await seed_and_read(config)
    # Its original letter, kept (its id), with the refusal's reason; one attempt more.
    assert [(d.id, d.unique_event_id, d.reason, d.attempts) for d in left] == [
        (before[1].id, "uid-2", "sink_rejected", 2)
    ]
    assert json.loads(left[0].payload)["primaryKey"] == HOSTILE_KEY  # replayable again
    assert HOSTILE_KEY not in outcomes[1]["detail"] and outcomes[1]["detail"]
    assert seen == {"uid-1", "uid-3"}
    return left, outcomes


def key_json_table(state: Path) -> None:
    """The sink's table in the state file, with a trigger failing on a primaryKey that is
    not JSON. No RAISE (a sqlite sink refuses a table with one in the state file at open): an
    expression failing on one row's data, in the state transaction and on the own path."""
    with contextlib.closing(sqlite3.connect(state)) as db:
        db.executescript(
            f"CREATE TABLE opera_events ({LITE}); CREATE TRIGGER key_json BEFORE INSERT ON "
            "opera_events BEGIN SELECT json_extract(NEW.primary_key, '$'); END"
        )


async def test_a_replayed_event_refused_in_the_state_file_stays_in_the_dlq(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9", sink={"type": "sqlite"})
    state = tmp_path / "state.db"
    await seed_and_read(config)  # the store, then the table the sink adopts
    key_json_table(state)
    await replay_with_one_refused(capsys, config)
    with contextlib.closing(sqlite3.connect(state)) as db:
        written = [r[0] for r in db.execute("SELECT unique_event_id FROM opera_events")]
    assert sorted(written) == ["uid-1", "uid-3"]


async def test_a_replayed_event_refused_in_the_postgres_state_transaction_stays_in_the_dlq(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], postgres_dsn: str
) -> None:
    table = f"t_{uuid.uuid4().hex[:12]}"
    schema = f"s_{table}"
    await sql(
        postgres_dsn,
        "execute",
        f"CREATE FUNCTION {table}_cast() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM NEW.primary_key::int; RETURN NEW; END $$; "
        f'CREATE TABLE "{table}" ({PG}); '
        f'CREATE TRIGGER cast_key BEFORE INSERT OR UPDATE ON "{table}" '
        f"FOR EACH ROW EXECUTE FUNCTION {table}_cast()",
    )
    try:
        config = write_config(
            tmp_path,
            "http://127.0.0.1:9",
            sink={"type": "postgres", "dsn": postgres_dsn, "table": table},
            state={"backend": "postgres", "dsn": postgres_dsn, "schema": schema},
        )
        _, outcomes = await replay_with_one_refused(capsys, config)
        assert table in outcomes[1]["detail"]
        rows = await sql(postgres_dsn, "fetch", f'SELECT unique_event_id FROM "{table}"')
        assert sorted(r[0] for r in rows) == ["uid-1", "uid-3"]
    finally:
        await sql(
            postgres_dsn,
            "execute",
            f'DROP TABLE IF EXISTS "{table}"; DROP FUNCTION IF EXISTS {table}_cast(); '
            f'DROP SCHEMA IF EXISTS "{schema}" CASCADE',
        )


async def test_a_staged_delivery_is_reported_once_its_commit_is_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row staged for the state transaction is delivered by the commit: when that commit
    fails, nothing was delivered and the letters stay; the replay says so (it printed
    "delivered" for each as it staged it, exit 1 for the store's error alone)."""
    config = write_config(tmp_path, "http://127.0.0.1:9", sink={"type": "sqlite"})
    await seed_and_read(config, [letter(1, "1"), letter(2, "2")])

    async def failing(self: SqliteStore, batch: CommitBatch, now: float | None = None) -> bool:
        if batch.resolved:  # the replay's commit
            raise StoreError("disk I/O error (injected)")
        return await commit(self, batch, now)

    commit = SqliteStore.commit
    monkeypatch.setattr(SqliteStore, "commit", failing)
    code, out, err = await cli(capsys, "dlq", "replay", "--all", "--json", "--config", str(config))
    monkeypatch.undo()
    assert code != 0 and "injected" in err
    outcomes = json.loads(out)
    assert [(o["unique_event_id"], o["result"]) for o in outcomes] == [
        ("uid-1", "failed"),
        ("uid-2", "failed"),
    ]
    assert all("stays in the DLQ" in o["detail"] for o in outcomes)
    left, seen = await seed_and_read(config)
    assert [d.unique_event_id for d in left] == ["uid-1", "uid-2"] and not seen


async def test_the_later_events_of_a_resource_refused_at_commit_stay_behind_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """uid-1 and uid-2 are one resource's; the state transaction, then the own path, refuse
    uid-1 (its eventName is not JSON), not uid-2: uid-2 is never written after uid-1 failed
    (the committer parks it in that commit; a later page skips the key's events), both stay
    in the DLQ, in order; the other resource's event is delivered."""
    config = write_config(tmp_path, "http://127.0.0.1:9", sink={"type": "sqlite"})
    state = tmp_path / "state.db"
    await seed_and_read(config)
    with contextlib.closing(sqlite3.connect(state)) as db:
        db.executescript(
            f"CREATE TABLE opera_events ({LITE}); CREATE TRIGGER name_json BEFORE INSERT ON "
            "opera_events BEGIN SELECT json_extract(NEW.event_name, '$'); END"
        )
    letters = [dead_letter(1, name="BAD"), dead_letter(2, name="2"), dead_letter(3, name="3")]
    letters[1] = dataclasses.replace(
        letters[1], payload=letters[1].payload.replace("pk-2", "pk-1"), primary_key="pk-1"
    )
    await seed_and_read(config, letters)
    code, out, err = await cli(capsys, "dlq", "replay", "--all", "--json", "--config", str(config))
    assert code == 1, out + err
    outcomes = json.loads(out)
    assert [(o["unique_event_id"], o["result"]) for o in outcomes] == [
        ("uid-1", "failed"),
        ("uid-2", "skipped"),
        ("uid-3", "delivered"),
    ]
    assert "earlier event" in outcomes[1]["detail"]
    left, _ = await seed_and_read(config)
    assert [(d.unique_event_id, d.reason) for d in left] == [
        ("uid-1", "sink_rejected"),
        ("uid-2", "parked"),
    ]
    with contextlib.closing(sqlite3.connect(state)) as db:
        written = [r[0] for r in db.execute("SELECT unique_event_id FROM opera_events")]
    assert written == ["uid-3"]
    # Replayed again, uid-2 waits behind uid-1 (still refused), never written past it.
    code, out, err = await cli(capsys, "dlq", "replay", "--all", "--json", "--config", str(config))
    assert code == 1, out + err
    assert [(o["unique_event_id"], o["result"]) for o in json.loads(out)] == [
        ("uid-1", "failed"),
        ("uid-2", "skipped"),
    ]
    left, _ = await seed_and_read(config)
    assert [d.unique_event_id for d in left] == ["uid-1", "uid-2"]
