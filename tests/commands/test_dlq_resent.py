"""A dead-lettered event that OHIP sends again is a duplicate, not a second try.

A restart (or a reconnect) resumes inclusive from the checkpoint, so when the newest finished
event was dead-lettered it always comes again. Were it tried again, a sink that accepts it now
would get it from the stream while its DLQ row stays (and ``dlq replay`` would deliver it a
second time), and with park-key its copy would be parked behind itself, the row's reason
replaced. Here it stays in the DLQ once, with its first reason, and only the replay delivers it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pysink
import pytest
from operator_support import (
    PYSINK,
    cli,
    dead_letters,
    key_with_events,
    processed_ids,
    settled,
    uid,
    write_config,
)
from support import running, wait_until

from consumer.config import load_settings

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")


@pytest.mark.parametrize("mode", ["dead-letter", "park-key"])
async def test_a_dead_letter_sent_again_on_resume_is_delivered_only_by_the_replay(
    sandbox_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
):
    gw = await sandbox_factory(backlog=100)
    truth = gw.events("DEMO")
    culprit = truth[-1]  # the newest event: the checkpoint, sent again by every resume
    pysink.REJECT_IDS.add(uid(culprit))
    config = write_config(tmp_path, gw.url, sink=PYSINK, on_permanent_failure=mode)
    settings = load_settings(config)
    state = settings.state.path
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", len(truth)))
    first = await dead_letters(state)
    assert [(r.unique_event_id, r.reason, r.attempts) for r in first] == [
        (uid(culprit), "sink_rejected", 1)
    ]

    pysink.REJECT_IDS.clear()  # the sink would take it now (a webhook's 422 was once only)
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", 1))  # the resent checkpoint event
    assert (daemon.pipelines["main"].delivered, daemon.pipelines["main"].dead_lettered) == (0, 0)
    assert uid(culprit) not in pysink.delivered_ids()
    assert await dead_letters(state) == first  # the same row: reason, error, attempts

    code, out, err = await cli(capsys, "dlq", "replay", "--all", "--json", "--config", str(config))
    assert code == 0, err
    assert [(o["unique_event_id"], o["result"]) for o in json.loads(out)] == [
        (uid(culprit), "delivered")
    ]
    assert await dead_letters(state) == []
    assert Counter(pysink.delivered_ids()) == Counter(uid(e) for e in truth)  # each once
    assert uid(culprit) in processed_ids(state)


async def test_parked_events_sent_again_stay_parked_with_their_first_reasons(
    sandbox_factory, tmp_path: Path
):
    """A resume that starts before the dead letters (the sandbox redelivers the whole log,
    as an offset set back would): the culprit and the events parked behind it are each
    recognised, none parked again behind itself or tried again."""
    gw = await sandbox_factory(backlog=300, redeliver=300)
    truth = gw.events("DEMO")
    key, key_events = key_with_events(truth)
    culprit, later = key_events[0], key_events[1:]
    pysink.REJECT_IDS.add(uid(culprit))
    config = write_config(tmp_path, gw.url, sink=PYSINK, on_permanent_failure="park-key")
    settings = load_settings(config)
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", len(truth)))
    first = await dead_letters(settings.state.path)
    assert [(r.unique_event_id, r.reason, r.attempts, r.primary_key) for r in first] == [
        (uid(culprit), "sink_rejected", 1, key),
        *((uid(e), "parked", 1, key) for e in later),
    ]

    pysink.REJECT_IDS.clear()
    delivered = list(pysink.DELIVERED)
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", len(truth)))
    p = daemon.pipelines["main"]
    assert (p.delivered, p.dead_lettered, p.duplicates) == (0, 0, len(truth))
    assert delivered == pysink.DELIVERED  # nothing more
    assert await dead_letters(settings.state.path) == first
