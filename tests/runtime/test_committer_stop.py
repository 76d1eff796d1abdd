"""The committer stopped while a commit is under way: the commit finishes (shielded), and
should it fail, its error is read and logged once, never left to asyncio's "Task exception
was never retrieved" with a traceback on the stop operators look at most. Real Committer and
SqliteStore; the sink's sync waits, then fails."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from log_capture import captured_logs

from consumer.core.events import Event
from consumer.core.watermark import Position
from consumer.errors import TransientSinkError
from consumer.runtime.committer import Committer
from consumer.sinks.base import PlainSink
from consumer.state.sqlite import SqliteStore


class GatedSink(PlainSink):
    """A sync that waits for the gate, then fails (a disk that stays full)."""

    name = "gated"

    def __init__(self) -> None:
        self.syncing = asyncio.Event()
        self.gate = asyncio.Event()
        self.failed = asyncio.Event()

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        return None

    async def sync(self, position: str | None) -> None:
        self.syncing.set()
        await self.gate.wait()
        self.failed.set()
        raise TransientSinkError("the disk is full")


async def test_a_commit_failing_after_the_stop_is_logged_not_left_unretrieved(
    tmp_path: Path,
) -> None:
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    store = await SqliteStore.open(tmp_path / "state.db")
    sink = GatedSink()
    committer = Committer(store, sink, max_events=1, interval_s=0.01)
    try:
        seq = committer.arrived("main", Position("000001", "u1"))
        committer.processed("main", ["u1"], [seq])
        with captured_logs() as logs:
            task = asyncio.create_task(committer.run())
            async with asyncio.timeout(10):
                await sink.syncing.wait()  # the commit is under way
            task.cancel()  # the daemon stops
            await asyncio.gather(task, return_exceptions=True)
            sink.gate.set()  # then the commit under way fails
            async with asyncio.timeout(10):
                await sink.failed.wait()
            for _ in range(5):  # its task ends, its callbacks run
                await asyncio.sleep(0)
            gc.collect()
        assert not [c for c in unhandled if "never retrieved" in str(c.get("message"))], unhandled
        [line] = [x for x in logs.getvalue().splitlines() if "the disk is full" in x]
        assert "the commit under way at the stop failed" in line, line
        # The final commit (the daemon's after the stop) tries again, and says why it fails.
        with pytest.raises(TransientSinkError):
            await committer.flush()
    finally:
        loop.set_exception_handler(previous)
        await store.close()
