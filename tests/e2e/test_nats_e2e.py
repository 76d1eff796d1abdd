"""The daemon as a process (`python -m consumer run`) against the sandbox, publishing to a
real nats-server with JetStream (tests/nats_server.py): a backlog caught up, kill -9 between
the publishes and the checkpoint, the server going away mid-stream, wrong credentials.

Every check reads the stream back from the bus and compares it with the sandbox's ground
truth: each uniqueEventId exactly once, and each primaryKey's events in the gateway's order.
Waits are on positive conditions (the bus holds N messages, the checkpoint is the newest
offset, the daemon logged a failed write), each bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bus_e2e import (
    assert_ground_truth,
    catch_up,
    kill_then_restart,
    no_dead_letters,
    outage_mid_stream,
    refused,
    sink_section,
)
from nats_server import NatsServer, event_ids, order_by_key
from support import tail

from consumer.sandbox import SandboxGateway

PASSWORD = "nats-e2e-Pw-51f0-secret"
WRONG = "nats-e2e-Wrong-9a3c-secret"


def nats_sink(server: NatsServer, timeout_s: float = 2.0, **extra: str | float) -> str:
    return sink_section(
        "nats",
        f'servers = ["{server.url}"]',
        f"timeout_s = {timeout_s}",
        "duplicate_window_s = 3600.0",
        **extra,
    )


def by_uid(uid: str) -> str:
    """An event without a primaryKey is its own resource on the bus (see order_by_key)."""
    return uid


async def assert_exactly_once(server: NatsServer, gw: SandboxGateway) -> None:
    messages = await server.stream_messages()
    ids = event_ids(messages)
    assert_ground_truth(gw, ids, order_by_key(messages), by_uid)
    assert all(m.subject and m.subject.startswith("opera.DEMO.") for m in messages)
    assert all(
        m.headers and m.headers["Nats-Msg-Id"] == uid for m, uid in zip(messages, ids, strict=True)
    )


async def test_catch_up_of_a_backlog_lands_every_event_once(
    sandbox_factory, nats_server: NatsServer, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=600)
    state = await catch_up(gw, tmp_path, nats_sink(nats_server), nats_server.message_count)
    await assert_exactly_once(nats_server, gw)
    info = await nats_server.stream_info()
    assert info.config.duplicate_window == 3600.0  # created by the daemon, with the window
    assert no_dead_letters(state)


async def test_kill_between_publish_and_checkpoint_then_restart(
    sandbox_factory, nats_server: NatsServer, tmp_path: Path
) -> None:
    backlog = 400
    gw = await sandbox_factory(backlog=backlog)
    # JetStream drops the replayed messages as duplicates (Nats-Msg-Id).
    await kill_then_restart(
        gw,
        tmp_path,
        nats_sink(nats_server),
        nats_server.message_count,
        backlog,
        duplicates_metric="opera_consumer_nats_duplicates_total",
        written_metric="opera_consumer_nats_published_total",
    )
    await assert_exactly_once(nats_server, gw)
    assert no_dead_letters(tmp_path / "state.db")


async def test_nats_outage_mid_stream_loses_nothing_and_doubles_nothing(
    sandbox_factory, nats_server: NatsServer, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=300)
    # A write in flight while the server is down fails at the publish timeout: 1 s (the
    # retries that a slow acknowledgement may cost are what the test is about).
    sink = nats_sink(nats_server, timeout_s=1.0)
    failure = await outage_mid_stream(gw, tmp_path, sink, nats_server.message_count, nats_server)
    assert "nats sink" in failure["error"]
    await assert_exactly_once(nats_server, gw)
    assert no_dead_letters(tmp_path / "state.db")


async def test_wrong_credentials_exit_78_with_a_clear_message(
    sandbox_factory, nats_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    server = nats_factory(users={"opera": PASSWORD})
    gw = await sandbox_factory(backlog=20)
    sink = nats_sink(server, user="opera", password=WRONG)
    text = await refused(gw, tmp_path, sink, WRONG, PASSWORD)
    assert "refused the credentials" in text and server.url in text, tail(tmp_path / "daemon.log")
    assert await server.message_count() == 0
