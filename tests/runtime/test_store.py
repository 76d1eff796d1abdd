"""The SQLite state store on real files."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from consumer.core.watermark import Position
from consumer.runtime.store import MIGRATIONS, CommitBatch, DeadLetter, Store


@pytest.fixture
async def store(tmp_path: Path):
    s = await Store.open(tmp_path / "state.db")
    yield s
    await s.close()


async def test_file_is_private_wal_and_migrated(tmp_path: Path):
    path = tmp_path / "sub" / "state.db"
    s = await Store.open(path)
    await s.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    s = await Store.open(path)  # reopening is a no-op
    await s.close()


async def test_a_newer_schema_is_refused(tmp_path: Path):
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="upgrade opera-consumer"):
        await Store.open(path)


async def test_commit_writes_everything_together(store: Store):
    letter = DeadLetter(stream="a", reason="malformed", error="bad", payload="{x")
    await store.commit(
        CommitBatch(
            checkpoints={"a": Position("10", "e10")},
            processed={"a": ["e1", "e10"], "b": ["e1"]},
            done_counts={"a": 2},
            dead_letters=[letter],
            sink_state=("jsonl", "123"),
        )
    )
    cp = await store.checkpoint("a")
    assert cp is not None and (cp.offset, cp.unique_event_id, cp.processed_count) == (
        "10",
        "e10",
        2,
    )
    assert store.seen("a", ["e1", "e10", "e99"]) == {"e1", "e10"}
    assert store.seen("b", ["e10"]) == set()  # per stream
    assert await store.sink_state("jsonl") == "123"
    assert [d.payload for d in await store.dead_letters("a")] == ["{x"]
    # the same malformed frame again: one row, two attempts
    await store.commit(
        CommitBatch(
            dead_letters=[letter], checkpoints={"a": Position("11", "e11")}, done_counts={"a": 3}
        )
    )
    rows = await store.dead_letters()
    assert len(rows) == 1 and rows[0].attempts == 2
    cp = await store.checkpoint("a")
    assert cp is not None and cp.processed_count == 5 and cp.offset == "11"
    assert await store.dead_letter_counts() == {"a": 1}


async def test_seen_handles_more_ids_than_sqlite_variables(store: Store):
    ids = [f"id-{i}" for i in range(2500)]
    await store.commit(CommitBatch(processed={"s": ids[::2]}))
    assert store.seen("s", ids) == set(ids[::2])


async def test_a_failed_commit_leaves_nothing(store: Store):
    good = CommitBatch(
        processed={"s": ["a"]}, checkpoints={"s": Position("1", "a")}, done_counts={"s": 1}
    )
    await store.commit(good)
    bad = CommitBatch(
        processed={"s": ["b"]},
        checkpoints={"s": Position("2", "b")},
        done_counts={"s": 1},
        dead_letters=[DeadLetter(stream="s", reason="x", error="y", payload=None)],  # type: ignore[arg-type]
    )
    with pytest.raises(Exception):  # noqa: B017 - any failure must roll back everything
        await store.commit(bad)
    assert store.seen("s", ["a", "b"]) == {"a"}
    cp = await store.checkpoint("s")
    assert cp is not None and cp.offset == "1" and cp.processed_count == 1


async def test_anchor_never_moves_an_existing_checkpoint(store: Store):
    await store.anchor("s", Position("5", "e5"))
    await store.anchor("s", Position("9", "e9"))
    cp = await store.checkpoint("s")
    assert cp is not None and (cp.offset, cp.processed_count) == ("5", 0)


async def test_prune_deletes_only_old_ids(store: Store):
    await store.commit(
        CommitBatch(processed={"s": [f"old-{i}" for i in range(25_000)]}), now=1000.0
    )
    await store.commit(CommitBatch(processed={"s": ["new"]}), now=5000.0)
    assert await store.prune_processed(older_than=2000.0) == 25_000
    assert store.seen("s", ["old-1", "new"]) == {"new"}


async def test_close_is_idempotent(tmp_path: Path):
    s = await Store.open(tmp_path / "x.db")
    await s.close()
    await s.close()
