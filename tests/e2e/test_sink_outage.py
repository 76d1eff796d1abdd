"""A sink that is down: intake pauses, memory stays bounded, the link stays alive, nothing is
dead-lettered, and delivery resumes by itself."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from harness import SwitchableSink
from support import count_lines, make_settings, running, sink_ids, truth_ids, wait_until

from consumer.state import SqliteStore as Store


async def test_intake_pauses_while_the_sink_is_down(sandbox_factory, tmp_path: Path):
    """Issue #9 item 12: the outage lasts until 20 more pings have gone out (two seconds of
    them, however slow the machine), not for a count of sleeps; the catch-up waits for a
    fixed number of events with generous bounds."""
    gw = await sandbox_factory(backlog=2000, rate=400.0, ping_interval_s=0.2)
    outage = tmp_path / "outage"
    outage.touch()  # down from the start
    settings = make_settings(
        tmp_path,
        gw.url,
        pipeline={"queue_size": 200, "batch_max": 20, "sink_retry_max_s": 0.2},
        connection={"ping_interval_s": 0.1, "liveness_floor_s": 1.0},
    )
    sink_path = tmp_path / "events.jsonl"
    sink = SwitchableSink(sink_path, outage)
    async with running(settings, sink=sink) as daemon:
        pipeline, runner = daemon.pipelines["main"], daemon.runners["main"]
        await wait_until(lambda: runner._paused, timeout=60)  # the reader waits: TCP backpressure
        pings = gw.stats.pings_received
        peak = [0]

        def pinged_through() -> bool:  # the server keeps producing all the while
            peak[0] = max(peak[0], pipeline.in_flight)
            return gw.stats.pings_received >= pings + 20

        await wait_until(pinged_through, timeout=60, interval=0.05)  # our pings keep flowing
        assert count_lines(sink_path) == 0
        assert peak[0] <= 200 + 4 * 20  # queues plus one batch per worker: bounded
        assert runner.stats.connections == 1  # and the connection is not declared dead
        outage.unlink()  # the sink is back
        gw_total = len(gw.events("DEMO"))
        await wait_until(lambda: count_lines(sink_path) >= gw_total, timeout=110, interval=0.1)
    store = await Store.open(tmp_path / "state.db")
    try:
        assert await store.dead_letters() == []
    finally:
        await store.close()
    ids = sink_ids(sink_path)
    assert Counter(ids) == Counter(truth_ids(gw.events("DEMO"))[: len(ids)])
    assert len(ids) >= gw_total
