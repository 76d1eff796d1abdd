"""``on_permanent_failure = "dead-letter"`` (the default): only the event the sink rejects is
set aside in the DLQ, the rest of its resource flows (Issue #10 item 7: split out of
test_operator_tools.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pysink
import pytest
from operator_support import (
    FAST_RETRY,
    PYSINK,
    dead_letters,
    in_order,
    key_with_events,
    off,
    processed_ids,
    settled,
    uid,
)
from support import make_settings, running, wait_until

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")


async def test_dead_letter_mode_sets_aside_only_the_rejected_event(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=300)
    truth = gw.events("DEMO")
    key, key_events = key_with_events(truth)
    culprit = key_events[0]
    pysink.REJECT_IDS.add(uid(culprit))
    settings = make_settings(tmp_path, gw.url, sink=PYSINK, pipeline=FAST_RETRY)
    assert settings.streams["main"].on_permanent_failure == "dead-letter"
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", len(truth)))
    rows = await dead_letters(tmp_path / "state.db")
    assert [(r.stream, r.unique_event_id, r.reason, r.primary_key) for r in rows] == [
        ("main", uid(culprit), "sink_rejected", key)
    ]
    row = rows[0]
    assert "Rejected" in row.error and uid(culprit) in row.error
    assert json.loads(row.payload) == culprit
    assert (row.offset, row.event_name, row.attempts) == (off(culprit), culprit["eventName"], 1)
    delivered = pysink.delivered_ids()
    assert Counter(delivered) == Counter(uid(e) for e in truth if e is not culprit)
    later = [uid(e) for e in key_events[1:]]
    assert in_order(delivered, later) == later  # the rest of the resource flowed, in order
    # handled: a copy sent again is a duplicate; only `dlq replay` delivers it
    assert uid(culprit) in processed_ids(tmp_path / "state.db")


async def test_an_error_that_names_no_culprit_is_isolated_one_event_at_a_time(
    sandbox_factory, tmp_path: Path
):
    gw = await sandbox_factory(backlog=300)
    truth = gw.events("DEMO")
    key, key_events = key_with_events(truth)
    pysink.REJECT_KEYS.add(key)  # a ValueError without unique_event_id, for the whole batch
    settings = make_settings(
        tmp_path, gw.url, sink=PYSINK, pipeline={**FAST_RETRY, "batch_max": 50}
    )
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", len(truth)))
    rows = await dead_letters(tmp_path / "state.db")
    assert sorted((r.unique_event_id, r.reason, r.primary_key) for r in rows) == sorted(
        (uid(e), "sink_rejected", key) for e in key_events
    )
    assert all("ValueError" in r.error for r in rows)
    assert Counter(pysink.delivered_ids()) == Counter(
        uid(e) for e in truth if e["primaryKey"] != key
    )
