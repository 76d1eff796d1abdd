"""A gateway's close reason is the far end's text: one quoting the application key across the
200th character of what the stream says it waits for (/readyz, STATUS=, ``status``) was cut
there before it was masked, and the start of the key was left to read. A real WebSocket server
on loopback closes; tokens come from the sandbox."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from support import make_settings, running, wait_until
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from consumer.core import protocol
from consumer.core.close_policy import _STOP_CODES
from consumer.runtime.assembly import register_secrets
from consumer.runtime.daemon import for_a_person
from consumer.sandbox import SandboxOptions

APP_KEY = SandboxOptions().app_key
SAID = f"{_STOP_CODES[4406]}: "  # what the stream says of a 4406, before the server's reason
PAD = "p" * (190 - len(SAID))  # puts the key across the 200th character


async def closes_quoting_the_key(ws: ServerConnection) -> None:
    """Closes at connection_init with 4406 and a reason that quotes the application key."""
    async for _ in ws:
        await ws.close(4406, PAD + APP_KEY)
        return


async def test_a_close_reason_quoting_the_key_is_masked_before_it_is_cut(
    sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    assert len((PAD + APP_KEY).encode()) <= 123  # a close frame's reason
    sandbox = await sandbox_factory(backlog=0)
    async with serve(
        closes_quoting_the_key, "127.0.0.1", 0, subprotocols=[Subprotocol(protocol.SUBPROTOCOL)]
    ) as server:
        port = server.sockets[0].getsockname()[1]
        settings = make_settings(
            tmp_path,
            f"ws://127.0.0.1:{port}",
            auth={
                "client_id": SandboxOptions().client_id,
                "client_secret": SandboxOptions().client_secret,
                "token_url": f"{sandbox.url}/oauth/v1/tokens",
            },
            connection={
                "close_actions": {"4406": "reconnect"},  # waits instead of stopping
                "backoff_initial_s": 60.0,
                "backoff_max_s": 120.0,
            },
        )
        register_secrets(settings)  # as run does before the daemon starts
        async with running(settings) as daemon:
            runner = daemon.runners["main"]
            await wait_until(lambda: bool(runner.waiting_for()))
            shown = for_a_person(runner.waiting_for())  # as every view shows it
    assert shown.startswith(SAID + PAD), shown  # the server's reason is there...
    pieces = [APP_KEY[i : i + 6] for i in range(len(APP_KEY) - 5)]
    leaked = [p for p in pieces if p in shown]
    assert not leaked, f"a piece of the application key is shown: {shown!r}"  # ...not the key
