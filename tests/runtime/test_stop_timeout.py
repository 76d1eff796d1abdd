"""A stop longer than systemd's TimeoutStopSec= (50 s in the unit) asks for the time it is
allowed (EXTEND_TIMEOUT_USEC), bounded by the settings: without it systemd killed a daemon
still draining within its drain_timeout_s, and reported the stop failed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pysink
import pytest
from receiver import Received, Receiver, Reply
from support import stream_config, toml_config, wait_until

from consumer.config import Settings
from consumer.config.loading import load_settings
from consumer.config.settings import DOCUMENTED_STOP_S, STOP_SLACK_S, StopStep, stop_budget
from consumer.runtime.daemon import Daemon

DRAIN_S = 40.0  # past the unit's 50 s with the rest of the stop, never waited out here


def webhook_config(tmp_path: Path, url: str, hook: str, drain_s: float) -> Path:
    return toml_config(
        tmp_path,
        url,
        f"[pipeline]\ndrain_timeout_s = {drain_s}\n",
        sink=f'[sink]\ntype = "webhook"\nurl = "{hook}"\ntimeout_s = 60\n',
    )


def start(config: Path, log: Path, notify: str | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "consumer", "run", "--config", str(config)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def usec(settings: Settings, step: StopStep) -> str:
    return f"EXTEND_TIMEOUT_USEC={int((stop_budget(settings).left(step) + STOP_SLACK_S) * 1e6)}"


async def test_a_long_drain_extends_the_stop_timeout_within_the_settings(
    sandbox_factory, tmp_path: Path
):
    gw = await sandbox_factory(backlog=20)
    entered, release = threading.Event(), threading.Event()

    def held(_: Received) -> Reply:  # a receiver that does not answer until released
        entered.set()
        release.wait(60)
        return Reply()

    path = str(tmp_path / "notify.sock")
    log = tmp_path / "daemon.log"
    messages: list[str] = []
    with (
        Receiver(held) as rx,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as r,
    ):
        r.bind(path)
        r.setblocking(False)

        def received() -> list[str]:
            while True:
                try:
                    messages.append(r.recv(4096).decode())
                except BlockingIOError:
                    return messages

        config = webhook_config(tmp_path, gw.url, rx.url, DRAIN_S)
        settings = load_settings(config)
        budget = stop_budget(settings)
        assert budget.total_s > 50  # what the unit's TimeoutStopSec= alone would kill
        proc = start(config, log, path)
        try:
            await wait_until(entered.is_set)  # a POST held: the queue cannot drain
            await wait_until(lambda: "READY=1" in received())
            proc.send_signal(signal.SIGTERM)
            # The drain is held: the extension covering it comes while the daemon waits.
            await wait_until(lambda: usec(settings, "drain_s") in received())
            assert proc.poll() is None and not release.is_set()
            release.set()
            async with asyncio.timeout(60):
                while proc.poll() is None:
                    await asyncio.sleep(0.05)
            assert proc.returncode == 0, log.read_text()[-3000:]
            received()
        finally:
            release.set()
            proc.kill()
            proc.wait()
    stopping = messages.index("STOPPING=1")
    extensions = [m for m in messages if m.startswith("EXTEND_TIMEOUT_USEC=")]
    # After STOPPING=1 (systemd takes it for the stop's timeout), each the rest of the stop
    # from a step on, as the settings bound it: the whole stop first, never more.
    steps: tuple[StopStep, ...] = ("streams_s", "drain_s", "commit_s", "close_s")
    assert extensions == [usec(settings, s) for s in steps]
    assert messages.index(extensions[0]) > stopping
    most = int((budget.total_s + STOP_SLACK_S) * 1e6)
    assert extensions[0] == f"EXTEND_TIMEOUT_USEC={most}"
    values = [int(m.split("=")[1]) for m in extensions]
    assert values == sorted(values, reverse=True) and values[-1] > 0
    assert "a stop may take longer" not in log.read_text()  # systemd: extended instead


async def test_outside_systemd_a_stop_past_50_s_is_warned_at_start(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=0)
    log = tmp_path / "daemon.log"
    config = webhook_config(tmp_path, gw.url, "http://127.0.0.1:9/hook", 60.0)
    most = round(stop_budget(load_settings(config)).total_s + STOP_SLACK_S)
    proc = start(config, log, None)
    try:
        await wait_until(lambda: "opera-consumer running" in log.read_text(), timeout=60)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            while proc.poll() is None:
                await asyncio.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert "a stop may take longer than a 50 s grace" in text, text[-3000:]
    assert f'"stop_within_s": {most}' in text


def test_the_stop_budget_adds_every_step_once() -> None:
    """Single: close, drain, final commit (44 s by default, and STOP_SLACK_S: within the
    documented 50 s). A
    fleet member also waits for handovers under way and releases its leases."""
    default = {"complete_timeout_s": 10.0}  # support's is scaled down
    streams = {"main": stream_config("https://x.example", connection=default)}
    single = Settings(
        streams=streams,  # type: ignore[arg-type]
    )
    b = stop_budget(single)
    assert (b.streams_s, b.drain_s, b.handovers_s, b.commit_s, b.leave_s) == (12, 20, 0, 12, 0)
    assert b.total_s == 44 and b.left("commit_s") == 12
    assert b.total_s + STOP_SLACK_S <= DOCUMENTED_STOP_S
    fleet = Settings(
        streams=streams,  # type: ignore[arg-type]
        fleet={"enabled": True},  # type: ignore[arg-type]
        state={"backend": "postgres", "dsn": "postgresql://u@127.0.0.1/db"},  # type: ignore[arg-type]
        sink={"type": "webhook", "url": "https://hook.example/"},  # type: ignore[arg-type]
    )
    b = stop_budget(fleet)
    assert (b.handovers_s, b.leave_s) == (44, 10)  # fleet_handover_s; release and leave
    assert b.total_s == 12 + 20 + 44 + 12 + 10 and b.left("handovers_s") == 66


@pytest.mark.usefixtures("fresh_pysink", "contained_logging")
async def test_a_fleet_member_asks_for_the_handovers_and_its_leases_too(
    sandbox_factory, postgres_dsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped while it hands a stream over (as tests/runtime/test_fleet_shutdown.py): the
    wait for that handover and the leases' release are asked for, bounded by the settings."""
    gw = await sandbox_factory(backlog=0, complete_close_delay_s=60.0)
    # No takeover jitter (random, up to 2 s in fleet mode) before the first subscribe. The
    # shutdown's drain (0.5 s) ends while the handover still waits for its session (1 s).
    connection = {"complete_timeout_s": 1.0, "takeover_jitter_s": 0.0}
    settings = Settings(
        streams={"a": stream_config(gw.url, connection=connection)},  # type: ignore[dict-item]
        state={"backend": "postgres", "dsn": postgres_dsn, "schema": f"t_{uuid.uuid4().hex[:16]}"},  # type: ignore[arg-type]
        sink={"type": "python", "target": "pysink:handle"},  # type: ignore[arg-type]
        pipeline={"workers": 1, "drain_timeout_s": 0.5},  # type: ignore[arg-type]
        fleet={"enabled": True, "member": "m1", "lease_ttl_s": 20.0, "renew_interval_s": 0.2},  # type: ignore[arg-type]
        metrics={"port": 0},  # type: ignore[arg-type]
    )
    path = str(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    messages: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as r:
        r.bind(path)
        r.setblocking(False)
        pysink.STUCK_STREAMS.add("a")  # its handover takes the drain time
        daemon = await Daemon.create(settings)
        task = asyncio.create_task(daemon.run())
        await wait_until(lambda: "a" in daemon.runners)
        await wait_until(lambda: daemon.runners["a"].state.value == "streaming")
        gw.append("DEMO", 3)
        await wait_until(lambda: "a" in daemon.pipelines and daemon.pipelines["a"].in_flight == 3)
        assert daemon.fleet is not None
        daemon.fleet._move("a", lost=False)  # what a tick does for another member's share
        await wait_until(lambda: daemon.runners["a"].state.value == "completing")
        daemon.request_stop()
        async with asyncio.timeout(60):
            assert await task == 0
        while True:
            try:
                messages.append(r.recv(4096).decode())
            except BlockingIOError:
                break
    budget = stop_budget(settings)
    assert budget.handovers_s > 0 and budget.leave_s > 0
    extensions = [m for m in messages if m.startswith("EXTEND_TIMEOUT_USEC=")]
    steps: tuple[StopStep, ...] = ("streams_s", "drain_s", "handovers_s", "commit_s", "close_s")
    assert extensions == [usec(settings, s) for s in steps]
    assert messages.index(extensions[0]) > messages.index("STOPPING=1")
