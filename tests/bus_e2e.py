"""What the bus end-to-end tests (tests/e2e/test_nats_e2e.py, tests/e2e/test_redis_e2e.py)
share: the daemon as a process against the sandbox, publishing to a real server, in the same
four scenarios (a backlog caught up, kill -9 between the writes and the checkpoint, the server
going away mid-stream, wrong credentials), and the ground-truth checks of what landed.

Each scenario is a function given the sink's configuration (:func:`sink_section`) and
``count``, how many messages the bus holds now (0 while the stream does not exist or the
server is down); the bus-specific checks stay in the test modules. Waits are on positive
conditions, each bounded; the daemon's log is ``tmp_path/daemon.log``, its state
``tmp_path/state.db``.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx
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

Count = Callable[[], Awaitable[int]]

# Failed writes retried quickly (the behaviour is the same, only faster).
PIPELINE = "[pipeline]\nsink_retry_initial_s = 0.05\nsink_retry_max_s = 0.5\n"


class Restartable(Protocol):
    def stop(self) -> None: ...

    def start(self) -> None: ...


def sink_section(kind: str, *lines: str, **extra: str | float) -> str:
    """The ``[sink]`` table: ``type = kind``, the ``lines`` as they are, then each of
    ``extra`` as ``key = value`` (a string quoted)."""
    body = ["[sink]", f'type = "{kind}"', *lines]
    for key, value in extra.items():
        body.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}")
    return "\n".join(body) + "\n"


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


def truth(gw: SandboxGateway) -> list[str]:
    """The gateway's uniqueEventIds, in its log order."""
    return [uid for uid, _, _ in gw.event_keys("DEMO")]


def expected_order(gw: SandboxGateway, keyless: Callable[[str], str]) -> dict[str, list[str]]:
    """primaryKey -> its uniqueEventIds in the gateway's log order; an event without a
    primaryKey under ``keyless(uid)`` (as the bus's own grouping has it)."""
    keys: dict[str, list[str]] = {}
    for uid, _offset, key in gw.event_keys("DEMO"):
        keys.setdefault(key or keyless(uid), []).append(uid)
    return keys


def assert_ground_truth(
    gw: SandboxGateway,
    ids: Sequence[str],
    order: Mapping[str, list[str]],
    keyless: Callable[[str], str],
) -> None:
    """``ids`` (the bus's uniqueEventIds) are the gateway's, each exactly once, and
    ``order`` (primaryKey -> uniqueEventIds in the bus's order) each resource's events in
    the gateway's order."""
    expected = truth(gw)
    twice = [uid for uid, n in Counter(ids).items() if n > 1]
    assert not twice, f"{len(twice)} events twice on the bus, e.g. {twice[:3]}"
    assert sorted(ids) == sorted(expected), f"missing: {sorted(set(expected) - set(ids))[:5]}"
    assert order == expected_order(gw, keyless)


def no_dead_letters(state: Path) -> bool:
    with sqlite3.connect(state) as db:
        return bool(db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0)


async def metric(port: int, name: str) -> float:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no {name} in /metrics")


# --- the scenarios -------------------------------------------------------------------------


async def catch_up(gw: SandboxGateway, tmp_path: Path, sink: str, count: Count) -> Path:
    """The daemon until the whole backlog is on the bus and committed, then SIGTERM (a clean
    exit); the state database."""
    total, newest, state = len(gw.events("DEMO")), newest_offset(gw), tmp_path / "state.db"
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(toml_config(tmp_path, gw.url, sink=sink), log)
    try:

        async def done() -> bool:
            return committed(state, newest) and await count() >= total

        await poll(done, proc, log)
    finally:
        assert await stop(proc, signal.SIGTERM) == 0, tail(log)
    return state


async def kill_then_restart(
    gw: SandboxGateway,
    tmp_path: Path,
    sink: str,
    count: Count,
    backlog: int,
    *,
    duplicates_metric: str,
    written_metric: str,
) -> None:
    """First run: a commit interval of a minute, so the bus fills while the checkpoint does
    not move; SIGKILL in that gap, once half the backlog is on the bus. Then a restart with
    normal commits until the whole backlog is on the bus and committed: the stream replays
    from the anchor, the bus drops the replayed writes as duplicates and takes the rest. The
    replay must really reach the bus and be dropped there, not be skipped by the daemon:
    ``duplicates_metric`` counts every write of the first run (less the anchor's), and
    ``written_metric`` no more than the rest. ``backlog``: the sandbox's."""
    state, log = tmp_path / "state.db", tmp_path / "daemon.log"
    cfg = toml_config(tmp_path, gw.url, sink=sink, commit_interval_ms=60_000)
    proc = spawn_daemon(cfg, log)

    async def half_written() -> bool:
        return await count() >= backlog // 2

    await poll(half_written, proc, log)
    assert await stop(proc, signal.SIGKILL) == -signal.SIGKILL
    written = await count()
    cp = checkpoint(state)
    assert cp is not None and cp[1] == truth(gw)[0]  # only the anchor: the gap is real
    assert written >= backlog // 2

    cfg = toml_config(tmp_path, gw.url, sink=sink, commit_interval_ms=20)
    port = launcher.free_port()
    cfg.write_text(cfg.read_text().replace("[metrics]\nport = 0", f"[metrics]\nport = {port}"))
    proc = spawn_daemon(cfg, log)
    newest = newest_offset(gw)
    try:

        async def caught_up() -> bool:
            return committed(state, newest) and await count() >= backlog

        await poll(caught_up, proc, log)
        duplicates = await metric(port, duplicates_metric)
        fresh = await metric(port, written_metric)
    finally:
        assert await stop(proc, signal.SIGTERM) == 0, tail(log)
    assert duplicates >= written - 1
    assert fresh <= len(truth(gw)) - written


async def outage_mid_stream(
    gw: SandboxGateway, tmp_path: Path, sink: str, count: Count, server: Restartable
) -> dict[str, Any]:
    """The server stopped once 50 messages are on the bus (writes may be in flight), 200
    more events while it is down, the server started again once the daemon logged a failed
    write, then on until everything is on the bus and committed, and SIGTERM. The first
    failed write the daemon logged."""
    state, log = tmp_path / "state.db", tmp_path / "daemon.log"
    cfg = toml_config(tmp_path, gw.url, sink=sink, extra=PIPELINE)
    proc = spawn_daemon(cfg, log)
    try:

        async def some_written() -> bool:
            return await count() >= 50

        await poll(some_written, proc, log)
        server.stop()
        gw.append("DEMO", 200)

        async def write_failed() -> bool:
            return bool(sink_failures(log))

        await poll(write_failed, proc, log)
        server.start()  # the same server back: same port, same store
        newest, total = newest_offset(gw), len(gw.events("DEMO"))

        async def caught_up() -> bool:
            return committed(state, newest) and await count() >= total

        await poll(caught_up, proc, log)
    finally:
        assert await stop(proc, signal.SIGTERM) == 0, tail(log)
    failure: dict[str, Any] = sink_failures(log)[0]
    return failure


async def refused(gw: SandboxGateway, tmp_path: Path, sink: str, *secrets: str) -> str:
    """The daemon with credentials the server refuses: it exits 78 (EX_CONFIG) and its log
    names ``sink.password`` and none of the ``secrets``. The log."""
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(toml_config(tmp_path, gw.url, sink=sink), log)
    code = await wait_exit(proc, 60)
    text = log.read_text(errors="replace")
    assert code == 78, tail(log)
    assert "sink.password" in text, tail(log)
    assert not [secret for secret in secrets if secret in text]
    return text
