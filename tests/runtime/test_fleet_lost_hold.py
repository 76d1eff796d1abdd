"""A worker held past the member's self-fence deadline (consumer.runtime.pipeline,
_hold_while_fenced) stays held when the renewal that moves the deadline finds its stream lost.

The case: a stream being handed over (still renewed, so no self-fence stops it) when the
process was paused past its lease; another member took it meanwhile. On resuming, the next
renewal leaves the stream out: it moved the member's deadline first, then started the stream's
stop, and a worker whose recheck came due in the same loop iteration wrote its batch beside the
new holder before the stop reached it (found by review: the batch was written, then the stop
began). Fleet.past_fence now answers per stream, lost ones included.

The fleet is a real Fleet whose lease table answers its renewal only (the table's own tests
are tests/state/test_fleet_table.py); the pipeline, its committer and its jsonl sink are real.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleet_support import fleet_settings
from support import wait_until
from test_pipeline import STREAM, ev, harness

from consumer.core.events import Event
from consumer.runtime.fleet import Fleet
from consumer.sinks.jsonl import JsonlSink
from consumer.state.fleet import Renewal

TTL_S = 4.3


class Recording(JsonlSink):
    said: list[str]

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        self.said.append(f"write {len(events)}")
        await super().write(stream, events)


class AnswersOnSignal:
    """The renewal's answer comes when the test writes a byte to ``sock``'s peer: then the
    answer and a held worker's recheck can be ready together. The stream is not renewed."""

    member = "m1"

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def tick(self, held: Any, timeout: float, **kwargs: Any) -> Renewal:
        await asyncio.get_running_loop().sock_recv(self.sock, 1)
        return Renewal(renewed=frozenset(), draining=False, now=0.0)


async def test_a_renewal_that_finds_the_stream_lost_lets_no_held_worker_write(
    tmp_path: Path,
) -> None:
    ours, database = socket.socketpair()
    ours.setblocking(False)
    sink = Recording(tmp_path / "events.jsonl", fsync=False)
    sink.said = []
    pipelines: list[Any] = []
    tasks: list[asyncio.Task[None]] = []

    async def stop_stream(stream: str, lost: bool) -> None:
        sink.said.append(f"stop {stream} lost={lost}")
        await pipelines[0].stop()

    def spawn(coro: Any, name: str) -> asyncio.Task[None]:
        tasks.append(asyncio.create_task(coro, name=name))
        return tasks[-1]

    settings = fleet_settings(
        "postgresql://u@127.0.0.1:9/db",
        "s",
        "m1",
        streams=(STREAM,),
        lease_ttl_s=TTL_S,
        stop_step_s=0.0,
    )
    fleet = Fleet(
        settings,
        start_stream=lambda s: asyncio.sleep(0),
        stop_stream=stop_stream,
        spawn=spawn,
        table=AnswersOnSignal(ours),  # type: ignore[arg-type]
    )
    # Held, being handed over (renewed till released), and no renewal for longer than the
    # lease: the process was paused.
    fleet.epochs = {STREAM: 7}
    fleet._moving = {STREAM: False}
    fleet._joined_at = time.monotonic()
    fleet._renewed_at = time.monotonic() - (TTL_S + 5)
    fleet._closing = True  # the tick ends after its renewal (no fleet view to answer)
    past = functools.partial(fleet.past_fence, STREAM)
    try:
        async with harness(tmp_path, sink, workers=1, past_fence=past) as (_, _c, pipeline):
            pipelines.append(pipeline)
            for i in range(3):
                await pipeline.put(ev(i))
            await wait_until(lambda: pipeline.writes_fenced == 1)
            tick = asyncio.create_task(fleet._tick(time.monotonic()))
            await asyncio.sleep(0)  # the renewal is sent
            database.send(b"x")  # and answered while the loop is busy for longer than
            time.sleep(0.08)  # noqa: ASYNC251  # a held worker's recheck (FENCED_RECHECK_S)
            await tick
            await wait_until(lambda: pipeline._ended)
            assert sink.said == [f"stop {STREAM} lost=True"]  # and no write
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ours.close()
        database.close()
