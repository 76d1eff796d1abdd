"""The SQLite store's file lease (``<state>.lock``) against what is not another holder: an
operator's command asking who holds it (its shared probe, held for an instant) made a daemon
starting at that moment exit 78 "held by another process" while nobody held it."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path
from typing import Any

import pytest
from support import wait_until

from consumer.errors import LeaseHeld
from consumer.state import lease
from consumer.state.lease import Lease, holder, lock_path


class _Attempts:
    """``fcntl.flock`` as it is, counting the exclusive tries refused (a spy: the lock taken
    and refused is the kernel's)."""

    def __init__(self) -> None:
        self.refused = 0
        self._flock = fcntl.flock

    def __call__(self, fd: Any, operation: int) -> None:
        try:
            self._flock(fd, operation)
        except BlockingIOError:
            if operation & fcntl.LOCK_EX:
                self.refused += 1
            raise


async def test_a_lease_taken_during_a_holder_probe_waits_it_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's shared lock is held while the lease is asked for, and let go once the
    exclusive try has been refused: the lease is taken (it was LeaseHeld at once)."""
    state = tmp_path / "state.db"
    attempts = _Attempts()
    monkeypatch.setattr(lease.fcntl, "flock", attempts)
    probe = os.open(lock_path(state), os.O_RDWR | os.O_CREAT, 0o600)
    taken: list[Lease] = []
    try:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # as holder() does
        result: asyncio.Future[Lease] = asyncio.ensure_future(
            asyncio.to_thread(Lease.acquire, state, ["main"])
        )
        await wait_until(lambda: attempts.refused >= 1 or result.done())
        os.close(probe)  # the probe is done
        probe = -1
        taken.append(await result)
        info = holder(state)
        assert info is not None
        assert (info["pid"], info["role"], info["streams"]) == (os.getpid(), "daemon", ["main"])
    finally:
        if probe >= 0:
            os.close(probe)
        for held in taken:
            held.release()


@pytest.mark.parametrize("relative", [False, True])
def test_the_store_through_a_link_is_one_lease(tmp_path: Path, relative: bool) -> None:
    """The store through a link (e.g. /etc/opera-consumer/state.db to the data disk) locked a
    ``.lock`` of its own beside the link: a daemon given the link and one given the file both
    ran on it. The store not made yet (as at a first start): the link dangles."""
    real_dir = tmp_path / "data"
    real_dir.mkdir()
    state = real_dir / "state.db"
    (tmp_path / "etc").mkdir()
    link = tmp_path / "etc" / "state.db"
    link.symlink_to(Path("..", "data", "state.db") if relative else state)
    for first_path, second_path in ((state, link), (link, state)):
        first = Lease.acquire(first_path, ["main"])
        try:
            with pytest.raises(LeaseHeld) as refused:
                Lease.acquire(second_path, ["main"], role="offset")
            assert f"pid {os.getpid()}" in str(refused.value)
            assert holder(second_path) is not None
        finally:
            first.release()
    assert not state.exists()
    assert [p.name for p in real_dir.iterdir()] == ["state.db.lock"]
    assert [p.name for p in link.parent.iterdir()] == ["state.db"]
