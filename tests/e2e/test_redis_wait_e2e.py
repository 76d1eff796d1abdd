"""The daemon as a process with sink.wait_replicas, against a real redis primary and replica:
while the replica is down, events reach the primary but the checkpoint stays at its anchor
(nothing counts as written until a replica has it: a failover then cannot lose what was
checkpointed); the replica back, the retries go through, the checkpoint reaches the newest
offset, and primary and replica hold each event exactly once."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import redis
from bus_e2e import PIPELINE, assert_ground_truth, no_dead_letters, poll, sink_section, stop, truth
from redis_server import RedisServer, replicating
from support import (
    checkpoint,
    committed,
    newest_offset,
    sink_failures,
    spawn_daemon,
    tail,
    toml_config,
)

from consumer.sandbox import SandboxGateway

KEY = "opera:DEMO"


async def length(server: RedisServer) -> int:
    try:
        async with server.client() as r:
            return int(await r.xlen(KEY))
    except (redis.exceptions.RedisError, OSError):
        return 0


async def assert_exactly_once(server: RedisServer, gw: SandboxGateway) -> None:
    async with server.client() as r:
        entries = await r.xrange(KEY)
    ids = [fields[b"uniqueEventId"].decode() for _, fields in entries]
    order: dict[str, list[str]] = {}
    for _, fields in entries:
        order.setdefault(fields[b"primaryKey"].decode(), []).append(
            fields[b"uniqueEventId"].decode()
        )
    assert_ground_truth(gw, ids, order, lambda uid: "")


async def test_the_checkpoint_waits_for_a_replica_and_nothing_is_doubled(
    sandbox_factory, redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    primary = redis_factory()
    replica = redis_factory(options=["--replicaof", "127.0.0.1", str(primary.port)])
    await replicating(primary)
    replica.stop()
    gw = await sandbox_factory(backlog=120)
    sink = sink_section(
        "redis",
        f'url = "{primary.url()}"',
        "timeout_s = 2.0",
        wait_replicas=1,
        wait_timeout_ms=200,
    )
    state, log = tmp_path / "state.db", tmp_path / "daemon.log"
    proc = spawn_daemon(toml_config(tmp_path, gw.url, sink=sink, extra=PIPELINE), log)
    try:

        async def refused_for_want_of_a_replica() -> bool:
            failures = sink_failures(log)
            return await length(primary) > 0 and any(
                "sink.wait_replicas = 1" in str(f.get("error")) for f in failures
            )

        await poll(refused_for_want_of_a_replica, proc, log)
        cp = checkpoint(state)
        assert cp is None or cp[1] == truth(gw)[0], cp  # the anchor at most: nothing counted
        replica.start()
        newest, total = newest_offset(gw), len(gw.events("DEMO"))

        async def caught_up() -> bool:
            return committed(state, newest) and await length(replica) >= total

        await poll(caught_up, proc, log)
    finally:
        assert await stop(proc, signal.SIGTERM) == 0, tail(log)
    await assert_exactly_once(primary, gw)
    await assert_exactly_once(replica, gw)
    assert no_dead_letters(state)
