"""A stream kept in memory (``storage: memory``, made by an operator: the daemon creates file
storage) loses every message it acknowledged when its server restarts, the events the daemon
checkpointed with them, and the restarted daemon then recreates it empty (``on_start =
"create"``): open() and preflight warned about limits that remove events, not about this."""

from __future__ import annotations

import json

from bus_events import event
from log_capture import captured_logs
from nats.js.api import StorageType
from nats_server import NatsServer

from consumer.config import NatsSinkSettings
from consumer.sinks.nats import NatsSink

SAYS = "keeps its messages in memory"


async def test_a_stream_in_memory_is_warned_about_a_restart_loses_it(
    nats_server: NatsServer,
) -> None:
    await nats_server.add_stream(
        "OPERA", ["opera.>"], duplicate_window=86400, storage=StorageType.MEMORY
    )
    settings = NatsSinkSettings.model_validate(
        {"type": "nats", "servers": [nats_server.url], "timeout_s": 5.0}
    )
    sink = NatsSink(settings, {"main": "DEMO"})
    line = await sink.preflight()
    assert "; WARNING: " in line and SAYS in line and "file storage" in line, line
    with captured_logs() as logs:
        await sink.open(None)
    try:
        warnings = [json.loads(x) for x in logs.getvalue().splitlines() if '"warning"' in x]
        assert any(SAYS in w.get("warning", "") for w in warnings), logs.getvalue()
        await sink.write("main", [event(i) for i in range(5)])  # acknowledged: checkpointed
    finally:
        await sink.close()
    assert await nats_server.message_count() == 5
    nats_server.stop()  # what the warning is about
    nats_server.start()
    assert await nats_server.message_count() == 0  # the stream is gone, its events with it
