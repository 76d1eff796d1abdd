"""A TCP proxy for tests, with a network's failures on demand: :class:`TcpProxy`.

It runs in its own thread with its own asyncio loop, so sync tests, async tests (whatever
their loop does) and clients in other processes can all go through it. It listens on
127.0.0.1 (a free port) and forwards each connection to the target, both ways, with
backpressure and half-closes passed on. Three modes, switched from any other thread (each
call returns once the switch is done):

* :meth:`~TcpProxy.restore`: forward (the start). Connections black-holed earlier are reset.
* :meth:`~TcpProxy.blackhole`: a network partition. Existing connections forward nothing more
  in either direction, and no close or reset crosses either (a client giving up is not seen
  by the target, nor the reverse); new connections are accepted but never reach the target.
  Everyone sees silence and meets their own timeouts.
* :meth:`~TcpProxy.cut`: every connection is reset (both sides), and new ones are refused
  (nothing listens on the port, which stays reserved for :meth:`~TcpProxy.restore`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

Mode = Literal["forward", "blackhole", "cut"]
T = TypeVar("T")

CALL_TIMEOUT_S = 5.0  # bound on every switch, start and stop


def _reset(transport: asyncio.Transport | None) -> None:
    """Close abruptly: a TCP RST (linger 0), not a FIN."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _bound_socket(port: int) -> socket.socket:
    """A TCP socket on 127.0.0.1:port, sharing the port with our other sockets (SO_REUSEPORT)
    and past TIME_WAIT (SO_REUSEADDR)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


class _Side(asyncio.Protocol):
    """One end of a proxied connection: the client's or the target's."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.made(self)

    def data_received(self, data: bytes) -> None:
        self.conn.data(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        return self.conn.eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.conn.lost(self, exc)

    def pause_writing(self) -> None:
        other = self.conn.other(self)
        if other is not None and other.transport is not None and not other.lost:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.conn.other(self)
        if other is not None and other.transport is not None and not other.lost:
            other.transport.resume_reading()


class _Connection:
    """A client's connection and its connection to the target."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self)
        self.target: _Side | None = None
        self.blackholed = False

    def other(self, side: _Side) -> _Side | None:
        return self.target if side is self.client else self.client

    def sides(self) -> list[_Side]:
        return [self.client] if self.target is None else [self.client, self.target]

    def made(self, side: _Side) -> None:
        if side is not self.client:
            self.target = side
            return
        proxy = self.proxy
        proxy.connections.add(self)
        if proxy.mode == "cut":  # accepted just as the listener closed
            self.reset()
        elif proxy.mode == "blackhole":
            self.blackholed = True  # never reaches the target; reads are discarded
        else:
            assert side.transport is not None
            side.transport.pause_reading()  # until the target is connected
            proxy.spawn(self._connect())

    async def _connect(self) -> None:
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        target = _Side(self)
        try:
            await loop.create_connection(lambda: target, proxy.target_host, proxy.target_port)
        except OSError:
            self.reset()  # as a router would: the target is unreachable
            return
        client = self.client
        if client.lost or proxy.mode == "cut":
            self.reset()
        elif client.transport is not None:
            client.transport.resume_reading()  # blackholed meanwhile: read and discard

    def data(self, side: _Side, data: bytes) -> None:
        other = self.other(side)
        if self.blackholed or other is None or other.transport is None:
            return
        other.transport.write(data)

    def eof(self, side: _Side) -> bool:
        """A half-close: pass it on and keep the connection for the other direction."""
        other = self.other(side)
        if self.blackholed or other is None or other.transport is None:
            return True
        if other.eof:
            self.close()
        elif other.transport.can_write_eof():
            other.transport.write_eof()
        return True

    def lost(self, side: _Side, exc: Exception | None) -> None:
        if not self.blackholed:
            other = self.other(side)
            if other is not None:
                if exc is None:
                    if other.transport is not None:
                        other.transport.close()  # after what is buffered
                else:
                    _reset(other.transport)
        if all(s.lost for s in self.sides()):
            self.proxy.connections.discard(self)

    def close(self) -> None:
        for s in self.sides():
            if s.transport is not None:
                s.transport.close()

    def reset(self) -> None:
        for s in self.sides():
            _reset(s.transport)
        if all(s.lost or s.transport is None for s in self.sides()):
            self.proxy.connections.discard(self)


class TcpProxy:
    """``with TcpProxy(host, port) as proxy:`` point clients at ``127.0.0.1:proxy.port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.mode: Mode = "forward"
        self.connections: set[_Connection] = set()  # read and written in the proxy's thread
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._reserve: socket.socket | None = None  # holds the port while nothing listens
        self._port = 0

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        assert self._thread is None, "already started"
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()
        try:
            self._call(self._open())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Reset every connection, stop listening, end the thread (each step bounded)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if thread.is_alive():
                self._call(self._shutdown())
        finally:
            if thread.is_alive():
                loop.call_soon_threadsafe(loop.stop)
                thread.join(CALL_TIMEOUT_S)
            self._thread = None
            if thread.is_alive():
                raise RuntimeError("the TCP proxy's thread did not stop")

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._port, "start() first"
        return self._port

    # --- failures -----------------------------------------------------------------------------

    def blackhole(self) -> None:
        """Forward nothing more, pass no close on; accept new connections, never forward."""
        self._call(self._switch("blackhole"))

    def restore(self) -> None:
        """Forward again: new connections reach the target; black-holed ones are reset."""
        self._call(self._switch("forward"))

    def cut(self) -> None:
        """Reset every connection and refuse new ones until :meth:`restore`."""
        self._call(self._switch("cut"))

    # --- in the proxy's thread ----------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._loop
        assert loop is not None and self._thread is not None, "start() first"
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("TcpProxy methods are called from other threads")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(CALL_TIMEOUT_S)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self) -> None:
        self._reserve = _bound_socket(0)
        self._port = int(self._reserve.getsockname()[1])
        await self._listen()

    async def _listen(self) -> None:
        if self._server is not None:
            return
        sock = _bound_socket(self._port)
        try:
            sock.listen(128)
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: _Connection(self).client, sock=sock)
        except BaseException:
            sock.close()
            raise

    def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()  # the listening socket only (3.11: connections stay)
            self._server = None

    async def _switch(self, mode: Mode) -> None:
        if mode == "cut":
            self.mode = mode
            self._unlisten()
            await self._reset_all()
            return
        if mode == "blackhole":
            for conn in self.connections:
                conn.blackholed = True
        else:
            await self._reset_all(blackholed_only=True)
        self.mode = mode
        await self._listen()

    async def _reset_all(self, *, blackholed_only: bool = False) -> None:
        if not blackholed_only:
            for task in list(self._tasks):  # connecting to the target
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in list(self.connections):
            if conn.blackholed or not blackholed_only:
                conn.reset()
        await asyncio.sleep(0)  # let connection_lost run

    async def _shutdown(self) -> None:
        self.mode = "cut"
        self._unlisten()
        await self._reset_all()
        self.connections.clear()
        if self._reserve is not None:
            self._reserve.close()
            self._reserve = None
