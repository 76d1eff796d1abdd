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
from typing import Any

import pytest
from support import caught, spawn_daemon, tail, toml_config, wait_exit, wait_until

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


# The signal arrives just as start-up ends: the loop reads it in the same iteration that
# resumes `run` after Daemon.create, so the start-up handler is dispatched only after the
# daemon installed its own. It must still stop the daemon, not be noted where nobody looks.
LATE_STARTER = """
import asyncio, os, signal, sys
from pathlib import Path
from consumer.config import load_settings
from consumer.runtime import daemon

real = daemon.Daemon.create.__func__

async def create(cls, settings, **kw):
    made = await real(cls, settings, **kw)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def kill():
        os.kill(os.getpid(), signal.SIGTERM)  # its C handler writes the loop's wakeup pipe
        loop.call_soon(done.set_result, made)  # run() resumes before the pipe is read

    loop.call_soon(kill)
    return await done

daemon.Daemon.create = classmethod(create)
sys.exit(asyncio.run(daemon.run(load_settings(Path({config!r})))))
"""


async def test_a_signal_as_start_up_ends_still_stops_the_daemon(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=5)
    config = toml_config(tmp_path, gw.url)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", LATE_STARTER.format(config=str(config))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "signal received: draining" in done.stdout + done.stderr


# The real command line. A signal can be obeyed from the moment a handler exists: /proc says
# when (SigCgt). One sent sooner, while the interpreter itself starts (a few tens of ms, before
# any of our code runs), takes the default action whatever a program does, so "right after
# spawn" is no test of ours; these are the earliest points that are.
PROC = Path("/proc/self/status")


def loading(pid: int) -> bool:
    """Whether the process is loading the configuration's dependencies (pydantic's compiled
    core mapped), long before its event loop runs."""
    try:
        return "pydantic_core" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not PROC.exists(), reason="needs /proc (Linux) to see when a handler exists")
@pytest.mark.parametrize("when", ["handler installed", "dependencies loading"])
@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGTERM, 0), (signal.SIGHUP, 1)], ids=["SIGTERM", "SIGHUP"]
)
async def test_a_signal_as_the_command_starts_stops_it_once_started(
    sandbox_factory: Any, tmp_path: Path, sig: signal.Signals, status: int, when: str
) -> None:
    gw = await sandbox_factory(backlog=5)
    config = toml_config(tmp_path, gw.url)
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(config, log)
    try:

        def now() -> bool:
            return caught(proc.pid, sig) if when == "handler installed" else loading(proc.pid)

        await wait_until(lambda: now() or proc.poll() is not None, interval=0.001)
        assert proc.poll() is None, tail(log)
        proc.send_signal(sig)
        assert await wait_exit(proc) == status, tail(log)
    finally:
        proc.kill()
    assert "signal received while starting" in log.read_text(errors="replace"), tail(log)
