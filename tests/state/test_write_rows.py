"""``sqlite_tx.write_rows``: a batch of rows in statements of many rows each, with the effect
of one statement per row (the state store's staged rows and the sqlite sink's own file)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from consumer.sqlite_tx import ROWS_PER_STATEMENT, write_rows


def upsert(rows: int) -> str:
    marks = ", ".join(["(?, ?)"] * rows)
    return f"INSERT INTO t (id, v) VALUES {marks} ON CONFLICT (id) DO UPDATE SET v = excluded.v"


@pytest.fixture
def db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, v INTEGER)")
    yield conn
    conn.close()


def traced(db: sqlite3.Connection) -> list[str]:
    seen: list[str] = []
    db.set_trace_callback(seen.append)
    return seen


@pytest.mark.parametrize(
    ("count", "sizes"),
    [
        (1, [1]),
        (7, [4, 2, 1]),
        (2 * ROWS_PER_STATEMENT + 3, [ROWS_PER_STATEMENT, ROWS_PER_STATEMENT, 2, 1]),
    ],
)
def test_rows_go_in_statements_of_many_rows(db: sqlite3.Connection, count: int, sizes: list[int]):
    """Powers of two: a prepared statement per remainder size would fill sqlite3's cache."""
    rows = [(f"u{i}", i) for i in range(count)]
    statements = traced(db)
    write_rows(db, upsert(1), rows, upsert)
    assert [s.count("('u") for s in statements] == sizes
    assert db.execute("SELECT id, v FROM t ORDER BY v").fetchall() == rows


def test_the_variable_limit_bounds_a_statement(db: sqlite3.Connection):
    db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 7)  # 3 rows of 2 values: 2 a statement
    rows = [(f"u{i}", i) for i in range(9)]
    statements = traced(db)
    write_rows(db, upsert(1), rows, upsert)
    assert [s.count("('u") for s in statements] == [2, 2, 2, 2, 1]
    assert db.execute("SELECT COUNT(*) FROM t").fetchone() == (9,)


def test_a_later_row_of_the_same_id_wins_as_one_by_one(db: sqlite3.Connection):
    rows = [("a", 1), ("b", 2), ("a", 3), ("b", 4), ("a", 5)]
    write_rows(db, upsert(1), rows, upsert)
    assert dict(db.execute("SELECT id, v FROM t").fetchall()) == {"a": 5, "b": 4}


def test_without_many_each_row_is_its_statement(db: sqlite3.Connection):
    rows = [(f"u{i}", i) for i in range(3)]
    statements = traced(db)
    write_rows(db, upsert(1), rows, None)
    write_rows(db, upsert(1), [], upsert)
    assert len(statements) == 3
    assert db.execute("SELECT COUNT(*) FROM t").fetchone() == (3,)
