"""A worker abandoned at its stream's stop (consumer.runtime.pipeline.CANCEL_GRACE_S: its sink
write swallows cancellation, as a handler catching BaseException or nats-py with a full
outbound buffer does) records nothing once the stop has returned. The daemon forgets the
stream next (Committer.forget); what the stray write then took belongs to no lease. Recorded,
it made up a ledger for the forgotten stream (in fleet mode, a commit of it refused for good:
the stream's work dropped whenever it was taken again), or marked the next lease's events done
by their sequence numbers (the checkpoint past events no sink took). Its events are the next
holder's to replay. Real Committer, StreamPipeline and SqliteStore.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

import pytest
from support import wait_until
from test_committer_dead_letters import STREAM as S
from test_committer_dead_letters import one_worker

from consumer.core.events import Event
from consumer.core.protocol import event_from_raw
from consumer.runtime import pipeline as pipeline_module
from consumer.runtime.committer import Committer
from consumer.runtime.pipeline import StreamPipeline
from consumer.sinks.base import PlainSink
from consumer.state.sqlite import SqliteStore

WAIT_S = 5.0


class Stubborn(PlainSink):
    """The first write holding an event of ``gates`` waits until its gate opens, swallowing
    every cancellation meanwhile."""

    name = "stubborn"

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.waiting: set[str] = set()
        self.got: list[str] = []

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        for e in events:
            gate = self.gates.pop(e.unique_event_id, None)
            if gate is None:
                continue
            self.waiting.add(e.unique_event_id)
            while not gate.is_set():
                with contextlib.suppress(asyncio.CancelledError):  # swallowed
                    await gate.wait()
        self.got.extend(e.unique_event_id for e in events)


def ev(offset: int, uid: str) -> Event:
    event = event_from_raw({"metadata": {"offset": f"{offset:06d}", "uniqueEventId": uid}})
    assert event is not None
    return event


def pipeline(sink: Stubborn, committer: Committer) -> StreamPipeline:
    p = one_worker(sink, committer)  # of stream STREAM
    p.start()
    return p


@pytest.mark.parametrize("stray_ends", ["before the stream is taken again", "after it is"])
async def test_an_abandoned_workers_write_records_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stray_ends: str
) -> None:
    monkeypatch.setattr(pipeline_module, "CANCEL_GRACE_S", 0.2)
    store = await SqliteStore.open(tmp_path / "state.db")
    sink = Stubborn()
    committer = Committer(store, sink, max_events=1000, interval_s=3600)
    first_lease = ["a1", "a2", "a3"]
    stray, held = asyncio.Event(), asyncio.Event()
    sink.gates["a1"] = stray
    old = pipeline(sink, committer)
    new: StreamPipeline | None = None
    try:
        for i, uid in enumerate(first_lease, 1):
            await old.put(ev(i, uid))
        await wait_until(lambda: "a1" in sink.waiting, timeout=WAIT_S)
        # stop_stream: the workers stopped (this one abandoned), a last commit, forgotten.
        await old.stop()
        assert len(old.abandoned) == 1
        await committer.flush()
        committer.forget(S)
        if stray_ends == "before the stream is taken again":
            stray.set()
            async with asyncio.timeout(WAIT_S):  # it ends once its write has
                await asyncio.gather(*old.abandoned, return_exceptions=True)
            assert sink.got == first_lease  # the sink took them: nothing of it recorded
            assert not await committer.flush()
            assert await store.seen(S, first_lease) == set()
        # The stream taken again: resumed from its checkpoint (none: all of it again), and
        # one event more, whose write waits.
        sink.gates["b4"] = held
        new = pipeline(sink, committer)
        for i, uid in enumerate([*first_lease, "b4"], 1):
            await new.put(ev(i, uid))
        await wait_until(lambda: "b4" in sink.waiting, timeout=WAIT_S)
        if stray_ends == "after it is":
            stray.set()
            async with asyncio.timeout(WAIT_S):  # it ends once its write has
                await asyncio.gather(*old.abandoned, return_exceptions=True)
            # Its records would mark the new lease's events done by their numbers: nothing of
            # that lease is, its one write still waits.
            assert new.in_flight == 4
            await committer.flush()
            assert await store.checkpoint(S) is None
        held.set()
        async with asyncio.timeout(WAIT_S):
            await new.drained()
        assert await committer.flush()
        cp = await store.checkpoint(S)
        assert cp is not None and cp.unique_event_id == "b4"
        assert await store.seen(S, [*first_lease, "b4"]) == {*first_lease, "b4"}
        assert new.delivered == 4 and new.dead_lettered == 0
    finally:
        stray.set()
        held.set()
        for p in (old, new):
            if p is not None:
                await p.stop()
        await store.close()
