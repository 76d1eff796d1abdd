"""sink.replicas that the JetStream cluster cannot place, against real nats-servers.

Creating the stream with more copies than the cluster has servers was retried for ever as if a
server were down (nats-server before 2.9 answers 10023 "insufficient resources"), or, from 2.9
on, a server that was only down stopped the daemon with exit 78 (10005 "no suitable peers for
placement, peer offline" is a 400, read as an operator's fix), while a cluster that is simply
too small got no word of sink.replicas. Now: too few servers, for certain (10005 without a
reason: every server the cluster knows, down ones too, was counted) is SinkUnusable (exit 78)
naming sink.replicas, the servers the cluster announces and the fix; a server down (10005
"peer offline") or an older server that does not say (10023) is transient, with a warning
naming sink.replicas logged once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from log_capture import captured_logs
from nats.js.api import StreamConfig
from nats_server import NatsServer, cluster_ready, start_cluster, subscribed

from consumer.config import NatsSinkSettings
from consumer.errors import ExitCode, SinkUnusable, TransientSinkError, exit_code_for
from consumer.sinks.nats import NatsSink, placement

WARNED = "nats sink: the stream's copies cannot be placed; check sink.replicas"


def sink_for(servers: Sequence[str], **overrides: Any) -> NatsSink:
    values: dict[str, Any] = {"type": "nats", "servers": list(servers), "timeout_s": 5.0}
    values.update(overrides)
    return NatsSink(NatsSinkSettings.model_validate(values), {"main": "DEMO"})


def warnings_of(logs: Any) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in logs.getvalue().splitlines()]
    return [e for e in lines if e.get("event") == WARNED]


def test_what_a_refusal_to_place_the_copies_means() -> None:
    assert placement(10005, "no suitable peers for placement", 3) == "impossible"
    assert placement(10005, "no suitable peers for placement, peer offline", 3) == "maybe"
    assert placement(10005, "no suitable peers for placement, miscellaneous issue", 3) == "maybe"
    assert placement(10023, "insufficient resources", 3) == "maybe"
    # Another reason is another fix (tags, storage): left to the generic handling.
    assert placement(10005, "no suitable peers for placement, tags not matched ['x']", 3) is None
    assert placement(10005, "no suitable peers for placement", 1) is None  # not sink.replicas
    assert placement(10023, "insufficient resources", 1) is None
    assert placement(10058, "stream name already in use", 3) is None
    assert placement(10005, None, 3) is None


async def test_more_replicas_than_the_cluster_has_servers_is_unusable_at_open(
    nats_factory: Callable[..., NatsServer],
) -> None:
    members = start_cluster(nats_factory, 2)
    await cluster_ready(members)
    sink = sink_for([m.url for m in members], replicas=3)
    with pytest.raises(SinkUnusable) as caught:
        await sink.open(None)
    text = str(caught.value)
    assert "sink.replicas = 3" in text and "fewer servers" in text
    assert "the cluster announces 2 server(s)" in text and "set sink.replicas = 2" in text
    assert exit_code_for(caught.value) == ExitCode.CONFIG
    with pytest.raises(nats.js.errors.NotFoundError):
        await members[0].stream_info()  # nothing created
    # As many copies as servers: created.
    sink = sink_for([m.url for m in members], replicas=2)
    await sink.open(None)
    await sink.close()
    assert (await members[0].stream_info()).config.num_replicas == 2


async def _offline_seen(url: str, timeout_s: float = 60.0) -> None:
    """Until the cluster reports a server offline when placing 3 copies (bounded): a probe
    stream, deleted when it could still be placed."""
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        # A probe unanswered (the stopped server led the cluster: a new leader is being
        # elected) is asked again after 1 s, not 5.
        js = nc.jetstream(timeout=1)
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    await js.add_stream(
                        StreamConfig(name="PROBE", subjects=["probe"], num_replicas=3)
                    )
                except nats.js.errors.APIError as exc:
                    if "peer offline" in (exc.description or ""):
                        return
                except nats.errors.TimeoutError:
                    pass
                else:
                    await js.delete_stream("PROBE")
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def test_a_server_down_is_retried_with_one_warning_then_created(
    nats_factory: Callable[..., NatsServer],
) -> None:
    members = start_cluster(nats_factory, 3)
    await cluster_ready(members)
    members[2].stop()
    up = [m.url for m in members[:2]]
    await _offline_seen(up[0])
    sink = sink_for(up, replicas=3)
    with captured_logs() as logs:
        for _ in range(2):
            with pytest.raises(TransientSinkError) as caught:
                await sink.open(None)
            text = str(caught.value)
            assert "sink.replicas = 3" in text and "offline" in text, text
    warned = warnings_of(logs)
    assert len(warned) == 1 and "sink.replicas" in warned[0]["warning"]
    members[2].start()
    await cluster_ready(members)
    async with asyncio.timeout(60):  # until the cluster sees it again
        while True:
            try:
                await sink.open(None)
                break
            except TransientSinkError:
                await asyncio.sleep(0.2)
    await sink.close()
    assert (await members[0].stream_info()).config.num_replicas == 3


@asynccontextmanager
async def old_jetstream(server: NatsServer, create_answer: dict[str, Any]) -> AsyncIterator[None]:
    """A JetStream API as a server before 2.9 answers (on a server without JetStream): the
    stream does not exist, and creating it is refused with ``create_answer``."""
    nc = await nats.connect(server.url)

    async def respond(msg: Any) -> None:
        if msg.subject.startswith("$JS.API.STREAM.INFO."):
            error = {"code": 404, "err_code": 10059, "description": "stream not found"}
            await msg.respond(json.dumps({"error": error}).encode())
        elif msg.subject.startswith("$JS.API.STREAM.CREATE."):
            await msg.respond(json.dumps({"error": create_answer}).encode())

    await nc.subscribe("$JS.API.>", cb=respond)
    await subscribed(nc)
    try:
        yield
    finally:
        await nc.close()


async def test_insufficient_resources_of_an_older_server_is_retried_naming_replicas(
    nats_factory: Callable[..., NatsServer],
) -> None:
    server = nats_factory(jetstream=False)
    answer = {"code": 503, "err_code": 10023, "description": "insufficient resources"}
    async with old_jetstream(server, answer):
        sink = sink_for([server.url], replicas=3)
        with captured_logs() as logs:
            for _ in range(2):
                with pytest.raises(TransientSinkError) as caught:
                    await sink.open(None)
                text = str(caught.value)
                assert "sink.replicas = 3" in text and "never succeeds" in text, text
        assert len(warnings_of(logs)) == 1
        # One copy: not a question of sink.replicas (storage, limits): as before.
        with pytest.raises(TransientSinkError) as caught:
            await sink_for([server.url]).open(None)
        assert "sink.replicas" not in str(caught.value)
