"""A gateway (or a proxy between) that breaks the WebSocket framing itself: websockets fails
the connection with 1002 (here a frame with a reserved bit set, as a proxy that compresses
without having negotiated it writes). The stream reconnects, bounded as after a lost
connection, and says what happened: it said "connection lost without a close frame (1006)",
and an operator looked at the network rather than at what stands between it and the gateway.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from support import make_settings, running, wait_until
from test_hostile_gateway_session import event_frame, token_auth, ws_server
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

RESERVED_BIT_FRAME = b"\xc1\x02{}"  # FIN, RSV1, text; 2 bytes of payload: never negotiated


class BreakingGateway:
    """Acks, answers pings, and on a subscribe sends one event, then a frame no WebSocket
    client may accept."""

    def __init__(self) -> None:
        self.connections = 0

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                msg = json.loads(message)
                if msg.get("type") == "connection_init":
                    await ws.send('{"type":"connection_ack"}')
                elif msg.get("type") == "ping":
                    await ws.send('{"type":"pong"}')
                elif msg.get("type") == "subscribe":
                    await ws.send(event_frame(msg["id"], 1))
                    ws.transport.write(RESERVED_BIT_FRAME)


async def test_a_frame_that_breaks_the_websocket_protocol_is_said_so(
    sandbox_factory, tmp_path: Path
) -> None:
    sb = await sandbox_factory(backlog=0)
    gw = BreakingGateway()
    async with ws_server(gw.handler) as url:
        settings = make_settings(tmp_path, url, auth=token_auth(sb.url))
        async with running(settings) as daemon:
            runner = daemon.runners["main"]
            await wait_until(lambda: gw.connections >= 2)  # reconnected
            said = runner.stats.last_close
            assert "WebSocket protocol" in said and "reserved bits must be 0" in said, said
            assert "1002" in said and "without a close frame" not in said, said
            assert runner.stats.closes["1002"] >= 1 and not runner.stats.closes["1006"]
