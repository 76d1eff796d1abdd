"""The daemon as a process (`python -m consumer run`) against the sandbox, publishing to a
real nats-server with JetStream (tests/nats_server.py): a backlog caught up, kill -9 between
the publishes and the checkpoint, the server going away mid-stream, wrong credentials.

Every check reads the stream back from the bus and compares it with the sandbox's ground
truth: each uniqueEventId exactly once, and each primaryKey's events in the gateway's order.
Waits are on positive conditions (the bus holds N messages, the checkpoint is the newest
offset, the daemon logged a failed write), each bounded.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from nats_server import (
    NatsServer,
    event_ids,
    order_by_key,
    servers,
)
from prometheus_client.parser import text_string_to_metric_families
from support import (
    checkpoint,
    committed,
    newest_offset,
    sink_failures,
    spawn_daemon,
    tail,
    toml_config,
    wait_exit,
)

from consumer.sandbox import SandboxGateway, launcher


@pytest.fixture
def nats_factory() -> Iterator[Callable[..., NatsServer]]:
    """``start(**options)``: a throwaway nats-server (tests/nats_server.py)."""
    yield from servers()


@pytest.fixture
def nats_server(nats_factory: Callable[..., NatsServer]) -> NatsServer:
    return nats_factory()


PASSWORD = "nats-e2e-Pw-51f0-secret"
WRONG = "nats-e2e-Wrong-9a3c-secret"


def nats_sink(server: NatsServer, **extra: str | float) -> str:
    lines = [
        "[sink]",
        'type = "nats"',
        f'servers = ["{server.url}"]',
        "timeout_s = 2.0",
        "duplicate_window_s = 3600.0",
    ]
    for key, value in extra.items():
        lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}")
    return "\n".join(lines) + "\n"


# Failed writes retried quickly (the behaviour is the same, only faster).
PIPELINE = "[pipeline]\nsink_retry_initial_s = 0.05\nsink_retry_max_s = 0.5\n"


async def poll(
    condition: Callable[[], Awaitable[bool]],
    proc: subprocess.Popen[bytes],
    log: Path,
    seconds: float = 90.0,
) -> None:
    """Until ``condition`` holds (bounded); fails at once if the daemon died meanwhile."""
    async with asyncio.timeout(seconds):
        while not await condition():
            assert proc.poll() is None, tail(log)
            await asyncio.sleep(0.05)


async def stop(proc: subprocess.Popen[bytes], sig: int) -> int:
    proc.send_signal(sig)
    return await wait_exit(proc)


def expected_order(gw: SandboxGateway) -> dict[str, list[str]]:
    """primaryKey -> its uniqueEventIds in the gateway's log order."""
    keys: dict[str, list[str]] = {}
    for uid, _offset, key in gw.event_keys("DEMO"):
        keys.setdefault(key or uid, []).append(uid)
    return keys


async def assert_exactly_once(server: NatsServer, gw: SandboxGateway) -> None:
    messages = await server.stream_messages()
    truth = [uid for uid, _, _ in gw.event_keys("DEMO")]
    ids = event_ids(messages)
    twice = [uid for uid, n in Counter(ids).items() if n > 1]
    assert not twice, f"{len(twice)} events twice on the bus, e.g. {twice[:3]}"
    assert sorted(ids) == sorted(truth), f"missing: {sorted(set(truth) - set(ids))[:5]}"
    assert order_by_key(messages) == expected_order(gw)  # each resource's events in order
    assert all(m.subject and m.subject.startswith("opera.DEMO.") for m in messages)
    assert all(
        m.headers and m.headers["Nats-Msg-Id"] == uid for m, uid in zip(messages, ids, strict=True)
    )


def no_dead_letters(state: Path) -> bool:
    with sqlite3.connect(state) as db:
        return db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0


async def metric(port: int, name: str) -> float:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no {name} in /metrics")


async def test_catch_up_of_a_backlog_lands_every_event_once(
    sandbox_factory, nats_server: NatsServer, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=600)
    total, newest, state = len(gw.events("DEMO")), newest_offset(gw), tmp_path / "state.db"
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(toml_config(tmp_path, gw.url, sink=nats_sink(nats_server)), log)
    try:

        async def done() -> bool:
            return committed(state, newest) and await nats_server.message_count() >= total

        await poll(done, proc, log)
    finally:
        assert await stop(proc, signal.SIGTERM) == 0, tail(log)
    await assert_exactly_once(nats_server, gw)
    info = await nats_server.stream_info()
    assert info.config.duplicate_window == 3600.0  # created by the daemon, with the window
    assert no_dead_letters(state)


async def test_kill_between_publish_and_checkpoint_then_restart(
    sandbox_factory, nats_server: NatsServer, tmp_path: Path
) -> None:
    backlog = 400
    gw = await sandbox_factory(backlog=backlog)
    truth = [uid for uid, _, _ in gw.event_keys("DEMO")]
    state, log = tmp_path / "state.db", tmp_path / "daemon.log"
    sink = nats_sink(nats_server)

    # First run: a commit interval of a minute, so the bus fills while the checkpoint does not
    # move; then SIGKILL in that gap.
    cfg = toml_config(tmp_path, gw.url, sink=sink, commit_interval_ms=60_000)
    proc = spawn_daemon(cfg, log)

    async def half_published() -> bool:
        return await nats_server.message_count() >= backlog // 2

    await poll(half_published, proc, log)
    assert await stop(proc, signal.SIGKILL) == -signal.SIGKILL
    published = await nats_server.message_count()
    cp = checkpoint(state)
    assert cp is not None and cp[1] == truth[0]  # only the anchor: the gap is real
    assert published >= backlog // 2

    # Restart with normal commits: the stream replays from the anchor; JetStream drops the
    # replayed messages as duplicates (Nats-Msg-Id), and the rest are published.
    cfg = toml_config(tmp_path, gw.url, sink=sink, commit_interval_ms=20)
    port = launcher.free_port()
    cfg.write_text(cfg.read_text().replace("[metrics]\nport = 0", f"[metrics]\nport = {port}"))
    proc = spawn_daemon(cfg, log)
    newest = newest_offset(gw)
    try:

        async def caught_up() -> bool:
            return committed(state, newest) and await nats_server.message_count() >= backlog

        await poll(caught_up, proc, log)
        # The replay really went to the bus and was dropped there, not skipped by the daemon.
        duplicates = await metric(port, "opera_consumer_nats_duplicates_total")
        fresh = await metric(port, "opera_consumer_nats_published_total")
    finally:
        assert await stop(proc, signal.SIGTERM) == 0, tail(log)
    assert duplicates >= published - 1  # every message of the first run (less the anchor's)
    assert fresh <= len(truth) - published
    await assert_exactly_once(nats_server, gw)
    assert no_dead_letters(state)


async def test_nats_outage_mid_stream_loses_nothing_and_doubles_nothing(
    sandbox_factory, nats_server: NatsServer, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=300)
    state, log = tmp_path / "state.db", tmp_path / "daemon.log"
    cfg = toml_config(tmp_path, gw.url, sink=nats_sink(nats_server), extra=PIPELINE)
    proc = spawn_daemon(cfg, log)
    try:

        async def some_published() -> bool:
            return await nats_server.message_count() >= 50

        await poll(some_published, proc, log)
        nats_server.stop()  # mid-stream: publishes may be in flight
        gw.append("DEMO", 200)  # and events keep coming while the bus is down

        async def write_failed() -> bool:
            return bool(sink_failures(log))

        await poll(write_failed, proc, log)
        nats_server.start()  # the same server back: same port, same store
        newest, total = newest_offset(gw), len(gw.events("DEMO"))

        async def caught_up() -> bool:
            return committed(state, newest) and await nats_server.message_count() >= total

        await poll(caught_up, proc, log)
    finally:
        assert await stop(proc, signal.SIGTERM) == 0, tail(log)
    failure = sink_failures(log)[0]
    assert "nats sink" in failure["error"]
    await assert_exactly_once(nats_server, gw)
    assert no_dead_letters(state)


async def test_wrong_credentials_exit_78_with_a_clear_message(
    sandbox_factory, nats_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    server = nats_factory(users={"opera": PASSWORD})
    gw = await sandbox_factory(backlog=20)
    log = tmp_path / "daemon.log"
    sink = nats_sink(server, user="opera", password=WRONG)
    proc = spawn_daemon(toml_config(tmp_path, gw.url, sink=sink), log)
    code = await wait_exit(proc, 60)
    text = log.read_text(errors="replace")
    assert code == 78, tail(log)
    assert "refused the credentials" in text and server.url in text, tail(log)
    assert "sink.password" in text
    assert WRONG not in text and PASSWORD not in text
    assert await server.message_count() == 0
