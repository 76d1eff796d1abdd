"""The sqlite sink in a file of its own, its file removed or replaced while the daemon runs, or
not creatable at start for a full disk (found by a review).

- Removed (shipped away, archived as one would a log): SQLite in WAL mode went on committing
  into the unlinked inode, the checkpoint moved past those events, and they went with the
  inode when the connection closed: lost. Each transaction now checks before its COMMIT that
  the path still names the file opened; otherwise it rolls back and the sink is unusable
  (exit 78), and the restart writes those events into the file the path names then.
- A full disk (no inode), a quota or a failing device when the file is created at start was a
  ConfigError (exit 78, never restarted by systemd) blaming sink.path; it is retriable now.
"""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
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

from consumer.errors import ConfigError, SinkUnusable, TransientSinkError
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


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ENOSPC, TransientSinkError),
        (errno.EDQUOT, TransientSinkError),
        (errno.EIO, TransientSinkError),
        (errno.EACCES, ConfigError),
        (errno.EISDIR, ConfigError),
    ],
)
async def test_a_full_disk_at_open_is_retriable_not_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, expected: type[Exception]
) -> None:
    path = tmp_path / "events.db"
    real = os.open

    def failing(file: Any, flags: int, *args: Any, **kw: Any) -> int:
        if os.fspath(file) == str(path) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real(file, flags, *args, **kw)

    monkeypatch.setattr(os, "open", failing)
    sink = SqliteSink(path, "opera_events")
    with pytest.raises(expected) as caught:
        await sink.open(None)
    if expected is TransientSinkError:
        assert "free disk space or fix the device" in str(caught.value)
    else:
        assert "sink.path" in str(caught.value)


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


def spawn_on_tmpfs(config: Path, log: Path, folder: Path, size: str) -> subprocess.Popen[bytes]:
    """The daemon in a mount namespace of its own, ``folder`` a tmpfs of ``size`` there."""
    script = f'mount -t tmpfs -o size={size} none "{folder}" && exec "$@"'
    with log.open("ab") as f:
        return subprocess.Popen(
            [
                *("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"),
                *(sys.executable, "-OO", "-m", "consumer", "run", "--config", str(config)),
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def can_unshare() -> bool:
    if os.geteuid() != 0:
        return False
    return not subprocess.run(["unshare", "-m", "true"], check=False).returncode


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sink_type", ["jsonl", "sqlite"])
async def test_a_full_disk_at_start_is_not_an_exit_that_systemd_never_restarts(
    sandbox_factory: Any, tmp_path: Path, sink_type: str
) -> None:
    """A real full disk (a tmpfs without a free inode) under the sink's file at start: exit 1
    (Restart=on-failure starts it again once space is freed), not 78."""
    if not can_unshare():
        pytest.skip("needs a mount namespace")
    gw = await sandbox_factory(backlog=5)
    folder, log = tmp_path / "disk", tmp_path / "daemon.log"
    folder.mkdir()
    name = "events.jsonl" if sink_type == "jsonl" else "events.db"
    config = toml_config(
        tmp_path, gw.url, sink=f'[sink]\ntype = "{sink_type}"\npath = "{folder / name}"'
    )
    proc = spawn_on_tmpfs(config, log, folder, "1m,nr_inodes=1")  # full: no inode left
    try:
        code = await wait_exit(proc, 60)
    finally:
        proc.send_signal(signal.SIGKILL)
        await wait_exit(proc)
    assert "No space left on device" in tail(log), tail(log)
    assert "free disk space or fix the device" in tail(log), tail(log)
    assert code == 1, f"exit {code}: {tail(log, 600)}"
