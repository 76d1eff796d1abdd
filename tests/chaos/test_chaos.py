"""Every fault at once, and kill -9 at random moments: nothing lost, nothing twice.

The sandbox drops connections without a close frame, closes them with 1000/1001/4500/4504,
defers pongs during bursts, delays connection_ack, puts malformed frames in the stream,
re-delivers events on resume, holds the stream (4409) after an unclean drop and expires tokens
within seconds; the sink goes down for a while; the daemon process is killed with SIGKILL
several times. Then the sink must hold every event exactly once, in order per primaryKey, and
the DLQ every malformed frame with its raw text.

Reduced size in `make test`; `make chaos` runs CHAOS_EVENTS=100000 CHAOS_KILLS=10.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from support import (
    assert_each_once_in_order,
    count_lines,
    newest_offset,
    read_sink,
    sink_failures,
    stop_when_committed,
    tail,
    toml_config,
    wait_exit,
    wait_until,
)

from consumer.core.evidence import PAYLOAD_LIMIT
from consumer.state import SqliteStore as Store

EVENTS = int(os.environ.get("CHAOS_EVENTS", "10000"))
KILLS = int(os.environ.get("CHAOS_KILLS", "4"))
HARNESS = Path(__file__).parents[1] / "harness.py"


def spawn(config: Path, outage: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(HARNESS), str(config), str(outage)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


# Generous bounds for a loaded 2-core machine (make chaos: CHAOS_EVENTS=100000 runs longer).
@pytest.mark.timeout(300 + EVENTS // 100)
async def test_no_fault_loses_or_duplicates_an_event(sandbox_factory, tmp_path: Path):
    """Issue #9 item 12: the sink outage starts once the restarted daemon has written (its own
    lines, not the previous run's) and ends once a retry has failed too, so it always meets
    its writes; the final run ends when the committed checkpoint is the gateway's newest
    offset, never after a fixed sleep."""
    gw = await sandbox_factory(
        backlog=EVENTS,
        chaos_seed=11,
        drop_every=max(200, EVENTS // 7),
        close_every=max(200, EVENTS // 5),
        malformed_every=max(50, EVENTS // 25),
        oversized_bytes=100_000,  # the daemon below processes frames up to 64 KiB
        redeliver=5,
        defer_pongs=True,
        ack_delay_s=0.05,
        stale_hold_s=0.3,
        token_ttl_s=3.0,
        ping_interval_s=0.5,
    )
    config = toml_config(
        tmp_path, gw.url, connection={"ping_interval_s": 0.02, "max_frame_bytes": 65536}
    )
    sink, log, outage = tmp_path / "events.jsonl", tmp_path / "daemon.log", tmp_path / "outage"
    rng = random.Random(5)
    for run in range(KILLS):
        start = count_lines(sink)
        proc = spawn(config, outage, log)
        try:
            target = start + rng.randint(EVENTS // (KILLS * 4), EVENTS // (KILLS + 1))
            # Never past the events the gateway has: the kill comes up to 0.3 s after the
            # target, and a fast daemon can have every event in the sink before the last one.
            target = min(target, len(gw.event_keys("DEMO")))
            if run == 1:  # the sink goes down for a while, then comes back
                # Once this process has written (the lines of the runs before don't count):
                # the rest of its backlog is still to come, so the outage meets its writes.
                await wait_until(
                    lambda p=proc, n=start: count_lines(sink) > n or p.poll() is not None,  # type: ignore[misc]
                    timeout=120,
                )
                assert proc.poll() is None, tail(log)
                failed = len(sink_failures(log))
                outage.touch()
                # Down until a write has failed and been retried in vain: "for a while".
                await wait_until(
                    lambda p=proc, n=failed: (
                        any(r.get("attempt", 0) >= 2 for r in sink_failures(log)[n:])
                        or p.poll() is not None
                    ),
                    timeout=120,
                    interval=0.1,
                )
                assert proc.poll() is None, tail(log)
                outage.unlink()
                gw.append("DEMO", 300)  # live events on top of the backlog
            await wait_until(
                lambda t=target, p=proc: count_lines(sink) >= t or p.poll() is not None,  # type: ignore[misc]
                timeout=180,
            )
            assert proc.poll() is None, tail(log)
            await asyncio.sleep(rng.random() * 0.3)  # kill -9 at a random moment
        finally:
            proc.kill()
            await wait_exit(proc)
    newest = newest_offset(gw)
    state = tmp_path / "state.db"
    proc = spawn(config, outage, log)
    # A token rotation for sure: the killed runs may each end within one token's life (3 s).
    await wait_until(
        lambda: gw.stats.token_requests > KILLS + 1 or proc.poll() is not None, timeout=60
    )
    assert proc.poll() is None, tail(log)
    # Everything committed (every event written, none in flight): then stop and count.
    await stop_when_committed(proc, state, newest, log, timeout=300 + EVENTS // 200)

    truth = gw.events("DEMO")
    lines = read_sink(sink)
    assert_each_once_in_order(lines, truth)

    store = await Store.open(tmp_path / "state.db")
    try:
        letters = await store.dead_letters("main")
    finally:
        await store.close()
    # Each malformed frame once, with its raw text (a large one: as much as the DLQ keeps).
    kept = Counter(d.payload for d in letters)
    assert kept == Counter(raw[:PAYLOAD_LIMIT] for raw in gw.malformed["DEMO"])
    assert all(d.reason == "malformed" and d.error for d in letters)
    assert any("exceeds max_frame_bytes" in d.error for d in letters)  # oversized, dead-lettered

    # Where the sessions resumed: at the gateway's own position only while nothing was sent
    # (the first, no checkpoint yet); every later one (reconnects, rotations, restarts) at an
    # offset the consumer had finished, never where the gateway had got to (after a drop,
    # past frames lost on the way).
    assert gw.stats.position_starts and set(gw.stats.position_starts) == {0}
    assert len(gw.stats.subscribes) > KILLS + 1  # in-process reconnects too

    # the faults really happened (those whose timing the test controls)
    assert gw.stats.chaos_drops >= 1
    assert {1000, 1001, 4500, 4504} & set(gw.stats.close_codes_sent)
    assert 4409 in gw.stats.close_codes_sent  # stale hold after each kill -9
    assert gw.stats.token_requests > KILLS + 1  # more than one token per process: rotations
    assert "sink write failed; retrying" in log.read_text()
