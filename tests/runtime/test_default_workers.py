"""``[pipeline] workers`` unset: one worker for a sink whose write never suspends (more would
only cut each hand-over into smaller batches), four where writes wait on I/O; set, obeyed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import make_settings, running, wait_until

from consumer.config import Settings
from consumer.runtime.assembly import build_sink
from consumer.runtime.pipeline import QUEUE_PER_WORKER, WAITING_SINK_WORKERS, default_workers
from consumer.sandbox import SandboxGateway

GATEWAY = "http://127.0.0.1:9"  # never connected to: only the sinks are built


def settings(tmp_path: Path, sink: dict[str, Any], *, orchestrated: bool = False) -> Settings:
    """Settings with this sink (a ``path`` in it: a file name in ``tmp_path``)."""
    if "path" in sink:
        sink = {**sink, "path": tmp_path / sink["path"]}
    s = make_settings(tmp_path, GATEWAY, sink=sink)
    if orchestrated:
        on = s.orchestration.model_copy(update={"enabled": True})
        s = s.model_copy(update={"orchestration": on})
    return s


@pytest.mark.parametrize(
    ("sink", "orchestrated", "workers"),
    [
        ({"type": "jsonl", "path": "events.jsonl"}, False, 1),
        ({"type": "sqlite"}, False, 1),  # rows in the state store's commit
        ({"type": "sqlite", "path": "other.db"}, False, WAITING_SINK_WORKERS),  # aiosqlite
        ({"type": "webhook", "url": "http://127.0.0.1:9/hook"}, False, WAITING_SINK_WORKERS),
        ({"type": "python", "target": "pysink:handle"}, False, WAITING_SINK_WORKERS),
        ({"type": "jsonl", "path": "events.jsonl"}, True, WAITING_SINK_WORKERS),  # GET first
    ],
    ids=["jsonl", "sqlite-in-store", "sqlite-own-file", "webhook", "python", "orchestrated-jsonl"],
)
async def test_the_default_follows_whether_the_sink_waits(
    tmp_path: Path, sink: dict[str, Any], orchestrated: bool, workers: int
) -> None:
    s = settings(tmp_path, sink, orchestrated=orchestrated)
    async with aiohttp.ClientSession() as http:
        assert default_workers(build_sink(s, http)) == workers


async def test_postgres_waits_unless_its_rows_go_in_the_state_transaction(tmp_path: Path) -> None:
    pytest.importorskip("asyncpg", reason="the postgres extra is not installed")
    from consumer.sinks.postgres import PostgresSink

    s = settings(tmp_path, {"type": "postgres", "dsn": "postgresql://u:pass@127.0.0.1:9/db"})
    assert s.sink.type == "postgres"
    assert default_workers(PostgresSink(s.sink, in_state_transaction=True)) == 1  # type: ignore[arg-type]
    assert default_workers(PostgresSink(s.sink)) == WAITING_SINK_WORKERS  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pipeline", "started", "queued"),
    [
        ({}, 1, QUEUE_PER_WORKER),
        ({"workers": 3}, 3, 3 * QUEUE_PER_WORKER),
        ({"workers": 3, "queue_size": 40}, 3, 40),
    ],
    ids=["unset", "three", "three-queue-set"],
)
async def test_the_daemon_starts_that_many_workers_with_a_queue_to_match(
    sandbox_factory: Callable[..., Awaitable[SandboxGateway]],
    tmp_path: Path,
    pipeline: dict[str, int],
    started: int,
    queued: int,
) -> None:
    """``queue_size`` unset: 500 per worker (one worker's queue never filled 500 while commits
    kept up; a larger one only held more megabytes while a commit waited on the disk)."""
    gw = await sandbox_factory(backlog=20)
    s = make_settings(tmp_path, gw.url, pipeline={"workers": None, **pipeline})
    async with running(s) as daemon:
        await wait_until(
            lambda: "main" in daemon.pipelines and daemon.pipelines["main"].delivered == 20
        )
        assert len(daemon.pipelines["main"].tasks) == started
        assert daemon.pipelines["main"].queue_size == queued
