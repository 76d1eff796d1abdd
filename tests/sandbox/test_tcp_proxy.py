"""tests/tcp_proxy.py: forwarding, a partition (blackhole), a cut, and recovery, against a
tiny echo server."""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
from tcp_proxy import TcpProxy

SILENCE_S = 0.3  # how long a black-holed read is given to (not) answer


class Echo:
    """An asyncio echo server (on the test's loop) that counts its connections."""

    def __init__(self) -> None:
        self.accepted = 0
        self.ended = 0
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.ended += 1
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    e = Echo()
    e.server = await asyncio.start_server(e.handle, "127.0.0.1", 0)
    yield e
    e.server.close()
    await e.server.wait_closed()


@pytest.fixture
def proxy(echo: Echo) -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", echo.port) as p:
        yield p


async def wait_for(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(10):
        return await reader.readexactly(len(data))


async def ended(reader: asyncio.StreamReader) -> None:
    """Wait until the connection ends: EOF or a reset."""
    async with asyncio.timeout(10):
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass


def close(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


async def test_forwards_both_ways_with_half_close(proxy: TcpProxy, echo: Echo):
    reader, writer = await connect(proxy.port)
    assert await roundtrip(reader, writer, b"hello") == b"hello"
    big = bytes(range(256)) * 8192  # 2 MiB: backpressure on the way
    writer.write(big)
    writer.write_eof()  # the echo server sees EOF, answers the rest, closes
    async with asyncio.timeout(10):
        assert await reader.read() == big
    await wait_for(lambda: echo.ended == 1)
    close(writer)


async def test_blackhole_then_restore(proxy: TcpProxy, echo: Echo):
    r1, w1 = await connect(proxy.port)
    assert await roundtrip(r1, w1, b"before") == b"before"
    proxy.blackhole()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(roundtrip(r1, w1, b"lost"), SILENCE_S)
    # A new connection is accepted, but nothing reaches the target.
    r2, w2 = await connect(proxy.port)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(roundtrip(r2, w2, b"lost too"), SILENCE_S)
    # The client giving up does not cross the partition: the target still holds its end.
    close(w1)
    r3, w3 = await connect(proxy.port)  # a connection made after the close, as a marker
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(roundtrip(r3, w3, b"x"), SILENCE_S)
    assert (echo.accepted, echo.ended) == (1, 0)

    proxy.restore()
    await wait_for(lambda: echo.ended == 1)  # the black-holed connection is reset
    await ended(r2)  # so are the ones accepted during the partition
    await ended(r3)
    r4, w4 = await connect(proxy.port)
    assert await roundtrip(r4, w4, b"after") == b"after"
    assert echo.accepted == 2
    for w in (w2, w3, w4):
        close(w)


async def test_cut_resets_and_refuses_until_restore(proxy: TcpProxy, echo: Echo):
    reader, writer = await connect(proxy.port)
    assert await roundtrip(reader, writer, b"ping") == b"ping"
    proxy.cut()
    await ended(reader)
    await wait_for(lambda: echo.ended == 1)  # the target's side is reset too
    close(writer)
    with pytest.raises(ConnectionRefusedError):
        await connect(proxy.port)
    proxy.restore()
    reader, writer = await connect(proxy.port)  # the same port again
    assert await roundtrip(reader, writer, b"back") == b"back"
    close(writer)


async def test_cut_while_black_holed_and_restore(proxy: TcpProxy, echo: Echo):
    reader, writer = await connect(proxy.port)
    assert await roundtrip(reader, writer, b"a") == b"a"
    proxy.blackhole()
    proxy.cut()
    await ended(reader)
    await wait_for(lambda: echo.ended == 1)
    close(writer)
    proxy.blackhole()  # listening again, forwarding nothing
    r2, w2 = await connect(proxy.port)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(roundtrip(r2, w2, b"b"), SILENCE_S)
    proxy.restore()
    await ended(r2)
    r3, w3 = await connect(proxy.port)
    assert await roundtrip(r3, w3, b"c") == b"c"
    for w in (w2, w3):
        close(w)


async def test_unreachable_target_resets_the_client():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with TcpProxy("127.0.0.1", port) as proxy:
            try:
                reader, writer = await connect(proxy.port)
            except ConnectionResetError:
                return  # reset before the client's connect call even returned
            await ended(reader)
            close(writer)


class _SyncEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def test_sync_clients_and_stop_resets_connections():
    """From a sync test (no event loop at all), with a threaded echo server."""
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SyncEcho) as server:
        server.daemon_threads = True
        serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        serving.start()
        try:
            proxy = TcpProxy("127.0.0.1", server.server_address[1])
            with proxy, socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
                c.sendall(b"sync")
                assert c.recv(4, socket.MSG_WAITALL) == b"sync"
                proxy.blackhole()
                c.settimeout(SILENCE_S)
                c.sendall(b"x")
                with pytest.raises(TimeoutError):
                    c.recv(1)
                c.settimeout(10)
                proxy.stop()  # resets what is still open, ends its thread
                with pytest.raises(ConnectionResetError):
                    while c.recv(65536):
                        pass
        finally:
            server.shutdown()
            serving.join(10)
