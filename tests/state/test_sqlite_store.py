"""Unit tests for the SQLite state store (consumer.state.sqlite) on real files in tmp_path."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import consumer.state.sqlite as store_module
from consumer.core.records import CommitBatch, DeadLetter
from consumer.core.watermark import Position
from consumer.errors import SchemaTooNew, StoreError
from consumer.state.sqlite import MIGRATIONS
from consumer.state.sqlite import SqliteStore as Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "state" / "store.db")
    try:
        yield s
    finally:
        await s.close()


def raw_query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def letter(uid: str | None = "u1", payload: str = '{"a":1}', error: str = "boom") -> DeadLetter:
    return DeadLetter(
        stream="s",
        reason="sink_rejected" if uid else "malformed",
        error=error,
        payload=payload,
        offset="10" if uid else None,
        unique_event_id=uid,
        event_name="E" if uid else None,
    )


# --- open / schema -----------------------------------------------------------------------------


async def test_open_creates_a_private_file_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "store.db"
    s = await Store.open(path)
    try:
        assert path.is_file()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        await s.commit(CommitBatch(processed={"s": ["a"]}))
        wal = path.with_name(path.name + "-wal")
        if wal.exists():
            assert stat.S_IMODE(wal.stat().st_mode) == 0o600
        assert raw_query(path, "PRAGMA journal_mode") == [("wal",)]
        assert raw_query(path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    finally:
        await s.close()


async def test_reopen_is_idempotent_and_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    s = await Store.open(path)
    await s.commit(
        CommitBatch(checkpoints={"s": Position("0007", "u7")}, processed={"s": ["u7"]}),
        now=1000.0,
    )
    await s.close()
    await s.close()  # closing twice is harmless
    for _ in range(2):
        s = await Store.open(path)
        try:
            cp = await s.checkpoint("s")
            assert cp is not None
            assert (cp.offset, cp.unique_event_id) == ("0007", "u7")
            assert await s.seen("s", ["u7"]) == {"u7"}
        finally:
            await s.close()
    assert raw_query(path, "PRAGMA user_version") == [(len(MIGRATIONS),)]


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    s = await Store.open(path)
    await s.close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    con.commit()
    con.close()
    with pytest.raises(SchemaTooNew, match="newer") as raised:
        await Store.open(path)
    assert str(path) in str(raised.value) and "upgrade opera-consumer" in str(raised.value)
    # the refused file is untouched
    assert raw_query(path, "PRAGMA user_version") == [(len(MIGRATIONS) + 1,)]


# --- commit: processed ids ---------------------------------------------------------------------


async def test_seen_returns_exactly_the_committed_ids(store: Store) -> None:
    assert await store.seen("s", ["a", "b"]) == set()
    await store.commit(CommitBatch(processed={"s": ["a", "b"], "t": ["c"]}))
    assert await store.seen("s", ["a", "b", "c", "d"]) == {"a", "b"}
    assert await store.seen("t", ["a", "b", "c"]) == {"c"}
    assert await store.seen("s", []) == set()


async def test_seen_with_more_than_900_ids(store: Store) -> None:
    committed = [f"id-{i}" for i in range(2500)]
    await store.commit(CommitBatch(processed={"s": committed}))
    query = [f"id-{i}" for i in range(0, 4000, 1)]  # 1500 unknown ones too
    assert await store.seen("s", query) == set(committed)
    # a chunk boundary exactly at 900
    assert await store.seen("s", committed[:900]) == set(committed[:900])
    assert await store.seen("s", committed[:901]) == set(committed[:901])


async def test_committing_an_id_twice_keeps_one_row(store: Store, tmp_path: Path) -> None:
    await store.commit(CommitBatch(processed={"s": ["a", "a"]}))
    await store.commit(CommitBatch(processed={"s": ["a"]}))
    rows = raw_query(tmp_path / "state" / "store.db", "SELECT COUNT(*) FROM processed_events")
    assert rows == [(1,)]


async def test_prune_deletes_only_old_rows(store: Store) -> None:
    await store.commit(CommitBatch(processed={"s": ["old1", "old2"]}), now=1_000.0)
    await store.commit(CommitBatch(processed={"s": ["new1"], "t": ["new2"]}), now=5_000.0)
    assert await store.prune_processed(older_than=1_000.0) == 0  # strictly older
    assert await store.prune_processed(older_than=4_999.0) == 2
    assert await store.seen("s", ["old1", "old2", "new1"]) == {"new1"}
    assert await store.seen("t", ["new2"]) == {"new2"}
    assert await store.prune_processed(older_than=4_999.0) == 0


async def test_prune_more_than_one_chunk(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "_PRUNE_CHUNK", 7)
    await store.commit(CommitBatch(processed={"s": [f"o{i}" for i in range(30)]}), now=10.0)
    await store.commit(CommitBatch(processed={"s": ["keep"]}), now=100.0)
    assert await store.prune_processed(older_than=50.0) == 30
    assert await store.seen("s", [f"o{i}" for i in range(30)] + ["keep"]) == {"keep"}


# --- commit: checkpoints -----------------------------------------------------------------------


async def test_checkpoint_is_written_and_processed_count_accumulates(store: Store) -> None:
    assert await store.checkpoint("s") is None
    await store.commit(
        CommitBatch(checkpoints={"s": Position("0001", "u1")}, done_counts={"s": 3}), now=100.0
    )
    await store.commit(
        CommitBatch(checkpoints={"s": Position("0005", "u5")}, done_counts={"s": 4}), now=200.0
    )
    cp = await store.checkpoint("s")
    assert cp is not None
    assert (cp.stream, cp.offset, cp.unique_event_id) == ("s", "0005", "u5")
    assert cp.processed_count == 7
    assert cp.updated_at == 200.0
    assert cp.last_event_at == 200.0


async def test_count_without_a_new_position_still_accumulates(store: Store) -> None:
    await store.commit(
        CommitBatch(checkpoints={"s": Position("1", "u1")}, done_counts={"s": 2}), now=100.0
    )
    await store.commit(CommitBatch(processed={"s": ["x"]}, done_counts={"s": 5}), now=200.0)
    cp = await store.checkpoint("s")
    assert cp is not None
    assert (cp.offset, cp.processed_count) == ("1", 7)


async def test_checkpoints_lists_every_stream(store: Store) -> None:
    await store.commit(
        CommitBatch(checkpoints={"b": Position("2", "u2"), "a": Position("1", "u1")})
    )
    assert [(c.stream, c.offset) for c in await store.checkpoints()] == [("a", "1"), ("b", "2")]


async def test_anchor_creates_but_never_moves_a_checkpoint(store: Store) -> None:
    await store.anchor("s", Position("5", "u5"))
    cp = await store.checkpoint("s")
    assert cp is not None and cp.offset == "5"
    await store.anchor("s", Position("9", "u9"))
    cp = await store.checkpoint("s")
    assert cp is not None and cp.offset == "5"


# --- commit: dead letters and sink state -------------------------------------------------------


async def test_dead_letter_row_fields(store: Store) -> None:
    await store.commit(CommitBatch(dead_letters=[letter()]), now=50.0)
    rows = await store.dead_letters()
    assert len(rows) == 1
    row = rows[0]
    assert (row.stream, row.offset, row.unique_event_id, row.event_name) == ("s", "10", "u1", "E")
    assert (row.reason, row.error, row.payload) == ("sink_rejected", "boom", '{"a":1}')
    assert (row.attempts, row.first_at, row.last_at) == (1, 50.0, 50.0)


async def test_same_dead_letter_twice_is_one_row_with_two_attempts(store: Store) -> None:
    await store.commit(CommitBatch(dead_letters=[letter(error="first")]), now=1.0)
    await store.commit(CommitBatch(dead_letters=[letter(error="second")]), now=2.0)
    rows = await store.dead_letters("s")
    assert len(rows) == 1
    assert rows[0].attempts == 2
    assert rows[0].error == "second"
    assert (rows[0].first_at, rows[0].last_at) == (1.0, 2.0)
    assert await store.dead_letter_counts() == {"s": 1}


async def test_same_dead_letter_twice_in_one_batch(store: Store) -> None:
    await store.commit(CommitBatch(dead_letters=[letter(), letter()]))
    rows = await store.dead_letters()
    assert [r.attempts for r in rows] == [2]


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
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*_: Any) -> tuple[Any, ...]:
        raise RuntimeError("disk on fire")

    # processed ids are inserted before the dead letters are built: the failure is mid-way
    monkeypatch.setattr(store_module, "_dl_row", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        await store.commit(full_batch())
    await assert_empty(store)
    # the store is still usable, and a retry commits everything
    monkeypatch.undo()
    await store.commit(full_batch())
    assert await store.seen("s", ["u8", "u9"]) == {"u8", "u9"}
    assert await store.sink_state("jsonl") == "999"


async def test_a_commit_failing_at_the_last_statement_leaves_nothing(store: Store) -> None:
    batch = full_batch()
    batch.sink_state = ("jsonl", object())  # type: ignore[assignment]  # unbindable: fails last
    with pytest.raises(StoreError, match="binding") as raised:  # sqlite3's, translated
        await store.commit(batch)
    assert not raised.value.retriable
    await assert_empty(store)


async def test_a_cancelled_commit_leaves_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = asyncio.Event()

    def slow(d: DeadLetter, now: float) -> tuple[Any, ...]:
        started.set()
        raise asyncio.CancelledError

    monkeypatch.setattr(store_module, "_dl_row", slow)
    with pytest.raises(asyncio.CancelledError):
        await store.commit(full_batch())
    assert started.is_set()
    await assert_empty(store)
