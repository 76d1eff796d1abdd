"""A sink that becomes unusable stops the daemon (exit 78) at once: the events it had read
never drain (the worker that met the sink has ended, and no commit would take them), so
waiting out `drain_timeout_s` only kept an operator and systemd waiting; they are replayed at
the next start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import log_records, tail, toml_config, wait_exit, wait_until

from consumer.errors import ExitCode

STARTER = """
import asyncio, sys
from pathlib import Path
from consumer.config import load_settings
from consumer.errors import SinkUnusable
from consumer.logs import configure
from consumer.runtime import daemon
from consumer.sinks.jsonl import JsonlSink

class UnusableSink(JsonlSink):
    async def write(self, stream, events):
        raise SinkUnusable("the sink file was replaced underneath us")

daemon.build_sink = lambda settings, http, tokens: UnusableSink(settings.sink.path)
settings = load_settings(Path({config!r}))
configure(settings.log.level, settings.log.format)
sys.exit(asyncio.run(daemon.run(settings)))
"""


def start(script: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-OO", "-c", script], stdout=out, stderr=subprocess.STDOUT
        )


async def test_an_unusable_sink_stops_without_waiting_for_a_drain_that_cannot_come(
    sandbox_factory, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=200)
    # A deadline far past the test's own bound: the daemon must not wait for it.
    config = toml_config(tmp_path, gw.url, "[pipeline]\ndrain_timeout_s = 3600")
    log = tmp_path / "daemon.log"
    proc = start(STARTER.format(config=str(config)), log)
    try:
        await wait_until(lambda: bool(log_records(log, "sink unusable; stopping")), timeout=60)
        assert await wait_exit(proc, 60) == ExitCode.CONFIG, tail(log)
    finally:
        proc.kill()
    assert [r["exit_code"] for r in log_records(log, "stopped")] == [ExitCode.CONFIG], tail(log)
    undrained = log_records(
        log,
        "not drained (the sink or the state store is unusable); the rest is replayed on the "
        "next start",
    )
    assert undrained and undrained[0]["in_flight"] > 0, tail(log)
    assert not log_records(log, "drain deadline passed; the rest is replayed on the next start")
