"""kill -9 while the jsonl sink rotates: between a write, a rotation and a commit.

The daemon (``python -m consumer run``, a real process) writes into files of a few KiB (hundreds
of rotations by size, and one by time every second) while the sandbox drops connections and
re-delivers events on resume. It is killed with SIGKILL at random moments, and once while the
state store is locked, so that rotated files exist on disk that no commit covers (the window
between rotate and commit, held open). After a final run that commits the gateway's newest
event, the union of the files must hold every event of the sandbox exactly once, in order per
primaryKey.

Reduced size in `make test`; `make chaos` runs CHAOS_EVENTS=100000 CHAOS_KILLS=10.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import (
    assert_each_once_in_order,
    committed,
    newest_offset,
    spawn_daemon,
    stop_when_committed,
    tail,
    toml_config,
    wait_exit,
    wait_until,
)

from consumer.config import load_settings
from consumer.core.rotation import Rotation
from consumer.sinks.jsonl import rotated_files

EVENTS = int(os.environ.get("CHAOS_EVENTS", "3000"))
KILLS = max(2, int(os.environ.get("CHAOS_KILLS", "4")))
ROTATE_BYTES = max(4096, EVENTS)  # about 500 files whatever the size (events: ~720 bytes)
REMOVED = "removed uncommitted rotated jsonl file"


def read_files(path: Path, rot: Rotation) -> list[dict[str, Any]]:
    """Every line of the rotated files, in file order (each file whole lines)."""
    out = []
    for f in rotated_files(path, rot):
        data = f.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{f.name} ends in a partial line"
        out += [json.loads(line) for line in data.splitlines()]
    return out


def committed_seq(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT state FROM sink_state WHERE sink = 'jsonl'").fetchone()
    return int(json.loads(row[0])["seq"])


async def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    await wait_exit(proc)


async def locked_kill(
    proc: subprocess.Popen[bytes], state: Path, path: Path, rot: Rotation, log: Path
) -> list[str]:
    """Hold the state store's write lock until the daemon has synced rotated files past the
    committed one (its commits wait, then fail and are retried), then kill -9 it. Returns the
    names of the files no commit covers."""
    db = sqlite3.connect(state, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(db.execute, "BEGIN IMMEDIATE")
        seq = await asyncio.to_thread(committed_seq, db)

        def uncovered() -> list[str]:
            return [
                f.name
                for f in rotated_files(path, rot)
                if (rot.seq_of(f.name) or 0) > seq + 1 and f.stat().st_size
            ]

        await wait_until(lambda: bool(uncovered()) or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, tail(log)
        await kill(proc)
        found = uncovered()
        assert await asyncio.to_thread(committed_seq, db) == seq  # no commit got through
    finally:
        await asyncio.to_thread(db.close)  # rolls the lock back
    return found


@pytest.mark.timeout(300 + EVENTS // 100)
async def test_kill_9_around_rotations_leaves_every_event_once(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(
        backlog=EVENTS,
        chaos_seed=17,
        drop_every=max(300, EVENTS // 4),
        redeliver=5,
        stale_hold_s=0.3,
    )
    path, state, log = tmp_path / "events.jsonl", tmp_path / "state.db", tmp_path / "daemon.log"
    sink = (
        f'[sink]\npath = "{path}"\nrotate_bytes = {ROTATE_BYTES}\nrotate_interval_s = 1\n'
        "fsync = true\n"
    )
    config = toml_config(tmp_path, gw.url, sink=sink)
    rot = load_settings(config).sink.rotation()  # type: ignore[union-attr]
    assert rot is not None
    rng = random.Random(23)
    newest = newest_offset(gw)
    uncovered: list[str] = []
    for run in range(KILLS):
        # Progress of this process: events the gateway sent it (the files may first shrink,
        # as the restart removes what no commit covered).
        sent = gw.stats.events_sent
        proc = spawn_daemon(config, log)
        try:
            if run == 1:
                await wait_until(
                    lambda p=proc, n=sent: gw.stats.events_sent > n or p.poll() is not None,  # type: ignore[misc]
                    timeout=120,
                    interval=0.05,
                )
                assert proc.poll() is None, tail(log)
                uncovered = await locked_kill(proc, state, path, rot, log)
                continue
            target = sent + rng.randint(EVENTS // (KILLS * 4), EVENTS // (KILLS + 1))
            await wait_until(
                lambda t=target, p=proc: (
                    gw.stats.events_sent >= t or committed(state, newest) or p.poll() is not None
                ),
                timeout=180,
                interval=0.05,
            )
            assert proc.poll() is None, tail(log)
            await asyncio.sleep(rng.random() * 0.3)  # kill -9 at a random moment
        finally:
            await kill(proc)
    assert uncovered, "the locked run left no uncommitted rotated file"

    proc = spawn_daemon(config, log)
    await stop_when_committed(proc, state, newest, log, timeout=300 + EVENTS // 200)

    truth = gw.events("DEMO")
    lines = read_files(path, rot)
    assert_each_once_in_order(lines, truth)

    # The rotations and the crash windows really happened.
    files = rotated_files(path, rot)
    assert len(files) >= 20
    assert not path.exists()  # rotation from the start: the path only names the files
    text = log.read_text()
    assert REMOVED in text
    removed = {json.loads(x)["file"] for x in text.splitlines() if REMOVED in x}
    assert set(uncovered) <= removed  # the restart deleted what no commit covered
    assert gw.stats.chaos_drops >= 1
