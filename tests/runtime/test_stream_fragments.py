"""A message the gateway sends in many fragments (frames) is one message, whatever their
number: its size is bounded by max_frame_bytes, not the count of its pieces.

websockets' reassembly refuses a message of more than 4,096 frames and fails the connection
with 1009; a gateway or a proxy that cuts frames small (a 4 MB event in 1 KB frames) sends the
same message again at every resume, and the stream was held there for good, logged as "a frame
larger than 67108864 bytes arrived (1009) ... raise max_frame_bytes", which never helped.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from support import make_settings, running, sink_ids, wait_until
from test_hostile_gateway_session import event_frame, token_auth, ws_server
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

FRAGMENTS = 20_000  # of one message, well past websockets' 4,096


class FragmentingGateway:
    """Acks, answers pings, and on a subscribe sends event 1 whole, event 2 in FRAGMENTS
    frames (a byte each, then empty ones), event 3 whole; closes after the client's
    ``complete``."""

    def __init__(self) -> None:
        self.connections = 0

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                kind = json.loads(message).get("type")
                if kind == "connection_init":
                    await ws.send('{"type":"connection_ack"}')
                elif kind == "ping":
                    await ws.send('{"type":"pong"}')
                elif kind == "subscribe":
                    sub_id = json.loads(message)["id"]
                    await ws.send(event_frame(sub_id, 1))
                    data = event_frame(sub_id, 2).encode()
                    pieces = [data[i : i + 1] for i in range(len(data))]
                    await ws.send(pieces + [b""] * (FRAGMENTS - len(pieces)))
                    await ws.send(event_frame(sub_id, 3))
                elif kind == "complete":
                    await ws.close(1000)
                    return


async def test_a_message_in_thousands_of_fragments_is_one_event_and_the_stream_goes_on(
    sandbox_factory, tmp_path: Path
) -> None:
    sb = await sandbox_factory(backlog=0)
    gw = FragmentingGateway()
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
