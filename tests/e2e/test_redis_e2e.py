"""The daemon as a process (`python -m consumer run`) against the sandbox, adding to a real
redis-server (tests/redis_server.py): a backlog caught up, kill -9 between the XADDs and the
checkpoint, the server going away mid-stream, wrong credentials.

Every check reads the stream back from Redis and compares it with the sandbox's ground truth:
each uniqueEventId exactly once, each primaryKey's events in the gateway's order, and every
guard naming its entry. Waits are on positive conditions (the stream holds N entries, the
checkpoint is the newest offset, the daemon logged a failed write), each bounded; everything
listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import orjson
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis_server import (  # noqa: F401  # fixtures
    RedisServer,
    redis_factory_fixture,
    redis_server_fixture,
)
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

KEY = "opera:DEMO"
PASSWORD = "redis-e2e-Pw-7c41-secret"
WRONG = "redis-e2e-Wrong-2b8e-secret"
# Failed writes retried quickly (the behaviour is the same, only faster).
PIPELINE = "[pipeline]\nsink_retry_initial_s = 0.05\nsink_retry_max_s = 0.5\n"


def redis_sink(url: str, **extra: str | float) -> str:
    lines = ["[sink]", 'type = "redis"', f'url = "{url}"', "timeout_s = 2.0"]
    for key, value in extra.items():
        lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}")
    return "\n".join(lines) + "\n"


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


async def length(server: RedisServer) -> int:
    """XLEN of the stream; 0 while it does not exist or the server is down (without blocking
    the event loop, where the sandbox runs)."""
    try:
        async with server.client() as r:
            return int(await r.xlen(KEY))
    except (redis.exceptions.RedisError, OSError):
        return 0


def expected_order(gw: SandboxGateway) -> dict[str, list[str]]:
    """primaryKey -> its uniqueEventIds in the gateway's log order."""
    keys: dict[str, list[str]] = {}
    for uid, _offset, key in gw.event_keys("DEMO"):
        keys.setdefault(key or "", []).append(uid)
    return keys


async def assert_exactly_once(server: RedisServer, gw: SandboxGateway) -> None:
    async with server.client() as r:
        entries = await r.xrange(KEY)
        guards = {
            k.decode(): (await r.get(k) or b"").decode()
            async for k in r.scan_iter(match=f"{KEY}:guard:*", count=1000)
        }
    truth = [uid for uid, _, _ in gw.event_keys("DEMO")]
    ids = [fields[b"uniqueEventId"].decode() for _, fields in entries]
    twice = [uid for uid, n in Counter(ids).items() if n > 1]
    assert not twice, f"{len(twice)} events twice in the stream, e.g. {twice[:3]}"
    assert sorted(ids) == sorted(truth), f"missing: {sorted(set(truth) - set(ids))[:5]}"
    order: dict[str, list[str]] = {}
    for _, fields in entries:
        order.setdefault(fields[b"primaryKey"].decode(), []).append(
            fields[b"uniqueEventId"].decode()
        )
    assert order == expected_order(gw)  # each resource's events in order
    for entry_id, fields in entries:
        document = orjson.loads(fields[b"event"])
        assert document["metadata"]["uniqueEventId"] == fields[b"uniqueEventId"].decode()
        assert fields[b"stream"] == b"main" and fields[b"chainCode"] == b"DEMO"
        uid = fields[b"uniqueEventId"].decode()
        assert guards[f"{KEY}:guard:{{{KEY}}}:{uid}"] == entry_id.decode()  # its guard
    assert len(guards) == len(entries)


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
    sandbox_factory, redis_server: RedisServer, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=600)
    total, newest, state = len(gw.events("DEMO")), newest_offset(gw), tmp_path / "state.db"
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(toml_config(tmp_path, gw.url, sink=redis_sink(redis_server.url())), log)
    try:

        async def done() -> bool:
            return committed(state, newest) and await length(redis_server) >= total

        await poll(done, proc, log)
    finally:
        assert await stop(proc, signal.SIGTERM) == 0, tail(log)
    await assert_exactly_once(redis_server, gw)
    assert no_dead_letters(state)


async def test_kill_between_xadd_and_checkpoint_then_restart(
    sandbox_factory, redis_server: RedisServer, tmp_path: Path
) -> None:
    backlog = 400
    gw = await sandbox_factory(backlog=backlog)
    truth = [uid for uid, _, _ in gw.event_keys("DEMO")]
    state, log = tmp_path / "state.db", tmp_path / "daemon.log"
    sink = redis_sink(redis_server.url())

    # First run: a commit interval of a minute, so the stream fills while the checkpoint does
    # not move; then SIGKILL in that gap.
    cfg = toml_config(tmp_path, gw.url, sink=sink, commit_interval_ms=60_000)
    proc = spawn_daemon(cfg, log)

    async def half_added() -> bool:
        return await length(redis_server) >= backlog // 2

    await poll(half_added, proc, log)
    assert await stop(proc, signal.SIGKILL) == -signal.SIGKILL
    added = await length(redis_server)
    cp = checkpoint(state)
    assert cp is not None and cp[1] == truth[0]  # only the anchor: the gap is real
    assert added >= backlog // 2

    # Restart with normal commits: the stream replays from the anchor; the guards make the
    # replayed XADDs no-ops, and the rest are added.
    cfg = toml_config(tmp_path, gw.url, sink=sink, commit_interval_ms=20)
    port = launcher.free_port()
    cfg.write_text(cfg.read_text().replace("[metrics]\nport = 0", f"[metrics]\nport = {port}"))
    proc = spawn_daemon(cfg, log)
    newest = newest_offset(gw)
    try:

        async def caught_up() -> bool:
            return committed(state, newest) and await length(redis_server) >= backlog

        await poll(caught_up, proc, log)
        # The replay really reached Redis and was refused there, not skipped by the daemon.
        duplicates = await metric(port, "opera_consumer_redis_duplicates_total")
        fresh = await metric(port, "opera_consumer_redis_added_total")
    finally:
        assert await stop(proc, signal.SIGTERM) == 0, tail(log)
    assert duplicates >= added - 1  # every entry of the first run (less the anchor's)
    assert fresh <= len(truth) - added
    await assert_exactly_once(redis_server, gw)
    assert no_dead_letters(state)


async def test_redis_outage_mid_stream_loses_nothing_and_doubles_nothing(
    sandbox_factory, redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = redis_factory(appendonly=True)  # the data survives the stop
    gw = await sandbox_factory(backlog=300)
    state, log = tmp_path / "state.db", tmp_path / "daemon.log"
    cfg = toml_config(tmp_path, gw.url, sink=redis_sink(server.url()), extra=PIPELINE)
    proc = spawn_daemon(cfg, log)
    try:

        async def some_added() -> bool:
            return await length(server) >= 50

        await poll(some_added, proc, log)
        server.stop()  # mid-stream: scripts may be in flight
        gw.append("DEMO", 200)  # and events keep coming while Redis is down

        async def write_failed() -> bool:
            return bool(sink_failures(log))

        await poll(write_failed, proc, log)
        server.start()  # the same server back: same port, same data
        newest, total = newest_offset(gw), len(gw.events("DEMO"))

        async def caught_up() -> bool:
            return committed(state, newest) and await length(server) >= total

        await poll(caught_up, proc, log)
    finally:
        assert await stop(proc, signal.SIGTERM) == 0, tail(log)
    failure = sink_failures(log)[0]
    assert f"redis sink at 127.0.0.1:{server.port}/0" in failure["error"]
    await assert_exactly_once(server, gw)
    assert no_dead_letters(state)


async def test_wrong_credentials_exit_78_with_a_clear_message(
    sandbox_factory, redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = redis_factory(users={"opera": (PASSWORD, "~opera:* +@all")})
    gw = await sandbox_factory(backlog=20)
    log = tmp_path / "daemon.log"
    sink = redis_sink(server.url(), username="opera", password=WRONG)
    proc = spawn_daemon(toml_config(tmp_path, gw.url, sink=sink), log)
    code = await wait_exit(proc, 60)
    text = log.read_text(errors="replace")
    assert code == 78, tail(log)
    assert "refused our credentials" in text, tail(log)
    assert f"127.0.0.1:{server.port}/0" in text and "sink.password" in text
    assert WRONG not in text and PASSWORD not in text
    assert await length(server) == 0
