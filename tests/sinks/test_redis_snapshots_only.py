"""A Redis that persists by snapshots only (``appendonly no`` with a ``save`` rule: redis.conf's
default) loses, when it crashes (kill -9, the OOM killer, the host), every write since its last
snapshot: events the sink wrote and the daemon checkpointed, which nothing replays. Preflight
and open said nothing of it (only of a server persisting nothing at all)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable

from bus_events import event
from log_capture import captured_logs
from redis_server import RedisServer

from consumer.config import RedisSinkSettings
from consumer.sinks.redis import RedisSink

CHAINS = {"main": "DEMO"}
KEY = "opera:DEMO"


def settings(url: str) -> RedisSinkSettings:
    return RedisSinkSettings.model_validate({"type": "redis", "url": url, "timeout_s": 2.0})


def warnings(logs: io.StringIO) -> str:
    lines = [json.loads(x) for x in logs.getvalue().splitlines()]
    return " | ".join(
        str(e.get("warning", "")) for e in lines if e["event"] == "redis sink: check the server"
    )


async def test_snapshots_only_are_warned_about_a_crash_loses_what_was_written(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(options=["--save", "3600 1"])  # appendonly no (the helper's)
    sink = RedisSink(settings(server.url()), CHAINS)
    line = await sink.preflight()
    assert "; WARNING: " in line and "appendonly yes" in line and "snapshot" in line, line
    with captured_logs() as logs:
        await sink.open(None)
    try:
        said = warnings(logs)
        assert "appendonly yes" in said and "snapshot" in said, said
        await sink.write("main", [event(i) for i in range(10)])  # returned: checkpointed
    finally:
        await sink.close()
    assert server.length(KEY) == 10
    server.kill()  # what the warning is about: acknowledged, then gone
    server.start()
    assert server.length(KEY) == 0
    # An append-only file keeps them: no warning.
    durable = redis_factory(appendonly=True)
    assert "WARNING" not in await RedisSink(settings(durable.url()), CHAINS).preflight()
