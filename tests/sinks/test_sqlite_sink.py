"""The SQLite sink, in the state store or a file of its own: rows and checkpoint together,
through concurrent writes and kill -9 (Issue #10 item 7: split out of test_operator_tools.py)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest
from operator_support import off, processed_ids, query, settled, uid, write_config
from support import (
    checkpoint,
    committed,
    make_settings,
    newest_offset,
    running,
    spawn_daemon,
    truth_ids,
    wait_exit,
    wait_until,
)

from consumer.core.protocol import event_from_raw
from consumer.sinks.rows import COLUMNS
from consumer.sinks.sqlite import SqliteSink

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")


def table_count(db: Path, table: str = "opera_events") -> int:
    try:
        return int(query(db, f'SELECT COUNT(*) FROM "{table}"')[0][0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def table_ids(db: Path, table: str = "opera_events") -> list[str]:
    try:
        return [r[0] for r in query(db, f'SELECT unique_event_id FROM "{table}"')]
    except sqlite3.OperationalError:  # not created yet
        return []


async def test_sqlite_sink_in_the_state_store(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=300)
    settings = make_settings(tmp_path, gw.url, sink={"type": "sqlite"})
    state = tmp_path / "state.db"
    started = time.time()
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", 300))
    truth = gw.events("DEMO")
    cols = ", ".join(f'"{c}"' for c in COLUMNS)
    rows = query(state, f"SELECT {cols} FROM opera_events")
    assert sorted(r[0] for r in rows) == sorted(truth_ids(truth))
    by_id = {uid(e): e for e in truth}
    for r in rows:
        got = dict(zip(COLUMNS, r, strict=True))
        e = by_id[got["unique_event_id"]]
        assert got["stream"] == "main"
        assert got["offset"] == off(e)
        assert (got["event_name"], got["module_name"]) == (e["eventName"], e["moduleName"])
        assert (got["primary_key"], got["hotel_id"]) == (e["primaryKey"], e["hotelId"])
        assert got["event_timestamp"] == e["timestamp"]
        assert json.loads(got["detail"]) == e["detail"]
        assert got["resource"] is None
        assert started <= got["written_at"] <= time.time()
    assert processed_ids(state) == set(truth_ids(truth))
    assert not (tmp_path / "events.jsonl").exists()


async def test_sqlite_sink_in_a_file_of_its_own(
    sandbox_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Issue #9 item 12: the rows are checked once the committed checkpoint is the gateway's
    newest event (every event done, none in flight), not after a sleep."""
    gw = await sandbox_factory(backlog=300)
    db = tmp_path / "sink.db"
    settings = make_settings(
        tmp_path, gw.url, sink={"type": "sqlite", "path": db, "table": "guest_events"}
    )
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", 300))
        gw.append("DEMO", 30)
        await wait_until(settled(daemon, "main", 330))
        newest = newest_offset(gw)
        await wait_until(lambda: committed(tmp_path / "state.db", newest), timeout=60)
    ids = table_ids(db, "guest_events")
    assert Counter(ids) == Counter(truth_ids(gw.events("DEMO")))
    tables = {r[0] for r in query(tmp_path / "state.db", "SELECT name FROM sqlite_master")}
    assert "guest_events" not in tables and "opera_events" not in tables
    # A healthy file never needed a retry (the workers write concurrently).
    retries = [r.getMessage() for r in caplog.records if "sink write failed" in r.getMessage()]
    assert retries == []


async def test_sqlite_sink_file_takes_concurrent_writes(sandbox_factory, tmp_path: Path):
    """The pipeline's workers call ``write`` concurrently: each call must commit its own rows
    in its own transaction, on the sink's one connection."""
    gw = await sandbox_factory(backlog=8)
    events = [event_from_raw(e) for e in gw.events("DEMO")]
    db = tmp_path / "sink.db"
    sink = SqliteSink(db, "opera_events")
    await sink.open(None)
    try:
        results = await asyncio.gather(
            *(sink.write("main", [ev]) for ev in events if ev is not None), return_exceptions=True
        )
    finally:
        await sink.close()
    assert [repr(r) for r in results if r is not None] == []
    assert sorted(table_ids(db)) == sorted(truth_ids(gw.events("DEMO")))


async def test_sqlite_sink_rows_and_checkpoint_survive_kill_9_together(
    sandbox_factory, tmp_path: Path
):
    """Issue #9 item 12: the last run is stopped once its committed checkpoint is the
    gateway's newest event (every row in, none in flight), not after a sleep."""
    total = 5000
    gw = await sandbox_factory(backlog=total)
    # One event per batch and small commits: hundreds of transactions, a kill lands between or
    # inside one of them (and the daemon is slow enough for the kills to land mid-backlog).
    config = write_config(
        tmp_path,
        gw.url,
        sink={"type": "sqlite"},
        state={"commit_max_events": 20, "commit_interval_ms": 2},
        pipeline={"batch_max": 1, "queue_size": 40},
    )
    state, log = tmp_path / "state.db", tmp_path / "daemon.log"
    truth = truth_ids(gw.events("DEMO"))

    rng = random.Random(3)
    kills_mid_work = 0
    for _ in range(3):
        before = table_count(state)
        proc = spawn_daemon(config, log)
        try:
            target = before + rng.randint(250, 900)
            await wait_until(
                lambda t=target, p=proc: table_count(state) >= t or p.poll() is not None,  # type: ignore[misc]
                timeout=60,
                interval=0.005,
            )
            assert proc.poll() is None, log.read_text()[-3000:]
            await asyncio.sleep(rng.random() * 0.05)  # at a random moment
        finally:
            proc.send_signal(signal.SIGKILL)
            await wait_exit(proc)
        rows = table_ids(state)
        kills_mid_work += len(rows) < total
        # Never separated: the rows are exactly the processed ids, and they cover the checkpoint.
        assert len(rows) == len(set(rows))
        assert set(rows) == processed_ids(state)
        cp = checkpoint(state)
        assert cp is not None and cp[1] in set(rows)
        assert set(rows) <= set(truth)
    assert kills_mid_work >= 2, "the daemon finished before it could be killed"

    subscribed = len(gw.stats.subscribes)
    proc = spawn_daemon(config, log)
    try:
        await wait_until(lambda: len(gw.stats.subscribes) > subscribed, timeout=30)
        await wait_until(lambda: table_count(state) >= total, timeout=60)
        newest = newest_offset(gw)
        await wait_until(lambda: committed(state, newest), timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    rows = table_ids(state)
    assert sorted(rows) == sorted(truth)  # each once: unique_event_id is the primary key
    assert set(rows) == processed_ids(state)
    last = gw.events("DEMO")[-1]
    assert checkpoint(state) == (off(last), uid(last))
