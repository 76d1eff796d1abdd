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

from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import redis
from bus_e2e import (
    assert_ground_truth,
    catch_up,
    kill_then_restart,
    no_dead_letters,
    outage_mid_stream,
    refused,
    sink_section,
)
from redis_server import RedisServer
from support import tail

from consumer.sandbox import SandboxGateway

KEY = "opera:DEMO"
PASSWORD = "redis-e2e-Pw-7c41-secret"
WRONG = "redis-e2e-Wrong-2b8e-secret"


def redis_sink(url: str, **extra: str | float) -> str:
    return sink_section("redis", f'url = "{url}"', "timeout_s = 2.0", **extra)


async def length(server: RedisServer) -> int:
    """XLEN of the stream; 0 while it does not exist or the server is down (without blocking
    the event loop, where the sandbox runs)."""
    try:
        async with server.client() as r:
            return int(await r.xlen(KEY))
    except (redis.exceptions.RedisError, OSError):
        return 0


def counter(server: RedisServer) -> Callable[[], Awaitable[int]]:
    """:func:`length` of ``server``, for the scenarios of tests/bus_e2e.py."""
    return lambda: length(server)


def no_key(uid: str) -> str:
    """An event without a primaryKey has an empty primaryKey field."""
    return ""


async def assert_exactly_once(server: RedisServer, gw: SandboxGateway) -> None:
    async with server.client() as r:
        entries = await r.xrange(KEY)
        guards = {
            k.decode(): (await r.get(k) or b"").decode()
            async for k in r.scan_iter(match=f"{KEY}:guard:*", count=1000)
        }
    ids = [fields[b"uniqueEventId"].decode() for _, fields in entries]
    order: dict[str, list[str]] = {}
    for _, fields in entries:
        order.setdefault(fields[b"primaryKey"].decode(), []).append(
            fields[b"uniqueEventId"].decode()
        )
    assert_ground_truth(gw, ids, order, no_key)
    for entry_id, fields in entries:
        document = orjson.loads(fields[b"event"])
        assert document["metadata"]["uniqueEventId"] == fields[b"uniqueEventId"].decode()
        assert fields[b"stream"] == b"main" and fields[b"chainCode"] == b"DEMO"
        uid = fields[b"uniqueEventId"].decode()
        assert guards[f"{KEY}:guard:{{{KEY}}}:{uid}"] == entry_id.decode()  # its guard
    assert len(guards) == len(entries)


async def test_catch_up_of_a_backlog_lands_every_event_once(
    sandbox_factory, redis_server: RedisServer, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=600)
    sink = redis_sink(redis_server.url())
    state = await catch_up(gw, tmp_path, sink, counter(redis_server))
    await assert_exactly_once(redis_server, gw)
    assert no_dead_letters(state)


async def test_kill_between_xadd_and_checkpoint_then_restart(
    sandbox_factory, redis_server: RedisServer, tmp_path: Path
) -> None:
    backlog = 400
    gw = await sandbox_factory(backlog=backlog)
    # The guards make the replayed XADDs no-ops.
    await kill_then_restart(
        gw,
        tmp_path,
        redis_sink(redis_server.url()),
        counter(redis_server),
        backlog,
        duplicates_metric="opera_consumer_redis_duplicates_total",
        written_metric="opera_consumer_redis_added_total",
    )
    await assert_exactly_once(redis_server, gw)
    assert no_dead_letters(tmp_path / "state.db")


async def test_redis_outage_mid_stream_loses_nothing_and_doubles_nothing(
    sandbox_factory, redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = redis_factory(appendonly=True)  # the data survives the stop
    gw = await sandbox_factory(backlog=300)
    failure = await outage_mid_stream(
        gw, tmp_path, redis_sink(server.url()), counter(server), server
    )
    assert f"redis sink at 127.0.0.1:{server.port}/0" in failure["error"]
    await assert_exactly_once(server, gw)
    assert no_dead_letters(tmp_path / "state.db")


async def test_wrong_credentials_exit_78_with_a_clear_message(
    sandbox_factory, redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = redis_factory(users={"opera": (PASSWORD, "~opera:* +@all")})
    gw = await sandbox_factory(backlog=20)
    sink = redis_sink(server.url(), username="opera", password=WRONG)
    text = await refused(gw, tmp_path, sink, WRONG, PASSWORD)
    assert "refused our credentials" in text, tail(tmp_path / "daemon.log")
    assert f"127.0.0.1:{server.port}/0" in text
    assert await length(server) == 0
