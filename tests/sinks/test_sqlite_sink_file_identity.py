"""The sqlite sink in a file of its own, its file removed or replaced while the daemon runs
(found by a review).

- Removed (shipped away, archived as one would a log): SQLite in WAL mode went on committing
  into the unlinked inode, the checkpoint moved past those events, and they went with the
  inode when the connection closed: lost. Each transaction now checks before its COMMIT that
  the path still names the file opened; otherwise it rolls back and the sink is unusable
  (exit 78), and the restart writes those events into the file the path names then.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from support import (
    committed,
    newest_offset,
    spawn_daemon,
    stop_when_committed,
    tail,
    toml_config,
    truth_ids,
    wait_exit,
    wait_until,
)
from test_postgres_sink import event

from consumer.errors import SinkUnusable
from consumer.sinks.sqlite import SqliteSink


def rows_in(db_path: Path, table: str = "opera_events") -> set[str]:
    if not db_path.exists():
        return set()
    with closing(sqlite3.connect(db_path, timeout=10)) as db:
        try:
            return {r[0] for r in db.execute(f"SELECT unique_event_id FROM {table}")}
        except sqlite3.OperationalError:  # no table
            return set()


@pytest.mark.parametrize("how", ["removed", "replaced"])
async def test_a_write_into_a_file_no_longer_at_the_path_is_rolled_back(
    tmp_path: Path, how: str
) -> None:
    path = tmp_path / "events.db"
    sink = SqliteSink(path, "opera_events")
    await sink.open(None)
    try:
        await sink.write("main", [event(1)])
        assert rows_in(path) == {"u1"}
        aside = tmp_path / "aside.db"
        if how == "removed":
            path.unlink()
        else:  # another database moved over it
            with closing(sqlite3.connect(aside)) as other:
                other.execute("CREATE TABLE t (x)")
            os.replace(aside, path)
        for i in (2, 3):  # and it stays refused
            with pytest.raises(SinkUnusable, match="removed or replaced"):
                await sink.write("main", [event(i)])
    finally:
        await sink.close()
    # Rolled back, never committed: not in whatever the path (and the -wal left by the
    # connection to the file it had open, which SQLite reads with it) holds now.
    assert not rows_in(path) & {"u2", "u3"}


@pytest.mark.timeout(240)
async def test_a_sqlite_sink_file_removed_while_running_loses_no_event(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=100)
    db_path, state, log = tmp_path / "events.db", tmp_path / "state.db", tmp_path / "daemon.log"
    sink = f'[sink]\ntype = "sqlite"\npath = "{db_path}"'
    proc = spawn_daemon(toml_config(tmp_path, gw.url, sink=sink), log)
    try:
        await wait_until(lambda: committed(state, newest_offset(gw)) or proc.poll() is not None)
        assert proc.poll() is None, tail(log)
        assert len(rows_in(db_path)) == 100
        os.unlink(db_path)  # removed by the operator while the daemon runs
        gw.append("DEMO", 100)
        newest = newest_offset(gw)
        await wait_until(lambda: committed(state, newest) or proc.poll() is not None, timeout=60)
        code = await wait_exit(proc) if proc.poll() is not None else None
    finally:
        proc.kill()
        await wait_exit(proc)
    assert code == 78, tail(log)
    assert "removed or replaced" in tail(log)

    # The restart (creates a new file at the path) until the newest event is committed.
    proc = spawn_daemon(toml_config(tmp_path, gw.url, sink=sink), log)
    await stop_when_committed(proc, state, newest, log)
    after = set(truth_ids(gw.events("DEMO"))[100:])
    assert after <= rows_in(db_path)
