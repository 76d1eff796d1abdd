"""The file lease taken on the event loop (the daemon's start, `offset set`, `sink adopt`,
`dlq replay`) waits out an operator's probe of ``<state>.lock`` (up to a second) with the loop
running: it slept in ``time.sleep`` on the loop's thread, and nothing else ran meanwhile (a
starting daemon's signal handlers, its /readyz)."""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import wait_until

from consumer.config import StateSettings
from consumer.state import lease
from consumer.state.lease import holder, lock_path


@pytest.fixture
def probe(tmp_path: Path) -> Iterator[list[int]]:
    """An operator's shared probe of ``<state>.lock`` (as :func:`holder` takes it), held until
    the test closes it (pops its descriptor)."""
    fd = os.open(lock_path(tmp_path / "state.db"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    held = [fd]
    try:
        yield held
    finally:
        for fd in held:
            os.close(fd)


class Ticker:
    """Another task of the loop, counting its turns."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.wait((self._task,))


async def test_the_loop_runs_while_the_lease_waits_out_a_probe(
    tmp_path: Path, probe: list[int]
) -> None:
    settings = StateSettings(path=tmp_path / "state.db")
    ticker = Ticker()
    taking = asyncio.ensure_future(lease.acquire(settings, ["main"]))
    try:
        await wait_until(lambda: ticker.ticks >= 5 or taking.done())
        assert not taking.done(), "the loop stood still while the lease waited"
        os.close(probe.pop())  # by this task, meanwhile: the probe is done
        held = await taking
        info = holder(settings.path)
        assert info is not None and (info["pid"], info["streams"]) == (os.getpid(), ["main"])
        await held.release()
    finally:
        taking.cancel()
        await ticker.stop()


async def test_a_lease_cancelled_while_it_waits_closes_its_lock_file(
    tmp_path: Path, probe: list[int]
) -> None:
    """A signal during the daemon's start cancels it: nothing of the lease stays open."""
    settings = StateSettings(path=tmp_path / "state.db")
    lock = lock_path(settings.path)

    def open_on_lock() -> int:
        return sum(
            os.path.realpath(f"/proc/self/fd/{fd}") == str(lock)
            for fd in os.listdir("/proc/self/fd")
        )

    taking = asyncio.ensure_future(lease.acquire(settings, ["main"]))
    await wait_until(lambda: open_on_lock() == 2 or taking.done())  # the probe's and ours
    assert not taking.done()
    taking.cancel()
    await asyncio.wait((taking,))
    assert taking.cancelled()
    assert open_on_lock() == 1  # the probe's
