"""The Python sink end to end: every event delivered exactly once, per primaryKey in arrival
order, through transient failures (Issue #10 item 7: split out of test_operator_tools.py)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pysink
import pytest
from operator_support import FAST_RETRY, PYSINK, dead_letters, processed_ids, uid
from support import committed, make_settings, newest_offset, running, truth_ids, wait_until

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")


async def test_python_sink_delivers_every_event_exactly_once(sandbox_factory, tmp_path: Path):
    """Issue #9 item 12: before the no-duplicate check, the test waits for the committed
    checkpoint to reach the gateway's newest event (every event done, none in flight), not a
    sleep."""
    gw = await sandbox_factory(backlog=300)
    pysink.TRANSIENT[0] = 3  # the first calls fail transiently: retried, not lost or doubled
    settings = make_settings(tmp_path, gw.url, sink=PYSINK, pipeline=FAST_RETRY)
    async with running(settings) as daemon:
        await wait_until(lambda: len(pysink.DELIVERED) >= 300)
        gw.append("DEMO", 40)
        await wait_until(lambda: len(pysink.DELIVERED) >= 340)
        newest = newest_offset(gw)
        # every event done and committed: a duplicate would have shown up by now
        await wait_until(lambda: committed(tmp_path / "state.db", newest), timeout=60)
    truth = gw.events("DEMO")
    assert Counter(pysink.delivered_ids()) == Counter(truth_ids(truth))
    assert {s for s, _, _ in pysink.DELIVERED} == {"main"}
    assert pysink.TRANSIENT[0] == 0  # the transient failures did happen
    assert daemon.pipelines["main"].dead_lettered == 0
    # per primaryKey, in arrival order; the key handed over is the event's
    expected: dict[str, list[str]] = defaultdict(list)
    for e in truth:
        expected[e["primaryKey"]].append(uid(e))
    got: dict[str, list[str]] = defaultdict(list)
    for _, event_id, key in pysink.DELIVERED:
        got[key].append(event_id)
    assert got == expected
    assert processed_ids(tmp_path / "state.db") == set(truth_ids(truth))
    assert await dead_letters(tmp_path / "state.db") == []
