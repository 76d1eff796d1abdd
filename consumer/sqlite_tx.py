"""One ``BEGIN IMMEDIATE … COMMIT`` helper for every aiosqlite writer (the state store and the
sqlite sink's own file): rolled back on any failure, cancellation included; and the one way
both write a batch of rows (:func:`write_rows`)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

import aiosqlite

_T = TypeVar("_T")


@contextlib.asynccontextmanager
async def transaction(db: aiosqlite.Connection) -> AsyncIterator[aiosqlite.Connection]:
    """A write transaction on a connection opened with ``isolation_level=None``."""
    try:
        await db.execute("BEGIN IMMEDIATE")
    except BaseException:
        # Cancelled while the BEGIN waited for the lock, aiosqlite still runs it, after we
        # left: a ROLLBACK queued behind it ends that transaction, or the connection's next
        # one fails ("cannot start a transaction within a transaction"). An error when no
        # transaction began.
        with contextlib.suppress(sqlite3.Error):
            await db.execute("ROLLBACK")
        raise
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


ROWS_PER_STATEMENT = 512


def write_rows(
    db: sqlite3.Connection,
    statement: str,
    rows: Sequence[Sequence[Any]],
    many: Callable[[int], str] | None,
) -> None:
    """Run ``statement`` for each row, as ``many(n)`` statements of up to
    ``ROWS_PER_STATEMENT`` rows where the caller has them.

    sqlite3 lets go of the GIL around every step, and a thread that wants it back waits for
    the event loop's thread to let go too (up to the 5 ms switch interval while a catch-up
    keeps it busy): ``executemany`` is one such hand-over per row. Measured with another
    thread busy: 770 rows/s one by one, 26,000 in statements of 500 rows (47,000 and 59,000
    with that thread idle).

    Every ``n`` is a power of two: sqlite3 keeps each prepared statement in its cache, and a
    statement of hundreds of rows is a large program; at most ten sizes are ever prepared.
    (With one statement per remainder size the daemon's peak RSS was 104-111 MB in
    bench/compare.py's sqlite runs; with powers of two, 63.)"""
    if many is None or not rows:
        db.executemany(statement, rows)
        return
    limit = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(rows[0])
    largest = 1 << (max(1, min(ROWS_PER_STATEMENT, limit)).bit_length() - 1)
    start = 0
    while start < len(rows):
        size = min(largest, 1 << ((len(rows) - start).bit_length() - 1))
        part = rows[start : start + size]
        db.execute(many(size), [value for row in part for value in row])
        start += size
