"""One ``BEGIN IMMEDIATE … COMMIT`` helper for every aiosqlite writer (the state store and the
sqlite sink's own file): rolled back on any failure, cancellation included."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar, cast

import aiosqlite

_T = TypeVar("_T")


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


@contextlib.contextmanager
def sync_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """:func:`transaction` for code that runs in the connection's thread (:func:`in_thread`)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


async def in_thread(db: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    """Run ``fn(connection)`` in the aiosqlite connection's own thread, in its queue with the
    connection's other calls: a whole transaction in one call instead of one await per
    statement. aiosqlite has no public API for this; ``_execute`` is what all of its methods
    use (the version is pinned)."""
    execute = cast(Callable[..., Any], db._execute)
    return cast(_T, await execute(lambda: fn(db._conn)))
