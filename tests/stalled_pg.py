"""A PostgreSQL server that completes the start-up (no SSL, trust auth) and then never answers:
a server stuck behind a lock, a frozen VM, a partition after the connect. Every client meets
its own timeouts, or waits for ever.

:func:`stalled_postgres` serves it on 127.0.0.1 (a free port) from the test's own loop, so a
command run in a thread or a process meanwhile finds it answering the connect. Run alone:
``python tests/stalled_pg.py PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
from collections.abc import AsyncIterator

SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _parameter(name: str, value: str) -> bytes:
    return _message(b"S", name.encode() + b"\0" + value.encode() + b"\0")


READY = (
    _message(b"R", struct.pack("!i", 0))  # AuthenticationOk
    + _parameter("server_version", "16.0")
    + _parameter("client_encoding", "UTF8")
    + _parameter("server_encoding", "UTF8")
    + _parameter("DateStyle", "ISO, MDY")
    + _parameter("integer_datetimes", "on")
    + _parameter("standard_conforming_strings", "on")
    + _message(b"K", struct.pack("!ii", 4242, 1))  # BackendKeyData
    + _message(b"Z", b"I")  # ReadyForQuery: idle
)


class StalledServer:
    def __init__(self) -> None:
        self.port = 0
        self.connections = 0  # start-ups completed (a client's CancelRequest counts too)
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # type: ignore[arg-type]
        try:
            while True:
                n = struct.unpack("!i", await reader.readexactly(4))[0]
                code = struct.unpack("!i", (await reader.readexactly(n - 4))[:4])[0]
                if code not in (SSL_REQUEST, GSSENC_REQUEST):
                    break  # the StartupMessage
                writer.write(b"N")  # no encryption: go on in the clear
                await writer.drain()
            writer.write(READY)
            await writer.drain()
            self.connections += 1
            while await reader.read(65536):  # every query, even a goodbye: silence
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def close_connections(self) -> None:
        for writer in list(self._writers):
            writer.close()
        async with asyncio.timeout(10):  # each ends as its connection closes
            await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def stalled_postgres() -> AsyncIterator[StalledServer]:
    stalled = StalledServer()
    server = await asyncio.start_server(stalled._serve, "127.0.0.1", 0)
    stalled.port = int(server.sockets[0].getsockname()[1])
    try:
        yield stalled
    finally:
        server.close()
        await stalled.close_connections()
        await server.wait_closed()


async def _main(port: int) -> None:
    stalled = StalledServer()
    server = await asyncio.start_server(stalled._serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1])))
