"""The nats sink's stream copies, against real nats-servers: a stream the daemon creates has
``sink.replicas`` copies (it had one, whatever the cluster: the loss of that server lost
what the stream had acknowledged, and the daemon checkpointed); a stream of one replica while
several servers are configured is warned about at open and in preflight; replicas on a server
that is not clustered is an operator's fix (SinkUnusable), not a retry forever."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import nats.js.errors
import pytest
from bus_events import event
from log_capture import captured_logs
from nats_server import NatsServer, cluster_ready, start_cluster

from consumer.config import NatsSinkSettings
from consumer.errors import SinkUnusable
from consumer.sinks.nats import NatsSink

ONE_REPLICA = "the stream has 1 replica while"


def sink_for(servers: Sequence[str], **overrides: Any) -> NatsSink:
    values: dict[str, Any] = {"type": "nats", "servers": list(servers), "timeout_s": 5.0}
    values.update(overrides)
    return NatsSink(NatsSinkSettings.model_validate(values), {"main": "DEMO"})


async def _open_write_close(sink: NatsSink) -> str:
    """Open, write one event, close; the warnings logged at open."""
    with captured_logs() as logs:
        await sink.open(None)
    try:
        await sink.write("main", [event(1)])
    finally:
        await sink.close()
    lines = [json.loads(x) for x in logs.getvalue().splitlines()]
    return " | ".join(str(e.get("warning", "")) for e in lines)


async def test_a_cluster_stream_is_created_with_the_configured_replicas(
    nats_factory: Callable[..., NatsServer],
) -> None:
    members = start_cluster(nats_factory, 3)
    await cluster_ready(members)
    urls = [m.url for m in members]
    assert "3 replica(s)" in await sink_for(urls, replicas=3).preflight()
    assert ONE_REPLICA in await sink_for(urls).preflight()  # would create it with one
    warned = await _open_write_close(sink_for(urls, replicas=3))
    assert ONE_REPLICA not in warned
    info = await members[0].stream_info()
    assert info.config.num_replicas == 3
    assert info.state.messages == 1
    line = await sink_for(urls).preflight()
    assert "3 replica(s)" in line and "WARNING" not in line


async def test_one_replica_with_several_servers_is_warned_about(
    nats_factory: Callable[..., NatsServer],
) -> None:
    members = start_cluster(nats_factory, 3)
    await cluster_ready(members)
    urls = [m.url for m in members]
    await members[0].add_stream("OPERA", ["opera.>"], duplicate_window=86400)  # one replica
    sink = sink_for(urls, on_start="must-exist")
    line = await sink.preflight()
    assert "; WARNING: " in line and ONE_REPLICA in line and "--replicas 3" in line
    assert ONE_REPLICA in await _open_write_close(sink)
    # replicas applies only when the daemon creates the stream: said so.
    warned = await _open_write_close(sink_for(urls, replicas=3))
    assert "sink.replicas = 3 applies only when the daemon creates it" in warned
    # One server listed: nothing to say of a cluster.
    assert ONE_REPLICA not in await sink_for(urls[:1]).preflight()


async def test_replicas_on_a_server_that_is_not_clustered_is_unusable(
    nats_server: NatsServer,
) -> None:
    sink = sink_for([nats_server.url], replicas=3)
    with pytest.raises(SinkUnusable, match=r"sink\.replicas = 3.*not part of a JetStream cluster"):
        await sink.open(None)
    with pytest.raises(nats.js.errors.NotFoundError):
        await nats_server.stream_info()  # nothing created
    await _open_write_close(sink_for([nats_server.url]))  # one replica: fine
    assert (await nats_server.stream_info()).config.num_replicas == 1
