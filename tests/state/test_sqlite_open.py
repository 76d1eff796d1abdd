"""Opening the SQLite store fails cleanly: no connection thread outlives a failed open (they
are not daemon threads, so one left running keeps the process from ever exiting)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from consumer.errors import StoreError
from consumer.state import SqliteStore


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
