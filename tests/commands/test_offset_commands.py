"""The ``offset show | set | reset`` commands, and the daemon's next session starting where
they say (Issue #10 item 7: split out of test_operator_tools.py)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pysink
import pytest
from operator_support import PYSINK, cli, off, query, settled, uid, write_config
from support import (
    checkpoint,
    committed,
    newest_offset,
    read_table,
    running,
    truth_ids,
    wait_until,
)

from consumer.config import load_settings
from consumer.state import Lease, holder

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")


async def test_offset_set(sandbox_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    gw = await sandbox_factory(backlog=200)
    truth = gw.events("DEMO")
    last = truth[-1]
    config = write_config(tmp_path, gw.url, sink=PYSINK)
    settings = load_settings(config)
    state = settings.state.path
    cfg = ("--config", str(config))

    code, _, err = await cli(capsys, "offset", "show", *cfg)
    assert code == 1 and "has not run" in err  # no state store yet

    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", len(truth)))
    assert checkpoint(state) == (off(last), uid(last))

    # show
    code, out, err = await cli(capsys, "offset", "show", "--json", *cfg)
    assert code == 0, err
    [shown] = json.loads(out)
    assert (shown["stream"], shown["offset"], shown["unique_event_id"]) == (
        "main",
        off(last),
        uid(last),
    )
    assert shown["next_start"] == f"offset {off(last)}" and shown["checkpoint_at"]
    code, out, err = await cli(capsys, "offset", "show", *cfg)
    assert code == 0, err
    [row] = read_table(out)
    assert list(row) == ["stream", "offset", "checkpoint_at", "next_start"]
    assert (row["stream"], row["offset"]) == ("main", off(last))
    assert row["next_start"] == f"offset {off(last)}"  # as it is, not offset_<n>

    # set without --execute: the plan, nothing changes
    code, out, err = await cli(capsys, "offset", "set", "main", "123", *cfg)
    assert code == 0, err
    [row] = read_table(out)
    assert list(row) == ["stream", "current", "new", "note"]
    assert [row["stream"], row["current"], row["new"]] == ["main", off(last), "123"]
    assert row["note"] == "resume there (inclusive); events already processed are skipped"
    assert "plan only" in err
    code, out, err = await cli(capsys, "offset", "set", "main", "123", "--json", *cfg)
    assert code == 0, err
    [plan] = json.loads(out)
    assert (plan["stream"], plan["current"], plan["new"]) == ("main", off(last), "123")
    assert checkpoint(state) == (off(last), uid(last))

    # refused: a daemon holds the stream; a bad offset; an unknown stream
    lease = Lease.acquire(state, ["main"])
    try:
        for extra in ((), ("--execute",)):
            code, _, err = await cli(capsys, "offset", "set", "main", "123", *extra, *cfg)
            assert code == 1
            assert f"pid {os.getpid()}" in err
    finally:
        lease.release()
    # A lease on other streams only: the plan is shown, but the store is locked for writing.
    lease = Lease.acquire(state, ["other"])
    try:
        code, _, err = await cli(capsys, "offset", "set", "main", "123", *cfg)
        assert code == 0, err
        code, _, err = await cli(capsys, "offset", "set", "main", "123", "--execute", *cfg)
        assert code == 1
        assert f"pid {os.getpid()}" in err
    finally:
        lease.release()
    code, _, err = await cli(capsys, "offset", "set", "main", "12a", "--execute", *cfg)
    assert code == 1 and "12a" in err
    code, _, err = await cli(capsys, "offset", "set", "nope", "123", "--execute", *cfg)
    assert code == 1 and "unknown stream" in err and "nope" in err
    assert checkpoint(state) == (off(last), uid(last))

    # --execute
    code, _, err = await cli(capsys, "offset", "set", "main", "123", "--execute", *cfg)
    assert code == 0, err
    assert checkpoint(state) == ("123", "")
    assert holder(state) is None
    code, out, err = await cli(capsys, "offset", "show", "--json", *cfg)
    assert json.loads(out)[0]["next_start"] == "offset 123"

    # The next session resumes there: the whole log (offsets start above 1000) comes again,
    # every event already processed.
    subscribed = len(gw.stats.subscribes)
    async with running(settings) as daemon:
        await wait_until(lambda: len(gw.stats.subscribes) > subscribed)
        await wait_until(lambda: daemon.pipelines["main"].duplicates >= len(truth))
    assert gw.stats.subscribes[subscribed].get("offset") == "123"
    assert "offsetType" not in gw.stats.subscribes[subscribed]
    assert Counter(pysink.delivered_ids()) == Counter(truth_ids(truth))
    assert checkpoint(state) == (off(last), uid(last))


async def test_offset_reset_to_highest_skips_the_backlog(
    sandbox_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """Issue #9 item 12: the live events are checked once the committed checkpoint is the
    newest of them (every event done, none in flight), not after a sleep."""
    gw = await sandbox_factory(backlog=100)
    config = write_config(tmp_path, gw.url, sink=PYSINK)
    settings = load_settings(config)
    state = settings.state.path
    cfg = ("--config", str(config))
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", 100))
    first = pysink.delivered_ids()
    assert len(first) == 100
    skipped = gw.append("DEMO", 50)  # a backlog the operator decides to skip
    newest = skipped[-1]

    code, out, err = await cli(capsys, "offset", "reset", "main", "--highest", "--json", *cfg)
    assert code == 0, err
    [plan] = json.loads(out)
    assert (plan["current"], plan["new"]) == (off(gw.events("DEMO")[99]), "highest")
    assert "plan only" in err
    assert query(state, "SELECT * FROM start_overrides") == []
    code, out, err = await cli(capsys, "offset", "reset", "main", "--highest", "--execute", *cfg)
    assert code == 0, err
    code, out, err = await cli(capsys, "offset", "show", "--json", *cfg)
    assert json.loads(out)[0]["next_start"] == "highest"

    subscribed = len(gw.stats.subscribes)
    async with running(settings):
        await wait_until(lambda: len(pysink.DELIVERED) >= 101)
        # The stream is re-anchored on the newest event, the first one of the session.
        await wait_until(lambda: checkpoint(state) == (off(newest), uid(newest)))
        assert query(state, "SELECT * FROM start_overrides") == []
        live = gw.append("DEMO", 5)
        await wait_until(lambda: len(pysink.DELIVERED) >= 106)
        last_live = newest_offset(gw)
        await wait_until(lambda: committed(state, last_live), timeout=60)
    assert gw.stats.subscribes[subscribed].get("offsetType") == "highest"
    assert "offset" not in gw.stats.subscribes[subscribed]
    ids = pysink.delivered_ids()
    assert ids[:101] == [*first, uid(newest)]  # the 49 events before the newest: skipped
    assert Counter(ids[101:]) == Counter(uid(e) for e in live)
    assert checkpoint(state) == (off(live[-1]), uid(live[-1]))

    # The reset was used up: the session after resumes from the checkpoint again.
    subscribed = len(gw.stats.subscribes)
    async with running(settings) as daemon:
        await wait_until(lambda: daemon.pipelines["main"].duplicates >= 1)
    assert gw.stats.subscribes[subscribed].get("offset") == off(live[-1])
    assert "offsetType" not in gw.stats.subscribes[subscribed]
    assert len(pysink.DELIVERED) == 106

    # A pending reset is replaced by a later `offset set`.
    code, _, err = await cli(capsys, "offset", "reset", "main", "--highest", "--execute", *cfg)
    assert code == 0, err
    assert query(state, "SELECT stream, mode FROM start_overrides") == [("main", "highest")]
    code, _, err = await cli(capsys, "offset", "set", "main", off(skipped[0]), "--execute", *cfg)
    assert code == 0, err
    assert query(state, "SELECT * FROM start_overrides") == []
    code, out, _ = await cli(capsys, "offset", "show", "--json", *cfg)
    assert json.loads(out)[0]["next_start"] == f"offset {off(skipped[0])}"


async def test_a_resume_over_processed_events_does_not_stall_with_small_commits(
    sandbox_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """``offset set`` back to the start with ``commit_max_events = 1``: every event comes again
    and is recognised as processed. The workers must not wait forever for a commit that an
    all-duplicates batch never makes (Committer.wait_capacity / flush).

    Issue #9 item 12: 60 s (not 5) for the duplicates, so that a loaded machine is not taken
    for a stall; a real stall never gets there."""
    gw = await sandbox_factory(backlog=300)
    truth = gw.events("DEMO")
    config = write_config(
        tmp_path,
        gw.url,
        sink=PYSINK,
        state={"commit_max_events": 1},
        pipeline={"drain_timeout_s": 1.0},  # stalled, the stop need not wait long
    )
    settings = load_settings(config)
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", len(truth)))
    code, _, err = await cli(
        capsys, "offset", "set", "main", off(truth[0]), "--execute", "--config", str(config)
    )
    assert code == 0, err
    async with running(settings) as daemon:
        p = daemon.pipelines["main"]
        try:
            await wait_until(lambda: p.duplicates >= len(truth), timeout=60)
        except TimeoutError:
            pytest.fail(
                f"stalled: {p.duplicates} of {len(truth)} duplicates recognised, "
                f"{p.in_flight} events in flight, the workers wait for a commit"
            )
    assert Counter(pysink.delivered_ids()) == Counter(truth_ids(truth))
    assert checkpoint(settings.state.path) == (off(truth[-1]), uid(truth[-1]))
