"""An HTTP server on loopback that answers a byte at a time, for the deadline tests of the
HTTP sinks (webhook POST, orchestration GET): each byte comes well within any read timeout, so
only a bound on the whole request ends the wait."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

GAP_S = 0.1  # between two bytes
MAX_S = 60.0  # then the answer ends (a test's own guard fires long before)


@contextlib.asynccontextmanager
async def trickling_server(*, body: bool) -> AsyncIterator[int]:
    """Yields the port. Every request is answered ``200 OK`` slowly: its header without end
    (``body`` False) or, after the header, a JSON array without end (``body`` True). At exit the
    handlers stop and are waited for."""
    stop = asyncio.Event()
    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            if body:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n[")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Slow: ")
            for _ in range(round(MAX_S / GAP_S)):
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), GAP_S)
                if stop.is_set() or writer.is_closing():
                    break
                writer.write(b"1," if body else b"a")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        try:
            yield int(server.sockets[0].getsockname()[1])
        finally:
            stop.set()
            if handlers:
                await asyncio.wait(handlers, timeout=10)
