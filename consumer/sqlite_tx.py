"""One ``BEGIN IMMEDIATE … COMMIT`` helper for every aiosqlite writer (the state store and the
sqlite sink's own file): rolled back on any failure, cancellation included."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator

import aiosqlite


@contextlib.asynccontextmanager
async def transaction(db: aiosqlite.Connection) -> AsyncIterator[aiosqlite.Connection]:
    """A write transaction on a connection opened with ``isolation_level=None``."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        await db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            await db.execute("ROLLBACK")
        raise
