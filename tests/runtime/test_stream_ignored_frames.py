"""Frames the session ignores (a ``next``, ``error`` or ``complete`` for another subscription
id, a second ``connection_ack``) are logged once per session for each type: events that all
come under another id are the one thing the log must say (the stream looks connected and
alive, and no alert on lag or a stuck checkpoint fires while nothing is consumed). One warning
a session for any ignored frame went to whichever came first: a gateway that acknowledges
twice left the ignored events unsaid."""

from __future__ import annotations

from pathlib import Path

from log_capture import log_records
from support import make_settings, running, sink_ids, wait_until
from test_hostile_gateway_session import ScriptedGateway, event_frame, token_auth, ws_server
from websockets.asyncio.server import ServerConnection

IGNORED = "frame for an unknown subscription id ignored (logged once per session)"


async def send_some_under_another_id(ws: ServerConnection, sub_id: str) -> None:
    """Event 1 under the client's id, three events under another id, then event 2 under the
    client's id."""
    await ws.send(event_frame(sub_id, 1))
    for n in (10, 11, 12):
        await ws.send(event_frame("another-subscription", n))
    await ws.send(event_frame(sub_id, 2))


async def test_events_under_another_id_are_logged_whatever_was_ignored_before(
    sandbox_factory, tmp_path: Path
) -> None:
    sb = await sandbox_factory(backlog=0)
    async with ws_server(ScriptedGateway(send_some_under_another_id, acks=2).handler) as url:
        settings = make_settings(tmp_path, url, auth=token_auth(sb.url))
        with log_records() as logged:
            async with running(settings) as daemon:
                await wait_until(lambda: len(sink_ids(tmp_path / "events.jsonl")) >= 2)
                assert daemon.runners["main"].stats.ignored == 4
    warned = [r for r in logged if r["event"] == IGNORED]
    assert sorted(r["type"] for r in warned) == ["connection_ack", "next"], warned
    assert [r["id"] for r in warned if r["type"] == "next"] == ["another-subscription"]
