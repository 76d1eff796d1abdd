"""A daemon (re)started while an operator's `offset set` or `sink adopt` holds the state
store's lease for its run: it exited 78, which systemd does not restart, and the stream stayed
down after the command let go. It waits the command out, as it waits out a `dlq replay`."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from support import count_lines, log_records, spawn_daemon, tail, toml_config, wait_exit, wait_until

from consumer.config import load_settings
from consumer.errors import ExitCode
from consumer.state import lease

RETRYING = "state store unreachable at start; retrying"


@pytest.mark.parametrize("role", ["offset", "sink-adopt"])
async def test_a_daemon_started_during_an_operators_change_waits_for_it(
    sandbox_factory: Any, tmp_path: Path, role: str
) -> None:
    gw = await sandbox_factory(backlog=5)
    config = toml_config(tmp_path, gw.url)
    settings = load_settings(config)
    log = tmp_path / "daemon.log"
    held = await lease.acquire(settings.state, sorted(settings.streams), role=role)
    released = False
    proc = spawn_daemon(config, log)
    try:
        await wait_until(lambda: len(log_records(log, RETRYING)) >= 1 or proc.poll() is not None)
        assert proc.poll() is None, tail(log)
        await held.release()
        released = True
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 5, timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == ExitCode.OK, tail(log)
    finally:
        if not released:
            await held.release()
        if proc.poll() is None:
            proc.kill()
