"""A signal while the daemon stops by itself (the sink unusable, every stream stopped): its
first one was taken for a second one, so `systemctl stop` or `docker stop` meanwhile exited
130 at once, without the drain, the final commit or the closing, and the 78 the daemon chose
(do not restart) became a 130 that systemd's Restart=on-failure restarts."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import log_records, tail, toml_config, wait_exit, wait_until

from consumer.errors import ExitCode

# `opera-consumer run` with a sink that is unusable at its first write (the daemon stops
# itself, exit 78) and whose closing, the stop's last step, waits for the test.
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

    async def close(self):
        while not Path({release!r}).exists():
            await asyncio.sleep(0.02)
        await super().close()

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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_the_first_signal_in_a_stop_of_its_own_keeps_the_stop_and_its_status(
    sandbox_factory, tmp_path: Path, sig: signal.Signals
) -> None:
    gw = await sandbox_factory(backlog=20)
    config = toml_config(tmp_path, gw.url)
    release, log = tmp_path / "release", tmp_path / "daemon.log"
    proc = start(STARTER.format(release=str(release), config=str(config)), log)
    try:
        await wait_until(
            lambda: bool(log_records(log, "sink unusable; stopping")) or proc.poll() is not None,
            timeout=60,
        )
        assert proc.poll() is None, tail(log)
        proc.send_signal(sig)  # the operator's first and only one
        await wait_until(
            lambda: bool(log_records(log, "signal received: draining")) or proc.poll() is not None,
            timeout=60,
        )
        release.touch()
        assert await wait_exit(proc) == ExitCode.CONFIG, tail(log)
    finally:
        proc.kill()
    assert not log_records(log, "second signal: exiting now"), tail(log)
    assert [r["exit_code"] for r in log_records(log, "stopped")] == [ExitCode.CONFIG], tail(log)


async def test_an_unusable_sink_stops_without_waiting_for_a_drain_that_cannot_come(
    sandbox_factory, tmp_path: Path
) -> None:
    """What it read never drains (the worker that met the sink has ended, and no commit would
    take it), so waiting out ``drain_timeout_s`` only kept an operator and systemd waiting:
    the stop goes on at once, and what was read is replayed at the next start."""
    gw = await sandbox_factory(backlog=200)
    config = toml_config(tmp_path, gw.url, "[pipeline]\ndrain_timeout_s = 3600")
    release, log = tmp_path / "release", tmp_path / "daemon.log"
    release.touch()  # its closing does not wait
    proc = start(STARTER.format(release=str(release), config=str(config)), log)
    try:
        await wait_until(lambda: bool(log_records(log, "sink unusable; stopping")), timeout=60)
        assert await wait_exit(proc) == ExitCode.CONFIG, tail(log)  # 60 s, far under 3600
    finally:
        proc.kill()
    assert [r["exit_code"] for r in log_records(log, "stopped")] == [ExitCode.CONFIG], tail(log)
    undrained = log_records(
        log,
        "not drained (the sink or the state store is unusable); the rest is replayed on the "
        "next start",
    )
    assert undrained and undrained[0]["in_flight"] > 0, tail(log)
