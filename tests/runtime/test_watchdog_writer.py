"""The watchdog stops beating while anything holds the state store's writer for a minute, not
only a commit: a prune step stuck on a disk that no longer answers holds every commit behind
the same lock, nothing became durable, and WATCHDOG=1 went on for ever (found by a review).
The daemon in-process against the sandbox, its sd_notify on a real datagram socket; its clock
moved 1000 s ahead so that whatever holds the writer counts as stuck at once."""

from __future__ import annotations

import asyncio
import socket
import time as real_time
import types
from pathlib import Path
from typing import Any

import pytest
from support import make_settings, running, wait_until

from consumer.runtime import daemon as daemon_module
from consumer.runtime import systemd
from consumer.state.sqlite import SqliteStore


async def test_no_watchdog_beat_while_a_prune_holds_the_writer(
    sandbox_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await sandbox_factory(backlog=50)
    path = str(tmp_path / "notify.sock")
    r = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    r.bind(path)
    r.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a beat every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    shim = types.SimpleNamespace(
        monotonic=lambda: real_time.monotonic() + 1000.0, time=real_time.time
    )
    monkeypatch.setattr(daemon_module, "time", shim)
    stuck = asyncio.Event()

    async def hung_prune(self: SqliteStore, *args: Any, **kwargs: Any) -> int:
        stuck.set()
        await asyncio.Event().wait()  # a DELETE on a disk that no longer answers
        return 0

    monkeypatch.setattr(SqliteStore, "prune_processed", hung_prune)
    messages: list[bytes] = []
    after: list[int] = []  # where the messages read once the prune hung begin

    def statuses_since_stuck() -> int:
        while True:
            try:
                messages.append(r.recv(1 << 16))
            except BlockingIOError:
                break
        if stuck.is_set() and not after:
            after.append(len(messages))
        return sum(m.startswith(b"STATUS=") for m in messages[after[0] :]) if after else 0

    try:
        async with running(make_settings(tmp_path, gw.url)):
            await wait_until(lambda: statuses_since_stuck() >= 4, timeout=30)
    finally:
        r.close()
    since = messages[after[0] :]
    second = [i for i, m in enumerate(since) if m.startswith(b"STATUS=")][1]
    # Each beat comes before its STATUS=: those after the second one began once it hung.
    assert b"WATCHDOG=1" not in since[second:], since
    assert systemd.watchdog_period() == pytest.approx(0.05)  # under a watchdog all along
