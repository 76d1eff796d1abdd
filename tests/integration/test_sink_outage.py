"""A sink that is down: intake pauses, memory stays bounded, the link stays alive, nothing is
dead-lettered, and delivery resumes by itself."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from harness import SwitchableSink
from support import count_lines, make_settings, running, sink_ids, truth_ids, wait_until

from consumer.runtime.store import Store


async def test_intake_pauses_while_the_sink_is_down(sandbox_factory, tmp_path: Path):
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
        await wait_until(lambda: runner._paused)  # the reader waits for room: TCP backpressure
        pings = gw.stats.pings_received
        peak = 0
        for _ in range(30):  # 3 s of outage while the server keeps producing
            await asyncio.sleep(0.1)
            peak = max(peak, pipeline.in_flight)
        assert count_lines(sink_path) == 0
        assert peak <= 200 + 4 * 20  # queues plus one batch per worker: bounded
        assert gw.stats.pings_received >= pings + 10  # our pings keep flowing
        assert runner.stats.connections == 1  # and the connection is not declared dead
        outage.unlink()  # the sink is back
        await wait_until(lambda: count_lines(sink_path) >= len(gw.events("DEMO")) - 50, timeout=60)
        gw_total = len(gw.events("DEMO"))
        await wait_until(lambda: count_lines(sink_path) >= gw_total, timeout=60)
    store = await Store.open(tmp_path / "state.db")
    try:
        assert await store.dead_letters() == []
    finally:
        await store.close()
    ids = sink_ids(sink_path)
    assert Counter(ids) == Counter(truth_ids(gw.events("DEMO"))[: len(ids)])
    assert len(ids) >= gw_total
