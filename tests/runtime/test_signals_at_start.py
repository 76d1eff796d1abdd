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
# resumes `run` after the start (store_wait.when_reachable, which runs Daemon.create), so the
# start-up handler is dispatched only after the daemon installed its own. It must still stop
# the daemon, not be noted where nobody looks.
LATE_STARTER = """
import asyncio, os, signal, sys
from pathlib import Path
from consumer.config import load_settings
from consumer.runtime import daemon, store_wait

real = store_wait.when_reachable

async def when_reachable(settings, start, stopping):
    made = await real(settings, start, stopping)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def kill():
        os.kill(os.getpid(), signal.SIGTERM)  # its C handler writes the loop's wakeup pipe
        loop.call_soon(done.set_result, made)  # run() resumes before the pipe is read

    loop.call_soon(kill)
    return await done

store_wait.when_reachable = when_reachable
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


@pytest.mark.skipif(not PROC.exists(), reason="needs /proc (Linux) to see when a handler exists")
@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGTERM, 0), (signal.SIGHUP, 1)], ids=["SIGTERM", "SIGHUP"]
)
async def test_a_signal_while_the_sink_is_opened_stops_it_as_asked(
    sandbox_factory: Any, tmp_path: Path, sig: signal.Signals, status: int
) -> None:
    """`systemctl stop` while the daemon opens a PostgreSQL sink whose server does not answer
    (a host down): the start waited out the sink's connect timeout, then exited 1 for the
    sink's failure (a unit left failed, not stopped). Now the open is cancelled at once and
    the exit is the stop's (0, 1 for SIGHUP), with nothing left behind unclosed."""
    gw = await sandbox_factory(backlog=5)
    accepted: list[asyncio.StreamWriter] = []
    done = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # never answers the startup packet
        await done.wait()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = (
        f'[sink]\ntype = "postgres"\ndsn = "postgresql://u:pw-0001@127.0.0.1:{port}/db"\n'
        "timeout_s = 600"  # the old code waited this out: the test's wait ends first
    )
    config = toml_config(tmp_path, gw.url, sink=sink)
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(config, log)
    try:
        await wait_until(
            lambda: (accepted and caught(proc.pid, sig)) or proc.poll() is not None, timeout=60
        )
        assert proc.poll() is None, tail(log)
        proc.send_signal(sig)
        assert await wait_exit(proc, 60) == status, tail(log)
    finally:
        proc.kill()
        done.set()
        server.close()
        await server.wait_closed()
    text = log.read_text(errors="replace")
    assert "signal received while starting" in text, tail(log)
    for bad in ("Traceback", "never retrieved", "was destroyed but it is pending", "Unclosed"):
        assert bad not in text, tail(log)
