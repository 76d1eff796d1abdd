"""SIGTERM or SIGHUP during `dlq replay` killed it by the signal's default action (only ^C was
caught): what it had delivered stayed in the DLQ unrecorded, and the next replay handed it to
the sink again. A replay run under systemd-run is stopped by SIGTERM, one over ssh gets SIGHUP
when the session drops; README: "what was delivered is recorded however the replay ends". Now
either stops it as ^C does: recorded, exit 130, its message."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import dead_letter, wait_until

from consumer.cli import main
from consumer.config import StateSettings
from consumer.core.records import CommitBatch
from consumer.errors import ExitCode
from consumer.state import open_store

REPO = Path(__file__).resolve().parents[2]

# A python sink: appends each delivered uniqueEventId, and blocks on uid-3 the first time (a
# slow far end) after saying so.
HANDLERS = """
import asyncio
from pathlib import Path

OUT = Path(__file__).with_name("delivered.txt")
BLOCKED = Path(__file__).with_name("blocked")


async def handle(stream, events):
    for ev in events:
        if ev.unique_event_id == "uid-3" and not BLOCKED.exists():
            BLOCKED.write_text("x")
            await asyncio.sleep(600)
    with OUT.open("a") as f:
        f.writelines(ev.unique_event_id + "\\n" for ev in events)
"""


def _config(tmp_path: Path) -> Path:
    (tmp_path / "slowsink.py").write_text(HANDLERS)
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[streams.main]
gateway_url = "https://gw.example.com"
chain_code = "CHAIN1"
app_key = "app-key-0001"

[streams.main.auth]
client_id = "cid"
client_secret = "client-secret-0001"
enterprise_id = "ENT1"

[state]
path = "{tmp_path / "state.db"}"

[sink]
type = "python"
target = "slowsink:handle"
"""
    )
    return config


def _env() -> dict[str, str]:
    keep = {
        k: v
        for k, v in os.environ.items()
        if k != "CREDENTIALS_DIRECTORY" and not k.upper().startswith("OPERA_CONSUMER_")
    }
    return {**keep, "PYTHONPATH": str(REPO)}  # this tree's code, whatever the cwd


def _spawn(command: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command, env=_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


async def _left(state: StateSettings) -> list[str]:
    store = await open_store(state)
    try:
        return [str(r.unique_event_id) for r in await store.dead_letters()]
    finally:
        await store.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_a_signal_during_a_replay_records_what_was_delivered(
    tmp_path: Path, sig: signal.Signals
) -> None:
    config = _config(tmp_path)
    state = StateSettings(path=tmp_path / "state.db")
    store = await open_store(state)
    try:
        await store.commit(CommitBatch(dead_letters=[dead_letter(i) for i in range(1, 5)]))
    finally:
        await store.close()
    command = [sys.executable, "-m", "consumer", "dlq", "replay", "--all", "--config", str(config)]
    proc = _spawn(command, tmp_path)
    try:
        # uid-1 and uid-2 delivered, uid-3 under way
        await wait_until(
            lambda: (tmp_path / "blocked").exists() or proc.poll() is not None, timeout=60
        )
        assert proc.poll() is None, proc.communicate()
        assert (tmp_path / "delivered.txt").read_text().split() == ["uid-1", "uid-2"]
        proc.send_signal(sig)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == ExitCode.INTERRUPTED, (proc.returncode, err[-2000:])
    assert f"interrupted by {sig.name}" in err and "Traceback" not in err, err[-2000:]
    assert await _left(state) == ["uid-3", "uid-4"]
    # The operator replays again: the sink gets each event once in all.
    again = await asyncio.to_thread(
        subprocess.run,
        command,
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == ExitCode.OK, again.stderr[-2000:]
    got = (tmp_path / "delivered.txt").read_text().split()
    assert got == ["uid-1", "uid-2", "uid-3", "uid-4"], got
    assert await _left(state) == []


def test_a_replay_in_process_leaves_the_signal_handlers_as_it_found_them(tmp_path: Path) -> None:
    """The replay takes SIGTERM and SIGHUP over while it runs; a caller in the same process
    gets its own handlers back."""
    config = _config(tmp_path)
    asyncio.run(_left(StateSettings(path=tmp_path / "state.db")))  # the store, empty
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    before = [signal.getsignal(s) for s in signals]
    assert main(["dlq", "replay", "--all", "--config", str(config)]) == ExitCode.OK
    assert [signal.getsignal(s) for s in signals] == before


# A handler that does not let go when the replay is stopped (it swallows the cancellation).
STUBBORN = """
import asyncio
from pathlib import Path

HERE = Path(__file__).parent


async def handle(stream, events):
    (HERE / "blocked").write_text("x")
    try:
        await asyncio.sleep(600)
    except asyncio.CancelledError:
        (HERE / "asked").write_text("x")
        await asyncio.sleep(600)
"""


async def test_a_second_signal_ends_a_replay_that_does_not_stop_at_once(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (tmp_path / "slowsink.py").write_text(STUBBORN)
    state = StateSettings(path=tmp_path / "state.db")
    store = await open_store(state)
    try:
        await store.commit(CommitBatch(dead_letters=[dead_letter(1)]))
    finally:
        await store.close()
    proc = _spawn(
        [sys.executable, "-m", "consumer", "dlq", "replay", "--all", "--config", str(config)],
        tmp_path,
    )
    try:
        await wait_until(
            lambda: (tmp_path / "blocked").exists() or proc.poll() is not None, timeout=60
        )
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: (tmp_path / "asked").exists() or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == ExitCode.INTERRUPTED, (proc.returncode, err[-2000:])
    assert "a second signal: exiting now" in err, err[-2000:]
    assert await _left(state) == ["uid-1"]
