"""Operator features end to end: the Python and SQLite sinks, park-key, the daemon's lease, and
the ``dlq`` and ``offset`` commands, against the sandbox gateway on loopback, real SQLite files.

The commands run in-process through ``consumer.cli.main`` in a worker thread (``main`` calls
``asyncio.run``; the thread has no running loop while this test's loop keeps serving the
sandbox and the daemon). So the Python sink target (tests/pysink.py) is the same module for the
daemon and the commands: one ``pysink.DELIVERED`` records both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pysink
import pytest
import structlog
from support import (
    FAST_CONNECTION,
    checkpoint,
    make_settings,
    running,
    spawn_daemon,
    truth_ids,
    wait_exit,
    wait_until,
)

import consumer.logs
from consumer.cli import main
from consumer.config import load_settings
from consumer.core.protocol import event_from_raw
from consumer.dlq import LIST_COLUMNS
from consumer.runtime.daemon import Daemon
from consumer.runtime.lease import Lease, LeaseHeld, holder
from consumer.runtime.store import DeadLetterRow, Store
from consumer.sandbox import SandboxOptions
from consumer.sinks.rows import COLUMNS
from consumer.sinks.sqlite import SqliteSink

PYSINK: dict[str, Any] = {"type": "python", "target": "pysink:handle"}
FAST_RETRY: dict[str, Any] = {"sink_retry_initial_s": 0.01, "sink_retry_max_s": 0.05}
MALFORMED = (
    '{"type":"next","id":"x","payload":{"data":{"newEvent":{"moduleName":"R"}}}}',
    "{not json",
)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_sink() -> Iterator[None]:
    pysink.reset()
    yield
    pysink.reset()


@pytest.fixture(autouse=True)
def _contained_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The commands configure logging for the whole process: JSON on stderr (stdout stays for
    their output), and no structlog logger cached for good. Pytest's own handlers are kept,
    and everything is put back afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    root_level = root.level
    ours: list[logging.Handler] = []
    real = consumer.logs.configure

    def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
        others = [h for h in root.handlers if h not in ours]
        real(level, "json", stream)  # replaces every handler of the root logger with its own
        ours.extend(root.handlers)
        root.handlers[:] = [*others, *root.handlers]
        structlog.configure(cache_logger_on_first_use=False)

    monkeypatch.setattr(consumer.logs, "configure", configure)
    configure("warning")
    yield
    for handler in ours:
        root.removeHandler(handler)
    root.setLevel(root_level)
    structlog.configure(**saved)


# --- helpers --------------------------------------------------------------------------------


def uid(event: dict[str, Any]) -> str:
    return str(event["metadata"]["uniqueEventId"])


def off(event: dict[str, Any]) -> str:
    return str(event["metadata"]["offset"])


def key_with_events(events: list[dict[str, Any]], n: int = 3) -> tuple[str, list[dict[str, Any]]]:
    """The first primaryKey (in log order) with at least ``n`` events, and its events."""
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_key[e["primaryKey"]].append(e)
    for key, evs in by_key.items():
        if len(evs) >= n and evs[0] is not events[0]:
            return key, evs
    raise AssertionError(f"no primaryKey with {n} events in the backlog")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))


def write_config(
    tmp_path: Path,
    url: str,
    *,
    sink: dict[str, Any],
    streams: dict[str, str] | None = None,
    name: str = "config.toml",
    state: dict[str, Any] | None = None,
    pipeline: dict[str, Any] | None = None,
    **stream_extra: Any,
) -> Path:
    """A TOML config for the sandbox at ``url`` (``streams``: name -> chain), the state store
    in ``tmp_path/state.db``: what both the daemon and the commands load."""
    state = {"commit_interval_ms": 20, **(state or {})}
    pipeline = {"workers": 4, "drain_timeout_s": 10.0, **FAST_RETRY, **(pipeline or {})}
    o = SandboxOptions()
    lines: list[str] = []
    for stream, chain in (streams or {"main": "DEMO"}).items():
        lines += [
            f"[streams.{stream}]",
            f"gateway_url = {_toml(url)}",
            f"chain_code = {_toml(chain)}",
            f"app_key = {_toml(o.app_key)}",
            *(f"{k} = {_toml(v)}" for k, v in stream_extra.items()),
            f"[streams.{stream}.auth]",
            f"client_id = {_toml(o.client_id)}",
            f"client_secret = {_toml(o.client_secret)}",
            f"[streams.{stream}.connection]",
            *(f"{k} = {_toml(v)}" for k, v in FAST_CONNECTION.items()),
        ]
    lines += [
        "[state]",
        f"path = {_toml(tmp_path / 'state.db')}",
        *(f"{k} = {_toml(v)}" for k, v in state.items()),
        "[pipeline]",
        *(f"{k} = {_toml(v)}" for k, v in pipeline.items()),
        "[sink]",
        *(f"{k} = {_toml(v)}" for k, v in sink.items()),
        "[metrics]",
        "enabled = false",
        "[log]",
        'level = "warning"',
        'format = "json"',
    ]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``opera-consumer ARGS`` in-process; returns (exit status, stdout, stderr)."""
    capsys.readouterr()  # drop what came before

    def call() -> int:
        try:
            return main(list(args))
        except SystemExit as exc:  # argparse
            return int(exc.code or 0)

    code = await asyncio.to_thread(call)
    out, err = capsys.readouterr()
    return code, out, err


def query(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        return conn.execute(sql, args).fetchall()


def processed_ids(state: Path, stream: str = "main") -> set[str]:
    return {
        r[0]
        for r in query(state, "SELECT event_id FROM processed_events WHERE stream = ?", (stream,))
    }


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


async def dead_letters(state: Path) -> list[DeadLetterRow]:
    store = await Store.open(state)
    try:
        return await store.dead_letters()
    finally:
        await store.close()


def settled(daemon: Daemon, stream: str, n: int) -> Callable[[], bool]:
    """True once ``n`` entries of the stream were delivered, dead-lettered or skipped."""
    p = daemon.pipelines[stream]
    return lambda: p.delivered + p.dead_lettered + p.duplicates >= n


def append_until_key(gw: Any, key: str, *, step: int = 20) -> list[dict[str, Any]]:
    """Append events until one is about ``key`` (the sandbox's follow-ups hit recent
    resources); deterministic for the sandbox's seed."""
    new: list[dict[str, Any]] = []
    while len(new) < 2000:
        new += gw.append("DEMO", step)
        if any(e["primaryKey"] == key for e in new):
            return new
    raise AssertionError(f"no new event of primaryKey {key} in {len(new)}")


def in_order(ids: list[str], wanted: list[str]) -> list[str]:
    """The members of ``wanted`` in the order they appear in ``ids``."""
    keep = set(wanted)
    return [i for i in ids if i in keep]


# --- a: the python sink ---------------------------------------------------------------------


async def test_python_sink_delivers_every_event_exactly_once(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=300)
    pysink.TRANSIENT[0] = 3  # the first calls fail transiently: retried, not lost or doubled
    settings = make_settings(tmp_path, gw.url, sink=PYSINK, pipeline=FAST_RETRY)
    async with running(settings) as daemon:
        await wait_until(lambda: len(pysink.DELIVERED) >= 300)
        gw.append("DEMO", 40)
        await wait_until(lambda: len(pysink.DELIVERED) >= 340)
        await asyncio.sleep(0.2)  # a duplicate would show up now
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


# --- b: dead-letter (the default) -----------------------------------------------------------


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
    assert uid(culprit) not in processed_ids(tmp_path / "state.db")


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


# --- c: park-key, then replay -----------------------------------------------------------------


async def test_park_key_holds_the_resource_back_until_a_replay_delivers_it_in_order(
    sandbox_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
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
    assert not processed_ids(state) & {uid(e) for e in key_events}

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

    # Fixed: the replay delivers the whole resource in arrival order and empties the DLQ.
    pysink.REJECT_IDS.clear()
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
        await wait_until(lambda: daemon.pipelines["main"].duplicates >= len(truth))
        await asyncio.sleep(0.2)
    assert list(pysink.DELIVERED) == delivered
    assert daemon.pipelines["main"].dead_lettered == 0
    assert Counter(pysink.delivered_ids()) == Counter(truth_ids(truth))


async def test_a_parked_resource_flows_again_once_its_dead_letters_are_replayed(
    sandbox_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """The daemon keeps running; the python sink may be replayed into meanwhile."""
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
        await asyncio.sleep(0.2)
    assert Counter(pysink.delivered_ids()) == Counter(truth_ids(gw.events("DEMO")))
    ids = pysink.delivered_ids()
    resource = [uid(e) for e in gw.events("DEMO") if e["primaryKey"] == key]
    assert in_order(ids, resource) == resource
    assert await dead_letters(settings.state.path) == []


# --- d: dlq list | show | replay | purge ------------------------------------------------------


async def test_dlq_commands(sandbox_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    gw = await sandbox_factory(backlog=100, chains=("DEMO", "OTHER"))
    demo, other = gw.events("DEMO"), gw.events("OTHER")
    for raw in MALFORMED:
        gw.inject_malformed("DEMO", raw)
    r10, r40, o20 = demo[10], demo[40], other[20]
    pysink.REJECT_IDS.update({uid(r10), uid(r40), uid(o20)})
    streams = {"main": "DEMO", "other": "OTHER"}
    py_cfg = write_config(tmp_path, gw.url, sink=PYSINK, streams=streams)
    jsonl = tmp_path / "events.jsonl"
    jsonl_cfg = write_config(
        tmp_path, gw.url, sink={"type": "jsonl", "path": jsonl}, streams=streams, name="j.toml"
    )
    state = tmp_path / "state.db"
    async with running(load_settings(py_cfg)) as daemon:
        await wait_until(settled(daemon, "main", len(demo) + len(MALFORMED)))
        await wait_until(settled(daemon, "other", len(other)))

    rows = await dead_letters(state)
    assert len(rows) == 5
    by_uid = {r.unique_event_id: r for r in rows if r.unique_event_id}
    malformed = {r.payload: r for r in rows if r.reason == "malformed"}
    assert set(by_uid) == {uid(r10), uid(r40), uid(o20)}
    assert set(malformed) == set(MALFORMED)
    m1, m2 = malformed[MALFORMED[0]], malformed[MALFORMED[1]]
    all_ids = {r.id for r in rows}

    async def listed(*args: str) -> list[dict[str, Any]]:
        code, out, err = await cli(capsys, "dlq", "list", "--json", *args, "--config", str(py_cfg))
        assert code == 0, err
        result: list[dict[str, Any]] = json.loads(out)
        return result

    # list: a table for people
    code, out, err = await cli(capsys, "dlq", "list", "--config", str(py_cfg))
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.split() == list(LIST_COLUMNS)
    cells = [line.split() for line in lines]
    assert all(len(c) == len(LIST_COLUMNS) for c in cells)
    assert {int(c[0]) for c in cells} == all_ids
    row10 = next(c for c in cells if int(c[0]) == by_uid[uid(r10)].id)
    assert row10[1:7] == [
        "main",
        "sink_rejected",
        r10["eventName"].replace(" ", "_"),
        r10["primaryKey"],
        off(r10),
        "1",
    ]
    # list --json and the filters
    everything = await listed()
    assert [d["id"] for d in everything] == sorted(all_ids)  # oldest first
    d10 = next(d for d in everything if d["unique_event_id"] == uid(r10))
    assert d10["stream"] == "main" and d10["reason"] == "sink_rejected"
    assert (d10["primary_key"], d10["offset"], d10["attempts"]) == (r10["primaryKey"], off(r10), 1)
    assert d10["first_at"] and d10["last_at"]
    assert [d["unique_event_id"] for d in await listed("--stream", "other")] == [uid(o20)]
    assert {d["id"] for d in await listed("--reason", "malformed")} == {m1.id, m2.id}
    assert {
        d["unique_event_id"] for d in await listed("--stream", "main", "--reason", "sink_rejected")
    } == {uid(r10), uid(r40)}
    assert await listed("--stream", "nope") == []

    # show: the whole error and the payload
    code, out, err = await cli(
        capsys, "dlq", "show", str(by_uid[uid(r10)].id), "--json", "--config", str(py_cfg)
    )
    assert code == 0, err
    shown = json.loads(out)
    assert shown["payload"] == r10
    assert shown["error"] == f"Rejected: rejected by the test sink: {uid(r10)}"
    assert (shown["reason"], shown["stream"]) == ("sink_rejected", "main")
    code, out, err = await cli(capsys, "dlq", "show", str(m2.id), "--json", "--config", str(py_cfg))
    assert code == 0, err
    shown = json.loads(out)
    assert shown["payload"] == MALFORMED[1]  # not JSON: its raw text
    assert shown["reason"] == "malformed" and shown["error"]
    # for people: one "key  value" line each, then the payload as received
    code, out, err = await cli(capsys, "dlq", "show", str(m2.id), "--config", str(py_cfg))
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.split() == ["reason", "malformed"] for line in lines)
    assert lines[lines.index("payload:") + 1 :] == MALFORMED[1].splitlines()
    code, _, err = await cli(capsys, "dlq", "show", "999999", "--config", str(py_cfg))
    assert code == 1 and "999999" in err

    # --since, with one dead letter two days old
    old = time.time() - 2 * 86400
    with contextlib.closing(sqlite3.connect(state)) as conn, conn:
        conn.execute(
            "UPDATE dead_letters SET first_at = ?, last_at = ? WHERE id = ?", (old, old, m1.id)
        )
    assert {d["id"] for d in await listed("--since", "1d")} == all_ids - {m1.id}
    assert {d["id"] for d in await listed("--since", "2000-01-01")} == all_ids
    assert await listed("--since", "2099-01-01") == []
    code, _, err = await cli(capsys, "dlq", "list", "--since", "soon", "--config", str(py_cfg))
    assert code == 2 and "soon" in err

    # a malformed frame cannot be replayed (the dry run says so, and fails)
    code, out, err = await cli(
        capsys, "dlq", "replay", str(m2.id), "--dry-run", "--json", "--config", str(py_cfg)
    )
    assert code == 1
    [planned] = json.loads(out)
    assert (planned["id"], planned["result"]) == (m2.id, "skipped")
    assert "malformed" in planned["detail"]

    # replay / purge need IDs or --all
    for action in ("purge", "replay"):
        code, _, err = await cli(capsys, "dlq", action, "--config", str(py_cfg))
        assert code == 2 and "--all" in err
    assert {r.id for r in await dead_letters(state)} == all_ids

    # purge --dry-run, then purge by age, then by ID
    code, out, err = await cli(
        capsys,
        "dlq",
        "purge",
        "--before",
        "1d",
        "--all",
        "--dry-run",
        "--json",
        "--config",
        str(py_cfg),
    )
    assert code == 0, err
    assert [d["id"] for d in json.loads(out)] == [m1.id]
    assert "would purge 1" in err
    assert {r.id for r in await dead_letters(state)} == all_ids
    code, _, err = await cli(
        capsys, "dlq", "purge", "--before", "1d", "--all", "--config", str(py_cfg)
    )
    assert code == 0, err
    assert "purged 1" in err
    assert {r.id for r in await dead_letters(state)} == all_ids - {m1.id}
    code, _, err = await cli(capsys, "dlq", "purge", str(m2.id), "999999", "--config", str(py_cfg))
    assert code == 1  # one of the IDs does not exist; the other is purged
    assert "999999" in err and "purged 1" in err
    left = {by_uid[uid(r10)].id, by_uid[uid(r40)].id, by_uid[uid(o20)].id}
    assert {r.id for r in await dead_letters(state)} == left

    # replay --dry-run: the plan, nothing changes
    snapshot = [(r.id, r.attempts, r.last_at) for r in await dead_letters(state)]
    processed = processed_ids(state) | processed_ids(state, "other")
    code, out, err = await cli(
        capsys, "dlq", "replay", "--all", "--dry-run", "--json", "--config", str(jsonl_cfg)
    )
    assert code == 0, err
    assert {(o["id"], o["result"]) for o in json.loads(out)} == {(i, "would deliver") for i in left}
    assert [(r.id, r.attempts, r.last_at) for r in await dead_letters(state)] == snapshot
    assert processed_ids(state) | processed_ids(state, "other") == processed
    assert not jsonl.exists() or jsonl.stat().st_size == 0

    # While a daemon holds the state store: the jsonl sink (one writer) is refused...
    pysink.REJECT_IDS.clear()
    lease = Lease.acquire(state, ["main"])
    try:
        code, _, err = await cli(
            capsys, "dlq", "replay", "--all", "--stream", "main", "--config", str(jsonl_cfg)
        )
        assert code == 1
        assert f"pid {os.getpid()}" in err and "jsonl" in err
        assert [(r.id, r.attempts, r.last_at) for r in await dead_letters(state)] == snapshot
        assert not jsonl.exists() or jsonl.stat().st_size == 0
        # ... a dry run is not, nor is a sink with many writers (python).
        code, _, err = await cli(
            capsys, "dlq", "replay", "--all", "--dry-run", "--config", str(jsonl_cfg)
        )
        assert code == 0, err
        code, out, err = await cli(
            capsys, "dlq", "replay", str(by_uid[uid(o20)].id), "--json", "--config", str(py_cfg)
        )
        assert code == 0, err
        assert [o["result"] for o in json.loads(out)] == ["delivered"]
        assert pysink.DELIVERED[-1] == ("other", uid(o20), o20["primaryKey"])
    finally:
        lease.release()

    # ... and works once nobody holds it.
    code, out, err = await cli(
        capsys, "dlq", "replay", "--all", "--json", "--config", str(jsonl_cfg)
    )
    assert code == 0, err
    assert {(o["unique_event_id"], o["result"]) for o in json.loads(out)} == {
        (uid(r10), "delivered"),
        (uid(r40), "delivered"),
    }
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sorted(lines, key=off) == [r10, r40]
    assert await dead_letters(state) == []
    assert {uid(r10), uid(r40)} <= processed_ids(state)
    assert uid(o20) in processed_ids(state, "other")
    assert holder(state) is None  # the replay's own lease is gone


# --- e: offset show | set | reset --------------------------------------------------------------


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
    header, row = out.splitlines()
    assert header.split() == ["stream", "offset", "checkpoint_at", "next_start"]
    assert row.split()[:2] == ["main", off(last)]

    # set without --execute: the plan, nothing changes
    code, out, err = await cli(capsys, "offset", "set", "main", "123", *cfg)
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split() == ["stream", "current", "new", "note"]
    assert row.split()[:3] == ["main", off(last), "123"]
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
        await asyncio.sleep(0.2)
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
    all-duplicates batch never makes (Committer.wait_capacity / flush)."""
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
            await wait_until(lambda: p.duplicates >= len(truth), timeout=5)
        except TimeoutError:
            pytest.fail(
                f"stalled: {p.duplicates} of {len(truth)} duplicates recognised, "
                f"{p.in_flight} events in flight, the workers wait for a commit"
            )
    assert Counter(pysink.delivered_ids()) == Counter(truth_ids(truth))
    assert checkpoint(settings.state.path) == (off(truth[-1]), uid(truth[-1]))


# --- f: the sqlite sink -----------------------------------------------------------------------


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
    gw = await sandbox_factory(backlog=300)
    db = tmp_path / "sink.db"
    settings = make_settings(
        tmp_path, gw.url, sink={"type": "sqlite", "path": db, "table": "guest_events"}
    )
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", 300))
        gw.append("DEMO", 30)
        await wait_until(settled(daemon, "main", 330))
        await asyncio.sleep(0.2)
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
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    rows = table_ids(state)
    assert sorted(rows) == sorted(truth)  # each once: unique_event_id is the primary key
    assert set(rows) == processed_ids(state)
    last = gw.events("DEMO")[-1]
    assert checkpoint(state) == (off(last), uid(last))


# --- g: the lease -------------------------------------------------------------------------------


async def test_a_second_daemon_on_the_same_state_store_is_refused(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=50)
    config = write_config(tmp_path, gw.url, sink={"type": "jsonl", "path": tmp_path / "e.jsonl"})
    settings = load_settings(config)
    state = settings.state.path
    async with running(settings) as first:
        await wait_until(settled(first, "main", 50))
        info = holder(state)
        assert info is not None
        assert (info["pid"], info["role"], info["streams"]) == (os.getpid(), "daemon", ["main"])
        with pytest.raises(LeaseHeld) as refused:
            await Daemon.create(settings)
        assert f"pid {os.getpid()}" in str(refused.value)
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "consumer", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 78, proc.stderr
        assert f"pid {os.getpid()}" in proc.stderr
        # The first one is unaffected.
        gw.append("DEMO", 10)
        await wait_until(settled(first, "main", 60))
    assert holder(state) is None
    assert first.exit_code == 0
    async with running(settings) as again:  # released at the stop: a new daemon may start
        await wait_until(lambda: again.runners["main"].state == "streaming")
