"""``on_permanent_failure = "park-key"``: a rejected event holds the rest of its resource back
in the DLQ until ``dlq replay`` delivers it in order (Issue #10 item 7: split out of
test_operator_tools.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pysink
import pytest
from operator_support import (
    PYSINK,
    cli,
    dead_letters,
    in_order,
    key_with_events,
    off,
    processed_ids,
    query,
    settled,
    uid,
    write_config,
)
from support import committed, newest_offset, running, truth_ids, wait_until

from consumer.config import load_settings

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")


def append_until_key(gw: Any, key: str, *, step: int = 20) -> list[dict[str, Any]]:
    """Append events until one is about ``key`` (the sandbox's follow-ups hit recent
    resources); deterministic for the sandbox's seed."""
    new: list[dict[str, Any]] = []
    while len(new) < 2000:
        new += gw.append("DEMO", step)
        if any(e["primaryKey"] == key for e in new):
            return new
    raise AssertionError(f"no new event of primaryKey {key} in {len(new)}")


async def test_park_key_holds_the_resource_back_until_a_replay_delivers_it_in_order(
    sandbox_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """Issue #9 item 12: the final no-redelivery check follows the session's recognition of
    every event as a duplicate, without a sleep after it."""
    gw = await sandbox_factory(backlog=300)
    truth = gw.events("DEMO")
    key, key_events = key_with_events(truth)
    culprit, later = key_events[0], key_events[1:]
    pysink.REJECT_IDS.add(uid(culprit))
    config = write_config(tmp_path, gw.url, sink=PYSINK, on_permanent_failure="park-key")
    settings = load_settings(config)
    state = settings.state.path
    assert settings.streams["main"].on_permanent_failure == "park-key"
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", len(truth)))
    assert daemon.pipelines["main"].dead_lettered == len(key_events)

    # The first event is rejected; the later ones of its resource are parked behind it.
    rows = await dead_letters(state)
    assert [(r.unique_event_id, r.reason, r.primary_key) for r in rows] == [
        (uid(culprit), "sink_rejected", key),
        *((uid(e), "parked", key) for e in later),
    ]
    assert "Rejected" in rows[0].error
    assert all(key in r.error for r in rows[1:])
    others = [uid(e) for e in truth if e["primaryKey"] != key]
    assert Counter(pysink.delivered_ids()) == Counter(others)  # everything else, once
    # handled: copies sent again are duplicates, never parked again behind themselves
    assert {uid(e) for e in key_events} <= processed_ids(state)

    # Still parked after a restart: a new event of the resource waits behind the culprit too.
    async with running(settings) as daemon:
        new = append_until_key(gw, key)
        # +1: the checkpointed event, sent again (inclusive resume) and recognised
        await wait_until(settled(daemon, "main", len(new) + 1))
    new_of_key = [e for e in new if e["primaryKey"] == key]
    key_events += new_of_key
    later += new_of_key
    others += [uid(e) for e in new if e["primaryKey"] != key]
    rows = await dead_letters(state)
    assert [(r.unique_event_id, r.reason) for r in rows] == [
        (uid(culprit), "sink_rejected"),
        *((uid(e), "parked") for e in later),
    ]
    assert Counter(pysink.delivered_ids()) == Counter(others)

    # A replay while the culprit is still rejected: it fails, the later ones stay parked.
    code, out, err = await cli(capsys, "dlq", "replay", "--all", "--json", "--config", str(config))
    assert code == 1, err
    outcomes = json.loads(out)
    assert [(o["unique_event_id"], o["result"]) for o in outcomes] == [
        (uid(culprit), "failed"),
        *((uid(e), "skipped") for e in later),
    ]
    assert "Rejected" in outcomes[0]["detail"]
    assert all("earlier event" in o["detail"] for o in outcomes[1:])
    assert [r.id for r in await dead_letters(state)] == [r.id for r in rows]
    assert Counter(pysink.delivered_ids()) == Counter(others)

    # Fixed, but the parked ones replayed alone, by id, the culprit left out: skipped, as
    # delivering them first would apply the resource's later changes before its first one.
    pysink.REJECT_IDS.clear()
    chosen = [str(r.id) for r in rows[1:3]]
    code, out, err = await cli(capsys, "dlq", "replay", *chosen, "--json", "--config", str(config))
    assert code == 1, err
    outcomes = json.loads(out)
    assert [o["result"] for o in outcomes] == ["skipped", "skipped"]
    assert f"dead letter {rows[0].id} " in outcomes[0]["detail"]  # the one it waits for
    assert Counter(pysink.delivered_ids()) == Counter(others)

    # The whole resource: delivered in arrival order, and the DLQ emptied.
    before = len(pysink.DELIVERED)
    code, out, err = await cli(capsys, "dlq", "replay", "--all", "--json", "--config", str(config))
    assert code == 0, err
    assert [o["result"] for o in json.loads(out)] == ["delivered"] * len(key_events)
    replayed = pysink.DELIVERED[before:]
    assert [event_id for _, event_id, _ in replayed] == [uid(e) for e in key_events]
    assert {(s, k) for s, _, k in replayed} == {("main", key)}
    offsets = [int(off(e)) for e in key_events]
    assert offsets == sorted(offsets)
    assert await dead_letters(state) == []
    assert {uid(e) for e in key_events} <= processed_ids(state)

    # Recorded as processed: a session that replays the whole log delivers none of them again.
    truth = gw.events("DEMO")
    code, _, err = await cli(
        capsys, "offset", "set", "main", off(truth[0]), "--execute", "--config", str(config)
    )
    assert code == 0, err
    delivered = list(pysink.DELIVERED)
    async with running(settings) as daemon:
        # every event of the log recognised as processed: nothing is left to deliver
        await wait_until(lambda: daemon.pipelines["main"].duplicates >= len(truth))
    assert list(pysink.DELIVERED) == delivered
    assert daemon.pipelines["main"].dead_lettered == 0
    assert Counter(pysink.delivered_ids()) == Counter(truth_ids(truth))


async def test_a_parked_resource_flows_again_once_its_dead_letters_are_replayed(
    sandbox_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """The daemon keeps running; the python sink may be replayed into meanwhile.

    Issue #9 item 12: before the exactly-once check, the test waits for the committed
    checkpoint to reach the gateway's newest event, not a sleep."""
    gw = await sandbox_factory(backlog=300)
    truth = gw.events("DEMO")
    key, key_events = key_with_events(truth)
    pysink.REJECT_IDS.add(uid(key_events[0]))
    config = write_config(tmp_path, gw.url, sink=PYSINK, on_permanent_failure="park-key")
    settings = load_settings(config)
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", len(truth)))
        await wait_until(
            lambda: (
                len(query(settings.state.path, "SELECT id FROM dead_letters")) == len(key_events)
            )
        )
        pysink.REJECT_IDS.clear()
        code, _, err = await cli(capsys, "dlq", "replay", "--all", "--config", str(config))
        assert code == 0, err
        new = append_until_key(gw, key)
        total = len(truth) + len(new)
        await wait_until(lambda: len(pysink.DELIVERED) >= total)
        newest = newest_offset(gw)
        await wait_until(lambda: committed(settings.state.path, newest), timeout=60)
    assert Counter(pysink.delivered_ids()) == Counter(truth_ids(gw.events("DEMO")))
    ids = pysink.delivered_ids()
    resource = [uid(e) for e in gw.events("DEMO") if e["primaryKey"] == key]
    assert in_order(ids, resource) == resource
    assert await dead_letters(settings.state.path) == []
