"""The state store's semantics, one suite run on both backends (tests/state/store_backends.py):
SQLite on a file in tmp_path, PostgreSQL in a fresh schema on the throwaway server of
tests/pg.py (those cases skip, with the reason, where no PostgreSQL server is installed).

Tests marked ``@sqlite_only`` are about the SQLite file itself (its mode, WAL, sqlite3's own
errors); everything about what the store keeps and answers runs on both.
PostgreSQL-specific behaviour (concurrent migrations, connection errors, bounded prunes) is in
test_postgres_store.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from store_backends import Backend, PostgresBackend, SqliteBackend

from consumer.core.records import Checkpoint, CommitBatch, DeadLetter, Staged
from consumer.core.watermark import Position
from consumer.errors import SchemaTooNew, StoreError
from consumer.state import StateStore as Store
from consumer.state.sqlite import MIGRATIONS as SQLITE_MIGRATIONS

# The test runs on SQLite only: it is about the file (mode, WAL) or sqlite3 itself.
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        yield SqliteBackend(tmp_path / "state" / "store.db")
        return
    server = request.getfixturevalue("postgres_server")  # skips when none is installed
    dsn = request.getfixturevalue("postgres_dsn")
    b = PostgresBackend(dsn, f"{server.host}:{server.port}/opera_test")
    try:
        yield b
    finally:
        await b.drop()


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    s = await backend.open()
    try:
        yield s
    finally:
        await s.close()


def letter(
    uid: str | None = "u1",
    payload: str = '{"a":1}',
    error: str = "boom",
    *,
    stream: str = "s",
    key: str | None = None,
    reason: str | None = None,
) -> DeadLetter:
    return DeadLetter(
        stream=stream,
        reason=reason or ("sink_rejected" if uid else "malformed"),
        error=error,
        payload=payload,
        offset="10" if uid else None,
        unique_event_id=uid,
        event_name="E" if uid else None,
        primary_key=key,
    )


# --- open / schema -----------------------------------------------------------------------------


@sqlite_only
async def test_open_creates_a_private_file_in_wal_mode(backend: SqliteBackend) -> None:
    """SQLite only: the file's mode and journal."""
    path = backend.path.parent / "sub" / "dir" / "store.db"
    s = await type(backend)(path).open()
    try:
        assert path.is_file()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        await s.commit(CommitBatch(processed={"s": ["a"]}))
        wal = path.with_name(path.name + "-wal")
        if wal.exists():
            assert stat.S_IMODE(wal.stat().st_mode) == 0o600
        assert type(backend)(path)._query("PRAGMA journal_mode") == [("wal",)]
        assert await type(backend)(path).version() == len(SQLITE_MIGRATIONS)
    finally:
        await s.close()


async def test_reopen_is_idempotent_and_keeps_data(backend: Backend) -> None:
    s = await backend.open()
    await s.commit(
        CommitBatch(checkpoints={"s": Position("0007", "u7")}, processed={"s": ["u7"]}),
        now=1000.0,
    )
    await s.close()
    await s.close()  # closing twice is harmless
    version = await backend.version()
    assert version == len(backend.module.MIGRATIONS)
    for _ in range(2):
        s = await backend.open()
        try:
            cp = await s.checkpoint("s")
            assert cp is not None
            assert (cp.offset, cp.unique_event_id) == ("0007", "u7")
            assert await s.seen("s", ["u7"]) == {"u7"}
        finally:
            await s.close()
    assert await backend.version() == version


async def test_a_newer_schema_is_refused(backend: Backend) -> None:
    s = await backend.open()
    await s.close()
    newer = len(backend.module.MIGRATIONS) + 1
    await backend.set_version(newer)
    with pytest.raises(SchemaTooNew, match="newer") as raised:
        await backend.open()
    assert backend.where in str(raised.value)
    assert "upgrade opera-consumer" in str(raised.value)
    assert not raised.value.retriable
    assert await backend.version() == newer  # the refused store is untouched


async def test_without_create_a_store_never_made_is_refused(backend: Backend) -> None:
    with pytest.raises(StoreError, match="has not run") as raised:
        await backend.open(create=False)
    assert not raised.value.retriable
    s = await backend.open()  # and it was not created by the refusal's side
    await s.close()
    s = await backend.open(create=False)  # now it exists
    await s.close()


# --- commit: processed ids ---------------------------------------------------------------------


async def test_seen_returns_exactly_the_committed_ids(store: Store) -> None:
    assert await store.seen("s", ["a", "b"]) == set()
    await store.commit(CommitBatch(processed={"s": ["a", "b"], "t": ["c"]}))
    assert await store.seen("s", ["a", "b", "c", "d"]) == {"a", "b"}
    assert await store.seen("t", ["a", "b", "c"]) == {"c"}
    assert await store.seen("s", []) == set()


async def test_ids_with_a_nul_are_ids_of_their_own(store: Store) -> None:
    """Ids come from the wire: one with a NUL is neither cut at it (then "a" would be taken for
    a duplicate and never delivered) nor lost (then its copy would be delivered again)."""
    await store.commit(CommitBatch(processed={"s": ["a\x00b", "c\x00"]}))
    asked = ["a", "a\x00b", "a\x00c", "c", "c\x00", "c\x00\x00"]
    assert await store.seen("s", asked) == {"a\x00b", "c\x00"}


async def test_seen_with_more_than_900_ids(store: Store) -> None:
    committed = [f"id-{i}" for i in range(2500)]
    await store.commit(CommitBatch(processed={"s": committed}))
    query = [f"id-{i}" for i in range(0, 4000, 1)]  # 1500 unknown ones too
    assert await store.seen("s", query) == set(committed)
    # a chunk boundary (SQLite's) exactly at 900
    assert await store.seen("s", committed[:900]) == set(committed[:900])
    assert await store.seen("s", committed[:901]) == set(committed[:901])


async def test_committing_an_id_twice_keeps_one_row(store: Store, backend: Backend) -> None:
    await store.commit(CommitBatch(processed={"s": ["a", "a"]}))
    await store.commit(CommitBatch(processed={"s": ["a"]}))
    assert await backend.count("processed_events") == 1


async def test_prune_deletes_only_old_rows(store: Store) -> None:
    await store.commit(CommitBatch(processed={"s": ["old1", "old2"]}), now=1_000.0)
    await store.commit(CommitBatch(processed={"s": ["new1"], "t": ["new2"]}), now=5_000.0)
    assert await store.prune_processed(older_than=1_000.0) == 0  # strictly older
    assert await store.prune_processed(older_than=4_999.0) == 2
    assert await store.seen("s", ["old1", "old2", "new1"]) == {"new1"}
    assert await store.seen("t", ["new2"]) == {"new2"}
    assert await store.prune_processed(older_than=4_999.0) == 0


async def test_prune_more_than_one_chunk(
    store: Store, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend.module, "PRUNE_CHUNK", 7)
    await store.commit(CommitBatch(processed={"s": [f"o{i}" for i in range(30)]}), now=10.0)
    await store.commit(CommitBatch(processed={"s": ["keep"]}), now=100.0)
    assert await store.prune_processed(older_than=50.0) == 30
    assert await store.seen("s", [f"o{i}" for i in range(30)] + ["keep"]) == {"keep"}
    # exactly a multiple of the chunk: the last statement deletes nothing
    await store.commit(CommitBatch(processed={"s": [f"p{i}" for i in range(14)]}), now=20.0)
    assert await store.prune_processed(older_than=50.0) == 14


async def test_prune_one_chunk_of_some_streams(
    store: Store, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a fleet member prunes: the streams it holds, a statement at a time."""
    monkeypatch.setattr(backend.module, "PRUNE_CHUNK", 7)
    old = {s: [f"{s}{i}" for i in range(10)] for s in ("a", "b", "c")}
    await store.commit(CommitBatch(processed=old), now=10.0)
    assert await store.prune_processed(older_than=50.0, streams=["a", "b"], once=True) == 7
    assert await store.prune_processed(older_than=50.0, streams=["a", "b"]) == 13
    assert await store.seen("c", old["c"]) == set(old["c"])  # not one of ours
    assert await store.seen("a", old["a"]) == set() and await store.seen("b", old["b"]) == set()


# --- commit: checkpoints -----------------------------------------------------------------------


async def test_checkpoint_is_written_and_processed_count_accumulates(store: Store) -> None:
    assert await store.checkpoint("s") is None
    first = CommitBatch(checkpoints={"s": Position("0001", "u1")}, done_counts={"s": 3})
    first.event_at["s"] = 40.0
    await store.commit(first, now=100.0)
    second = CommitBatch(checkpoints={"s": Position("0005", "u5")}, done_counts={"s": 4})
    second.event_at["s"] = 150.5
    await store.commit(second, now=200.0)
    cp = await store.checkpoint("s")
    assert cp is not None
    assert (cp.stream, cp.offset, cp.unique_event_id) == ("s", "0005", "u5")
    assert cp.processed_count == 7
    assert cp.updated_at == 200.0  # checkpoint time: when it was committed
    assert cp.event_at == 150.5  # event time: the own timestamp of the checkpoint's event


async def test_the_event_time_belongs_to_the_checkpoint_it_came_with(store: Store) -> None:
    """A checkpoint whose event has no known time has none: never the previous one's."""
    batch = CommitBatch(checkpoints={"s": Position("1", "u1")}, event_at={"s": 50.0})
    await store.commit(batch, now=100.0)
    await store.commit(CommitBatch(processed={"s": ["x"]}, done_counts={"s": 1}), now=150.0)
    cp = await store.checkpoint("s")
    assert cp is not None and (cp.event_at, cp.updated_at) == (50.0, 100.0)  # did not move
    await store.commit(CommitBatch(checkpoints={"s": Position("2", "u2")}), now=200.0)
    cp = await store.checkpoint("s")
    assert cp is not None and (cp.offset, cp.event_at, cp.updated_at) == ("2", None, 200.0)
    # An operator's offset, or a reset's first anchor: a position without an event time.
    await store.commit(CommitBatch(checkpoints={"s": Position("3", "u3")}, event_at={"s": 60.0}))
    await store.set_offset("s", "0001")
    cp = await store.checkpoint("s")
    assert cp is not None and (cp.offset, cp.event_at) == ("0001", None)
    await store.commit(CommitBatch(checkpoints={"s": Position("4", "u4")}, event_at={"s": 70.0}))
    await store.reset_to_highest("s")
    await store.anchor("s", Position("9000", "u9000"))
    cp = await store.checkpoint("s")
    assert cp is not None and (cp.offset, cp.event_at) == ("9000", None)


async def test_the_migration_renames_the_old_commit_time_column(backend: Backend) -> None:
    """Before this version, ``last_event_at`` held the commit time (as updated_at does): the
    event time is ``event_at``, empty (no event time is known), and nothing else changes.
    (PostgreSQL keeps the old column for a fleet's members still on the version before.)"""
    old = {"sqlite": 3, "postgres": 2}[backend.name]  # the version before the rename
    await backend.create_at(old)
    await backend.raw(
        f'INSERT INTO {backend.table("checkpoints")} (stream, "offset", unique_event_id, '
        "updated_at, processed_count, last_event_at) VALUES ('s', '0042', 'u42', 123.0, 7, 123.0)"
    )
    s = await backend.open()
    try:
        cp = await s.checkpoint("s")
        assert cp is not None
        assert (cp.offset, cp.unique_event_id, cp.updated_at, cp.processed_count) == (
            "0042",
            "u42",
            123.0,
            7,
        )
        assert cp.event_at is None
        batch = CommitBatch(checkpoints={"s": Position("0043", "u43")}, event_at={"s": 99.0})
        await s.commit(batch, now=200.0)
        assert await s.checkpoint("s") == Checkpoint("s", "0043", "u43", 200.0, 7, 99.0)
    finally:
        await s.close()
    assert await backend.version() == len(backend.module.MIGRATIONS)


async def test_when_a_completed_subscription_closed(store: Store) -> None:
    """Per stream, the last time recorded (the next subscriber waits out the gap from it)."""
    assert await store.completed_closed_at("s") is None
    await store.set_completed_closed_at("s", 1000.5)
    await store.set_completed_closed_at("t", 5.0)
    await store.set_completed_closed_at("s", 2000.25)
    assert await store.completed_closed_at("s") == 2000.25
    assert await store.completed_closed_at("t") == 5.0
    assert await store.completed_closed_at("u") is None


async def test_a_completed_close_is_recorded_and_read_on_the_stores_clock(store: Store) -> None:
    """Without a time given, the store's own clock (PostgreSQL: the database's, which the
    fleet's hosts share); the read gives that clock's now with it."""
    assert (await store.completed_close("s"))[0] is None
    await store.set_completed_closed_at("s")
    closed_at, now = await store.completed_close("s")
    assert closed_at is not None and 0.0 <= now - closed_at < 10.0
    await store.set_completed_closed_at("s", 1234.5)
    assert (await store.completed_close("s"))[0] == 1234.5


async def test_the_migration_adds_the_completed_close_time(backend: Backend) -> None:
    """A store of the version before: nothing recorded, then kept across a reopen."""
    migrations = backend.module.MIGRATIONS
    await backend.create_at(next(i for i, m in enumerate(migrations) if "completed_" in m))
    s = await backend.open()
    try:
        assert await s.completed_closed_at("s") is None
        await s.set_completed_closed_at("s", 1234.5)
    finally:
        await s.close()
    assert await backend.version() == len(backend.module.MIGRATIONS)
    s = await backend.open()
    try:
        assert await s.completed_closed_at("s") == 1234.5
    finally:
        await s.close()


async def test_the_newest_processed_stamp_is_known(store: Store) -> None:
    assert await store.newest_processed_at() is None
    await store.commit(CommitBatch(processed={"s": ["a"]}), now=100.0)
    await store.commit(CommitBatch(processed={"t": ["b"]}), now=250.0)
    assert await store.newest_processed_at() == 250.0


async def test_count_without_a_new_position_still_accumulates(store: Store) -> None:
    await store.commit(
        CommitBatch(checkpoints={"s": Position("1", "u1")}, done_counts={"s": 2}), now=100.0
    )
    await store.commit(CommitBatch(processed={"s": ["x"]}, done_counts={"s": 5}), now=200.0)
    cp = await store.checkpoint("s")
    assert cp is not None
    assert (cp.offset, cp.processed_count, cp.updated_at) == ("1", 7, 100.0)
    # a count for a stream without a checkpoint creates none
    await store.commit(CommitBatch(processed={"n": ["y"]}, done_counts={"n": 1}))
    assert await store.checkpoint("n") is None


async def test_checkpoints_lists_every_stream(store: Store) -> None:
    await store.commit(
        CommitBatch(checkpoints={"b": Position("2", "u2"), "a": Position("1", "u1")})
    )
    assert [(c.stream, c.offset) for c in await store.checkpoints()] == [("a", "1"), ("b", "2")]


async def test_anchor_creates_but_never_moves_a_checkpoint(store: Store) -> None:
    await store.anchor("s", Position("5", "u5"))
    cp = await store.checkpoint("s")
    assert cp is not None
    assert (cp.offset, cp.unique_event_id, cp.processed_count, cp.event_at) == (
        "5",
        "u5",
        0,
        None,
    )
    await store.anchor("s", Position("9", "u9"))
    cp = await store.checkpoint("s")
    assert cp is not None and cp.offset == "5"


# --- operator changes --------------------------------------------------------------------------


async def test_set_offset_moves_the_checkpoint_and_keeps_its_count(store: Store) -> None:
    await store.set_offset("new", "0042")  # a stream without a checkpoint gets one
    cp = await store.checkpoint("new")
    assert cp is not None and (cp.offset, cp.unique_event_id) == ("0042", "")
    await store.commit(
        CommitBatch(checkpoints={"s": Position("0009", "u9")}, done_counts={"s": 3}), now=5.0
    )
    await store.set_offset("s", "0001")
    cp = await store.checkpoint("s")
    assert cp is not None
    assert (cp.offset, cp.unique_event_id, cp.processed_count) == ("0001", "", 3)


async def test_reset_to_highest_until_the_stream_moves(store: Store) -> None:
    assert await store.start_override("s") is None
    await store.commit(CommitBatch(checkpoints={"s": Position("0009", "u9")}))
    await store.reset_to_highest("s")
    await store.reset_to_highest("s")  # twice: still one pending reset
    assert await store.start_override("s") == "highest"
    assert await store.start_override("t") is None
    # the first anchor of the new session replaces the old checkpoint and ends the reset
    await store.anchor("s", Position("5000", "u5000"))
    assert await store.start_override("s") is None
    cp = await store.checkpoint("s")
    assert cp is not None and (cp.offset, cp.unique_event_id) == ("5000", "u5000")


async def test_a_committed_checkpoint_or_set_offset_clears_a_pending_reset(store: Store) -> None:
    await store.reset_to_highest("s")
    await store.reset_to_highest("t")
    await store.reset_to_highest("u")
    await store.commit(CommitBatch(checkpoints={"s": Position("1", "u1")}))
    await store.set_offset("t", "7")
    await store.commit(CommitBatch(processed={"u": ["x"]}, done_counts={"u": 1}))  # no position
    assert [await store.start_override(x) for x in ("s", "t", "u")] == [None, None, "highest"]


async def test_set_sink_state_outside_a_commit(store: Store) -> None:
    await store.set_sink_state("jsonl", "10")
    assert await store.sink_state("jsonl") == "10"
    await store.set_sink_state("jsonl", "20")
    assert await store.sink_state("jsonl") == "20"


# --- commit: dead letters and sink state -------------------------------------------------------


async def test_dead_letter_row_fields(store: Store) -> None:
    await store.commit(CommitBatch(dead_letters=[letter()]), now=50.0)
    rows = await store.dead_letters()
    assert len(rows) == 1
    row = rows[0]
    assert (row.stream, row.offset, row.unique_event_id, row.event_name) == ("s", "10", "u1", "E")
    assert (row.reason, row.error, row.payload) == ("sink_rejected", "boom", '{"a":1}')
    assert (row.attempts, row.first_at, row.last_at) == (1, 50.0, 50.0)
    assert (row.primary_key, row.payload_size, row.payload_sha256) == (None, None, None)
    assert isinstance(row.id, int)


async def test_a_dead_letter_keeps_the_size_and_hash_of_the_whole_payload(store: Store) -> None:
    whole = "x" * 100_000
    digest = hashlib.sha256(whole.encode()).hexdigest()
    d = DeadLetter(
        stream="s",
        reason="malformed",
        error="too big",
        payload=whole[:100],
        payload_size=len(whole),
        payload_sha256=digest,
    )
    await store.commit(CommitBatch(dead_letters=[d]))
    [row] = await store.dead_letters("s")
    assert (row.payload, row.payload_size, row.payload_sha256) == (whole[:100], 100_000, digest)
    # its dedup key is the hash of the whole: the same frame again is another attempt
    await store.commit(CommitBatch(dead_letters=[d]))
    assert [r.attempts for r in await store.dead_letters("s")] == [2]


async def test_same_dead_letter_twice_is_one_row_with_two_attempts(store: Store) -> None:
    await store.commit(CommitBatch(dead_letters=[letter(error="first")]), now=1.0)
    await store.commit(CommitBatch(dead_letters=[letter(error="second", reason="parked")]), now=2.0)
    rows = await store.dead_letters("s")
    assert len(rows) == 1
    assert rows[0].attempts == 2
    assert (rows[0].error, rows[0].reason) == ("second", "parked")
    assert (rows[0].first_at, rows[0].last_at) == (1.0, 2.0)
    assert await store.dead_letter_counts() == {"s": 1}


async def test_same_dead_letter_twice_in_one_batch(store: Store) -> None:
    await store.commit(CommitBatch(dead_letters=[letter(), letter()]))
    rows = await store.dead_letters()
    assert [r.attempts for r in rows] == [2]


async def test_the_same_event_in_two_streams_is_two_dead_letters(store: Store) -> None:
    await store.commit(CommitBatch(dead_letters=[letter(stream="a"), letter(stream="b")]))
    assert await store.dead_letter_counts() == {"a": 1, "b": 1}


async def test_malformed_dead_letters_dedup_by_payload_hash(store: Store) -> None:
    a, b = letter(uid=None, payload="{oops"), letter(uid=None, payload="{other")
    assert a.dedup_key == "sha256:" + hashlib.sha256(b"{oops").hexdigest()
    await store.commit(CommitBatch(dead_letters=[a, b]))
    await store.commit(CommitBatch(dead_letters=[letter(uid=None, payload="{oops")]))
    rows = await store.dead_letters("s")
    assert [(r.payload, r.attempts, r.reason) for r in rows] == [
        ("{oops", 2, "malformed"),
        ("{other", 1, "malformed"),
    ]
    assert await store.dead_letters("other-stream") == []


async def test_dead_letter_filters(store: Store) -> None:
    await store.commit(CommitBatch(dead_letters=[letter("u1", reason="malformed")]), now=10.0)
    await store.commit(CommitBatch(dead_letters=[letter("u2", stream="t")]), now=20.0)
    await store.commit(CommitBatch(dead_letters=[letter("u3")]), now=30.0)
    every = await store.dead_letters()
    assert [r.unique_event_id for r in every] == ["u1", "u2", "u3"]  # arrival order
    ids = {r.unique_event_id: r.id for r in every}

    async def uids(*args: Any, **kwargs: Any) -> list[str | None]:
        return [r.unique_event_id for r in await store.dead_letters(*args, **kwargs)]

    assert await uids("s") == ["u1", "u3"]
    assert await uids(reason="sink_rejected") == ["u2", "u3"]
    assert await uids(since=20.0) == ["u2", "u3"]  # inclusive
    assert await uids(before=20.0) == ["u1"]  # exclusive
    assert await uids("s", reason="sink_rejected", since=15.0, before=31.0) == ["u3"]
    assert await uids(ids=[ids["u3"], ids["u1"]]) == ["u1", "u3"]
    assert await uids("t", ids=[ids["u1"]]) == []
    assert await uids(ids=[]) == []
    assert await uids(limit=2) == ["u1", "u2"]  # the oldest
    assert await uids("s", limit=1) == ["u1"]
    assert await uids(since=20.0, limit=5) == ["u2", "u3"]
    assert await store.dead_letter_counts() == {"s": 2, "t": 1}


async def test_dead_letters_without_their_payloads(store: Store) -> None:
    """A listing (dlq list, purge, the replay's ordering check over the whole queue) leaves the
    payloads in the store: the same rows and filters, each payload empty."""
    big = letter("u2", payload="x" * 1_000_000)
    await store.commit(CommitBatch(dead_letters=[letter("u1"), big]), now=10.0)
    whole = await store.dead_letters("s")
    listed = await store.dead_letters("s", payloads=False)
    assert [r.payload for r in whole] == ['{"a":1}', "x" * 1_000_000]
    assert [r.payload for r in listed] == ["", ""]
    assert [dataclasses.replace(r, payload="") for r in whole] == listed
    assert [r.unique_event_id for r in await store.dead_letters(reason="x", payloads=False)] == []


async def test_a_batch_sent_again_is_applied_once(store: Store) -> None:
    """A commit whose outcome the committer never learnt is sent again with its mark: applied
    once (the count, the letter's attempts, a letter a replay delivered in between)."""
    batch = CommitBatch(
        checkpoints={"s": Position("10", "u1")},
        processed={"s": ["u1", "u2"]},
        done_counts={"s": 1},
        dead_letters=[letter("u2")],
        mark=("c1", 1),
    )
    assert await store.commit(batch)
    [row] = await store.dead_letters("s")
    assert await store.purge_dead_letters([row.id]) == 1
    assert not await store.commit(batch)
    assert not await store.commit(CommitBatch(done_counts={"s": 5}, mark=("c1", 0)))  # older
    assert await store.dead_letters("s") == []
    # The committer's next batch is applied, and another committer's first.
    assert await store.commit(CommitBatch(done_counts={"s": 1}, mark=("c1", 2)))
    assert await store.commit(CommitBatch(done_counts={"s": 1}, mark=("c2", 1)))
    cp = await store.checkpoint("s")
    assert cp is not None
    assert cp.processed_count == 3


async def test_a_checkpoints_own_event_id_is_never_pruned(store: Store) -> None:
    """However old its stamp (a clock slow when it was written, corrected since): the
    inclusive resume sends that event again, and only its id says it was delivered."""
    await store.commit(
        CommitBatch(
            checkpoints={"b": Position("2", "b2"), "a": Position("9", "a9")},
            processed={"b": ["b1", "b2"], "a": ["a8", "a9"]},
        ),
        now=10.0,
    )
    await store.commit(CommitBatch(checkpoints={"a": Position("10", "a10")}), now=11.0)
    assert await store.prune_processed(20.0) == 3  # b1, a8, and a9 (no longer a checkpoint)
    assert await store.seen("b", ["b1", "b2"]) == {"b2"}
    assert await store.seen("a", ["a8", "a9"]) == set()


async def test_marks_go_with_the_processed_ids_prune(store: Store) -> None:
    await store.commit(CommitBatch(done_counts={"s": 1}, mark=("old", 1)), now=10.0)
    await store.commit(CommitBatch(done_counts={"s": 1}, mark=("new", 1)), now=30.0)
    await store.prune_processed(20.0)
    assert await store.commit(CommitBatch(done_counts={"s": 1}, mark=("old", 1)), now=40.0)
    assert not await store.commit(CommitBatch(done_counts={"s": 1}, mark=("new", 1)), now=40.0)


async def test_a_dead_letters_id_is_never_given_to_another(store: Store) -> None:
    """A `dlq replay` resolves the ids it read; one purged and given to a new letter meanwhile
    would take that letter with it (its event then in neither the sink nor the DLQ)."""
    await store.commit(CommitBatch(dead_letters=[letter("u1"), letter("u2")]))
    newest = max(r.id for r in await store.dead_letters())
    assert await store.purge_dead_letters([newest]) == 1
    await store.commit(CommitBatch(dead_letters=[letter("u3")]))
    (fresh,) = [r for r in await store.dead_letters() if r.unique_event_id == "u3"]
    assert fresh.id > newest


@sqlite_only
async def test_the_migration_keeps_every_dead_letter_and_its_id(backend: Backend) -> None:
    before = len(SQLITE_MIGRATIONS) - 1
    await backend.create_at(before)
    await backend.raw(
        "INSERT INTO dead_letters (id, stream, dedup_key, offset, unique_event_id, event_name, "
        "reason, error, payload, attempts, first_at, last_at, primary_key, payload_size, "
        "payload_sha256) VALUES (7, 's', 'k7', '10', 'u7', 'E', 'sink_rejected', 'boom', "
        "'{}', 2, 1.0, 2.0, 'pk', 2, 'ab')"
    )
    s = await backend.open()
    try:
        (kept,) = await s.dead_letters()
        assert (kept.id, kept.unique_event_id, kept.primary_key, kept.attempts) == (
            7,
            "u7",
            "pk",
            2,
        )
        assert await s.has_dead_letters("s", "pk")  # its index is back
        assert await s.purge_dead_letters([7]) == 1
        await s.commit(CommitBatch(dead_letters=[letter("u8")]))
        assert [r.id for r in await s.dead_letters()] == [8]
    finally:
        await s.close()
    assert await backend.version() == before + 1


async def test_purge_and_resolve_remove_dead_letters(store: Store) -> None:
    await store.commit(CommitBatch(dead_letters=[letter("u1"), letter("u2"), letter("u3")]))
    ids = [r.id for r in await store.dead_letters()]
    assert await store.purge_dead_letters([]) == 0
    assert await store.purge_dead_letters([ids[0], 999_999]) == 1
    assert await store.purge_dead_letters([ids[0]]) == 0
    # `dlq purge --all` of a large DLQ: past any SQL variable limit (SQLite's is 32,766 in a
    # default build, 250,000 in some), and no other row touched
    many = [ids[2], *range(10**7, 10**7 + 300_000)]
    assert await store.purge_dead_letters(many) == 1
    # a replay's delivery: removed in the commit that records the event as processed
    await store.commit(CommitBatch(processed={"s": ["u2"]}, resolved=[ids[1]]))
    assert [r.unique_event_id for r in await store.dead_letters()] == []
    assert await store.seen("s", ["u2"]) == {"u2"}


async def test_parked_among_and_has_dead_letters(store: Store) -> None:
    """park-key's per-batch lookup: of the batch's resources, those with dead letters (the
    oldest's id), and whether the stream has any dead letter of a resource at all."""
    assert await store.parked_among("s", ["pk1"]) == ({}, False)
    assert await store.parked_among("s", []) == ({}, False)
    await store.commit(
        CommitBatch(
            dead_letters=[
                letter("u1", key="pk1"),
                letter("u2", key="pk1"),
                letter(None, payload="{bad", key="pk2"),
                letter("u4"),  # no key: never parks anything
                letter("u5", key="pk9", stream="t"),
                letter("u6", stream="m"),  # a stream with letters of no resource
            ]
        )
    )
    digest = hashlib.sha256(b"{bad").hexdigest()
    asked = ["pk1", "pk2", "pk9", "free"]
    # the oldest of each
    assert await store.parked_among("s", asked) == ({"pk1": "u1", "pk2": "sha256:" + digest}, True)
    assert await store.parked_among("s", ["free", "pk9"]) == ({}, True)
    assert await store.parked_among("s", []) == ({}, True)
    assert await store.parked_among("t", asked) == ({"pk9": "u5"}, True)
    assert await store.parked_among("none", asked) == ({}, False)
    assert await store.parked_among("m", asked) == ({}, False)
    # a batch past SQLite's variable limit, a key repeated
    many = [f"k{i}" for i in range(40_000)] + ["pk2", "pk2"]
    assert (await store.parked_among("s", many))[0] == {"pk2": "sha256:" + digest}
    assert await store.has_dead_letters("s", "pk1")
    assert not await store.has_dead_letters("s", "pk9")
    assert not await store.has_dead_letters("t", "pk1")
    first = next(r.id for r in await store.dead_letters("s") if r.unique_event_id == "u1")
    await store.purge_dead_letters([first])
    assert (await store.parked_among("s", ["pk1"]))[0] == {"pk1": "u2"}
    rest = [r.id for r in await store.dead_letters("s") if r.primary_key is not None]
    await store.purge_dead_letters(rest)
    assert await store.parked_among("s", asked) == ({}, False)  # "u4" has no resource


async def test_sink_state_is_written_and_replaced(store: Store) -> None:
    assert await store.sink_state("jsonl") is None
    await store.commit(CommitBatch(sink_state=("jsonl", "123")))
    assert await store.sink_state("jsonl") == "123"
    await store.commit(CommitBatch(sink_state=("jsonl", "456")))
    assert await store.sink_state("jsonl") == "456"
    assert await store.sink_state("other") is None


async def test_empty_batch_is_falsy() -> None:
    assert not CommitBatch()
    assert not CommitBatch(done_counts={"s": 1})
    assert CommitBatch(processed={"s": ["a"]})
    assert CommitBatch(sink_state=("x", "1"))


async def test_staged_rows_commit_with_the_checkpoint(store: Store, backend: Backend) -> None:
    await backend.create_table("sink_rows")
    upsert = backend.upsert("sink_rows")
    await store.commit(
        CommitBatch(
            checkpoints={"s": Position("2", "u2")},
            processed={"s": ["u1", "u2"]},
            staged=[Staged(upsert, [("u1", 1), ("u2", 2)]), Staged(upsert, [("u1", 10)])],
        )
    )
    assert await backend.table_rows("sink_rows") == [("u1", 10), ("u2", 2)]


# --- atomicity ---------------------------------------------------------------------------------


def full_batch() -> CommitBatch:
    return CommitBatch(
        checkpoints={"s": Position("0009", "u9")},
        processed={"s": ["u8", "u9"]},
        done_counts={"s": 2},
        dead_letters=[letter()],
        sink_state=("jsonl", "999"),
    )


async def assert_empty(store: Store) -> None:
    assert await store.seen("s", ["u8", "u9"]) == set()
    assert await store.checkpoint("s") is None
    assert await store.dead_letters() == []
    assert await store.sink_state("jsonl") is None


async def test_a_commit_failing_midway_leaves_nothing(
    store: Store, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*_: Any) -> tuple[Any, ...]:
        raise RuntimeError("disk on fire")

    # processed ids are inserted before the dead letters are built: the failure is mid-way
    monkeypatch.setattr(backend.module, "dead_letter_row", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        await store.commit(full_batch())
    await assert_empty(store)
    # the store is still usable, and a retry commits everything
    monkeypatch.undo()
    await store.commit(full_batch())
    assert await store.seen("s", ["u8", "u9"]) == {"u8", "u9"}
    assert await store.sink_state("jsonl") == "999"


async def test_a_commit_failing_at_the_last_statement_leaves_nothing(
    store: Store, backend: Backend
) -> None:
    batch = full_batch()
    batch.sink_state = ("jsonl", object())  # type: ignore[assignment]  # unbindable: fails last
    with pytest.raises(StoreError, match=backend.bind_error) as raised:  # the driver's, translated
        await store.commit(batch)
    assert not raised.value.retriable
    await assert_empty(store)


async def test_a_failing_staged_statement_leaves_nothing(store: Store, backend: Backend) -> None:
    batch = full_batch()
    batch.staged.append(Staged(backend.upsert("no_such_table"), [("u9", 1)]))
    with pytest.raises(StoreError, match="no_such_table") as raised:
        await store.commit(batch)
    assert not raised.value.retriable
    await assert_empty(store)


async def test_a_cancelled_commit_leaves_nothing(
    store: Store, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = asyncio.Event()

    def slow(d: DeadLetter, now: float) -> tuple[Any, ...]:
        started.set()
        raise asyncio.CancelledError

    monkeypatch.setattr(backend.module, "dead_letter_row", slow)
    with pytest.raises(asyncio.CancelledError):
        await store.commit(full_batch())
    assert started.is_set()
    await assert_empty(store)
    monkeypatch.undo()
    await store.commit(full_batch())  # and the store goes on
    assert await store.sink_state("jsonl") == "999"


# --- SQLite only: sqlite3's own errors ---------------------------------------------------------


@sqlite_only
async def test_a_file_that_is_not_a_database_is_refused(backend: SqliteBackend) -> None:
    """SQLite only: a corrupt file (PostgreSQL has no file of ours to corrupt)."""
    backend.path.parent.mkdir(parents=True)
    backend.path.write_bytes(b"this is not an SQLite database, not even close" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database") as raised:
        await backend.open()
    assert str(backend.path) in str(raised.value)
    assert not raised.value.retriable


@sqlite_only
async def test_a_locked_database_is_retriable(
    backend: SqliteBackend, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite only: another process's write lock (busy_timeout shortened to fail fast)."""
    other = sqlite3.connect(backend.path, isolation_level=None, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")
        await store._w.execute("PRAGMA busy_timeout=0")  # type: ignore[attr-defined]
        with pytest.raises(StoreError, match="locked") as raised:
            await store.commit(CommitBatch(processed={"s": ["a"]}))
        assert raised.value.retriable
    finally:
        other.execute("ROLLBACK")
        other.close()
    await store.commit(CommitBatch(processed={"s": ["a"]}))
    assert await store.seen("s", ["a"]) == {"a"}
