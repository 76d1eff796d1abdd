"""The daemon's lease on its state store: a second daemon on the same store is refused, the
first is unaffected, and the lease is released at the stop (Issue #10 item 7: split out of
test_operator_tools.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from operator_support import settled, write_config
from support import running, wait_until

from consumer.config import load_settings
from consumer.errors import LeaseHeld
from consumer.runtime.daemon import Daemon
from consumer.state import holder

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")


async def test_a_second_daemon_on_the_same_state_store_is_refused(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=50)
    config = write_config(tmp_path, gw.url, sink={"type": "jsonl", "path": tmp_path / "e.jsonl"})
    settings = load_settings(config)
    state = settings.state.path
    async with running(settings) as first:
        await wait_until(settled(first, "main", 50))
        info = holder(state)
        assert info is not None
        assert (info["pid"], info["role"], info["streams"]) == (os.getpid(), "daemon", ["main"])
        with pytest.raises(LeaseHeld) as refused:
            await Daemon.create(settings)
        assert f"pid {os.getpid()}" in str(refused.value)
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "consumer", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 78, proc.stderr
        assert f"pid {os.getpid()}" in proc.stderr
        # The first one is unaffected.
        gw.append("DEMO", 10)
        await wait_until(settled(first, "main", 60))
    assert holder(state) is None
    assert first.exit_code == 0
    async with running(settings) as again:  # released at the stop: a new daemon may start
        await wait_until(lambda: again.runners["main"].state == "streaming")
