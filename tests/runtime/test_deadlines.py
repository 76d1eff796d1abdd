"""consumer.deadlines: many blocks' deadlines on one timer, each behaving as asyncio.timeout
(a TimeoutError out of an expired block, a cancellation of someone else's kept as one)."""

from __future__ import annotations

import asyncio
import time

import pytest

from consumer.deadlines import Deadlines

SECONDS = 0.3
BOUND_S = 10.0  # every wait here ends by then


async def test_a_block_past_its_deadline_raises_timeout_error() -> None:
    deadlines = Deadlines(SECONDS)
    deadline = deadlines.new()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(BOUND_S):
            with deadline:
                await asyncio.Event().wait()  # never set
    assert deadline.expired()
    assert time.monotonic() - started >= SECONDS
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    deadlines.close()


async def test_only_the_overdue_block_among_many_is_cancelled() -> None:
    """Three blocks at once: two end before the deadline, the third is cut by it."""
    deadlines = Deadlines(SECONDS)
    release = asyncio.Event()

    async def block(wait: asyncio.Event) -> str:
        with deadlines.new():
            await wait.wait()
        return "done"

    stuck = asyncio.create_task(block(asyncio.Event()))
    quick = [asyncio.create_task(block(release)) for _ in range(2)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*quick) == ["done", "done"]
    async with asyncio.timeout(BOUND_S):
        with pytest.raises(TimeoutError):
            await stuck
    deadlines.close()


async def test_renew_gives_the_block_its_whole_deadline_again() -> None:
    """Four steps of 0.3 deadline each, renewed after each: 1.2 deadlines in all, no expiry
    (0.7 s to spare at each step, for a loaded machine); the same without renewing expires."""
    deadlines = Deadlines(1.0)
    with deadlines.new() as deadline:
        for _ in range(4):
            await asyncio.sleep(0.3)
            deadline.renew()
    assert not deadline.expired()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(BOUND_S):
            with deadlines.new():
                for _ in range(20):
                    await asyncio.sleep(0.3)
    deadlines.close()


async def test_a_cancellation_of_someone_elses_stays_one() -> None:
    """The task cancelled by another (a stop) while its block waits: CancelledError, whether
    its deadline expired in the same step or not."""
    deadlines = Deadlines(SECONDS)
    entered = asyncio.Event()

    async def block() -> None:
        with deadlines.new():
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(block())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(BOUND_S):
            await task
    assert task.cancelled()

    # Expired, and cancelled by another in the same step: the other's cancellation wins.
    async def expired_and_stopped() -> None:
        with deadlines.new():
            await asyncio.sleep(BOUND_S)

    task = asyncio.create_task(expired_and_stopped())
    async with asyncio.timeout(BOUND_S):
        while not deadlines._live:
            await asyncio.sleep(0)
        (deadline,) = deadlines._live
        deadline._expire()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()
    deadlines.close()


def test_deadlines_work_in_one_event_loop_after_another() -> None:
    """A sink outlives a test's event loop: the next loop's blocks are still cut."""
    deadlines = Deadlines(SECONDS)

    async def stuck() -> None:
        async with asyncio.timeout(BOUND_S):
            with deadlines.new():
                await asyncio.Event().wait()

    for _ in range(2):
        with pytest.raises(TimeoutError):
            asyncio.run(stuck())


async def test_a_deadline_is_entered_once() -> None:
    deadlines = Deadlines(SECONDS)
    deadline = deadlines.new()
    with deadline:
        pass
    with pytest.raises(RuntimeError, match="entered once"), deadline:
        pass
    deadlines.close()
