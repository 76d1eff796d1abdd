"""Reference 2.6: OHIP's gateway pings the client, which "must answer immediately with pong" (it
paces its bursts by that round trip, and its pong timeout is unknown). While the pipeline is full
(a sink down, retried for minutes) the reader waited for room and read nothing, so the gateway's
pings went unanswered until the sink recovered. Now a wait that lasts
``paused_read_ahead_after_s`` reads on: pings answered at once, everything else held in order
(up to ``paused_read_ahead_bytes``) and handled first, as if just read, when room comes.

Real parts: the sandbox gateway on loopback (pinging every 0.1 s), the daemon, a python sink
whose write is held (tests/pysink.py ``GATES``) and one worker with a small queue, so that the
reader waits for room after a few events and the sink's order is the gateway's."""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pysink
import pytest
from log_capture import captured_logs
from support import committed, make_settings, newest_offset, running, truth_ids, wait_until

from consumer.config import Settings
from consumer.core.protocol import DecodeError
from consumer.core.session import ClientSession, Ended
from consumer.runtime.daemon import Daemon
from consumer.runtime.read_ahead import HELD_COST, ReadAhead
from consumer.runtime.stream import StreamRunner
from consumer.sandbox import SandboxGateway

pytestmark = pytest.mark.usefixtures("fresh_pysink")

PING_S = 0.1  # the sandbox's pings
LIMIT = 8000  # bytes read ahead at most in the tests that bound it: about 9 of the events


def settings_for(tmp_path: Path, gw: SandboxGateway, **connection: Any) -> Settings:
    return make_settings(
        tmp_path,
        gw.url,
        sink={"type": "python", "target": "pysink:handle"},
        # One worker taking 5 at a time, 5 more queued: the reader waits after about 10 events.
        pipeline={"workers": 1, "queue_size": 5, "batch_max": 5},
        connection={"paused_read_ahead_after_s": 0.05, **connection},
    )


def held_sink() -> asyncio.Event:
    """The sink's writes wait until the returned event is set (a downstream that is down)."""
    gate = pysink.GATES["main"] = asyncio.Event()
    return gate


async def waiting_for_room(daemon: Daemon) -> StreamRunner:
    """The sink holds its first write and the reader waits for room."""
    runner = daemon.runners["main"]
    await wait_until(lambda: pysink.CALLS[0] >= 1 and runner._paused, timeout=20)
    return runner


def read_ahead(runner: StreamRunner) -> ReadAhead:
    ahead = runner.read_ahead
    assert ahead is not None
    return ahead


def logged(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def assert_all_once_in_order(gw: SandboxGateway) -> None:
    """Each of the gateway's events reached the sink once, in the gateway's order (one worker;
    a replayed one is a duplicate, skipped)."""
    assert pysink.delivered_ids("main") == truth_ids(gw.events("DEMO"))


async def test_pings_are_answered_while_the_sink_holds_the_stream(sandbox_factory, tmp_path: Path):
    """The sink holds its first write and the pipeline is full: the gateway's pings keep being
    answered. Once the sink is back every event is delivered once, in order, the malformed
    frames read ahead among them are dead-lettered in their place, and the checkpoint reaches
    the newest offset."""
    gw = await sandbox_factory(backlog=40, malformed_every=10, ping_interval_s=PING_S)
    newest, state = newest_offset(gw), tmp_path / "state.db"
    gate = held_sink()
    async with running(settings_for(tmp_path, gw)) as daemon:
        runner = await waiting_for_room(daemon)
        answered = gw.stats.pongs_received
        await wait_until(lambda: gw.stats.pongs_received >= answered + 3, timeout=15)
        assert runner._paused and not gate.is_set() and pysink.delivered_ids() == []
        assert runner.stats.paused_pings >= 3
        async with httpx.AsyncClient() as http:
            port = daemon.metrics_server.port
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        assert 'opera_consumer_paused_pings_answered_total{stream="main"}' in text
        gate.set()
        await wait_until(lambda: committed(state, newest), timeout=20)
        pipeline = daemon.pipelines["main"]
        assert pipeline.dead_lettered == runner.stats.malformed >= 3  # one per 10 events
        assert pipeline.duplicates == 0 and runner.stats.connections == 1
    assert_all_once_in_order(gw)


async def test_the_read_ahead_holds_at_most_its_limit_then_stops_reading(
    sandbox_factory, tmp_path: Path
):
    """A backlog far larger than paused_read_ahead_bytes: the read-ahead holds frames until they
    reach the limit (the last one may pass it: at most the limit plus one frame), then stops
    reading while the sink still holds the stream. Released, every event once, in order."""
    gw = await sandbox_factory(backlog=100, ping_interval_s=PING_S)
    newest, state = newest_offset(gw), tmp_path / "state.db"
    gate = held_sink()
    settings = settings_for(tmp_path, gw, paused_read_ahead_bytes=LIMIT)
    async with running(settings) as daemon:
        runner = await waiting_for_room(daemon)
        await wait_until(
            lambda: runner.read_ahead is not None and runner.read_ahead.full, timeout=15
        )
        ahead = read_ahead(runner)
        await wait_until(lambda: not ahead.reading, timeout=5)  # it stopped by itself
        assert runner._paused and not gate.is_set()
        last_frame = ahead.held[-1][0]
        assert ahead.held_bytes - last_frame < LIMIT <= ahead.held_bytes
        assert ahead.held_bytes == sum(size for size, _ in ahead.held)
        gate.set()
        await wait_until(lambda: committed(state, newest), timeout=20)
        assert runner.stats.connections == 1
    assert_all_once_in_order(gw)


async def test_with_the_read_ahead_off_pings_wait_for_the_sink(sandbox_factory, tmp_path: Path):
    """paused_read_ahead_bytes = 0: as before, nothing is read while the reader waits, so the
    gateway's pings are answered only once the sink has made room. The gateway answering three
    of our own pings meanwhile (they go out whatever the reader does) is the time in which its
    pings, every 0.1 s, would have been answered."""
    gw = await sandbox_factory(backlog=40, ping_interval_s=PING_S)
    newest, state = newest_offset(gw), tmp_path / "state.db"
    gate = held_sink()
    settings = settings_for(tmp_path, gw, paused_read_ahead_bytes=0, ping_interval_s=0.2)
    async with running(settings) as daemon:
        runner = await waiting_for_room(daemon)
        answered, pongs_sent = gw.stats.pongs_received, gw.stats.pongs_sent
        await wait_until(lambda: gw.stats.pongs_sent >= pongs_sent + 3, timeout=15)
        assert gw.stats.pongs_received == answered and runner._paused
        gate.set()
        await wait_until(lambda: gw.stats.pongs_received > answered, timeout=15)
        await wait_until(lambda: committed(state, newest), timeout=20)
    assert_all_once_in_order(gw)


async def test_a_connection_closed_while_frames_are_held_loses_nothing(
    sandbox_factory, tmp_path: Path
):
    """The gateway closes the connection (4500) while the read-ahead holds events: what it holds
    is handled once the sink is back, before the close is acted on; the next session resumes
    from the checkpoint (its replay deduplicated) and brings the events sent meanwhile."""
    gw = await sandbox_factory(backlog=40, ping_interval_s=PING_S)
    state = tmp_path / "state.db"
    gate = held_sink()
    async with running(settings_for(tmp_path, gw)) as daemon:
        runner = await waiting_for_room(daemon)
        answered = gw.stats.pongs_received
        await wait_until(lambda: gw.stats.pongs_received > answered, timeout=15)
        ahead = read_ahead(runner)
        assert ahead.held  # events read ahead, not handed on
        await gw.disconnect_all(4500)
        await wait_until(lambda: not ahead.reading, timeout=10)  # it saw the close
        assert ahead.held and runner._paused
        gw.append("DEMO", 10)
        gate.set()
        newest = newest_offset(gw)
        await wait_until(lambda: committed(state, newest), timeout=20)
        assert runner.stats.connections == 2 and runner.stats.closes["4500"] == 1
    assert_all_once_in_order(gw)


async def test_a_failure_while_reading_ahead_loses_no_frame(
    sandbox_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Handling one frame fails inside the read-ahead (a bug: here the session's decoding of
    one event's frame raises, once). That frame was taken off the connection and is held
    nowhere: the reader handles what was held before it, then ends the session there, as when
    its own handling of a frame fails, and the next session replays it. Before, the reader read
    on past it: the event was never delivered nor dead-lettered, the checkpoint moved past it."""
    gw = await sandbox_factory(backlog=40, ping_interval_s=PING_S)
    newest, state = newest_offset(gw), tmp_path / "state.db"
    victim = truth_ids(gw.events("DEMO"))[20].encode()  # past the ~10 the pipeline takes
    failed: list[str] = []
    receive = ClientSession.receive

    def failing_once(self: ClientSession, frame: str | bytes) -> Any:
        task = asyncio.current_task()
        reading_ahead = task is not None and task.get_name() == "read-ahead"
        data = frame if isinstance(frame, bytes) else frame.encode()
        if not failed and reading_ahead and victim in data:
            failed.append(victim.decode())
            raise RuntimeError("a bug, once")
        return receive(self, frame)

    monkeypatch.setattr(ClientSession, "receive", failing_once)
    gate = held_sink()
    async with running(settings_for(tmp_path, gw)) as daemon:
        runner = await waiting_for_room(daemon)
        await wait_until(lambda: bool(failed), timeout=15)
        gate.set()
        await wait_until(lambda: committed(state, newest), timeout=20)
        connections = runner.stats.connections
    assert_all_once_in_order(gw)
    assert connections == 2  # the session ended where it failed


async def test_frames_held_when_the_stream_is_stopped_are_replayed(sandbox_factory, tmp_path: Path):
    """Shutdown while the sink holds the stream: the stream is cancelled after its grace, and
    what the read-ahead holds is dropped (said at info): never handed to the pipeline, it is in
    no watermark, so the next start's replay from the checkpoint brings it, each event once."""
    gw = await sandbox_factory(backlog=40, ping_interval_s=PING_S)
    newest, state = newest_offset(gw), tmp_path / "state.db"
    gate = held_sink()
    settings = settings_for(tmp_path, gw, complete_timeout_s=0.2)
    settings = settings.model_copy(
        update={"pipeline": settings.pipeline.model_copy(update={"drain_timeout_s": 0.5})}
    )
    with captured_logs() as logs:
        async with running(settings) as daemon:
            runner = await waiting_for_room(daemon)
            answered = gw.stats.pongs_received
            await wait_until(lambda: gw.stats.pongs_received > answered, timeout=15)
            ahead = read_ahead(runner)
            assert ahead.held
    dropped = [r for r in logged(logs) if r["event"].startswith("frames read ahead")]
    assert len(dropped) == 1 and dropped[0]["events"] > 0, dropped
    assert pysink.delivered_ids("main") == []  # the sink never took a write

    gate.set()
    async with running(settings):
        await wait_until(lambda: committed(state, newest), timeout=20)
    assert_all_once_in_order(gw)


async def test_the_servers_end_of_the_subscription_read_ahead_is_handled_in_its_place(
    sandbox_factory, tmp_path: Path
):
    """A stop while the sink holds the stream: our ``complete`` goes out, and the gateway's
    ``complete`` (graphql-ws servers send one) is read ahead behind the events, then reading
    ahead stops. Once the sink is back the events are handled, then the end of the
    subscription, as when the reader reads it: warned, the server's close awaited."""
    gw = await sandbox_factory(backlog=30, end_frames=True, ping_interval_s=PING_S)
    newest, state = newest_offset(gw), tmp_path / "state.db"
    gate = held_sink()
    with captured_logs() as logs:
        async with running(settings_for(tmp_path, gw)) as daemon:
            runner = await waiting_for_room(daemon)
            answered = gw.stats.pongs_received
            await wait_until(lambda: gw.stats.pongs_received > answered, timeout=15)
            ahead = read_ahead(runner)
            daemon.request_stop()
            await wait_until(
                lambda: bool(ahead.held) and isinstance(ahead.held[-1][1], Ended), timeout=10
            )
            assert not ahead.reading and gw.stats.completes_received == 1
            gate.set()
    assert committed(state, newest)
    assert_all_once_in_order(gw)
    events = Counter(r["event"] for r in logged(logs))
    assert events["subscription ended by the server"] == 1
    assert not [e for e in events if e.startswith("frames read ahead")]


async def test_empty_frames_read_ahead_count_toward_its_limit(sandbox_factory, tmp_path: Path):
    """Held frames were counted by their length alone: empty frames (2 bytes on the wire each)
    were held for nothing against paused_read_ahead_bytes, each a DecodeError of some 400
    bytes (its evidence, a SHA-256, a reason), so the read-ahead read on and held whatever the
    gateway sent while the sink held the stream. Each now counts HELD_COST too: it stops within
    its limit, and released, every event is delivered once, in order, each empty frame
    dead-lettered."""
    empties = 2000
    gw = await sandbox_factory(backlog=12, ping_interval_s=PING_S)
    for _ in range(empties):
        gw.inject_malformed("DEMO", "")
    gw.append("DEMO", 5)
    newest, state = newest_offset(gw), tmp_path / "state.db"
    gate = held_sink()
    settings = settings_for(tmp_path, gw, paused_read_ahead_bytes=LIMIT)
    async with running(settings) as daemon:
        runner = await waiting_for_room(daemon)
        await wait_until(lambda: runner.read_ahead is not None, timeout=15)
        ahead = read_ahead(runner)
        # It stops (its limit reached), or it has held every empty frame.
        await wait_until(
            lambda: ahead.full or sum(type(o) is DecodeError for _, o in ahead.held) >= empties,
            timeout=30,
        )
        assert ahead.full, f"{len(ahead.held)} outcomes held for {ahead.held_bytes} bytes"
        await wait_until(lambda: not ahead.reading, timeout=5)
        assert len(ahead.held) <= LIMIT // HELD_COST + 1
        gate.set()
        await wait_until(lambda: committed(state, newest), timeout=60)
        assert daemon.pipelines["main"].dead_lettered == runner.stats.malformed == empties
    assert_all_once_in_order(gw)
