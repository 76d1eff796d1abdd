"""The session against a hostile gateway (a raw WebSocket or HTTP server on 127.0.0.1, tokens
from the sandbox gateway):

- one that stops reading while it floods pings: every answer waits for a drain that never
  comes (websockets' send has no deadline); the connection must still be replaced, and a stop
  must still end;
- one that answers the upgrade with a redirect to itself: websockets would follow ten hops
  within one attempt, each an upgrade the key's budget never booked;
- one that refuses the upgrade (503, 429) with ``Retry-After``: honoured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pysink
import pytest
from support import make_settings, running, wait_until
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from consumer.config import Settings
from consumer.config.settings import stop_budget
from consumer.runtime.connection import CLOSE_WRITE_S, UNWRITTEN_MAX, connect
from consumer.runtime.daemon import Daemon
from consumer.sandbox import SandboxOptions


def token_auth(url: str) -> dict[str, Any]:
    o = SandboxOptions()
    return {
        "client_id": o.client_id,
        "client_secret": o.client_secret,
        "token_url": f"{url}/oauth/v1/tokens",
    }


def event_frame(sub_id: str, n: int) -> str:
    event = {
        "metadata": {"offset": str(100 + n), "uniqueEventId": f"uid-{n}"},
        "moduleName": "Reservation",
        "eventName": "UPDATE RESERVATION",
        "primaryKey": f"pk-{n}",
        "timestamp": "28-APR-24 06.18.59.028027 AM",
        "hotelId": "H1",
        "publisherId": "p",
        "actionInstanceId": "a",
        "detail": [{"elementName": "x", "oldValue": "a", "newValue": "b"}],
    }
    return json.dumps({"id": sub_id, "type": "next", "payload": {"data": {"newEvent": event}}})


RAW_PING = b"\x81\x0f" + b'{"type":"ping"}'  # an unmasked server text frame, written raw
# A WebSocket-level ping (opcode 0x9, 125-byte payload): the reader never sees it, websockets
# answers it itself inside data_received (the pong straight to the transport, no drain()).
RAW_WS_PING = b"\x89\x7d" + b"p" * 125
WEDGED_BYTES = 512 * 1024  # the gateway's own unsent bytes that show the client stopped reading
# More than the client may hold unwritten (UNWRITTEN_MAX) plus the pongs to one read's pings.
HELD_BOUND = UNWRITTEN_MAX + 4 * 1024 * 1024


@contextlib.asynccontextmanager
async def ws_server(handler: Callable[[ServerConnection], Any]) -> AsyncIterator[str]:
    server = await serve(
        handler,
        "127.0.0.1",
        0,
        subprotocols=[Subprotocol("graphql-transport-ws")],
        compression=None,
        ping_interval=None,
        close_timeout=1,
    )
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await server.wait_closed()


def stop_reading(ws: ServerConnection) -> asyncio.Transport:
    """The server's read side stuck from now on, with a small receive buffer."""
    transport = ws.transport
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    transport.pause_reading()
    return transport


async def flood_pings(
    transport: asyncio.Transport, wedged: asyncio.Event, ping: bytes = RAW_PING
) -> None:
    """Pings as fast as the client reads them (each one a pong the client must write), until
    the connection goes; ``wedged`` once our unsent bytes have not shrunk for a second (only
    written below WEDGED_BYTES: the client read nothing meanwhile, waiting to write its
    pongs). Bounded: 120 s."""
    blob = ping * (len(RAW_PING) * 4096 // len(ping))
    started = time.monotonic()
    while not transport.is_closing() and time.monotonic() - started < 120:
        unsent = transport.get_write_buffer_size()
        if unsent < WEDGED_BYTES:
            transport.write(blob)
        elif not wedged.is_set():
            await asyncio.sleep(1.0)
            if transport.get_write_buffer_size() >= unsent:
                wedged.set()
        await asyncio.sleep(0.005)


class ScriptedGateway:
    """A gateway for :func:`ws_server` that speaks graphql-transport-ws: acknowledges each
    ``connection_init`` (``acks`` times), answers pings, runs ``on_subscribe(ws, id)`` at a
    subscribe and closes after the client's ``complete``; ``connections``: how many came."""

    def __init__(
        self, on_subscribe: Callable[[ServerConnection, str], Awaitable[None]], acks: int = 1
    ) -> None:
        self.on_subscribe, self.acks = on_subscribe, acks
        self.connections = 0

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                msg = json.loads(message)
                kind = msg.get("type")
                if kind == "connection_init":
                    for _ in range(self.acks):
                        await ws.send('{"type":"connection_ack"}')
                elif kind == "ping":
                    await ws.send('{"type":"pong"}')
                elif kind == "subscribe":
                    await self.on_subscribe(ws, msg["id"])
                elif kind == "complete":
                    await ws.close(1000)
                    return


class WedgingGateway:
    """Acks, takes the subscribe, sends ``events`` events, then (once ``go`` is set) stops
    reading and floods pings (``aborted`` once the client cut that connection). A later
    connection behaves (acks, answers pings, sends nothing, closes after the client's
    ``complete`` as a gateway does: the test's stop does not wait complete_timeout_s)."""

    def __init__(self, events: int = 1, ping: bytes = RAW_PING) -> None:
        self.events = events
        self.ping = ping
        self.connections = 0
        self.go = asyncio.Event()
        self.wedged = asyncio.Event()
        self.aborted = asyncio.Event()
        self._transports: list[asyncio.Transport] = []

    def release(self) -> None:
        for t in self._transports:
            t.abort()

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        if self.connections > 1:
            with contextlib.suppress(ConnectionClosed):
                async for msg in ws:
                    m = json.loads(msg)
                    if m.get("type") == "connection_init":
                        await ws.send('{"type":"connection_ack"}')
                    elif m.get("type") == "ping":
                        await ws.send('{"type":"pong"}')
                    elif m.get("type") == "complete":
                        await ws.close(1000)
            return
        async for msg in ws:
            m = json.loads(msg)
            if m.get("type") == "connection_init":
                await ws.send('{"type":"connection_ack"}')
            elif m.get("type") == "subscribe":
                for n in range(1, self.events + 1):
                    await ws.send(event_frame(m["id"], n))
                break
        await self.go.wait()
        transport = stop_reading(ws)
        self._transports.append(transport)
        await flood_pings(transport, self.wedged, self.ping)
        if transport.is_closing():
            self.aborted.set()


async def small_send_buffer(daemon: Daemon, gw: WedgingGateway) -> None:
    """The client's socket send buffer made small (as the gateway's receive buffer is), so
    that its pongs fill what the kernels hold within a second rather than after megabytes
    (autotuned up to tcp_wmem's maximum, 4 MiB: a minute of pongs on a busy machine); then
    the gateway starts. Test-only reach into the session (its read-ahead holds the
    connection)."""
    runner = daemon.runners["main"]
    await wait_until(lambda: runner.read_ahead is not None)
    ahead = runner.read_ahead
    assert ahead is not None
    sock = ahead._ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    gw.go.set()


def wedge_settings(tmp_path: Path, url: str, sb_url: str, **connection: Any) -> Settings:
    return make_settings(
        tmp_path,
        url,
        auth=token_auth(sb_url),
        connection={"ping_interval_s": 0.5, **connection},
    )


async def test_a_gateway_that_stops_reading_is_taken_for_lost_and_replaced(
    sandbox_factory, tmp_path: Path
) -> None:
    """The reader waits in its pong's drain and the keepalive's ping cannot be written
    either; nothing is read any more. The connection is aborted within the liveness deadline
    (the pong's write deadline, or the liveness check, which no longer waits behind the
    unwritten ping): lost (1006), and the stream reconnects as after any lost connection."""
    sb = await sandbox_factory(backlog=0)
    gw = WedgingGateway()
    async with ws_server(gw.handler) as url:
        settings = wedge_settings(tmp_path, url, sb.url, liveness_floor_s=1.0, liveness_max_s=2.0)
        try:
            async with running(settings) as daemon:
                runner = daemon.runners["main"]
                await small_send_buffer(daemon, gw)
                await wait_until(lambda: gw.connections > 1, timeout=60)
                assert runner.stats.closes["1006"] >= 1
                said = runner.stats.last_close
                assert "stopped reading" in said or "liveness deadline passed" in said
                await wait_until(lambda: runner.state.value == "streaming")
        finally:
            gw.release()


async def test_a_gateway_that_floods_websocket_pings_it_never_reads_is_cut_off(
    sandbox_factory, tmp_path: Path
) -> None:
    """WebSocket-level pings, which websockets answers itself (the pong written in
    data_received, outside drain(), and pings fill no max_queue: the client reads on): with
    the default liveness deadline (180 s), the client held every pong for as long, hundreds of
    MiB. The connection is cut once its unwritten pongs pass UNWRITTEN_MAX: lost (1006) and
    replaced, long before the deadline. Waited for until the client holds HELD_BOUND, which
    fails the test rather than growing on."""
    sb = await sandbox_factory(backlog=0)
    gw = WedgingGateway(ping=RAW_WS_PING)
    async with ws_server(gw.handler) as url:
        settings = make_settings(tmp_path, url, auth=token_auth(sb.url))  # default liveness
        try:
            async with running(settings) as daemon:
                runner = daemon.runners["main"]
                await small_send_buffer(daemon, gw)
                ahead = runner.read_ahead
                assert ahead is not None
                client = ahead._ws.transport
                held = 0
                async with asyncio.timeout(60):
                    while not client.is_closing() and held <= HELD_BOUND:
                        held = client.get_write_buffer_size()
                        await asyncio.sleep(0.01)
                assert client.is_closing(), f"{held} bytes of pongs held, connection open"
                await wait_until(lambda: gw.connections > 1, timeout=30)
                assert runner.stats.closes["1006"] >= 1
                assert "the gateway stopped reading" in runner.stats.last_close
                assert "bytes of answers to its pings unwritten" in runner.stats.last_close
        finally:
            gw.release()


@pytest.mark.usefixtures("fresh_pysink")
async def test_a_gateway_that_stops_reading_while_the_reader_waits_for_room(
    sandbox_factory, tmp_path: Path
) -> None:
    """The sink holds its writes, the reader waits for room and the read-ahead answers the
    gateway's pings (the liveness clock paused meanwhile: our own backpressure): its pong that
    cannot be written aborts the connection after the deadline, rather than the read-ahead
    wait in the drain for good. The sink back, the stream reconnects and delivers."""
    sb = await sandbox_factory(backlog=0)
    gw = WedgingGateway(events=15)
    async with ws_server(gw.handler) as url:
        settings = make_settings(
            tmp_path,
            url,
            auth=token_auth(sb.url),
            sink={"type": "python", "target": "pysink:handle"},
            # One worker taking 5 at a time, 5 more queued: the reader waits after 10 events.
            pipeline={"workers": 1, "queue_size": 5, "batch_max": 5},
            connection={
                "ping_interval_s": 0.5,
                "liveness_floor_s": 1.0,
                "liveness_max_s": 2.0,
                "paused_read_ahead_after_s": 0.05,
            },
        )
        gate = pysink.GATES["main"] = asyncio.Event()
        try:
            async with running(settings) as daemon:
                runner = daemon.runners["main"]
                await wait_until(
                    lambda: runner.read_ahead is not None and runner.read_ahead.reading
                )
                await small_send_buffer(daemon, gw)
                async with asyncio.timeout(60):
                    await gw.aborted.wait()
                assert runner.stats.paused_pings > 0
                gate.set()
                await wait_until(lambda: gw.connections > 1, timeout=30)
                assert "the gateway stopped reading" in runner.stats.last_close
                await wait_until(lambda: len(pysink.DELIVERED) >= 10)
        finally:
            gate.set()
            gw.release()


async def test_a_stop_ends_though_the_gateway_stopped_reading(
    sandbox_factory, tmp_path: Path
) -> None:
    """The stop comes while the wedged reader still has time left (a long liveness deadline):
    ``complete`` cannot be written either, and is not waited for past complete_timeout_s (0.5
    s here, against 60 s of liveness); the daemon exits within its stop budget instead of
    waiting in the drain until killed."""
    sb = await sandbox_factory(backlog=0)
    gw = WedgingGateway()
    async with ws_server(gw.handler) as url:
        settings = wedge_settings(
            tmp_path,
            url,
            sb.url,
            liveness_floor_s=60.0,
            liveness_max_s=60.0,
            complete_timeout_s=0.5,
        )
        daemon = await Daemon.create(settings)
        task = asyncio.create_task(daemon.run())
        try:
            await small_send_buffer(daemon, gw)
            async with asyncio.timeout(60):
                await gw.wedged.wait()
            budget = stop_budget(settings)
            daemon.request_stop()
            async with asyncio.timeout(budget.streams_s + budget.drain_s + budget.commit_s):
                await task
            assert gw.connections == 1
        finally:
            daemon.request_stop()
            gw.release()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_cancelled_session_does_not_wait_to_write_its_close_frame() -> None:
    """A stop that cancels the session (the daemon's, after complete_timeout_s and a grace)
    leaves connect's __aexit__ to close: websockets writes the close frame and waits for the
    drain without a limit (close_timeout starts after it). A close frame unwritten after
    CLOSE_WRITE_S aborts the connection instead."""
    go, wedged = asyncio.Event(), asyncio.Event()
    transports: list[asyncio.Transport] = []

    async def handler(ws: ServerConnection) -> None:
        await go.wait()
        transport = stop_reading(ws)
        transports.append(transport)
        await flood_pings(transport, wedged)

    async def session(url: str) -> None:
        async with connect(
            url.replace("http", "ws", 1),
            subprotocols=["graphql-transport-ws"],
            close_timeout=30,
        ) as ws:
            sock = ws.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # small_send_buffer
            go.set()
            async for _ in ws:  # each ping read and answered, until the pongs cannot go out
                await ws.send('{"type":"pong"}')

    async with ws_server(handler) as url:
        task = asyncio.create_task(session(url))
        try:
            async with asyncio.timeout(60):
                await wedged.wait()
            task.cancel()
            async with asyncio.timeout(CLOSE_WRITE_S + 10):
                await asyncio.gather(task, return_exceptions=True)
        finally:
            for t in transports:
                t.abort()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_redirect_loop_on_the_upgrade_stays_within_the_upgrade_budget(
    sandbox_factory, tmp_path: Path
) -> None:
    """A gateway (or a proxy before it) answering the upgrade 302 to itself: not followed,
    each attempt is one upgrade request, so the key's budget holds (websockets would follow
    ten hops per attempt); the stream backs off, saying where it was sent (host only)."""
    sb = await sandbox_factory(backlog=0)
    requests: list[float] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        if b"upgrade: websocket" in head.lower():
            requests.append(time.monotonic())
        path = head.split(b" ", 2)[1]
        writer.write(
            b"HTTP/1.1 302 Found\r\nLocation: " + path + b"\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limit = 3
    try:
        settings = make_settings(
            tmp_path,
            f"http://127.0.0.1:{port}",
            auth=token_auth(sb.url),
            connection={
                "backoff_initial_s": 0.01,
                "backoff_max_s": 0.05,
                "upgrade_limit": limit,
                "upgrade_window_s": 30.0,
            },
        )
        async with running(settings) as daemon:
            runner = daemon.runners["main"]
            # `limit` attempts booked, the next waits for the window.
            await wait_until(lambda: runner.state.value == "throttled", timeout=20)
            assert len(requests) == limit
            assert runner.stats.closes["http_3xx"] == limit
            reason = runner.stats.last_close
            assert f"redirected to 127.0.0.1:{port} (HTTP 302); not followed" in reason
            assert "subscriptions" not in reason and "key=" not in reason  # the host only
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("status", [503, 429])
async def test_retry_after_on_a_refused_upgrade_is_honoured(
    status: int, sandbox_factory, tmp_path: Path
) -> None:
    """``Retry-After: 1`` on a refused upgrade: the next attempt waits for it, longer than
    the policy's own wait here (backoff 0.05 s for a 503, rate_limited_s 0.5 s plus at most
    0.05 s of jitter for a 429)."""
    sb = await sandbox_factory(backlog=0)
    requests: list[float] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        requests.append(time.monotonic())
        writer.write(
            b"HTTP/1.1 %d Refused\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n" % status
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        settings = make_settings(tmp_path, url, auth=token_auth(sb.url))
        async with running(settings) as daemon:
            await wait_until(lambda: len(requests) >= 2, timeout=20)
            reason = daemon.runners["main"].stats.last_close
    finally:
        server.close()
        await server.wait_closed()
    assert f"HTTP {status}" in reason and "Retry-After" in reason
    assert requests[1] - requests[0] >= 0.9
