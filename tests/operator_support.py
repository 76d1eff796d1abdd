"""Shared by the operator feature tests (Issue #10 item 7: tests/commands/test_dlq_*.py,
test_offset_commands.py, tests/sinks/test_python_sink.py, test_sqlite_sink.py,
tests/state/test_lease.py): the
Python sink target, a TOML config that both the daemon and the commands load, the commands run
in-process, and readers of the state store.

The commands run in-process through ``consumer.cli.main`` in a worker thread (``main`` calls
``asyncio.run``; the thread has no running loop while the test's loop keeps serving the
sandbox and the daemon). So the Python sink target (tests/pysink.py) is the same module for the
daemon and the commands: one ``pysink.DELIVERED`` records both.

Their modules use two fixtures of tests/conftest.py, ``fresh_pysink`` and
``contained_logging`` (``pytestmark = pytest.mark.usefixtures(...)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import FAST_CONNECTION

from consumer.cli import main
from consumer.core.records import DeadLetterRow
from consumer.runtime.daemon import Daemon
from consumer.sandbox import SandboxOptions
from consumer.state import SqliteStore as Store

PYSINK: dict[str, Any] = {"type": "python", "target": "pysink:handle"}
FAST_RETRY: dict[str, Any] = {"sink_retry_initial_s": 0.01, "sink_retry_max_s": 0.05}


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


def in_order(ids: list[str], wanted: list[str]) -> list[str]:
    """The members of ``wanted`` in the order they appear in ``ids``."""
    keep = set(wanted)
    return [i for i in ids if i in keep]
