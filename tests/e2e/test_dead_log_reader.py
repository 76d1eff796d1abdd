"""The daemon's exits when nobody reads its output any more (a dead journald pipe, a log
shipper gone) and what it tells systemd when a signal comes while it starts: a real process,
signals, a pipe whose reader is closed, a NOTIFY_SOCKET of the test's own.

Without PYTHONUNBUFFERED (a shell, a supervisor of the user's own) stderr is buffered, and a
failed write surfaces at a flush: in the second signal's exit, and in the interpreter's own at
the end. With it (the unit and the image set it) a write fails at once instead.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import caught, count_lines, toml_config, wait_exit, wait_until


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env.pop("PYTHONUNBUFFERED", None)
    return {**env, **extra}


def _start(config: Path, env: dict[str, str], out: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-OO", "-m", "consumer", "run", "--config", str(config)],
        env=env,
        stdout=out,
        stderr=out,
    )


@pytest.mark.parametrize("second_signal", [False, True], ids=["one-signal", "two-signals"])
async def test_a_dead_log_reader_changes_no_exit_status(
    sandbox_factory, tmp_path: Path, second_signal: bool
) -> None:
    """Buffered stderr, its reader gone: a clean stop exited 120 (the interpreter's final
    flush failed: a failure to systemd, Restart=on-failure restarted a stop it had asked
    for), and a second signal did nothing at all (the flush before os._exit raised in the
    signal's callback): the drain ran to its end."""
    # The server takes its time closing after `complete`: a second signal lands in the drain.
    gw = await sandbox_factory(
        backlog=100, rate=100.0, complete_close_delay_s=30.0 if second_signal else 0.0
    )
    config = toml_config(
        tmp_path, gw.url, connection={"complete_timeout_s": 30.0} if second_signal else None
    )
    sink = tmp_path / "events.jsonl"
    reader, writer = os.pipe()
    proc = _start(config, _env(), writer)
    os.close(writer)
    try:
        await wait_until(lambda: count_lines(sink) >= 50 or proc.poll() is not None, timeout=60)
        os.close(reader)  # journald went away: every write of the log now meets EPIPE
        seen = count_lines(sink)
        await wait_until(lambda: count_lines(sink) > seen or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, "the daemon died of a dead log reader"
        await wait_until(lambda: caught(proc.pid, signal.SIGTERM), timeout=10)
        proc.send_signal(signal.SIGTERM)
        if second_signal:
            # Draining (its `complete` came): the first was taken; two signals sent together
            # may reach the process as one.
            await wait_until(lambda: gw.stats.completes_received >= 1, timeout=30)
            proc.send_signal(signal.SIGTERM)
        code = await wait_exit(proc, 20 if second_signal else 60)
    finally:
        proc.kill()
        await wait_exit(proc)
    assert code == (130 if second_signal else 0)


async def test_a_second_signal_while_starting_exits_130_with_nobody_reading(
    sandbox_factory, tmp_path: Path
) -> None:
    """The second signal while the command line loads wrote its line to stderr first: EPIPE
    raised out of the signal handler into whatever was loading (exit 1, or 0 after the daemon
    started and stopped for the first), never the immediate 130."""
    gw = await sandbox_factory(backlog=5)
    config = toml_config(tmp_path, gw.url)
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads the output
    proc = _start(config, _env(PYTHONUNBUFFERED="1"), writer)
    os.close(writer)
    try:
        await wait_until(
            lambda: caught(proc.pid, signal.SIGTERM) or proc.poll() is not None, interval=0.001
        )
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        code = await wait_exit(proc, 30)
    finally:
        proc.kill()
        await wait_exit(proc)
    assert code == 130


# The daemon as `opera-consumer run` starts it, a SIGTERM taken while Daemon.create runs (a
# slow lease, migration or sink open): the signal lands in that phase, not before it.
# The SIGTERM comes once the start is done (Daemon.create returned: a signal during it now
# cancels the start, store_wait), before the daemon runs: it stops once started.
_STARTER = """
import asyncio, os, signal, sys
from pathlib import Path
from consumer.config import load_settings
from consumer.runtime import daemon, store_wait

real = store_wait.when_reachable

async def when_reachable(settings, start, stopping):
    made = await real(settings, start, stopping)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(0.2)
    return made

store_wait.when_reachable = when_reachable
sys.exit(asyncio.run(daemon.run(load_settings(Path({config!r})))))
"""


async def test_a_signal_while_starting_never_says_ready_after_stopping(
    sandbox_factory, tmp_path: Path
) -> None:
    """A SIGTERM while the daemon starts: it stops once started, and it said READY=1 after
    STOPPING=1; systemd, still in its start state, takes READY=1 for a completed start and
    reports a stopping process "active"."""
    gw = await sandbox_factory(backlog=5)
    config = toml_config(tmp_path, gw.url)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", _STARTER.format(config=str(config))],
            env=_env(NOTIFY_SOCKET=str(tmp_path / "notify.sock")),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        messages: list[str] = []
        while True:
            try:
                messages.append(sock.recv(1 << 16).decode())
            except BlockingIOError:
                break
    finally:
        sock.close()
    assert done.returncode == 0, done.stderr[-2000:]
    stopping = next(i for i, m in enumerate(messages) if "STOPPING=1" in m.split("\n"))
    assert not [m for m in messages[stopping:] if "READY=1" in m.split("\n")], messages
