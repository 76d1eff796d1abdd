"""A gateway that redirects the WebSocket upgrade to another origin: the token and the
application key go in connection_init, which websockets cannot strip on a redirect. The daemon
does not follow it (the stream stops, naming the host), and neither does preflight (nothing
reaches the other origin)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from support import make_settings

from consumer.commands import preflight
from consumer.errors import ExitCode
from consumer.runtime.daemon import Daemon
from consumer.sandbox import SandboxOptions


@contextlib.asynccontextmanager
async def redirector(to: str) -> AsyncIterator[str]:
    """An HTTP server on 127.0.0.1 that answers every request 302 to ``to`` + its path."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1].decode()
        writer.write(
            f"HTTP/1.1 302 Found\r\nLocation: {to}{path}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def test_no_credentials_go_to_another_origin(sandbox_factory, tmp_path: Path) -> None:
    gw = await sandbox_factory(backlog=5)
    port = gw.url.rsplit(":", 1)[1]
    opts = SandboxOptions()
    async with redirector(f"ws://localhost:{port}") as url:  # the sandbox, by another name
        settings = make_settings(
            tmp_path,
            url,
            auth={
                "client_id": opts.client_id,
                "client_secret": opts.client_secret,
                "token_url": f"{gw.url}/oauth/v1/tokens",
            },
        )
        daemon = await Daemon.create(settings)
        async with asyncio.timeout(60):
            await daemon.run()  # the stream stops; so does the daemon
    assert daemon.exit_code == ExitCode.CONFIG
    runner = daemon.runners["main"]
    assert runner.state.value == "stopped"
    assert f"redirected to another origin (localhost:{port})" in runner.stats.last_close
    assert gw.stats.connections == 0  # not followed: nothing at all reached that origin
    assert gw.stats.inits == 0
    # preflight: the same check, the same refusal
    async with redirector(f"ws://localhost:{port}") as url:
        settings = settings.model_copy(
            update={
                "streams": {
                    "main": settings.streams["main"].model_copy(update={"gateway_url": url})
                }
            }
        )
        items: list[preflight.Item] = []
        assert not await preflight.run(settings, items.append)
    [gateway] = [i for i in items if i.what == "gateway"]
    assert gateway.level == "FAIL" and f"another origin (localhost:{port})" in gateway.detail
    assert gw.stats.connections == 0  # preflight does not follow it either (it did: 10 hops)
    assert gw.stats.inits == 0
