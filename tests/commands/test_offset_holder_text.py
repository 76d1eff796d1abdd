"""`offset set` refused beside a running process names it from that process's lease record:
another process's bytes, shown bounded and escaped (a terminal escape or a kilobyte-long host
name in it reached the operator's terminal as it was)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest
from operator_support import cli, write_config

from consumer.state import SqliteStore
from consumer.state.lease import lock_path


async def test_a_holders_record_is_shown_bounded_and_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "ws://127.0.0.1:9/subscriptions", sink={"type": "jsonl"})
    store = await SqliteStore.open(tmp_path / "state.db")  # a daemon has run
    await store.close()
    record = {"pid": 4242, "host": "h\x1b[2J" + "x" * 3000, "role": "r\x07", "streams": ["main"]}
    fd = os.open(lock_path(tmp_path / "state.db"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, json.dumps(record).encode())
        fcntl.flock(fd, fcntl.LOCK_EX)  # held: as a running daemon holds it
        code, _, err = await cli(capsys, "offset", "set", "main", "123", "--config", str(config))
    finally:
        os.close(fd)
    # The refusal's line (a handler an earlier test left on a logger may add a logging error).
    [line] = [x for x in err.splitlines() if x.startswith("opera-consumer:")]
    assert code == 1 and "pid 4242 on h\\x1b[2J" in line, err
    assert "\x1b" not in line and "\x07" not in line and len(line) < 1000, line[:300]
