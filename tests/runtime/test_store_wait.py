"""The PostgreSQL state store unreachable at start (still booting with the host): ``run`` exited
1 at once ("taking the lease: cannot reach the server"), and systemd's start limit left the
unit failed for good after some 30 s. Now the start waits it out in-process, saying so in the
log, systemd's STATUS= and /readyz, and goes on when the server answers; a signal ends the wait;
refused credentials still end the start at once.

A real PostgreSQL server (tests/pg.py) of the test's own, on a port chosen before it starts;
the daemon as a process against the sandbox, under a notify socket of the test's."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pg import PostgresServer, find_bindir
from server_process import free_port
from support import (
    count_lines,
    log_records,
    spawn_daemon,
    tail,
    toml_config,
    wait_exit,
    wait_until,
)

from consumer.config import load_settings
from consumer.errors import ExitCode
from consumer.runtime import store_wait
from consumer.runtime.daemon import Daemon
from consumer.state import lease

RETRYING = "state store unreachable at start; retrying"
WAITING = "waiting for the state store"


@pytest.fixture
def stopped_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster made but not started, its port chosen (nobody listens there)."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server not installed: apt-get install postgresql")
    server = PostgresServer(bindir)
    try:
        server.init()
        server.port = free_port()
        yield server
    finally:
        server.remove()


def postgres_config(tmp_path: Path, url: str, dsn: str, metrics_port: int) -> Path:
    config = toml_config(tmp_path, url)
    text = config.read_text().replace(
        f'path = "{tmp_path / "state.db"}"',
        f'backend = "postgres"\ndsn = "{dsn}"\nschema = "waited"\npath = "{tmp_path / "state.db"}"',
    )
    text = text.replace("commit_max_events = 500\n", "")
    config.write_text(text.replace("[metrics]\nport = 0", f"[metrics]\nport = {metrics_port}"))
    return config


def start(config: Path, log: Path, notify: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "consumer", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": notify},
        )


class Notifications:
    """What the daemon sends to $NOTIFY_SOCKET, gathered as it comes."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.setblocking(False)
        self.got: list[str] = []

    def has(self, text: str) -> bool:
        while True:
            try:
                self.got.append(self._sock.recv(65536).decode())
            except BlockingIOError:
                break
        return any(text in message for message in self.got)

    def close(self) -> None:
        self._sock.close()


async def readyz(port: int) -> tuple[int, dict[str, Any]] | None:
    """/readyz's status and body, or None while nothing listens."""
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/readyz") as r,
        ):
            return r.status, await r.json()
    except aiohttp.ClientError:
        return None


async def test_the_daemon_waits_for_postgres_and_goes_on_when_it_answers(
    sandbox_factory: Any, tmp_path: Path, stopped_server: PostgresServer
) -> None:
    gw = await sandbox_factory(backlog=20)
    metrics_port = free_port()
    # The "postgres" database: there from the cluster's start, nothing to create meanwhile.
    config = postgres_config(tmp_path, gw.url, stopped_server.dsn("postgres"), metrics_port)
    log = tmp_path / "daemon.log"
    notify = Notifications(tmp_path / "notify.sock")
    proc = start(config, log, notify.path)
    try:
        await wait_until(lambda: len(log_records(log, RETRYING)) >= 2, timeout=60)
        assert proc.poll() is None, tail(log)
        first = log_records(log, RETRYING)[0]
        assert "cannot reach the server" in first["error"]
        assert stopped_server.password not in log.read_text()  # the DSN's secret: never
        await wait_until(lambda: notify.has(f"STATUS={WAITING}"), timeout=60)
        assert notify.has("EXTEND_TIMEOUT_USEC=")  # the wait is no start timeout
        assert not notify.has("READY=1")

        seen: dict[str, Any] = {}

        async def waiting_in_readyz() -> bool:
            answer = await readyz(metrics_port)
            if answer is None:  # between listeners: an attempt is under way
                return False
            seen["status"], seen["body"] = answer
            return True

        async with asyncio.timeout(60):
            while not await waiting_in_readyz():
                await asyncio.sleep(0.05)
        assert seen["status"] == 503, seen
        main = seen["body"]["streams"]["main"]
        assert main["state"] == "starting" and WAITING in main["waiting"], seen

        await asyncio.to_thread(stopped_server.start)
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 20, timeout=90)
        await wait_until(lambda: notify.has("READY=1"), timeout=30)
        answer = await readyz(metrics_port)
        assert answer is not None and answer[0] == 200, answer
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = await wait_exit(proc)
        notify.close()
    assert code == ExitCode.OK, tail(log)


async def test_a_signal_ends_the_wait(
    sandbox_factory: Any, tmp_path: Path, stopped_server: PostgresServer
) -> None:
    gw = await sandbox_factory(backlog=1)
    config = postgres_config(tmp_path, gw.url, stopped_server.dsn("postgres"), free_port())
    log = tmp_path / "daemon.log"
    notify = Notifications(tmp_path / "notify.sock")
    proc = start(config, log, notify.path)
    try:
        await wait_until(lambda: len(log_records(log, RETRYING)) >= 1, timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == ExitCode.OK, tail(log)
        assert not notify.has("READY=1")
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    assert gw.stats.connections == 0


async def test_refused_credentials_still_end_the_start_at_once(
    sandbox_factory: Any, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    gw = await sandbox_factory(backlog=1)
    dsn = postgres_server.dsn(password="not-the-password-9")
    config = postgres_config(tmp_path, gw.url, dsn, free_port())
    log = tmp_path / "daemon.log"
    notify = Notifications(tmp_path / "notify.sock")
    proc = start(config, log, notify.path)
    try:
        assert await wait_exit(proc) == ExitCode.CONFIG, tail(log)
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    assert log_records(log, RETRYING) == []
    assert "refused our credentials" in log.read_text()


@pytest.mark.parametrize("role", ["dlq-replay", "offset", "sink-adopt"])
async def test_a_daemon_started_during_an_operators_command_waits_for_it(
    sandbox_factory: Any, tmp_path: Path, role: str
) -> None:
    """An operator's `dlq replay`, `offset set` or `sink adopt` holds the store for its run: a
    daemon (re)started meanwhile used to exit 78, which systemd does not restart
    (RestartPreventExitStatus): the stream stayed down after the command let go."""
    gw = await sandbox_factory(backlog=5)
    config = toml_config(tmp_path, gw.url)
    settings = load_settings(config)
    log = tmp_path / "daemon.log"
    held = await lease.acquire(settings.state, sorted(settings.streams), role=role)
    released = False
    proc = spawn_daemon(config, log)
    try:
        await wait_until(
            lambda: len(log_records(log, RETRYING)) >= 1 or proc.poll() is not None, timeout=60
        )
        assert proc.poll() is None, tail(log)
        await held.release()
        released = True
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 5, timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == ExitCode.OK, tail(log)
    finally:
        if not released:
            await held.release()
        if proc.poll() is None:
            proc.kill()


async def test_a_stop_while_the_sink_opens_cancels_the_open_and_closes_what_it_opened(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """A signal during Daemon.create (a PostgreSQL sink whose server never answers) was acted
    on only once the open failed, after the sink's connect timeout, as the sink's failure
    (exit 1). Now it cancels the start at once: Stopped, the sink's connection closed, the
    store's lease released, no task left."""
    gw = await sandbox_factory(backlog=1)
    closed = asyncio.Event()
    accepted = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        while await reader.read(65536):  # the startup packet, never answered; then EOF
            pass
        closed.set()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = (
        f'[sink]\ntype = "postgres"\ndsn = "postgresql://u:pw-0001@127.0.0.1:{port}/db"\n'
        "timeout_s = 600"
    )
    settings = load_settings(toml_config(tmp_path, gw.url, sink=sink))
    stopping = asyncio.Event()
    before = asyncio.all_tasks()
    try:
        started = asyncio.ensure_future(
            store_wait.when_reachable(settings, lambda: Daemon.create(settings), stopping)
        )
        async with asyncio.timeout(30):
            await asyncio.wait(
                [started, asyncio.ensure_future(accepted.wait())],
                return_when=asyncio.FIRST_COMPLETED,
            )
        assert not started.done(), started.result()
        stopping.set()
        async with asyncio.timeout(30):  # the old code: the sink's 600 s
            with pytest.raises(store_wait.Stopped):
                await started
            await closed.wait()
    finally:
        server.close()
        await server.wait_closed()
    left = [
        t
        for t in asyncio.all_tasks() - before - {asyncio.current_task()}
        if not t.done() and getattr(t.get_coro(), "__name__", "") != "hold"  # the server's
    ]
    assert not left, left
    # the store's lease is free: a daemon could start now
    held = await lease.acquire(settings.state, settings.streams, outside_fleet=True)
    await held.release()
