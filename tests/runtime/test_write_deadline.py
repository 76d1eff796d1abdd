"""The stream's connection bounds every write itself (consumer.runtime.connection.Connection): a
frame a peer that stopped reading never takes aborts the connection after ``write_timeout()``,
whichever call wrote it, and the close that follows says why (its ``__cause__``); the pongs
websockets writes itself, whatever the deadline, once they pass UNWRITTEN_MAX. The runner's
use of it (deadlines by phase, the reconnect) is in test_hostile_gateway_session.py."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
from test_hostile_gateway_session import (
    HELD_BOUND,
    RAW_WS_PING,
    flood_pings,
    stop_reading,
    ws_server,
)
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, ConnectionClosedError

from consumer.runtime.connection import UNWRITTEN_MAX, Connection, WriteStalled, connect


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[Connection]:
    """The stream's connection class to ``url``, with a small send buffer: a peer that stops
    reading fills it soon."""
    async with connect(
        url.replace("http", "ws", 1),
        subprotocols=["graphql-transport-ws"],
        close_timeout=30,
    ) as ws:
        assert isinstance(ws, Connection)
        sock = ws.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        yield ws


@pytest.mark.parametrize("write", ["send", "pong"])
async def test_a_frame_unwritten_past_its_deadline_aborts_the_connection(write: str) -> None:
    go, wedged = asyncio.Event(), asyncio.Event()
    transports: list[asyncio.Transport] = []

    async def handler(ws: ServerConnection) -> None:
        await go.wait()
        transport = stop_reading(ws)
        transports.append(transport)
        await flood_pings(transport, wedged)

    async def session(url: str) -> ConnectionClosed:
        async with client(url) as ws:
            ws.write_timeout = lambda: 0.5
            go.set()
            try:
                async for _ in ws:  # each ping answered, until an answer cannot go out
                    if write == "send":
                        await ws.send('{"type":"pong"}')
                    else:
                        await ws.pong(b"pong")
            except ConnectionClosed as exc:
                return exc
        raise AssertionError("the connection closed cleanly")

    async with ws_server(handler) as url:
        try:
            async with asyncio.timeout(60):
                closed = await session(url)
        finally:
            for t in transports:
                t.abort()
    assert isinstance(closed, ConnectionClosedError) and closed.rcvd is None  # lost: 1006
    assert isinstance(closed.__cause__, WriteStalled)
    assert closed.__cause__.after_s == 0.5


async def test_pongs_websockets_writes_itself_are_bounded_by_size() -> None:
    """A WebSocket ping is answered as it is read, the pong written to the transport directly
    (never waited for, so no deadline): the client reads on whatever it cannot write. Against
    a peer that stops reading and floods pings, the pongs held unwritten are cut at
    UNWRITTEN_MAX, however long the write deadline (600 s here, the longest liveness
    deadline)."""
    go, wedged = asyncio.Event(), asyncio.Event()
    transports: list[asyncio.Transport] = []

    async def handler(ws: ServerConnection) -> None:
        await go.wait()
        transport = stop_reading(ws)
        transports.append(transport)
        await flood_pings(transport, wedged, RAW_WS_PING)

    async def read(ws: Connection) -> ConnectionClosed:
        try:
            async for _ in ws:  # nothing comes: the connection answers the pings itself
                pass
        except ConnectionClosed as exc:
            return exc
        raise AssertionError("the connection closed cleanly")

    async def session(url: str) -> tuple[ConnectionClosed | None, int]:
        async with client(url) as ws:
            ws.write_timeout = lambda: 600.0
            reader = asyncio.create_task(read(ws))
            go.set()
            held = 0
            try:  # until the connection is cut, or holds more than it may
                while not reader.done() and held <= HELD_BOUND:
                    held = ws.transport.get_write_buffer_size()
                    await asyncio.sleep(0.01)
            finally:
                if not reader.done():
                    ws.transport.abort()
            return await reader if held <= HELD_BOUND else None, held

    async with ws_server(handler) as url:
        try:
            async with asyncio.timeout(60):
                closed, held = await session(url)
        finally:
            for t in transports:
                t.abort()
    assert closed is not None, f"{held} bytes of pongs held unwritten, connection open"
    assert isinstance(closed, ConnectionClosedError) and closed.rcvd is None  # lost: 1006
    assert isinstance(closed.__cause__, WriteStalled)
    assert closed.__cause__.held > UNWRITTEN_MAX
