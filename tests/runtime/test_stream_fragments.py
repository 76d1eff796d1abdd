"""A message the gateway sends in many fragments (frames) is one message, whatever their
number: its size is bounded by max_frame_bytes, not the count of its pieces.

websockets' reassembly refuses a message of more than 4,096 frames and fails the connection
with 1009; a gateway or a proxy that cuts frames small (a 4 MB event in 1 KB frames) sends the
same message again at every resume, and the stream was held there for good, logged as "a frame
larger than 67108864 bytes arrived (1009) ... raise max_frame_bytes", which never helped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
from collections.abc import AsyncIterator
from pathlib import Path

from support import make_settings, running, sink_ids, wait_until
from test_hostile_gateway_session import ScriptedGateway, event_frame, token_auth, ws_server
from websockets.asyncio.server import ServerConnection

from consumer.runtime.connection import Connection, connect

FRAGMENTS = 20_000  # of one message, well past websockets' 4,096


async def send_fragmented(ws: ServerConnection, sub_id: str) -> None:
    """Event 1 whole, event 2 in FRAGMENTS frames (a byte each, then empty ones), event 3
    whole."""
    await ws.send(event_frame(sub_id, 1))
    data = event_frame(sub_id, 2).encode()
    pieces = [data[i : i + 1] for i in range(len(data))]
    await ws.send(pieces + [b""] * (FRAGMENTS - len(pieces)))
    await ws.send(event_frame(sub_id, 3))


async def test_a_message_in_thousands_of_fragments_is_one_event_and_the_stream_goes_on(
    sandbox_factory, tmp_path: Path
) -> None:
    sb = await sandbox_factory(backlog=0)
    gw = ScriptedGateway(send_fragmented)
    async with ws_server(gw.handler) as url:
        settings = make_settings(tmp_path, url, auth=token_auth(sb.url))
        async with running(settings) as daemon:
            runner = daemon.runners["main"]
            await wait_until(
                lambda: len(sink_ids(tmp_path / "events.jsonl")) >= 3 or bool(runner.stats.closes)
            )
            assert not runner.stats.closes, runner.stats.last_close
            assert sorted(sink_ids(tmp_path / "events.jsonl")) == ["uid-1", "uid-2", "uid-3"]
            assert runner.stats.malformed == 0
            assert gw.connections == 1


async def test_a_read_of_a_fragmented_message_cancelled_midway_loses_none_of_it() -> None:
    """The read-ahead's ``recv`` is cancelled when the reader's wait ends, maybe halfway
    through a fragmented message: nothing of it is lost (aiohttp joins the fragments in its
    parser and queues whole messages: a cancelled read takes nothing), and the next read has
    the message whole."""
    message = bytes(range(256)) * 24  # 6,144 fragments of a byte
    first_sent, rest = asyncio.Event(), asyncio.Event()

    async def fragments() -> AsyncIterator[bytes]:
        for i, piece in enumerate(message):
            if i == 5000:
                first_sent.set()
                await rest.wait()
            yield bytes([piece])

    server: list[ServerConnection] = []

    async def handler(ws: ServerConnection) -> None:
        server.append(ws)
        await ws.send(fragments())
        await ws.wait_closed()

    def all_taken(ws: Connection) -> bool:
        """Every byte the server wrote so far is in the client's process: none in the server's
        buffer or socket, none unread in the client's socket."""
        out, into = server[0].transport, ws.transport
        return (
            out.get_write_buffer_size() == 0
            and _queued(out.get_extra_info("socket"), termios.TIOCOUTQ) == 0
            and _queued(into.get_extra_info("socket"), termios.FIONREAD) == 0
        )

    async with (
        ws_server(handler) as url,
        connect(url.replace("http", "ws", 1), subprotocols=["graphql-transport-ws"]) as ws,
    ):
        reading = asyncio.create_task(ws.recv(decode=False))
        await first_sent.wait()
        await wait_until(lambda: all_taken(ws))  # the 5,000 fragments read by the client
        assert not reading.done()  # and the read waits for the rest
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        rest.set()
        async with asyncio.timeout(10):
            assert await ws.recv(decode=False) == message


def _queued(sock: socket.socket, request: int) -> int:
    """Bytes in a TCP socket's send queue (TIOCOUTQ) or unread in its receive queue (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0])
