"""sink.wait_replicas against a real primary and replica: a batch counts as written only once
that many replicas acknowledged it (WAIT), so a failover cannot lose what was checkpointed.

Redis replicates asynchronously: without WAIT, a batch the primary acknowledged and lost in a
failover before any replica had it was checkpointed, and gone. With it: the replica has each
batch when write returns; with the replica down write raises TransientSinkError (the batch
is not checkpointed and goes again), every try leaves each event once on the primary (its
guard), and once the replica is back the retry goes through and both have each event once."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from bus_events import event, write_until_through
from log_capture import captured_logs
from redis_server import RedisServer, event_ids, replicating

from consumer.config import RedisSinkSettings
from consumer.errors import SinkUnusable, TransientSinkError
from consumer.sinks.redis import RedisSink

CHAINS = {"main": "DEMO"}
KEY = "opera:DEMO"
PASSWORD = "redis-Pw-3e9a-wait-secret"
SINK_RULES = "~opera:* -@all +ping +script|load +evalsha +exists +type +xadd +set"


def settings(url: str, **overrides: Any) -> RedisSinkSettings:
    values: dict[str, Any] = {"type": "redis", "url": url, "timeout_s": 2.0}
    values.update(overrides)
    return RedisSinkSettings.model_validate(values)


def expected(n: int) -> list[str]:
    return [f"u{i:05d}" for i in range(n)]


def checks(logs: io.StringIO) -> str:
    lines = [json.loads(x) for x in logs.getvalue().splitlines()]
    return " | ".join(
        str(e.get("warning", "")) for e in lines if e["event"] == "redis sink: check the server"
    )


async def test_a_batch_is_written_only_once_a_replica_has_it_and_retried_without_doubles(
    redis_factory: Callable[..., RedisServer],
) -> None:
    primary = redis_factory()
    replica = redis_factory(options=["--replicaof", "127.0.0.1", str(primary.port)])
    await replicating(primary)
    # Time enough for the replica's answer on a loaded machine (300 ms was not, once).
    steady = RedisSink(
        settings(primary.url(), timeout_s=10.0, wait_replicas=1, wait_timeout_ms=5000), CHAINS
    )
    await steady.open(None)
    try:
        await steady.write("main", [event(i) for i in range(10)])
    finally:
        await steady.close()
    # WAIT answered: the replica has the batch when write returns.
    assert event_ids(replica.entries(KEY)) == expected(10)
    # Each refused try waits out the WAIT timeout: short, as no replica can answer it.
    sink = RedisSink(settings(primary.url(), wait_replicas=1, wait_timeout_ms=100), CHAINS)
    await sink.open(None)
    try:
        replica.stop()
        batch = [event(i) for i in range(10, 20)]
        for _ in range(3):  # not written (not checkpointed): retried, never doubled
            with pytest.raises(TransientSinkError, match=r"sink\.wait_replicas = 1") as caught:
                await sink.write("main", batch)
            assert "0 replica(s) acknowledged 10 event(s)" in str(caught.value)
            assert event_ids(primary.entries(KEY)) == expected(20)
        assert sink.counters()["redis_wait_refused"] == 3  # opera_consumer_redis_wait_refused
        # A restart's new sink (new connections; the retried batch writes nothing, its
        # events guarded): still not counted as written.
        again = RedisSink(settings(primary.url(), wait_replicas=1, wait_timeout_ms=100), CHAINS)
        with captured_logs() as logs:
            await again.open(None)
        assert "fewer than sink.wait_replicas = 1" in checks(logs)
        try:
            with pytest.raises(TransientSinkError, match=r"sink\.wait_replicas"):
                await again.write("main", batch)
        finally:
            await again.close()

        replica.start()  # back: it syncs again, then acknowledges
        assert await write_until_through(sink, batch, seconds=30, pause=0.05) >= 0
        # A replay, and more (retried, as the pipeline does, if a loaded machine's replica
        # answers after the 100 ms: the retries must not double either).
        more = [event(i) for i in range(15, 25)]
        assert await write_until_through(sink, more, seconds=30, pause=0.05) >= 0
    finally:
        await sink.close()
    assert event_ids(primary.entries(KEY)) == expected(25)
    assert event_ids(replica.entries(KEY)) == expected(25)


async def test_without_wait_replicas_nothing_waits_for_a_replica(
    redis_factory: Callable[..., RedisServer],
) -> None:
    primary = redis_factory()
    replica = redis_factory(options=["--replicaof", "127.0.0.1", str(primary.port)])
    await replicating(primary)
    replica.stop()
    sink = RedisSink(settings(primary.url()), CHAINS)  # wait_replicas = 0: as before
    await sink.open(None)
    try:
        await sink.write("main", [event(i) for i in range(5)])
    finally:
        await sink.close()
    assert event_ids(primary.entries(KEY)) == expected(5)


async def test_an_acl_without_wait_is_refused_at_open(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(
        users={"opera": (PASSWORD, SINK_RULES), "waiter": (PASSWORD, SINK_RULES + " +wait")}
    )
    refused = RedisSink(
        settings(server.url(), username="opera", password=PASSWORD, wait_replicas=1), CHAINS
    )
    with pytest.raises(SinkUnusable, match=r"refuses WAIT.*\+set \+wait") as caught:
        await refused.open(None)
    assert PASSWORD not in str(caught.value)
    allowed = RedisSink(
        settings(server.url(), username="waiter", password=PASSWORD, wait_replicas=1), CHAINS
    )
    line = await allowed.preflight()
    assert "WAIT for 1 replica(s)" in line
    await allowed.open(None)  # no INFO right: the replicas cannot be counted, not refused
    await allowed.close()


def test_wait_timeout_must_be_below_the_connection_timeout() -> None:
    with pytest.raises(ValueError, match=r"wait_timeout_ms.*below timeout_s"):
        settings("redis://127.0.0.1:6379/0", wait_replicas=1, wait_timeout_ms=2000)
    with pytest.raises(ValueError, match="wait_timeout_ms"):
        settings("redis://127.0.0.1:6379/0", wait_replicas=1, wait_timeout_ms=0)  # WAIT 0: ever
    with pytest.raises(ValueError, match="wait_replicas"):
        settings("redis://127.0.0.1:6379/0", wait_replicas=-1)
    s = settings("redis://127.0.0.1:6379/0", timeout_s=10.0)
    assert (s.wait_replicas, s.wait_timeout_ms) == (0, 1000)


async def test_an_event_whose_id_is_the_barriers_is_written(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """The barrier a batch sets before its WAIT is a guard key: an event whose uniqueEventId
    was the barrier's found it set by the batch before, was taken for written, and was in no
    stream though checkpointed (found by a review)."""
    primary = redis_factory()
    redis_factory(options=["--replicaof", "127.0.0.1", str(primary.port)])
    await replicating(primary)
    sink = RedisSink(
        settings(primary.url(), timeout_s=10.0, wait_replicas=1, wait_timeout_ms=5000), CHAINS
    )
    await sink.open(None)
    try:
        await sink.write("main", [event(1)])
        await sink.write("main", [event(2, uid="{wait}")])
    finally:
        await sink.close()
    assert event_ids(primary.entries(KEY)) == ["u00001", "{wait}"]
