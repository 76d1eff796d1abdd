"""Running under systemd: sd_notify on a real datagram socket, and the unit's hardening."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import count_lines, toml_config, wait_until

from consumer.runtime import systemd
from consumer.sandbox import launcher

UNIT = Path(__file__).parents[2] / "deploy" / "systemd" / "opera-consumer.service"
NOTIFY_BUFFER_MAX = 4096  # systemd ignores a longer notification whole (PIPE_BUF)


def start_daemon(config: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "consumer", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def receiver(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.setblocking(False)
    return s


def test_notify_path_and_abstract_sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = str(tmp_path / "notify.sock")
    with receiver(path) as r:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.notify("READY=1", "STATUS=ok")
        assert r.recv(4096) == b"READY=1\nSTATUS=ok"
    name = f"opera-consumer-test-{os.getpid()}"
    with receiver("\0" + name) as r:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("WATCHDOG=1")
        assert r.recv(4096) == b"WATCHDOG=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd.notify("READY=1")  # not under systemd: a no-op


def test_a_long_status_is_cut_to_fit_a_notification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = str(tmp_path / "notify.sock")
    with receiver(path) as r:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.status("é" * 5000)  # two bytes each
        sent = r.recv(1 << 16).decode()  # whole characters only
    assert sent.startswith("STATUS=éé") and sent.endswith("é…")
    assert len(sent.encode()) <= len("STATUS=") + systemd.STATUS_MAX_BYTES


def test_watchdog_period(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_period() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_period() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert systemd.watchdog_period() is None


async def test_ready_watchdog_and_stopping_in_order(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=20)
    path = str(tmp_path / "notify.sock")
    env = {
        **os.environ,
        "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": "100000",  # WatchdogSec=0.1s: a ping every 50 ms
    }
    env.pop("WATCHDOG_PID", None)
    messages: list[str] = []
    with receiver(path) as r:

        def drain() -> None:
            while True:
                try:
                    messages.append(r.recv(4096).decode())
                except BlockingIOError:
                    return

        proc = start_daemon(toml_config(tmp_path, gw.url), env)
        try:
            await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 20)
            await wait_until(lambda: (drain(), sum("WATCHDOG=1" in m for m in messages) >= 3)[1])
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(60):
                while proc.poll() is None:
                    await asyncio.sleep(0.05)
            assert proc.returncode == 0
            drain()
        finally:
            proc.kill()
    assert messages[0] == "READY=1"  # alone: no status can make it too long for systemd
    assert messages[1].startswith("STATUS=main: ")
    assert any(m.startswith("STATUS=main: streaming, offset ") for m in messages)
    stopping = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
    assert sum("WATCHDOG=1" in m for m in messages[1:stopping]) >= 3  # ticks between the two
    assert all("READY=1" not in m for m in messages[1:])


async def test_every_notification_fits_systemds_buffer_with_many_streams(tmp_path: Path):
    """READY=1 and WATCHDOG=1 went in one datagram with every stream's STATUS= line, which
    systemd ignores whole past 4096 bytes: with 120 streams READY=1 was lost (a start
    timeout), and with about 30 waiting for a token endpoint that is down every watchdog ping
    (systemd killed a healthy daemon). The status says how many streams, and those that fit."""
    streams = 120
    url = f"http://127.0.0.1:{launcher.free_port()}"  # the token endpoint is down
    config = tmp_path / "config.toml"
    config.write_text(
        "\n".join(  # a chain each: one key's streams of one chain are one subscription
            launcher.stream_config(url, stream=f"property_{i:03d}", chain=f"P{i:03d}")
            for i in range(streams)
        )
        + f'[state]\npath = "{tmp_path / "state.db"}"\n'
        + f'[sink]\npath = "{tmp_path / "events.jsonl"}"\n[metrics]\nport = 0\n'
    )
    path = str(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    messages: list[bytes] = []
    with receiver(path) as r:

        def pinged_while_waiting() -> bool:
            while True:
                try:
                    messages.append(r.recv(1 << 16))  # whatever the size
                except BlockingIOError:
                    break
            waiting = [i for i, m in enumerate(messages) if b"waiting for token (" in m]
            return bool(waiting) and sum(b"WATCHDOG=1" in m for m in messages[waiting[0] :]) >= 3

        proc = start_daemon(config, env)
        try:
            await wait_until(lambda: pinged_while_waiting() or proc.poll() is not None, timeout=60)
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(60):
                while proc.poll() is None:
                    await asyncio.sleep(0.05)
            assert proc.returncode == 0
        finally:
            proc.kill()
    too_long = [m[:100] for m in messages if len(m) >= NOTIFY_BUFFER_MAX]
    assert not too_long, too_long
    assert messages[0] == b"READY=1"
    status = next(m.decode() for m in messages if b"waiting for token (" in m)
    assert status.startswith(f"STATUS={streams} streams: "), status
    assert re.search(r"; property_\d+: connecting, offset - \(waiting for token \(", status)
    assert re.search(r"; … and \d+ more$", status), status


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_the_unit_is_hardened():
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    line = next(x for x in out.splitlines() if "Overall exposure level" in x)
    exposure = float(line.split(":")[1].split()[0])
    assert exposure <= 2.0, line
