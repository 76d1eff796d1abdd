"""Opening the SQLite store: it fails cleanly (no connection thread outlives a failed open:
they are not daemon threads, so one left running keeps the process from ever exiting), and an
old store migrated by another process meanwhile opens."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from consumer.errors import StoreError
from consumer.state import SqliteStore
from consumer.state import sqlite as sqlite_store
from consumer.state.sqlite import MIGRATIONS, _statements


async def test_a_lookup_connection_that_fails_leaves_no_thread_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        if kwargs.get("check_same_thread") is False and kwargs.get("isolation_level", 0) is None:
            raise sqlite3.OperationalError("unable to open database file")  # out of fds, say
        return real(*args, **kwargs)

    before = set(threading.enumerate())
    monkeypatch.setattr(sqlite3, "connect", connect)
    with pytest.raises(StoreError):
        await SqliteStore.open(tmp_path / "state.db")
    monkeypatch.undo()
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for t in left:
        t.join(5)
    assert [t for t in left if t.is_alive()] == []


async def test_an_old_store_migrated_by_another_process_meanwhile_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon and a command opening an old store together: one migrates, the other reads the
    old version, waits for the write lock and must then find the schema current (it ran the
    migration again: "duplicate column" or "table already exists")."""
    path = tmp_path / "state.db"
    first_read: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    real = sqlite_store._version

    async def version(db: Any) -> int:
        found = await real(db)
        if not first_read.done():
            first_read.set_result(found)
        return found

    monkeypatch.setattr(sqlite_store, "_version", version)
    with closing(sqlite3.connect(path)) as con:
        scripts = "".join(f"{m};" for m in MIGRATIONS[:-1])
        con.executescript(
            f"PRAGMA journal_mode=WAL; {scripts} PRAGMA user_version = {len(MIGRATIONS) - 1};"
        )
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")  # the other process, migrating
        for statement in _statements(MIGRATIONS[-1]):
            other.execute(statement)
        other.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        opening = asyncio.create_task(SqliteStore.open(path))
        async with asyncio.timeout(10):  # it read the old version: it waits for the lock next
            assert await first_read == len(MIGRATIONS) - 1
        other.execute("COMMIT")
        store = await asyncio.wait_for(opening, 10)
    finally:
        other.close()
    try:
        assert await store.seen("s", ["a"]) == set()
    finally:
        await store.close()
    with closing(sqlite3.connect(path)) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_a_script_splits_where_sqlite_says_a_statement_ends() -> None:
    script = "CREATE TABLE t (a TEXT DEFAULT 'x;y'); INSERT INTO t VALUES ('1;2');\n"
    assert _statements(script) == [
        "CREATE TABLE t (a TEXT DEFAULT 'x;y');",
        " INSERT INTO t VALUES ('1;2');",
    ]
    assert all(_statements(m) for m in MIGRATIONS)
