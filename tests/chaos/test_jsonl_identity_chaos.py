"""kill -9 after the jsonl file was moved aside or shortened between runs: nothing twice.

The sink accepts such a file and appends after what is there, but the state store kept the
old, larger committed length until the new run's first commit. A kill -9 before it (commits
far apart; the lines reach the file at each write-out) found a file shorter than that length
and kept every new line in it as committed (the review saw 781 events written twice), or,
when longer, cut it at the old length: mid-line. The position the sink starts at is now
recorded before its first write (tests/sinks/test_jsonl_identity.py has the unit proofs).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support import (
    committed_sink_length,
    count_lines,
    newest_offset,
    spawn_daemon,
    stop_when_committed,
    tail,
    toml_config,
    truth_ids,
    wait_exit,
    wait_until,
)

from consumer.sinks.jsonl import WRITE_OUT_BYTES

BEFORE, AFTER = 1200, 800


def read(path: Path) -> tuple[list[str], list[bytes]]:
    """(uniqueEventIds of the complete JSON lines, the lines that are not JSON)."""
    ids, bad = [], []
    for line in path.read_bytes().splitlines() if path.exists() else []:
        try:
            ids.append(json.loads(line)["metadata"]["uniqueEventId"])
        except (ValueError, KeyError, TypeError):
            bad.append(line[:80])
    return ids, bad


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["moved aside", "shortened in place"])
async def test_kill_9_after_the_file_changed_between_runs_writes_no_event_twice(
    sandbox_factory: Any, tmp_path: Path, how: str
) -> None:
    gw = await sandbox_factory(backlog=BEFORE)
    sink, state, log = tmp_path / "events.jsonl", tmp_path / "state.db", tmp_path / "daemon.log"

    # Run 1: every event committed, stopped cleanly.
    proc = spawn_daemon(toml_config(tmp_path, gw.url), log)
    await stop_when_committed(proc, state, newest_offset(gw), log)
    assert committed_sink_length(state) == sink.stat().st_size
    if how == "moved aside":  # shipped away by hand while the daemon is stopped
        sink.rename(tmp_path / "archive-1.jsonl")
        start = 0
    else:  # two thirds kept, at a line's end: the new lines pass the old committed length
        data = sink.read_bytes()
        start = data.rfind(b"\n", 0, 2 * len(data) // 3) + 1
        os.truncate(sink, start)
    kept, _ = read(sink)

    # Run 2: new events; killed once a write-out has put some of them in the file, before
    # any commit of this run.
    gw.append("DEMO", AFTER)
    proc = spawn_daemon(toml_config(tmp_path, gw.url, commit_interval_ms=60_000), log)
    try:
        await wait_until(
            lambda: (
                (sink.exists() and sink.stat().st_size >= start + WRITE_OUT_BYTES)
                or proc.poll() is not None
            ),
            timeout=60,
            interval=0.005,
        )
        assert proc.poll() is None, tail(log)
    finally:
        proc.kill()
        await wait_exit(proc)
    written = count_lines(sink) - len(kept)
    assert written > 0

    # Run 3: quick commits; stopped once the gateway's newest event is committed.
    proc = spawn_daemon(toml_config(tmp_path, gw.url), log)
    await stop_when_committed(proc, state, newest_offset(gw), log)

    ids, bad = read(sink)
    twice = [i for i, n in Counter(ids).items() if n > 1]
    assert not bad and not twice, (
        f"{written} new lines were in the file at the kill; after the restart {len(twice)} "
        f"events are in it twice, and {len(bad)} lines are not JSON (torn): {bad[:2]}"
    )
    assert ids == kept + truth_ids(gw.events("DEMO"))[BEFORE:]
