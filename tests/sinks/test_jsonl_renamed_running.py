"""The jsonl file renamed while the daemon runs (logrotate's create mode): the daemon stops,
and what it had handed to the renamed file past the committed length is cut off it first, so
that the restart's replay does not write those events a second time (found by a review: the
write-outs between commits left them in the renamed file, and the new one got them again)."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support import (
    committed_sink_length,
    newest_offset,
    spawn_daemon,
    stop_when_committed,
    tail,
    toml_config,
    truth_ids,
    wait_exit,
    wait_until,
)

from consumer.errors import ExitCode
from consumer.sinks.jsonl import WRITE_OUT_BYTES


def ids_of(*paths: Path) -> tuple[list[str], list[bytes]]:
    """uniqueEventIds of the complete JSON lines of ``paths`` (in order), and the bad lines."""
    ids, bad = [], []
    for path in paths:
        for line in path.read_bytes().splitlines() if path.exists() else []:
            try:
                ids.append(json.loads(line)["metadata"]["uniqueEventId"])
            except (ValueError, KeyError, TypeError):
                bad.append(line[:80])
    return ids, bad


@pytest.mark.timeout(240)
async def test_a_file_renamed_while_running_keeps_no_uncommitted_line_written_again(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=3000)
    sink, state, log = tmp_path / "events.jsonl", tmp_path / "state.db", tmp_path / "daemon.log"
    rotated = tmp_path / "events.jsonl.1"

    # Commits far apart: the catch-up's lines reach the file by write-outs before any commit.
    proc = spawn_daemon(toml_config(tmp_path, gw.url, commit_interval_ms=60_000), log)
    try:
        await wait_until(
            lambda: (
                (sink.exists() and sink.stat().st_size >= WRITE_OUT_BYTES)
                or proc.poll() is not None
            ),
            timeout=60,
            interval=0.005,
        )
        assert proc.poll() is None, tail(log)
        # logrotate, create mode: rename, then a new empty file under the path.
        sink.rename(rotated)
        sink.touch()
        proc.send_signal(signal.SIGTERM)  # the drain's final sync meets the renamed file
        code = await wait_exit(proc)
    finally:
        proc.kill()
        await wait_exit(proc)
    # Stopped: the drain's final commit met the renamed file, and exits as a running daemon
    # would for it (was 1: systemd restarted into it).
    assert code == ExitCode.CONFIG, tail(log)
    assert "removed or replaced" in tail(log), tail(log)
    assert rotated.stat().st_size == committed_sink_length(state), tail(log)

    # The restart (as systemd or the operator would after reading the message).
    proc = spawn_daemon(toml_config(tmp_path, gw.url), log)
    await stop_when_committed(proc, state, newest_offset(gw), log)

    ids, bad = ids_of(rotated, sink)
    assert not bad
    assert Counter(ids) == Counter(truth_ids(gw.events("DEMO")))  # each once
