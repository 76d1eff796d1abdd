"""A failed fsync of the jsonl file, end to end: the lines written since the last commit have
left the heap (write-outs) and may have left the kernel's cache too, so the daemon cuts them
and stops with exit 1; the restart replays them, and every event is in the file once."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest
from support import (
    assert_each_once_in_order,
    committed,
    committed_sink_length,
    make_settings,
    newest_offset,
    read_sink,
    running,
    wait_until,
)

from consumer.errors import ExitCode
from consumer.runtime.daemon import Daemon


async def test_a_failed_fsync_stops_the_daemon_and_the_restart_delivers_each_event_once(
    sandbox_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await sandbox_factory(backlog=100)
    settings = make_settings(tmp_path, gw.url)
    path, state = tmp_path / "events.jsonl", tmp_path / "state.db"
    real = os.fsync
    failing = False

    def fsync(fd: int) -> None:
        if failing and os.fstat(fd).st_ino == os.stat(path).st_ino:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    daemon = await Daemon.create(settings)
    run = asyncio.create_task(daemon.run())
    try:
        await wait_until(lambda: committed(state, newest_offset(gw)))
        durable = committed_sink_length(state)
        failing = True
        gw.append("DEMO", 100)
        async with asyncio.timeout(60):
            assert await run == ExitCode.RUNTIME
    finally:
        run.cancel()
    failing = False
    assert durable > 0 and committed_sink_length(state) == durable  # nothing more committed
    assert path.stat().st_size == durable  # what no checkpoint covers is cut
    async with running(settings):  # the restart
        await wait_until(lambda: committed(state, newest_offset(gw)))
    assert_each_once_in_order(read_sink(path), gw.events("DEMO"))
