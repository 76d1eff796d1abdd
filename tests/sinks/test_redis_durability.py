"""The redis sink against real redis-servers, on what the server may lose after acknowledging
it: an evicting ``maxmemory-policy`` (refused at open when it can evict the streams, warned
about when it can evict only the guards), a server that persists nothing (preflight warns),
and a failover (``READONLY`` from a demoted primary or a replica: retried, reconnecting, never
dead-lettered, delivered exactly once on the new primary)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from bus_events import event, write_until_through
from log_capture import captured_logs
from redis_server import ADMIN, ADMIN_PASSWORD, RedisServer, event_ids
from tcp_proxy import TcpProxy

from consumer.config import RedisSinkSettings
from consumer.errors import SinkUnusable, TransientSinkError
from consumer.sinks.redis import RedisSink

CHAINS = {"main": "DEMO"}
KEY = "opera:DEMO"
PASSWORD = "redis-Pw-77c1-durability-secret"
SINK_RULES = "~opera:* -@all +ping +script|load +evalsha +exists +type +xadd +set +xlen"
POLICY_FIX = "maxmemory-policy noeviction"


def settings(url: str, **overrides: Any) -> RedisSinkSettings:
    values: dict[str, Any] = {"type": "redis", "url": url, "timeout_s": 2.0}
    values.update(overrides)
    return RedisSinkSettings.model_validate(values)


def warnings(logs: io.StringIO) -> str:
    lines = [json.loads(x) for x in logs.getvalue().splitlines()]
    return " | ".join(
        str(e.get("warning", "")) for e in lines if e["event"] == "redis sink: check the server"
    )


async def _open_close(sink: RedisSink) -> None:
    await sink.open(None)
    try:
        await sink.write("main", [event(0)])
    finally:
        await sink.close()


async def test_an_evicting_policy_is_refused_at_open_volatile_is_warned_about(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(
        users={
            "opera": (PASSWORD, SINK_RULES),  # neither CONFIG nor INFO: cannot tell
            "watcher": (PASSWORD, SINK_RULES + " +info"),  # INFO only (managed servers)
        }
    )
    # The tests' admin: CONFIG allowed.
    admin = RedisSink(settings(server.url(), username=ADMIN, password=ADMIN_PASSWORD), CHAINS)
    watcher = RedisSink(settings(server.url(), username="watcher", password=PASSWORD), CHAINS)
    opera = RedisSink(settings(server.url(), username="opera", password=PASSWORD), CHAINS)
    async with server.client() as r:
        await r.config_set("maxmemory", 100_000_000)
        for policy in ("allkeys-lru", "allkeys-lfu", "allkeys-random"):
            await r.config_set("maxmemory-policy", policy)
            for sink in (admin, watcher):  # CONFIG GET, then INFO memory when refused
                with pytest.raises(SinkUnusable, match=POLICY_FIX) as caught:
                    await sink.open(None)
                assert f"maxmemory-policy {policy} may evict the streams" in str(caught.value)
                assert PASSWORD not in str(caught.value)
        assert server.length(KEY) == 0
        # volatile-*: only keys with a TTL (the guards, never the streams): a warning.
        await r.config_set("maxmemory-policy", "volatile-lru")
        for sink in (admin, watcher):
            with captured_logs() as logs:
                await _open_close(sink)
            assert "guards may be evicted" in warnings(logs) and POLICY_FIX in warnings(logs)
        assert await r.ttl(KEY) == -1  # the stream has no TTL: volatile-* cannot evict it
        # A user that may not ask: opens, with a warning that it could not be checked.
        await r.config_set("maxmemory-policy", "allkeys-lru")
        with captured_logs() as logs:
            await _open_close(opera)
        assert "maxmemory-policy unknown" in warnings(logs)
        # allkeys-* without a maxmemory evicts nothing (yet): a warning, not a refusal.
        await r.config_set("maxmemory", 0)
        with captured_logs() as logs:
            await _open_close(admin)
        assert "once a maxmemory is set" in warnings(logs)
        await r.config_set("maxmemory-policy", "noeviction")
        await r.config_set("maxmemory", 100_000_000)
        with captured_logs() as logs:
            await _open_close(admin)
        assert "maxmemory" not in warnings(logs)


async def test_preflight_reports_eviction_and_persistence(
    redis_factory: Callable[..., RedisServer],
) -> None:
    bare = redis_factory()  # --save "" --appendonly no: a restart loses everything
    line = await RedisSink(settings(bare.url()), CHAINS).preflight()
    assert "; WARNING: " in line and "persists nothing" in line and "appendonly yes" in line
    async with bare.client() as r:
        await r.config_set("maxmemory-policy", "allkeys-lru")  # no maxmemory: a warning
        line = await RedisSink(settings(bare.url()), CHAINS).preflight()
        assert "; WARNING: " in line and "allkeys-lru would evict the streams" in line
        await r.config_set("maxmemory", 100_000_000)
        with pytest.raises(SinkUnusable, match=POLICY_FIX):
            await RedisSink(settings(bare.url()), CHAINS).preflight()
    # (Snapshots only are warned about too: test_redis_snapshots_only.py.)
    line = await RedisSink(settings(redis_factory(appendonly=True).url()), CHAINS).preflight()
    assert "WARNING" not in line, line
    assert bare.length(KEY) == 0


async def test_maxlen_is_warned_about_at_open_and_in_preflight(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """MAXLEN trims the oldest entries, read or not, and they were checkpointed: like NATS's
    max_msgs with discard old, said at open and by preflight (it was not)."""
    server = redis_factory(appendonly=True)
    trimmed = RedisSink(settings(server.url(), maxlen=1000), CHAINS)
    with captured_logs() as logs:
        await _open_close(trimmed)
    said = warnings(logs)
    assert "sink.maxlen = 1000 trims each stream" in said and "read or not" in said, said
    line = await trimmed.preflight()
    assert "; WARNING: " in line and "sink.maxlen = 1000 trims each stream" in line, line
    untrimmed = RedisSink(settings(server.url()), CHAINS)
    with captured_logs() as logs:
        await _open_close(untrimmed)
    assert "maxlen" not in warnings(logs)
    assert "WARNING" not in await untrimmed.preflight()


def test_the_servers_repr_holds_no_secret() -> None:
    """Server (the connection's arguments) held the password in kwargs, shown by the default
    repr (a log of the sink's attributes, a traceback's locals)."""
    url = f"redis://opera:{PASSWORD}@127.0.0.1:6379/0"
    for sink in (
        RedisSink(settings(url), CHAINS),
        RedisSink(settings("redis://127.0.0.1:6379/0", password=PASSWORD), CHAINS),
    ):
        shown = repr(sink.server)
        assert PASSWORD not in shown and "127.0.0.1:6379/0" in shown, shown
        assert sink.server.kwargs["password"] == PASSWORD


async def _connections(server: RedisServer) -> int:
    async with server.client() as r:
        return int((await r.info("stats"))["total_connections_received"])


async def test_a_replica_is_retried_never_dead_lettered_then_written_once_promoted(
    redis_factory: Callable[..., RedisServer],
) -> None:
    primary = redis_factory()
    replica = redis_factory(options=["--replicaof", "127.0.0.1", str(primary.port)])
    sink = RedisSink(settings(replica.url(), timeout_s=1.0), CHAINS)
    await sink.open(None)  # a replica at start: a warning, not a stop
    try:
        events = [event(i) for i in range(10)]
        before = await _connections(replica)
        for _ in range(3):  # READONLY each time: transient (retried), never dead-lettered
            with pytest.raises(TransientSinkError, match=r"READONLY|read only replica"):
                await sink.write("main", events)
        # Each READONLY dropped the connection: the next write connected anew (twice), and
        # this look is one more.
        assert await _connections(replica) >= before + 3
        assert replica.length(KEY) == 0
        async with replica.client() as r:
            await r.execute_command("REPLICAOF", "NO", "ONE")  # promoted
        assert await write_until_through(sink, events, seconds=20, pause=0.05) >= 0
        await sink.write("main", [event(i) for i in range(5, 15)])  # a replay, and more
    finally:
        await sink.close()
    assert event_ids(replica.entries(KEY)) == [f"u{i:05d}" for i in range(15)]


async def test_a_failover_behind_a_stable_address_reaches_the_new_primary(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """The sink's address (a DNS name, a virtual IP: here a TCP proxy) leads to the new
    primary after a failover; the sink's pooled connection still leads to the old one, which
    now answers READONLY. Reconnecting finds the new one; the events of before the failover
    (replicated with their guards) are not written twice."""
    first = redis_factory()
    second = redis_factory(options=["--replicaof", "127.0.0.1", str(first.port)])
    with TcpProxy("127.0.0.1", first.port) as proxy:
        sink = RedisSink(settings(f"redis://127.0.0.1:{proxy.port}/0", timeout_s=1.0), CHAINS)
        await sink.open(None)
        try:
            await sink.write("main", [event(i) for i in range(10)])
            async with first.client() as r:
                assert await r.execute_command("WAIT", 1, 10_000) == 1  # replicated
            # The failover: the replica promoted, the old primary demoted under it, and the
            # address switched to the new primary (new connections only).
            async with second.client() as r:
                await r.execute_command("REPLICAOF", "NO", "ONE")
            async with first.client() as r:
                await r.execute_command("REPLICAOF", "127.0.0.1", str(second.port))
            proxy.target_port = second.port
            failures = await write_until_through(
                sink, [event(i) for i in range(5, 20)], seconds=20, pause=0.05
            )
            assert failures >= 1  # READONLY from the demoted one, at least once
        finally:
            await sink.close()
    assert event_ids(second.entries(KEY)) == [f"u{i:05d}" for i in range(20)]
