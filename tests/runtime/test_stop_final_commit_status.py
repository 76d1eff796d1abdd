"""The stop's final commit meeting a state store an operator must fix (its file replaced while
the daemon ran: a StoreError that no retry clears) exits as a running daemon's commit meeting
it would: 78, which systemd does not restart into. It exited 1. (The same for a sink that
became unusable: tests/sinks/test_jsonl_renamed_running.py.)

The daemon as a process, commits far apart, so that the stop's commit is the first to meet
the replaced file; done events are seen in its STATUS= line (the offset its streams are at)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from support import (
    caught,
    checkpoint,
    log_records,
    newest_offset,
    tail,
    toml_config,
    wait_exit,
    wait_until,
)
from test_store_wait import Notifications

from consumer.errors import ExitCode


def start(config: Path, log: Path, notify: str) -> subprocess.Popen[bytes]:
    # STATUS= every 0.1 s: the watchdog's beat (its period is half of WATCHDOG_USEC).
    env = {**os.environ, "NOTIFY_SOCKET": notify, "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-OO", "-m", "consumer", "run", "--config", str(config)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_a_final_commit_on_a_replaced_state_store_exits_78(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=20)
    state, log = tmp_path / "state.db", tmp_path / "daemon.log"
    notify = Notifications(tmp_path / "notify.sock")
    proc = start(toml_config(tmp_path, gw.url, commit_interval_ms=60_000), log, notify.path)
    try:
        # Every event done, none committed but the first (a stream's first is at arrival).
        done = f"main: streaming, offset {newest_offset(gw)}"
        await wait_until(
            lambda: (
                (notify.has(done) and caught(proc.pid, signal.SIGTERM)) or proc.poll() is not None
            )
        )
        assert proc.poll() is None, tail(log)
        cp = checkpoint(state)
        assert cp is not None and cp[0] != newest_offset(gw)  # the rest waits for the stop's
        state.rename(tmp_path / "state.db.moved")
        state.write_bytes(b"")  # another file under the path
        proc.send_signal(signal.SIGTERM)
        code = await wait_exit(proc)
    finally:
        proc.kill()
        await wait_exit(proc)
        notify.close()
    assert code == ExitCode.CONFIG, tail(log)
    [failed] = log_records(
        log, "final commit failed; uncommitted events are replayed on the next start"
    )
    assert "was removed or replaced" in failed["error"] and failed["exit_code"] == 78
