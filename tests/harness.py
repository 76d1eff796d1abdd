"""The real daemon, with its jsonl sink behind a switch: while OUTAGE_FILE exists, every write
fails transiently (a sink that is down). Run as a process so that the chaos test can kill -9 it.

    python tests/harness.py CONFIG OUTAGE_FILE

Also the positive conditions the process tests wait for (issue #9 item 12: never "sleep, then
assert nothing happened"): ``committed`` (the daemon has committed the gateway's newest event),
``committed_sink_length`` (a commit is through) and ``sink_failures`` (the outage really met
a write).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from support import checkpoint

from consumer.config import load_settings
from consumer.core.events import Event
from consumer.errors import TransientSinkError
from consumer.logs import configure
from consumer.runtime.daemon import Daemon, register_secrets
from consumer.sandbox import SandboxGateway
from consumer.sinks.jsonl import JsonlSink

SINK_FAILED = "sink write failed; retrying"  # the pipeline's log event for a failed write


class SwitchableSink(JsonlSink):
    def __init__(self, path: Path, outage: Path) -> None:
        super().__init__(path)
        self.outage = outage

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        if self.outage.exists():
            raise TransientSinkError("sink down (chaos)")
        await super().write(stream, events)


def newest_offset(gw: SandboxGateway, chain: str = "DEMO") -> str:
    """The offset of the chain's newest valid event (compute it once: the log can be long)."""
    return str(gw.events(chain)[-1]["metadata"]["offset"])


def committed(state: Path, offset: str, stream: str = "main") -> bool:
    """Whether the stream's checkpoint in the state store is ``offset``. The checkpoint is the
    newest position whose whole prefix is done and commits with the sink's position, so once
    it is the gateway's newest offset every event is in the sink and none is still in flight.
    (A stream's very first event is checkpointed on arrival, before any commit.) Read only;
    False while the state store or its schema does not exist yet."""
    if not state.exists():
        return False  # sqlite3.connect would create it
    try:
        cp = checkpoint(state, stream)
    except sqlite3.OperationalError:  # no table yet (the daemon is creating the schema)
        return False
    return cp is not None and cp[0] == offset


def committed_sink_length(state: Path, sink: str = "jsonl") -> int:
    """The sink length (bytes of the jsonl file) the state store has committed; 0 while it has
    none. Positive once the daemon's first commit is through."""
    if not state.exists():
        return 0
    try:
        with closing(sqlite3.connect(state, timeout=10)) as db:
            row = db.execute("SELECT state FROM sink_state WHERE sink = ?", (sink,)).fetchone()
    except sqlite3.OperationalError:  # no table yet
        return 0
    return int(row[0]) if row is not None else 0


def tail(log: Path, chars: int = 3000) -> str:
    """The end of a daemon's log, for an assertion message."""
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def sink_failures(log: Path) -> list[dict[str, Any]]:
    """The daemon's "sink write failed; retrying" records in a JSON log (other lines skipped)."""
    if not log.exists():
        return []
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if SINK_FAILED not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == SINK_FAILED:
            found.append(record)
    return found


async def main(config: Path, outage: Path) -> int:
    settings = load_settings(config)
    configure(settings.log.level, settings.log.format)
    register_secrets(settings)
    daemon = await Daemon.create(settings, sink=SwitchableSink(settings.sink.path, outage))
    return await daemon.run()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]))))
