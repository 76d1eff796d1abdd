"""A resume replays inclusively: the checkpoint's own event comes first (after duplicates, if
the gateway starts earlier). An offset older than OHIP's retention (7 days) replays from the
oldest event retained, without an error: the events between were lost, and the daemon says so
(an error and ``StreamStats.resume_gaps``) instead of carrying on silently."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import httpx
from log_capture import captured_logs
from support import make_settings, running, sink_ids, truth_ids, wait_until

from consumer.config.settings import FilterSettings


async def test_a_resume_past_the_retention_is_reported_and_duplicates_are_not(
    sandbox_factory, tmp_path: Path
):
    # The sandbox keeps the newest 5 entries and starts a resume 2 entries early (duplicates).
    gw = await sandbox_factory(backlog=5, retention_events=5, redeliver=2)
    settings = make_settings(tmp_path, gw.url)
    sink = tmp_path / "events.jsonl"
    async with running(settings) as daemon:  # no checkpoint yet: nothing to expect
        await wait_until(lambda: daemon.pipelines["main"].delivered >= 5)

    gw.append("DEMO", 3)  # the checkpoint's event is still retained
    async with running(settings) as daemon:
        runner = daemon.runners["main"]
        await wait_until(lambda: daemon.pipelines["main"].delivered >= 3)
        # and once more in this process, resuming from where it is
        await gw.disconnect_all(4500)
        gw.append("DEMO", 2)
        await wait_until(lambda: daemon.pipelines["main"].delivered >= 5)
        assert len(gw.stats.subscribes) == 3
        assert runner.stats.resume_gaps == 0
    assert Counter(sink_ids(sink)) == Counter(truth_ids(gw.events("DEMO")))  # each once

    gw.append("DEMO", 10)  # the checkpoint's event and the next 5 expire, unconsumed
    with captured_logs() as logs:
        async with running(settings) as daemon:
            runner = daemon.runners["main"]
            await wait_until(lambda: daemon.pipelines["main"].delivered >= 5)
            assert runner.stats.resume_gaps == 1
            async with httpx.AsyncClient() as http:
                port = daemon.metrics_server.port
                text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            assert 'opera_consumer_resume_gaps_total{stream="main"} 1.0' in text.splitlines()
    truth = gw.events("DEMO")
    checkpoint, first = truth[9], truth[15]  # the 5 between expired unconsumed
    assert Counter(sink_ids(sink)) == Counter(truth_ids(truth[:10] + truth[15:]))
    errors = [
        line
        for line in map(json.loads, logs.getvalue().splitlines())
        if line["event"].startswith("events may be missing")
    ]
    assert len(errors) == 1 and errors[0]["level"] == "error"
    assert errors[0]["checkpoint_offset"] == checkpoint["metadata"]["offset"]
    assert errors[0]["checkpoint_event_id"] == checkpoint["metadata"]["uniqueEventId"]
    assert errors[0]["first_new_offset"] == first["metadata"]["offset"]
    assert errors[0]["first_new_event_id"] == first["metadata"]["uniqueEventId"]


async def test_events_the_filter_dropped_before_the_checkpoint_are_no_gap(
    sandbox_factory, tmp_path: Path
):
    """A filtered event is done without a processed id: sent again before the checkpoint's
    own, it is not taken for a new one (a false "events may be missing" and alert)."""
    gw = await sandbox_factory(backlog=5, redeliver=2)
    settings = make_settings(tmp_path, gw.url).model_copy(
        update={"filter": FilterSettings(exclude_module_names=("*",))}  # every event
    )
    async with running(settings) as daemon:
        await wait_until(lambda: sum(daemon.pipelines["main"].filtered.values()) >= 5)
    gw.append("DEMO", 3)
    async with running(settings) as daemon:
        runner = daemon.runners["main"]
        # the two sent again (one before the checkpoint's), then the three new ones
        await wait_until(lambda: sum(daemon.pipelines["main"].filtered.values()) >= 5)
        assert runner.stats.resume_gaps == 0
