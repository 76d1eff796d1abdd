"""A signal while the daemon starts (the lease, the store, a sink slow to answer) must not kill
it by the signal's default action: systemd takes a death by SIGHUP for a clean exit, so
Restart=on-failure would not start it again. It stops once started, with the status it would
have had running: 0 for SIGTERM, 1 for SIGHUP."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import toml_config

# The daemon as `opera-consumer run` starts it, with its start-up made to take a signal
# midway (Daemon.create is where a slow lease, store or sink keeps it).
STARTER = """
import asyncio, os, signal, sys
from pathlib import Path
from consumer.config import load_settings
from consumer.runtime import daemon

real = daemon.Daemon.create.__func__

async def create(cls, settings, **kw):
    os.kill(os.getpid(), signal.{sig})
    await asyncio.sleep(0.2)  # the signal is taken while we are still starting
    return await real(cls, settings, **kw)

daemon.Daemon.create = classmethod(create)
sys.exit(asyncio.run(daemon.run(load_settings(Path({config!r})))))
"""


@pytest.mark.parametrize(("sig", "status"), [("SIGTERM", 0), ("SIGHUP", 1)])
async def test_a_signal_while_starting_stops_it_once_started(
    sandbox_factory, tmp_path: Path, sig: str, status: int
) -> None:
    gw = await sandbox_factory(backlog=5)
    config = toml_config(tmp_path, gw.url)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", STARTER.format(sig=sig, config=str(config))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == status, (done.returncode, done.stderr[-2000:])
    assert "signal received while starting" in done.stdout + done.stderr
    assert done.returncode != -getattr(signal, sig)
