"""A stream whose configuration removes events the sink published and saw acknowledged (so
checkpointed): open() and preflight said nothing. Interest retention without a consumer drops
every event at once: refused. Limits that remove events, read or not (max_msgs_per_subject,
max_msgs / max_bytes with discard old, max_age): a warning at open and in preflight, naming
the limit and the fix."""

from __future__ import annotations

import json
from typing import Any

import nats
import pytest
from bus_events import event
from log_capture import captured_logs
from nats.js.api import ConsumerConfig, DiscardPolicy, RetentionPolicy
from nats_server import NatsServer

from consumer.config import NatsSinkSettings
from consumer.errors import SinkUnusable
from consumer.sinks.nats import NatsSink


def sink_for(server: NatsServer) -> NatsSink:
    settings = NatsSinkSettings.model_validate(
        {"type": "nats", "servers": [server.url], "on_start": "must-exist", "timeout_s": 5.0}
    )
    return NatsSink(settings, {"main": "DEMO"})


async def test_interest_retention_without_a_consumer_is_refused(nats_server: NatsServer) -> None:
    await nats_server.add_stream(
        "OPERA", ["opera.>"], duplicate_window=86400, retention=RetentionPolicy.INTEREST
    )
    sink = sink_for(nats_server)
    with pytest.raises(SinkUnusable, match="interest retention and no consumer"):
        await sink.open(None)
    with pytest.raises(SinkUnusable, match="interest retention and no consumer"):
        await sink.preflight()

    # With a consumer it opens, and says that subjects no consumer reads are dropped.
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_consumer("OPERA", ConsumerConfig(durable_name="reader"))
    finally:
        await nc.close()
    assert "no consumer's filter matches" in await sink.preflight()
    await sink.open(None)
    try:
        await sink.write("main", [event(1)])
    finally:
        await sink.close()
    assert await nats_server.message_count() == 1  # kept for its reader


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"max_msgs_per_subject": 1}, "last 1 message(s) of each subject"),
        ({"max_msgs_per_subject": 1, "discard": DiscardPolicy.NEW}, "last 1 message(s)"),
        ({"max_msgs": 3}, "once it reaches max_msgs 3 (discard old)"),
        ({"max_bytes": 1_000_000}, "max_bytes 1000000 (discard old)"),
        ({"max_age": 2 * 86400}, "older than 2 d (max_age)"),
    ],
    ids=["per-subject", "per-subject-discard-new-not-per-subject", "msgs", "bytes", "age"],
)
async def test_limits_that_remove_acknowledged_events_are_warned_about(
    nats_server: NatsServer, config: dict[str, Any], says: str
) -> None:
    await nats_server.add_stream("OPERA", ["opera.>"], duplicate_window=86400, **config)
    sink = sink_for(nats_server)
    line = await sink.preflight()
    assert "WARNING" in line and says in line, line
    with captured_logs() as logs:
        await sink.open(None)
    await sink.close()
    warnings = [json.loads(x) for x in logs.getvalue().splitlines() if '"warning"' in x]
    assert any(says in w.get("warning", "") for w in warnings), logs.getvalue()


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"max_msgs": 3, "discard": DiscardPolicy.NEW},  # full: publishes refused, retried
        {"retention": RetentionPolicy.WORK_QUEUE},  # kept until read, reader or not
    ],
    ids=["unlimited", "discard-new", "work-queue"],
)
async def test_streams_that_keep_every_event_until_read_are_not_warned_about(
    nats_server: NatsServer, config: dict[str, Any]
) -> None:
    await nats_server.add_stream("OPERA", ["opera.>"], duplicate_window=86400, **config)
    sink = sink_for(nats_server)
    assert "WARNING" not in await sink.preflight()
    await sink.open(None)
    try:
        await sink.write("main", [event(i, key="same") for i in range(3)])
    finally:
        await sink.close()
    assert await nats_server.message_count() == 3
