"""consumer.core.unreachable: the reason a real aiohttp or websockets connection failed, read
from the whole chain of causes (the outer exception often says nothing)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from websockets.asyncio.client import connect

from consumer.core.unreachable import reason


async def failure(attempt: Awaitable[object]) -> BaseException:
    try:
        await attempt
    except Exception as exc:
        return exc
    raise AssertionError("the connection did not fail")


async def http_post(url: str) -> BaseException:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=1.0, sock_read=1.0)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        return await failure(http.post(url))


async def ws_open(url: str) -> BaseException:
    async def opening() -> None:
        async with connect(url, open_timeout=1.0):
            pass

    return await failure(opening())


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
CLIENTS: dict[str, Callable[[str], Awaitable[BaseException]]] = {
    "http": http_post,
    "ws": ws_open,
}


@contextlib.asynccontextmanager
async def server(handle: Handler) -> AsyncIterator[int]:
    """A loopback server; its connections are closed (and their handlers ended) on exit."""
    writers: list[asyncio.StreamWriter] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await handle(reader, writer)

    srv = await asyncio.start_server(tracked, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await srv.wait_closed()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # never answers
    writer.close()


async def answers_400(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1024)
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    with contextlib.suppress(OSError):
        await writer.drain()
    writer.close()


@pytest.mark.parametrize("client", ["http", "ws"])
async def test_connection_refused(client: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exc = await CLIENTS[client](f"{client}://127.0.0.1:{port}/")
    assert reason(exc) == "connection refused"  # aiohttp: "Cannot connect to host ..."


@pytest.mark.parametrize("client", ["http", "ws"])
async def test_no_answer_is_a_timeout(client: str) -> None:
    async with server(silent) as port:
        exc = await CLIENTS[client](f"{client}://127.0.0.1:{port}/")
    assert reason(exc) == "timeout"


@pytest.mark.parametrize(
    ("client", "handle"), [("http", silent), ("http", answers_400), ("ws", answers_400)]
)
async def test_tls_to_a_plain_server_is_a_tls_error(client: str, handle: Handler) -> None:
    """A plain server answers a ClientHello with 400, or waits for a request line that never
    comes: aiohttp's connect timeout then cancels asyncio's wait for the handshake of a
    connected socket. (websockets shows no such sign: a silent server is a "timeout" there, as
    it is for any server that does not answer.)"""
    async with server(handle) as port:
        exc = await CLIENTS[client](f"{client}s://127.0.0.1:{port}/")
    said = reason(exc)
    assert said.startswith("TLS error: ") and "plain-HTTP server?" in said, said
    assert "then use http://)" in said  # not ws://: gateway_url takes http(s):// only


async def test_a_name_that_does_not_resolve_is_a_dns_failure() -> None:
    try:
        socket.getaddrinfo("no-such-host.invalid", 443)
    except socket.gaierror:
        pass
    else:
        pytest.skip("this machine's resolver answers for .invalid")
    exc = await http_post("https://no-such-host.invalid/")
    assert reason(exc).startswith("DNS failure: ")


def test_an_empty_outer_message_falls_back_to_a_cause_that_says_something() -> None:
    try:
        try:
            raise EOFError("stream ended after 0 bytes")
        except EOFError as inner:
            raise aiohttp.ClientConnectionError("") from inner
    except aiohttp.ClientConnectionError as exc:
        assert reason(exc) == "EOFError: stream ended after 0 bytes"
    bare = RuntimeError()
    assert reason(bare) == "RuntimeError"


def test_a_looping_chain_and_hostile_text_are_bounded() -> None:
    a, b = ValueError("a\x1b[2J\nb" + "x" * 500), ValueError("b")
    a.__context__, b.__context__ = b, a
    said = reason(a)
    assert "\x1b" not in said and "\n" not in said and len(said) < 260


def test_secrets_are_scrubbed_before_the_line_is_cut() -> None:
    # aiohttp's errors end with the request's URL: a cut inside a secret would leave a piece
    # of it that no mask matches any more.
    secret = "S3CRETS3CRETS3CRETS3CRET"
    for pad in range(100, 150, 3):
        exc = ValueError(f"400, message='{'x' * pad}', url='https://h/hook?api_key={secret}'")
        text = reason(exc, lambda t: t.replace(secret, "***"))
        assert "S3C" not in text and "RET" not in text, (pad, text)
