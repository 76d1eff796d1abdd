"""The daemon end to end, in-process, against the sandbox gateway on loopback."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from support import (
    committed,
    count_lines,
    make_settings,
    newest_offset,
    read_sink,
    running,
    sink_ids,
    stream_config,
    truth_ids,
    wait_until,
)

from consumer.core.events import Event
from consumer.core.records import Staged
from consumer.errors import ExitCode, PermanentSinkError, TransientSinkError
from consumer.runtime.daemon import Daemon
from consumer.runtime.pipeline import StreamPipeline
from consumer.sinks.jsonl import JsonlSink
from consumer.state import SqliteStore as Store


async def test_backlog_then_live_events_reach_the_sink_once(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=300)
    settings = make_settings(tmp_path, gw.url)
    sink = tmp_path / "events.jsonl"
    async with running(settings) as daemon:
        await wait_until(lambda: count_lines(sink) >= 300)
        gw.append("DEMO", 40)
        await wait_until(lambda: count_lines(sink) >= 340)
    ids = sink_ids(sink)
    assert Counter(ids) == Counter(truth_ids(gw.events("DEMO")))
    # Lines are the events as received.
    by_id = {e["metadata"]["uniqueEventId"]: e for e in gw.events("DEMO")}
    for line in read_sink(sink):
        assert line == by_id[line["metadata"]["uniqueEventId"]]
    assert daemon.exit_code == 0
    assert gw.stats.completes_received == 1  # graceful stop sent `complete`


async def test_checkpoint_is_the_last_event_after_a_clean_stop(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=120)
    settings = make_settings(tmp_path, gw.url)
    async with running(settings):
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 120)
    store = await Store.open(tmp_path / "state.db")
    try:
        cp = await store.checkpoint("main")
    finally:
        await store.close()
    last = gw.events("DEMO")[-1]["metadata"]
    assert cp is not None
    assert (cp.offset, cp.unique_event_id) == (last["offset"], last["uniqueEventId"])
    assert cp.processed_count == 120


async def test_restart_resumes_from_checkpoint_without_loss_or_duplicate(
    sandbox_factory, tmp_path: Path
):
    gw = await sandbox_factory(backlog=200)
    settings = make_settings(tmp_path, gw.url)
    sink = tmp_path / "events.jsonl"
    async with running(settings):
        await wait_until(lambda: count_lines(sink) >= 200)
    gw.append("DEMO", 60)
    async with running(settings) as second:
        await wait_until(lambda: count_lines(sink) >= 260)
        # The inclusive replay re-sent the checkpointed event; it was recognised, not re-written.
        await wait_until(lambda: second.pipelines["main"].duplicates >= 1)
    assert Counter(sink_ids(sink)) == Counter(truth_ids(gw.events("DEMO")))
    assert second.pipelines["main"].delivered == 60


async def test_malformed_frame_is_dead_lettered_and_the_stream_goes_on(
    sandbox_factory, tmp_path: Path
):
    gw = await sandbox_factory(backlog=50)
    bad = [
        '{"type":"next","id":"x","payload":{"data":{"newEvent":{"moduleName":"R"}}}}',
        "{not json",
    ]
    for raw in bad:
        gw.inject_malformed("DEMO", raw)
    gw.append("DEMO", 30)
    settings = make_settings(tmp_path, gw.url)
    sink = tmp_path / "events.jsonl"
    async with running(settings):
        await wait_until(lambda: count_lines(sink) >= 80)
    store = await Store.open(tmp_path / "state.db")
    try:
        letters = await store.dead_letters("main")
    finally:
        await store.close()
    assert sorted(d.payload for d in letters) == sorted(bad)
    assert {d.reason for d in letters} == {"malformed"}
    assert all(d.error for d in letters)
    assert Counter(sink_ids(sink)) == Counter(truth_ids(gw.events("DEMO")))


async def test_per_primary_key_order_holds_with_several_workers(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=1500)
    settings = make_settings(tmp_path, gw.url, pipeline={"workers": 8, "batch_max": 7})
    sink = tmp_path / "events.jsonl"
    async with running(settings):
        await wait_until(lambda: count_lines(sink) >= 1500)
    expected: dict[str, list[str]] = defaultdict(list)
    for e in gw.events("DEMO"):
        expected[e["primaryKey"]].append(e["metadata"]["uniqueEventId"])
    got: dict[str, list[str]] = defaultdict(list)
    for e in read_sink(sink):
        got[e["primaryKey"]].append(e["metadata"]["uniqueEventId"])
    assert got == expected
    assert max(len(v) for v in expected.values()) > 1  # the data really has multi-event keys


async def test_second_consumer_gets_4409_and_the_first_keeps_running(
    sandbox_factory, tmp_path: Path
):
    gw = await sandbox_factory(backlog=20)
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    async with running(make_settings(first_dir, gw.url)):
        await wait_until(lambda: count_lines(first_dir / "events.jsonl") >= 20)
        async with running(make_settings(second_dir, gw.url)) as second:
            await wait_until(lambda: 4409 in gw.stats.close_codes_sent)
            await wait_until(lambda: "4409" in second.runners["main"].stats.last_close)
            gw.append("DEMO", 10)
            await wait_until(lambda: count_lines(first_dir / "events.jsonl") >= 30)
        assert sink_ids(second_dir / "events.jsonl") == []
    assert Counter(sink_ids(first_dir / "events.jsonl")) == Counter(truth_ids(gw.events("DEMO")))


async def test_token_rotation_completes_and_resumes_without_gap(sandbox_factory, tmp_path: Path):
    """2 s tokens: the session is rotated (complete, server close, new token) every second
    (half-way: 1 s before the gateway would refuse the token with 4401), and each new session
    resumes at the last event finished (inclusive). Events are added before each rotation and
    finished before it begins, so that position is known."""
    # stale_hold_s: a session that ended without `complete` would lock the stream (4409).
    gw = await sandbox_factory(backlog=10, token_ttl_s=2.0, stale_hold_s=30.0)
    settings = make_settings(tmp_path, gw.url)
    async with running(settings) as daemon:
        pipeline = daemon.pipelines["main"]
        for _ in range(2):
            gw.append("DEMO", 20)
            newest = newest_offset(gw)
            # All finished, and each rotation so far has its new subscribe (none is between
            # its complete and its subscribe): the next subscribe is made after this point.
            await wait_until(
                lambda n=newest: (
                    done_offset(pipeline) == n
                    and len(gw.stats.subscribes) == gw.stats.completes_received + 1
                ),
                timeout=60,
            )
            seen = len(gw.stats.subscribes)
            await wait_until(lambda n=seen: len(gw.stats.subscribes) > n, timeout=60)
            assert gw.stats.subscribes[seen].get("offset") == newest
        assert gw.stats.completes_received >= 2
        assert daemon.runners["main"]._tokens.fetches >= 2
    assert 4401 not in gw.stats.close_codes_sent  # rotated before the server had to refuse
    assert 4409 not in gw.stats.close_codes_sent  # and always completed first
    assert Counter(sink_ids(tmp_path / "events.jsonl")) == Counter(truth_ids(gw.events("DEMO")))


async def test_connection_loss_without_close_frame_reconnects_and_resumes(
    sandbox_factory, tmp_path: Path
):
    """Each new session resumes at the last finished event (inclusive), never at the gateway's
    own position. The drop without a close frame comes while the consumer is behind the
    gateway: its sink held, its reader waiting for room, frames the gateway counted as sent
    still on the way. Resuming at the gateway's position would lose those."""
    gw = await sandbox_factory(backlog=100)
    settings = make_settings(tmp_path, gw.url, pipeline={"queue_size": 40})
    sink = HeldSink(tmp_path / "events.jsonl")
    async with running(settings, sink=sink) as daemon:
        runner, pipeline = daemon.runners["main"], daemon.pipelines["main"]
        newest = newest_offset(gw)
        await wait_until(lambda: done_offset(pipeline) == newest)
        # A close while nothing moves: the next session starts at the last event, done.
        await gw.disconnect_all(code=1001, reason="maintenance")
        await wait_until(lambda: len(gw.stats.subscribes) == 2)
        assert gw.stats.subscribes[-1].get("offset") == newest
        gw.append("DEMO", 25)
        newest = newest_offset(gw)
        await wait_until(lambda: done_offset(pipeline) == newest)

        sink.gate.clear()  # the sink hangs: nothing more is finished
        # Behind: the reader waits for room, the socket's buffers are full, and the gateway
        # holds frames it counts as sent (its position is past them). Events are added until
        # then (how much the socket's buffers hold depends on the machine).
        sent, size = gw.stats.events_sent, len(gw.event_keys("DEMO"))  # all sent so far
        added = 0
        async with asyncio.timeout(120):
            while gw.unsent_bytes() == 0:
                added += len(gw.append("DEMO", 2000))
                # until the gateway holds some back, or has sent them all (add more then)
                await wait_until(
                    lambda n=added: gw.unsent_bytes() > 0 or gw.stats.events_sent == sent + n
                )
        assert len(gw.event_keys("DEMO")) == size + added
        assert done_offset(pipeline) == newest
        await gw.disconnect_all(code=None)  # those frames are lost with the connection
        sink.gate.set()
        await wait_until(lambda: len(gw.stats.subscribes) == 3)
        resumed = gw.stats.subscribes[-1].get("offset")
        # Where the consumer was: at least the last event finished before the drop, at most
        # what it had finished by the time the gateway saw the subscribe.
        finished = {e["metadata"]["offset"] for e in read_sink(tmp_path / "events.jsonl")}
        assert resumed is not None and int(resumed) >= int(newest) and resumed in finished
        last = newest_offset(gw)
        await wait_until(lambda: committed(tmp_path / "state.db", last), timeout=60)
        assert runner.stats.connections == 3
    assert Counter(sink_ids(tmp_path / "events.jsonl")) == Counter(truth_ids(gw.events("DEMO")))


async def test_the_first_ping_is_due_an_interval_after_connection_init(
    sandbox_factory, tmp_path: Path
):
    """OHIP wants a ping at least every 15 s. The waits before subscribing (here a slow
    connection_ack) come out of that: the first ping goes out ping_interval_s after
    connection_init (2 s here), not that long after the subscribe (3.5 s)."""
    gw = await sandbox_factory(backlog=5, ping_interval_s=0, ack_delay_s=1.5)
    settings = make_settings(tmp_path, gw.url, connection={"ping_interval_s": 2.0})
    async with running(settings):
        await wait_until(lambda: bool(gw.stats.first_ping_after_init_s), timeout=30)
    (first, *_) = gw.stats.first_ping_after_init_s
    # due at 2.0 (seen by the gateway a little before); 3.5 if counted from the subscribe
    assert first < 2.75, first


async def test_a_silent_connection_is_declared_dead_and_replaced(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=50, ping_interval_s=0)
    settings = make_settings(
        tmp_path,
        gw.url,
        connection={"ping_interval_s": 0.1, "liveness_floor_s": 1.0, "liveness_multiplier": 4.0},
    )
    sink = tmp_path / "events.jsonl"
    async with running(settings) as daemon:
        await wait_until(lambda: count_lines(sink) >= 50)
        await wait_until(lambda: gw.stats.pongs_sent > 3)  # pings flow and are answered
        newest = newest_offset(gw)
        await wait_until(lambda: done_offset(daemon.pipelines["main"]) == newest)
        gw.silence_connections()  # no pong, no event, no close: only the deadline can tell
        gw.append("DEMO", 20)
        await wait_until(lambda: daemon.runners["main"].stats.connections >= 2, timeout=60)
        await wait_until(lambda: count_lines(sink) >= 70)
        assert "liveness deadline" in daemon.runners["main"].stats.last_close
        # The new session resumed at the last event finished (nothing finished since the
        # silence), not where the gateway had got to.
        assert [s.get("offset") for s in gw.stats.subscribes] == [None, newest]
    assert Counter(sink_ids(sink)) == Counter(truth_ids(gw.events("DEMO")))


async def test_a_server_that_never_answers_pings_is_alive_while_events_flow(
    sandbox_factory, tmp_path: Path
):
    """Issue #9 item 12: a liveness floor with room for a loaded machine; events for three
    times as long as the floor, not one tight window."""
    gw = await sandbox_factory(backlog=10, rate=50.0, ignore_pings=True, ping_interval_s=0)
    settings = make_settings(
        tmp_path, gw.url, connection={"ping_interval_s": 0.1, "liveness_floor_s": 1.0}
    )
    async with running(settings) as daemon:
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 160, timeout=60)
        assert gw.stats.pings_received >= 10 and gw.stats.pongs_sent == 0
        assert daemon.runners["main"].stats.connections == 1


async def test_pongs_deferred_during_a_burst_do_not_kill_the_connection(
    sandbox_factory, tmp_path: Path
):
    """Issue #9 item 12: a 1 s liveness floor (the burst lasts several seconds) leaves room
    for a loaded machine."""
    # Like OHIP in burst mode, the sandbox answers no ping until the backlog is sent; the
    # liveness floor is far shorter than the burst, but events count as proof of life.
    gw = await sandbox_factory(backlog=30_000, ping_interval_s=0, defer_pongs=True)
    settings = make_settings(
        tmp_path, gw.url, connection={"ping_interval_s": 0.05, "liveness_floor_s": 1.0}
    )
    sink = tmp_path / "events.jsonl"
    async with running(settings) as daemon:
        await wait_until(lambda: count_lines(sink) >= 30_000, timeout=110)
        await wait_until(lambda: gw.stats.pongs_sent >= gw.stats.pings_received - 1)
        assert daemon.runners["main"].stats.connections == 1
    assert gw.stats.max_deferred_pongs >= 5  # pongs really were held back during the burst


async def test_wrong_app_key_stops_the_stream_with_exit_78(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=5)
    settings = make_settings(tmp_path, gw.url, app_key="not-the-key")
    daemon = await Daemon.create(settings)
    async with asyncio.timeout(60):
        code = await daemon.run()
    assert code == ExitCode.CONFIG
    assert "client_id/client_secret" in daemon.runners["main"].stats.last_close or (
        "key" in daemon.runners["main"].stats.last_close
    )


async def test_one_bad_stream_stops_alone(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=30, chains=("DEMO", "OTHER"))
    streams = {
        "good": stream_config(gw.url, chain_code="OTHER"),
        "bad": stream_config(gw.url, chain_code="NOPE"),  # 4403: chain not subscribed
    }
    settings = make_settings(tmp_path, gw.url, streams=streams)
    async with running(settings) as daemon:
        await wait_until(lambda: daemon.runners["bad"].state == "stopped")
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 30)
        assert daemon.runners["good"].state == "streaming"
        assert "4403" in daemon.runners["bad"].stats.last_close


def done_offset(pipeline: StreamPipeline) -> str | None:
    """The offset of the newest event whose whole prefix is finished: where a new session
    resumes."""
    done = pipeline.position
    return None if done is None else done.offset


class HeldSink(JsonlSink):
    """The jsonl sink, whose writes wait while ``gate`` is clear (a downstream that hangs)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.gate.set()

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        await self.gate.wait()
        await super().write(stream, events)


class FlakySink:
    """Wraps the jsonl sink: fails transiently for a while, and rejects one event for good."""

    name = "jsonl"
    waits = False  # as the jsonl sink it wraps: its write never suspends

    def __init__(self, path: Path, *, transient_failures: int, poison: str | None) -> None:
        self.inner = JsonlSink(path)
        self.transient_failures = transient_failures
        self.poison = poison
        self.calls = 0

    async def open(self, committed: str | None) -> None:
        await self.inner.open(committed)

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        self.calls += 1
        if self.transient_failures > 0:
            self.transient_failures -= 1
            raise TransientSinkError("backend unavailable")
        if any(e.unique_event_id == self.poison for e in events):
            raise PermanentSinkError("rejected: bad data", unique_event_id=self.poison)
        await self.inner.write(stream, events)

    def position(self) -> str | None:
        return self.inner.position()

    async def sync(self, position: str | None) -> None:
        await self.inner.sync(position)

    def committed(self, position: str) -> None:
        self.inner.committed(position)

    def staged(self) -> Staged | None:
        return self.inner.staged()

    def counters(self) -> dict[str, float]:
        return self.inner.counters()

    async def close(self) -> None:
        await self.inner.close()


async def test_transient_sink_errors_retry_and_permanent_ones_dead_letter(
    sandbox_factory, tmp_path: Path
):
    gw = await sandbox_factory(backlog=200)
    poison = gw.events("DEMO")[57]["metadata"]["uniqueEventId"]
    settings = make_settings(
        tmp_path, gw.url, pipeline={"sink_retry_initial_s": 0.01, "sink_retry_max_s": 0.05}
    )
    sink = FlakySink(tmp_path / "events.jsonl", transient_failures=15, poison=poison)
    async with running(settings, sink=sink):
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 199)
    store = await Store.open(tmp_path / "state.db")
    try:
        letters = await store.dead_letters()
    finally:
        await store.close()
    assert [(d.unique_event_id, d.reason) for d in letters] == [(poison, "sink_rejected")]
    assert json.loads(letters[0].payload)["metadata"]["uniqueEventId"] == poison
    expected = [i for i in truth_ids(gw.events("DEMO")) if i != poison]
    assert Counter(sink_ids(tmp_path / "events.jsonl")) == Counter(expected)


@pytest.mark.parametrize("start", ["highest", "offset"])
async def test_start_positions(sandbox_factory, tmp_path: Path, start: str):
    """Issue #9 item 12: ends on the committed checkpoint, not after a fixed sleep."""
    gw = await sandbox_factory(backlog=50)
    events = gw.events("DEMO")
    sub: dict[str, Any] = {"start": start}
    if start == "offset":
        sub["offset"] = events[30]["metadata"]["offset"]
    settings = make_settings(tmp_path, gw.url, subscription=sub)
    sink = tmp_path / "events.jsonl"
    newest = events[-1]["metadata"]["offset"]
    async with running(settings):
        expected = truth_ids(events[-1:] if start == "highest" else events[30:])
        # Everything up to the newest event committed: an event from before the start would
        # be in the sink by now (no fixed sleep to wait for one).
        await wait_until(
            lambda: count_lines(sink) >= len(expected) and committed(tmp_path / "state.db", newest),
            timeout=60,
        )
    assert Counter(sink_ids(sink)) == Counter(expected)
