"""The stream's WebSocket connection: aiohttp's client WebSocket (its frame reader is compiled:
about half the CPU per event of websockets' generators), behind the part of websockets'
``ClientConnection`` the runner uses (``recv``, ``send``, ``close``, ``subprotocol``,
``transport``) and raising websockets' own exceptions (``ConnectionClosedOK`` /
``ConnectionClosedError`` with the close frames received and sent and their order,
``InvalidStatus`` for a refused upgrade), so the runner and the close policy read a close as
before. None of its writes can hang on a gateway that stopped reading. A message already
received is read without a suspension (aiohttp's queue holds whole messages): ``recv`` costs
some 0.3 µs then, where websockets' ``take`` shortcut (a coroutine driven by hand) measured
0.54 µs here. The one module that knows aiohttp's WebSocket internals (its message queue,
writer and protocol).

What it does itself, rather than aiohttp's ``ClientWebSocketResponse``: it reads aiohttp's
queue of messages directly (``autoping`` and ``autoclose`` are off: aiohttp would answer a
close after waiting for the next message on the same queue the reader reads, and its pongs
are awaited writes without a bound); it answers a ping as websockets does (the pong written at
once, bounded by what is left unwritten: :data:`UNWRITTEN_MAX`); it echoes a close frame and
waits for the server to end the TCP connection (``close_timeout``); and a protocol error of
the peer (an oversized message: 1009, a malformed frame: 1002, a bad close frame) is a close
frame sent by us, as websockets fails a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Final, Literal

import aiohttp
import structlog
from aiohttp import WSMsgType
from aiohttp.client_exceptions import ClientConnectionResetError, WSServerHandshakeError
from aiohttp.http_websocket import WebSocketError
from aiohttp.streams import EofStream
from websockets.datastructures import Headers
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
    ProtocolError,
)
from websockets.frames import OK_CLOSE_CODES, Close, CloseCode
from websockets.http11 import Response

from . import tls

if TYPE_CHECKING:
    from aiohttp import ClientWebSocketResponse

log = structlog.get_logger(__name__)


# How long a close frame may wait to be written before the TCP connection is aborted instead:
# the peer's answer after it is waited for (close_timeout), which a peer that reads nothing
# never sends.
CLOSE_WRITE_S: Final = 1.0


# What the transport may hold unwritten once something arrives while writing is paused (past
# the high-water mark, 32 KiB). A ping is answered as it is read, the pong written to the
# transport directly, never waited for: a gateway that stops reading and floods pings would
# otherwise be answered into this buffer for the whole write deadline (the liveness deadline,
# up to 600 s: hundreds of MiB). Far above what the client writes itself (small frames, each
# waiting for the buffer to drain past the mark).
UNWRITTEN_MAX: Final = 1024 * 1024

# The transport's high-water mark (websockets' write_limit): a write past it waits for the
# buffer to drain, within its deadline.
WRITE_LIMIT: Final = 32 * 1024

_TEXT: Final = WSMsgType.TEXT
_BINARY: Final = WSMsgType.BINARY
_PING: Final = WSMsgType.PING
_PONG: Final = WSMsgType.PONG
_CLOSE: Final = WSMsgType.CLOSE

# A close frame's reason is at most 123 bytes (a control frame's payload, 125, less the code).
_REASON_MAX = 123


class WriteStalled(Exception):
    """Why a connection was aborted (the ``__cause__`` of its ConnectionClosed): the gateway
    stopped reading. A frame was not written within its deadline (``after_s``), or the pongs
    written for its pings piled up past :data:`UNWRITTEN_MAX` (``held`` bytes unwritten)."""

    def __init__(self, after_s: float | None = None, *, held: int = 0) -> None:
        super().__init__(
            f"a frame unwritten after {after_s:.1f} s"
            if after_s is not None
            else f"{held} bytes of answers to its pings unwritten"
        )
        self.after_s = after_s
        self.held = held


def _close_payload(code: int, reason: str) -> bytes:
    return code.to_bytes(2, "big") + reason.encode()[:_REASON_MAX]


class Connection:
    """A client WebSocket none of whose writes can hang on a peer that stopped reading.

    A frame still unwritten after its deadline aborts the connection: lost (1006), as after a
    crash, and replaced as any lost connection. The deadline: ``write_timeout()`` for a data
    frame (set by the runner for each phase; none until then), :data:`CLOSE_WRITE_S` for the
    close frame (the opening handshake has open_timeout). A data frame's abort is logged and is
    the cause (:class:`WriteStalled`) of the ConnectionClosed that follow; a close frame's is
    not (the connection was ending anyway). The pong to a ping is written at once, never
    waited for: bounded by size instead, past :data:`UNWRITTEN_MAX` unwritten the connection
    is aborted the same way."""

    write_timeout: Callable[[], float] | None = None

    def __init__(self, ws: ClientWebSocketResponse[Literal[False]], close_timeout: float) -> None:
        self._ws = ws
        queue = ws._reader
        self._read = queue.read
        # aiohttp's queue of (message, size): public in its compiled reader too.
        self._buffer = queue._buffer
        self._writer = ws._writer
        conn = ws._response.connection
        assert conn is not None and conn.transport is not None and conn.protocol is not None
        self._protocol = conn.protocol
        self.transport: asyncio.Transport = conn.transport
        self.transport.set_write_buffer_limits(high=WRITE_LIMIT)
        self.subprotocol: str | None = ws.protocol
        self.loop = asyncio.get_running_loop()
        self._close_timeout = close_timeout
        lost = self._protocol.closed  # None: lost already
        if lost is None:
            lost = self.loop.create_future()
            lost.set_result(None)
        lost.add_done_callback(_retrieve)
        self._lost: asyncio.Future[None] = lost
        self.close_rcvd: Close | None = None
        self.close_sent: Close | None = None
        self.close_rcvd_then_sent: bool | None = None
        self._cause: BaseException | None = None
        self._closing: asyncio.Task[None] | None = None

    # --- reading -------------------------------------------------------------------------

    async def recv(self, decode: bool | None = None) -> bytes:
        """The next text or binary message, as bytes (text frames unchecked for UTF-8:
        the decoder takes bad text as a dead letter). Pings are answered meanwhile. Raises
        ConnectionClosed once the connection is closed, after every message before it."""
        read = self._read
        while True:
            try:
                msg = await read()  # one recv at a time (the runner's read-ahead stops first)
            except EofStream:
                closed = await self._ended()
                raise closed from closed.__cause__  # WriteStalled, if so
            except WebSocketError as exc:
                closed = await self._failed(exc)
                raise closed from closed.__cause__  # WriteStalled, if so
            kind = msg[0]
            if kind is _TEXT or kind is _BINARY:
                data: bytes = msg[1]
                return data
            if kind is _PING:
                self._answer_ping(msg[1])
            elif kind is _CLOSE:
                closed = await self._close_received(msg[1], msg[2] or "")
                raise closed from closed.__cause__  # WriteStalled, if so
            # a pong, unasked: nothing to do

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[bytes]:
        """``async for``: messages until a normal closure (as websockets' iterator)."""
        try:
            while True:
                yield await self.recv()
        except ConnectionClosedOK:
            return

    def _answer_ping(self, payload: bytes) -> None:
        if self.close_sent is not None or self.transport.is_closing():
            return
        try:
            self._writer._write_websocket_frame(payload, _PONG, 0)
        except ClientConnectionResetError:
            return
        if self._protocol._paused:
            # Past the high-water mark only: one attribute read per ping usually.
            held = self.transport.get_write_buffer_size()
            if held > UNWRITTEN_MAX and not self.transport.is_closing():
                log.warning(
                    "the gateway stopped reading: answers to its pings piled up unwritten; "
                    "connection aborted",
                    unwritten_bytes=held,
                )
                self._set_cause(WriteStalled(held=held))
                self.transport.abort()

    # --- writing -------------------------------------------------------------------------

    async def send(self, message: str | bytes) -> None:
        """A text frame (bytes: a binary one), written within ``write_timeout()``."""
        if self.close_sent is not None or self._lost.done():
            closed = await self._closed()
            raise closed from closed.__cause__  # WriteStalled, if so
        if isinstance(message, str):
            await self._write(message.encode(), _TEXT)
        else:
            await self._write(message, _BINARY)

    async def pong(self, data: bytes = b"") -> None:
        """An unsolicited WebSocket pong, written within ``write_timeout()``."""
        await self._write(data, _PONG)

    async def _write(self, data: bytes, opcode: WSMsgType) -> None:
        try:
            self._writer._write_websocket_frame(data, opcode, 0)
        except ClientConnectionResetError:
            closed = await self._closed()
            raise closed from closed.__cause__  # WriteStalled, if so
        if not self._protocol._paused:
            return
        timeout = self.write_timeout
        timer = None
        if timeout is not None:
            bound = timeout()
            timer = self.loop.call_later(bound, self._abort_unwritten, bound)
        try:
            await self._protocol._drain_helper()  # the abort ends the wait too
        except (aiohttp.ClientError, ConnectionError):  # lost meanwhile (the abort among others)
            closed = await self._closed()
            raise closed from closed.__cause__  # WriteStalled, if so
        finally:
            if timer is not None:
                timer.cancel()
        if self.transport.is_closing():
            closed = await self._closed()
            raise closed from closed.__cause__  # WriteStalled, if so

    def _abort_unwritten(self, bound: float | None) -> None:
        if self.transport.get_write_buffer_size() == 0:
            return
        if bound is not None and not self.transport.is_closing():
            log.warning(
                "the gateway stopped reading: a frame was not written within the deadline; "
                "connection aborted",
                deadline_s=round(bound, 1),
            )
            self._set_cause(WriteStalled(bound))
        self.transport.abort()

    def _set_cause(self, exc: BaseException) -> None:
        if self._cause is None:
            self._cause = exc

    # --- closing -------------------------------------------------------------------------

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Send a close frame (written within :data:`CLOSE_WRITE_S`, else the connection is
        aborted), then wait for the server's and for it to end the TCP connection, at most
        ``close_timeout``; then end it."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(code, reason))
        await asyncio.shield(self._closing)

    async def _close(self, code: int, reason: str) -> None:
        if self.close_sent is None and not self._lost.done():
            self._send_close(Close(code, reason))
        # The server answers and ends the TCP connection. Its answer is left to the reader
        # (a recv after this raises the close, after what came before it): reading it here
        # would read aiohttp's queue beside the reader's own recv, which it does not allow.
        await self._wait_lost()

    def _send_close(self, close: Close) -> None:
        self.close_sent = close
        if self.close_rcvd is not None:
            self.close_rcvd_then_sent = True
        try:
            self._writer._write_websocket_frame(
                _close_payload(close.code, close.reason)
                if close.code != CloseCode.NO_STATUS_RCVD
                else b"",
                _CLOSE,
                0,
            )
        except ClientConnectionResetError:
            return
        self._writer._closing = True  # aiohttp's writer refuses data frames from now on
        if self._protocol._paused:
            self.loop.call_later(CLOSE_WRITE_S, self._abort_unwritten, None)

    def _record_rcvd(self, code: int, reason: str) -> Close:
        close = Close(code or CloseCode.NO_STATUS_RCVD, reason)
        if self.close_rcvd is None:
            self.close_rcvd = close
            if self.close_sent is not None:
                self.close_rcvd_then_sent = False
        return close

    async def _close_received(self, code: int, reason: str) -> ConnectionClosed:
        """The server's close frame: echoed (unless ours went first), then wait for the server
        to end the TCP connection."""
        close = Close(code or CloseCode.NO_STATUS_RCVD, reason)
        try:
            close.check()
        except ProtocolError as exc:
            return await self._fail(CloseCode.PROTOCOL_ERROR, str(exc))
        self._record_rcvd(code, reason)
        if self.close_sent is None:
            self._send_close(close)
        await self._wait_lost()
        return self._exc()

    async def _failed(self, exc: WebSocketError) -> ConnectionClosed:
        return await self._fail(exc.code, str(exc))

    async def _fail(self, code: int, reason: str) -> ConnectionClosed:
        """The peer broke the protocol: our close frame, the rest ignored, then wait for the
        server to end the TCP connection (as websockets fails a client connection)."""
        if self.close_sent is None and not self._lost.done():
            self._send_close(Close(code, reason[:_REASON_MAX]))
        await self._wait_lost()
        return self._exc()

    async def _ended(self) -> ConnectionClosed:
        """The TCP connection ended (read to its end)."""
        await self._wait_lost()
        return self._exc()

    async def _closed(self) -> ConnectionClosed:
        """A write on a connection closed or closing: its ConnectionClosed once it is closed."""
        if self._closing is not None:
            await asyncio.shield(self._closing)
        else:
            await self._wait_lost()
        if self.close_rcvd is None:
            self._peek_close()
        return self._exc()

    async def _wait_lost(self) -> None:
        async with self._deadline(self._close_timeout):
            await asyncio.shield(self._lost)
        self._release()

    def _release(self) -> None:
        """End the TCP connection (a no-op once the server has) and hand aiohttp's connection
        back (closed)."""
        self.transport.abort()
        self._ws._response.close()

    @contextlib.asynccontextmanager
    async def _deadline(self, seconds: float) -> AsyncIterator[None]:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                yield

    def _peek_close(self) -> None:
        """A close frame received and not read yet (a write failed first): as websockets
        would have it, having read it as it came."""
        for msg, _ in self._buffer:
            if msg[0] is _CLOSE:
                self._record_rcvd(msg[1], msg[2] or "")
                return

    def _exc(self) -> ConnectionClosed:
        rcvd, sent = self.close_rcvd, self.close_sent
        ok = (
            rcvd is not None
            and sent is not None
            and rcvd.code in OK_CLOSE_CODES
            and sent.code in OK_CLOSE_CODES
        )
        exc = (ConnectionClosedOK if ok else ConnectionClosedError)(
            rcvd, sent, self.close_rcvd_then_sent if rcvd and sent else None
        )
        exc.__cause__ = self._cause
        return exc


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


class _Redirected(Exception):
    def __init__(self, status: int, headers: Any) -> None:
        self.status = status
        self.headers = headers


async def _no_redirect(
    session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestRedirectParams
) -> None:
    """aiohttp follows a redirect of ws_connect's upgrade (its request has allow_redirects,
    max_redirects=0 means no limit): stopped here, before the next request."""
    raise _Redirected(params.response.status, params.response.headers)


def _refusal(status: int, headers: Any) -> InvalidStatus:
    pairs = list(headers.items()) if headers is not None else []
    return InvalidStatus(Response(status, "", Headers(pairs)))


@contextlib.asynccontextmanager
async def connect(
    url: str,
    *,
    subprotocols: Sequence[str],
    headers: dict[str, str] | None = None,
    max_size: int = 1024 * 1024,
    open_timeout: float = 10.0,
    close_timeout: float = 10.0,
    proxy: str | None = None,
    user_agent: str = "opera-consumer",
) -> AsyncIterator[Connection]:
    """A WebSocket to ``url`` that never follows a redirect (a 3xx is the InvalidStatus it
    is, see :mod:`.origin`); closed (1000) on the way out."""
    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(_no_redirect)
    all_headers = {"User-Agent": user_agent, **(headers or {})}
    async with aiohttp.ClientSession(
        trace_configs=[trace],
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
    ) as session:
        try:
            async with asyncio.timeout(open_timeout):
                ws = await session.ws_connect(
                    url,
                    protocols=subprotocols,
                    headers=all_headers,
                    proxy=proxy,
                    ssl=tls.client_context() if url.startswith("wss:") else True,
                    # aiohttp refuses a message of max_msg_size bytes (websockets takes one
                    # of max_size): at most max_size here, as before.
                    max_msg_size=max_size + 1,
                    autoclose=False,
                    autoping=False,
                    compress=0,
                    decode_text=False,
                )
        except _Redirected as exc:
            raise _refusal(exc.status, exc.headers) from None
        except WSServerHandshakeError as exc:
            if exc.status != 101:
                raise _refusal(exc.status, exc.headers) from None
            raise InvalidHandshake(f"invalid upgrade response: {exc.message}") from None
        except aiohttp.ClientHttpProxyError as exc:
            raise InvalidHandshake(f"the proxy refused the tunnel: HTTP {exc.status}") from None
        except OSError:
            raise
        except aiohttp.ClientError as exc:
            raise InvalidMessage(f"no valid upgrade response: {exc}") from exc
        conn = Connection(ws, close_timeout)
        try:
            yield conn
        finally:
            await conn.close()
