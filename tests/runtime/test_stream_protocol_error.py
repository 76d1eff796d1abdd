"""A gateway (or a proxy between) that breaks the WebSocket framing itself: the client fails
the connection with 1002 (here a frame with a reserved bit set, as a proxy that compresses
without having negotiated it writes). The stream reconnects, bounded as after a lost
connection, and says what happened: it said "connection lost without a close frame (1006)",
and an operator looked at the network rather than at what stands between it and the gateway.
"""

from __future__ import annotations

from pathlib import Path

from support import make_settings, running, wait_until
from test_hostile_gateway_session import ScriptedGateway, event_frame, token_auth, ws_server
from websockets.asyncio.server import ServerConnection

RESERVED_BIT_FRAME = b"\xc1\x02{}"  # FIN, RSV1, text; 2 bytes of payload: never negotiated


async def send_and_break(ws: ServerConnection, sub_id: str) -> None:
    """One event, then a frame no WebSocket client may accept."""
    await ws.send(event_frame(sub_id, 1))
    ws.transport.write(RESERVED_BIT_FRAME)


async def test_a_frame_that_breaks_the_websocket_protocol_is_said_so(
    sandbox_factory, tmp_path: Path
) -> None:
    sb = await sandbox_factory(backlog=0)
    gw = ScriptedGateway(send_and_break)
    async with ws_server(gw.handler) as url:
        settings = make_settings(tmp_path, url, auth=token_auth(sb.url))
        async with running(settings) as daemon:
            runner = daemon.runners["main"]
            await wait_until(lambda: gw.connections >= 2)  # reconnected
            said = runner.stats.last_close
            # The reason the transport gave (aiohttp: "... non-zero reserved bits").
            assert "WebSocket protocol" in said and "reserved bits" in said, said
            assert "1002" in said and "without a close frame" not in said, said
            assert runner.stats.closes["1002"] >= 1 and not runner.stats.closes["1006"]
