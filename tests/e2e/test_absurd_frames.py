"""One absurd frame from the gateway, end to end: the daemon as a process (default settings,
so max_frame_bytes is 16 MiB), the sandbox gateway on loopback, a real SQLite state file and a
real jsonl file.

A ``next`` frame just under max_frame_bytes made of millions of tiny values (``[]`` in a field
of its own, or ``{}`` detail elements) took 470-880 MB to decode: a gateway that sends one had
the daemon OOM-killed, and the frame, replayed at every resume, stopped the stream for good.
It is now a malformed dead letter (a bounded copy, the size and SHA-256 of the whole), the
events after it are delivered, and the daemon stays within the hostile suite's memory bound.
"""

from __future__ import annotations

import hashlib
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from support import (
    count_lines,
    dead_letter_rows,
    sink_ids,
    spawn_daemon,
    toml_config,
    truth_ids,
    wait_exit,
    wait_until,
)

from consumer.core.evidence import PAYLOAD_LIMIT

MAX_FRAME = 16 * 1024 * 1024  # [connection] max_frame_bytes' default
RSS_LIMIT = 250 * 2**20  # tests/hostile/test_hostile.py: "the daemon runs in about 90 MB"
ENVELOPE = 200  # what the sandbox wraps a newEvent in: {"id":<uuid>,"type":"next",...}


def absurd_event(field: str, unit: bytes) -> bytes:
    """A newEvent whose ``field`` is an array of as many ``unit``s as fit in a frame of
    max_frame_bytes."""
    head = (
        b'{"metadata":{"offset":"1","uniqueEventId":"absurd-1"},"primaryKey":"pk-absurd",'
        b'"publisherId":"p","' + field.encode() + b'":['
    )
    tail = b"]}"
    body = unit * ((MAX_FRAME - ENVELOPE - len(head) - len(tail)) // len(unit))
    return head + body[:-1] + tail


def dead_letters(state: Path) -> list[dict[str, Any]]:
    """The state file's dead letters; none while the daemon is still creating it."""
    try:
        return dead_letter_rows(state) if state.exists() else []
    except sqlite3.OperationalError:  # no such table yet
        return []


def peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes: the most it has ever held resident."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize(
    ("field", "unit"),
    [("x", b"[],"), ("detail", b"{},")],
    ids=["lists-the-general-way", "empty-detail-elements-the-fast-way"],
)
async def test_an_absurd_frame_is_dead_lettered_and_the_stream_goes_on_in_bounded_memory(
    sandbox_factory: Any, tmp_path: Path, field: str, unit: bytes
) -> None:
    gw = await sandbox_factory(backlog=5)
    event = absurd_event(field, unit)
    gw.inject_event("DEMO", event.decode())
    gw.append("DEMO", 5)
    sink, state, log = tmp_path / "events.jsonl", tmp_path / "state.db", tmp_path / "daemon.log"
    proc = spawn_daemon(toml_config(tmp_path, gw.url), log)
    try:

        def settled() -> bool:  # the daemon exited, or it has handled every frame
            lines = count_lines(sink)  # 10 events, 11 with the absurd one
            letters = bool(dead_letters(state))
            return proc.poll() is not None or lines > 10 or (lines == 10 and letters)

        await wait_until(settled, timeout=60)
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        peak = peak_rss(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            await wait_exit(proc)
    assert peak <= RSS_LIMIT, (
        f"daemon peak RSS (VmHWM) {peak / 2**20:.0f} MiB after one frame of about "
        f"{MAX_FRAME} bytes, bound {RSS_LIMIT / 2**20:.0f} MiB"
    )
    assert sink_ids(sink) == truth_ids(gw.events("DEMO"))  # every event, the absurd one not
    (letter,) = dead_letter_rows(state)
    assert letter["reason"] == "malformed"
    assert "JSON values" in letter["error"] and "bounded memory" in letter["error"]
    payload = letter["payload"]
    assert len(payload) == PAYLOAD_LIMIT
    envelope = payload[: payload.index('"newEvent":') + 11].encode()
    sent = envelope + event + b"}}}"  # the frame as the sandbox sent it
    assert len(sent) <= MAX_FRAME
    assert (letter["payload_size"], letter["payload_sha256"]) == (
        len(sent),
        hashlib.sha256(sent).hexdigest(),
    )
