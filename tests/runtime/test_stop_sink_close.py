"""Closing a NATS sink's connection to a frozen server (SIGSTOP: the socket open, nothing read,
its buffers full of the stopped workers' publishes) takes the sink's timeout_s, then the
connection is aborted. The stop told systemd nothing of it: the last EXTEND_TIMEOUT_USEC
covered the final commit and a 5 s slack, and systemd would have killed the daemon in the
middle of its close (and reported the stop failed). Now the stop budget counts the close
(``close_s``), and the daemon asks for it before closing.

The daemon as a process against the sandbox and a real nats-server, under a notify socket of
the test's; what it sends is stamped as it arrives, and each extension must cover the time
until the next one, the last one the time until the exit. (The workers' publishes swallow
their first cancellation, nats-py's while its buffer is full: the pipeline's second one, within
its grace, ends them; the stop is a clean one, exit 0.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nats_server import NatsServer
from support import caught, committed, newest_offset, tail, toml_config, wait_until
from test_store_wait import Notifications

from consumer.config.loading import load_settings
from consumer.config.settings import MAX_STOP_STEP_S, STOP_SLACK_S, Settings, StopStep, stop_budget

# The sink's timeout_s: what its close waits on the frozen server. Longer than what the
# final commit's extension leaves (its 12 s and the 5 s slack): systemd would kill it there.
CLOSE_S = 22.0
BIG_EVENTS = 40  # of ~900 kB each (below the server's 1 MB max_payload): the buffers fill
STEPS: tuple[StopStep, ...] = ("streams_s", "drain_s", "commit_s", "close_s")


class Stamped(Notifications):
    """The notifications, each with when the test read it (within a poll of its sending)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.at: list[float] = []

    def poll(self) -> list[str]:
        self.has("")  # reads whatever came
        now = time.monotonic()
        self.at += [now] * (len(self.got) - len(self.at))
        return self.got


def unsent_bytes(port: int) -> int:
    """What the sockets connected to ``port`` on loopback hold unacknowledged (tx_queue):
    the receiver's window is full, the sender's kernel buffer filling."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].rsplit(":", 1)[1], 16) == port:
            total += int(fields[4].split(":")[0], 16)
    return total


def big_event(offset: str, n: int) -> str:
    return json.dumps(
        {
            "metadata": {"offset": offset, "uniqueEventId": f"big-{n}"},
            "moduleName": "Reservation",
            "eventName": "UPDATE_RESERVATION",
            "primaryKey": f"K-{n}",  # each its own resource: all published at once
            "hotelId": "HOTEL1",
            "timestamp": "28-APR-24 06.18.59.028027 AM",
            "detail": [{"elementName": "comment", "newValue": "v" * 900_000}],
        }
    )


def nats_config(tmp_path: Path, url: str, server: NatsServer) -> Path:
    sink = (
        f'[sink]\ntype = "nats"\nservers = ["{server.url}"]\ntimeout_s = {CLOSE_S}\n'
        "duplicate_window_s = 3600.0\n"
    )
    # A worker per resource, about: each waits on its one publish, so the rest go out too.
    pipeline = f"[pipeline]\nworkers = 64\ndrain_timeout_s = 0.5\nqueue_max_bytes = {64 << 20}\n"
    return toml_config(tmp_path, url, pipeline, sink=sink)


def start(config: Path, log: Path, notify: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-OO", "-m", "consumer", "run", "--config", str(config)],
            env={**env, "NOTIFY_SOCKET": notify, "PYTHONPATH": str(Path(__file__).parents[2])},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def usec(settings: Settings, step: StopStep) -> int:
    return int((stop_budget(settings).left(step) + STOP_SLACK_S) * 1e6)


def test_the_budget_counts_a_bus_sinks_close(tmp_path: Path) -> None:
    base = toml_config(tmp_path, "http://127.0.0.1:9")
    assert stop_budget(load_settings(base)).close_s == 0  # jsonl: nothing to wait on
    for kind, extra in (("nats", 'servers = ["nats://127.0.0.1:4222"]'), ("redis", "")):
        for timeout_s, close_s in ((7.5, 7.5), (1e9, MAX_STOP_STEP_S)):
            sink = f'[sink]\ntype = "{kind}"\n{extra}\ntimeout_s = {timeout_s}\n'
            config = toml_config(tmp_path, "http://127.0.0.1:9", sink=sink)
            budget = stop_budget(load_settings(config))
            assert budget.close_s == close_s
            assert budget.left("close_s") == close_s and budget.total_s >= close_s


async def test_closing_a_sink_on_a_frozen_server_is_asked_of_systemd_first(
    sandbox_factory, nats_server: NatsServer, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=5)
    config = nats_config(tmp_path, gw.url, nats_server)
    settings = load_settings(config)
    budget = stop_budget(settings)
    assert budget.close_s == CLOSE_S
    state, log = tmp_path / "state.db", tmp_path / "daemon.log"
    notify = Stamped(tmp_path / "notify.sock")
    proc = start(config, log, notify.path)
    try:
        # Running, its stream created on the server and the backlog published.
        offset = newest_offset(gw)
        await wait_until(
            lambda: committed(state, offset) and caught(proc.pid, signal.SIGTERM),
            timeout=30,
        )
        await wait_until(lambda: "READY=1" in notify.poll())
        with nats_server.frozen():
            for n in range(BIG_EVENTS):
                gw.inject_event("DEMO", big_event(offset, n))
            # The workers' publishes fill the frozen server's window and our socket's buffer.
            await wait_until(lambda: unsent_bytes(nats_server.port) > 1 << 20, timeout=30)
            assert proc.poll() is None, tail(log)
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            async with asyncio.timeout(budget.total_s + STOP_SLACK_S + 10):
                while proc.poll() is None:
                    notify.poll()
                    await asyncio.sleep(0.01)
            ended = time.monotonic()
            notify.poll()
    finally:
        proc.kill()
        proc.wait()
        notify.close()
    assert proc.returncode == 0, tail(log)
    extensions = [
        (at, int(m.split("=")[1]) / 1e6)
        for at, m in zip(notify.at, notify.got, strict=True)
        if m.startswith("EXTEND_TIMEOUT_USEC=")
    ]
    # Each extension covers the stop until the next one, the last one until the exit: what
    # systemd waits for before its kill.
    for (at, seconds), until in zip(
        extensions, [at for at, _ in extensions[1:]] + [ended], strict=True
    ):
        assert until - at <= seconds, (until - at, seconds, tail(log))
    close_at = notify.at[notify.got.index(f"EXTEND_TIMEOUT_USEC={usec(settings, 'close_s')}")]
    assert ended - close_at >= CLOSE_S - 1.0, tail(log)  # the close did wait on the server
    assert ended - sent <= budget.total_s + STOP_SLACK_S
    assert [m for m in notify.got if m.startswith("EXTEND_TIMEOUT_USEC=")] == [
        f"EXTEND_TIMEOUT_USEC={usec(settings, step)}" for step in STEPS
    ]
