"""A session's two helper tasks (the keepalive and the completer) ending in a failure (a bug)
drop the connection, which the stream replaces; the session does not go on without its
liveness check or its completion. Real parts: the sandbox gateway, the daemon, the jsonl sink."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from log_capture import captured_logs
from support import (
    committed,
    make_settings,
    newest_offset,
    running,
    sink_ids,
    truth_ids,
    wait_until,
)

from consumer.runtime import stream


async def test_a_keepalive_that_fails_has_its_connection_replaced(
    sandbox_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first session's keepalive fails at its start, once: that connection is dropped and
    the next one streams on from the start position, every event once. Before, the session
    streamed on without its keepalive: no ping, no liveness deadline, a silent gateway never
    noticed."""
    gw = await sandbox_factory(backlog=40)
    newest = newest_offset(gw)
    first_ping_due = stream.first_ping_due
    failed: list[bool] = []

    def failing_once(*args: float) -> float:
        if not failed:
            failed.append(True)
            raise RuntimeError("a bug, once")
        return first_ping_due(*args)

    monkeypatch.setattr(stream, "first_ping_due", failing_once)
    # From an offset: with none, the sandbox (as OHIP) resumes after what it sent last, and the
    # first connection may be dropped before any event of it was read.
    settings = make_settings(tmp_path, gw.url, subscription={"start": "offset", "offset": "0"})
    with captured_logs() as logs:
        async with running(settings) as daemon:
            runner = daemon.runners["main"]
            await wait_until(lambda: committed(tmp_path / "state.db", newest))
            connections = runner.stats.connections
    assert failed and connections == 2
    assert "a session's helper failed; the connection is dropped and replaced" in logs.getvalue()
    ids = sink_ids(tmp_path / "events.jsonl")
    assert Counter(ids) == Counter(truth_ids(gw.events("DEMO")))
