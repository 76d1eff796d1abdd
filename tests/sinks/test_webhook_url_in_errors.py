"""The webhook's URL (its path and query: a Zapier hook's credential is its short path segments,
``/hooks/catch/<account>/<key>/``) never reaches an error text, whatever carries it there: aiohttp
names the whole request URL in the error for an answer it cannot parse, and a receiver's error
page may quote the path it was posted to. Sink errors name the webhook as
``scheme://host:port/…`` only (README, "Failure handling")."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from bus_events import event
from support import make_settings

from consumer.config import WebhookSinkSettings
from consumer.errors import PermanentSinkError, SinkError, TransientSinkError
from consumer.runtime.assembly import http_client
from consumer.sinks.webhook import WebhookSink

# The daemon runs this sink on uvloop by default (consumer.event_loop).
pytestmark = pytest.mark.both_loops

# Zapier's shape: every segment short, none of them registered as a secret by its length.
PATH = "/hooks/catch/4711093/b7xq2kz/"
QUERY = "?v=2"


@contextlib.asynccontextmanager
async def answering(answer: bytes) -> AsyncIterator[int]:
    """A loopback server answering every request with ``answer`` (bytes as written), then
    closing; yields its port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                 if line.lower().startswith(b"content-length:")),
                0,
            )  # fmt: skip
            await reader.readexactly(length)
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield int(server.sockets[0].getsockname()[1])


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[aiohttp.ClientSession]:
    async with http_client(make_settings(tmp_path, "http://127.0.0.1:9")) as c:
        yield c


async def failure(
    client: aiohttp.ClientSession, answer: bytes, kind: type[SinkError]
) -> tuple[str, int]:
    async with answering(answer) as port:
        url = f"http://127.0.0.1:{port}{PATH}{QUERY}"
        cfg = WebhookSinkSettings.model_validate({"type": "webhook", "url": url, "timeout_s": 5})
        sink = WebhookSink(cfg, client)
        await sink.open(None)
        with pytest.raises(kind) as caught:
            await sink.write("main", [event(0)])
    return str(caught.value), port


def assert_no_path(text: str, port: int) -> None:
    assert f"http://127.0.0.1:{port}/…" in text, text
    for piece in ("4711093", "b7xq2kz", "/hooks/catch", "v=2"):
        assert piece not in text, text


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",  # a status that is no number
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",  # a header aiohttp refuses
        b"\x00\x01garbage\r\n\r\n",  # not HTTP at all
    ],
)
async def test_an_answer_aiohttp_cannot_parse_names_no_path(
    client: aiohttp.ClientSession, answer: bytes
) -> None:
    """aiohttp's ClientResponseError reads ``url='http://host/hooks/catch/…'``: that went into
    the retry warning of every attempt, path and query as they were."""
    text, port = await failure(client, answer, TransientSinkError)
    assert_no_path(text, port)


async def test_an_error_page_quoting_the_path_shows_none_of_it(
    client: aiohttp.ClientSession,
) -> None:
    """Express's default 404 page (``Cannot POST /path``): the dead letter's error held the
    path that the README says sink errors leave out."""
    body = f"<pre>Cannot POST {PATH}{QUERY}</pre>".encode()
    answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    text, port = await failure(client, answer, PermanentSinkError)
    assert "HTTP 404" in text and "Cannot POST /…" in text, text
    assert_no_path(text, port)
