"""close() against a frozen server (SIGSTOP: the socket stays open, nothing answers) keeps
its bound. It drained the connection first, and nats-py's drain() swallows the cancellation
of our deadline, then flushes with its own 10 s timeout: a shutdown took 12 s and more with
timeout_s = 2. Nothing needs draining (an event counts as written only once acknowledged),
and a close that does not end in time has its socket aborted."""

from __future__ import annotations

import asyncio
import time

import pytest
from bus_events import event
from nats_server import NatsServer

from consumer.config import NatsSinkSettings
from consumer.sinks.nats import NatsSink

TIMEOUT_S = 1.0  # waited out twice on the frozen server: by the cancelled write, by close()
BOUND_S = 2 * TIMEOUT_S + 1.0  # close() is bounded by timeout_s; slack for a loaded machine


def _socket_buffers() -> int:
    """The most a loopback connection's two kernel buffers may hold (the receiver's and the
    sender's auto-tuned maxima): the in-flight events must be more, or nothing stays unsent."""
    most = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            most += int(f.read().split()[2])
    return most


@pytest.mark.parametrize("size", [100, 900_000], ids=["small", "buffers-full"])
async def test_close_on_a_frozen_server_keeps_its_bound(nats_server: NatsServer, size: int) -> None:
    settings = NatsSinkSettings.model_validate(
        {"type": "nats", "servers": [nats_server.url], "timeout_s": TIMEOUT_S}
    )
    sink = NatsSink(settings, {"main": "DEMO"})
    await sink.open(None)
    await sink.write("main", [event(1)])
    detail = [{"elementName": "x", "newValue": "v" * size}]
    with nats_server.frozen():
        # In flight when the daemon stops: many keys at once, so with big events the
        # socket's buffers fill up (nothing reads them).
        count = 38 if size < 1000 else (_socket_buffers() + (8 << 20)) // size + 1
        events = [event(i, key=f"k{i}", detail=detail) for i in range(2, 2 + count)]
        writing = asyncio.create_task(sink.write("main", events))
        await asyncio.sleep(0.3)
        writing.cancel()
        await asyncio.gather(writing, return_exceptions=True)
        started = time.monotonic()
        await sink.close()
        took = time.monotonic() - started
    assert took < BOUND_S, took
    # The server is fine afterwards, and a new sink writes.
    again = NatsSink(settings, {"main": "DEMO"})
    await again.open(None)
    try:
        await again.write("main", [event(50)])
    finally:
        await again.close()
