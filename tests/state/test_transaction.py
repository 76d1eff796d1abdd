"""``sqlite_tx.transaction``: a write transaction that leaves its connection usable whatever
happens to the task that opened it."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import aiosqlite
import pytest

from consumer.sqlite_tx import transaction


async def test_a_transaction_cancelled_while_its_begin_waits_leaves_none_open(
    tmp_path: Path,
) -> None:
    """Cancelled while BEGIN IMMEDIATE waited for another writer's lock (a stream's first
    anchor at shutdown, a CLI purge holding the lock): aiosqlite runs the BEGIN anyway once the
    lock is free. Nothing ended that transaction, and the connection's every later one failed
    ("cannot start a transaction within a transaction"): the final commit was lost."""
    path = tmp_path / "store.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TABLE t (v INTEGER)")
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute("PRAGMA busy_timeout=10000")
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock

        async def write() -> None:
            async with transaction(db):
                await db.execute("INSERT INTO t VALUES (1)")

        task = asyncio.create_task(write())
        await asyncio.sleep(0)  # its BEGIN is queued in the connection's thread, waiting
        task.cancel()
        other.execute("ROLLBACK")  # the lock is free: that BEGIN goes through
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await task
        async with transaction(db):  # the connection can write again
            await db.execute("INSERT INTO t VALUES (2)")
        async with db.execute("SELECT v FROM t") as cur:
            assert [r[0] for r in await cur.fetchall()] == [2]
    finally:
        await db.close()
        other.close()
