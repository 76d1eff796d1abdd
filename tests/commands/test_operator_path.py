"""What an operator meets on the way in, as a review of that path found it: `status --watch`
piped into `head`, its second refresh, systemd's STATUS= before the first event, `sandbox
--help`, `--config` naming a directory, and the command line leaving a caller's signal
handlers as they were."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import (
    checkpoint,
    committed,
    first_line_then_close,
    make_settings,
    newest_offset,
    running,
    spawn_daemon,
    tail,
    toml_config,
    wait_exit,
    wait_until,
)

from consumer.cli import main
from consumer.sandbox import launcher
from consumer.state import SqliteStore


def status(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "consumer", "status", "--config", str(config), *args]


async def test_a_watch_whose_reader_goes_away_ends_with_141(tmp_path: Path) -> None:
    """README: 141 when the reader of a command's output goes away; `status --watch | head -1`
    ended with 0 (it caught the broken pipe itself), unlike `preflight | head -1`."""
    config = toml_config(tmp_path, "http://127.0.0.1:9")
    await (await SqliteStore.open(tmp_path / "state.db")).close()  # as a daemon left it
    line, err, code = await asyncio.to_thread(
        first_line_then_close, status(config, "--watch", "--interval", "0.1")
    )
    assert line.split()[:2] == ["stream", "state"], line
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert code == 141, err


async def test_every_refresh_of_a_watch_measures_its_rate_over_an_interval(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The first refresh samples the daemon twice (a rate needs two) for up to a second; the
    next was scheduled from the start of it, so with `--interval 1` it came at once, the same
    table again with 0 events/s on a live stream."""
    gw = await sandbox_factory(backlog=5, rate=50.0)
    backlog_end = int(newest_offset(gw))
    port = launcher.free_port()
    config = toml_config(tmp_path, gw.url)
    config.write_text(
        config.read_text().replace("[metrics]\nport = 0", f"[metrics]\nport = {port}")
    )
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(config, log)
    try:
        # live: past the backlog, on the events the sandbox makes as it goes
        await wait_until(lambda: past(tmp_path / "state.db", backlog_end))
        assert proc.poll() is None, tail(log)
        watch = await asyncio.to_thread(
            subprocess.run,
            status(config, "--json", "--watch", "--interval", "1", "--count", "2"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert watch.returncode == 0, watch.stderr
        refreshes = [json.loads(line) for line in watch.stdout.splitlines()]
        assert len(refreshes) == 2, watch.stdout
        for [row] in refreshes:
            assert row["state"] == "streaming" and row["events_per_s"] > 0, refreshes
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0, tail(log)
    finally:
        proc.kill()


def past(state: Path, offset: int) -> bool:
    """Whether the stream's checkpoint is beyond ``offset`` (False before there is one)."""
    if not state.exists():
        return False  # sqlite3.connect would create it
    try:
        cp = checkpoint(state)
    except sqlite3.OperationalError:  # no table yet
        return False
    return cp is not None and int(cp[0]) > offset


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_systemd_status_shows_the_stored_checkpoint_before_the_first_event(
    sandbox_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STATUS= said `main: connecting, offset - (waiting for token ...)` of a stream with a
    checkpoint (`status` shows it): where it resumes is the stored one until it does an event."""
    gw = await sandbox_factory(backlog=5)
    newest = newest_offset(gw)
    async with running(make_settings(tmp_path, gw.url)):
        await wait_until(lambda: committed(tmp_path / "state.db", newest))
    # Started again, its token endpoint refusing: connecting, nothing done in this run.
    url = f"http://127.0.0.1:{refused_port()}"
    auth = {"client_id": "c", "client_secret": "client-secret-0001", "retry_max_s": 600.0}
    path = str(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a STATUS= every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    messages: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as r:
        r.bind(path)
        r.setblocking(False)

        def waiting() -> bool:
            while True:
                try:
                    messages.append(r.recv(4096).decode())
                except BlockingIOError:
                    # (a restart waits out the resubscribe gap first: "lockout ... retry in")
                    return any("waiting for token (" in m for m in messages)

        async with running(make_settings(tmp_path, url, auth=auth)):
            await wait_until(waiting)
    status = next(m for m in messages if "waiting for token (" in m)
    assert f"STATUS=main: connecting, offset {newest} (waiting for token (" in status, status
    assert messages[0] == "READY=1" and f"offset {newest}" in messages[1], messages


def test_sandbox_help_says_which_timestamps_are_the_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--fixed-timestamps ... (default: True)` read as if fixed ones were the default."""
    with pytest.raises(SystemExit):
        main(["sandbox", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    fixed = text[text.index("--fixed-timestamps every") :]
    assert "(default: True)" not in fixed[: fixed.index("exit status")], fixed
    assert text.count("(default: True)") == 0


def test_a_config_that_is_a_directory_is_named_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "config file /tmp not found"."""
    assert main(["check-config", "--config", str(tmp_path)]) == 78
    err = capsys.readouterr().err
    assert f"{tmp_path} is a directory" in err and str(tmp_path / "config.toml") in err, err


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_the_command_line_leaves_the_signal_handlers_as_it_found_them(
    tmp_path: Path, command: str
) -> None:
    """The command line holds SIGTERM, SIGINT and SIGHUP from its first step (a signal while
    the daemon starts is noted, not fatal); a caller in the same process gets its own back."""
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    before = [signal.getsignal(s) for s in signals]
    assert main([command, "--config", str(tmp_path / "none.toml")]) == 78
    assert [signal.getsignal(s) for s in signals] == before
