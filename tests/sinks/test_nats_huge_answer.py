"""What comes from the NATS server is bounded, whatever comes: a message announcing 1 GiB, a
protocol line without end, a line nats-py cannot read.

nats-py's parser takes a message's length at the server's word and buffers the message whole
(the sink's acknowledgements and JetStream's answers are a few KB: no server sends more to a
client than its max_payload), and it buffers a protocol line until its CRLF, however long: the
memory grew as fast as the network went, and nothing ended it but the connection's stale-ping
check (after a minute or more). An INFO line that is no JSON, or an -ERR line that is no UTF-8,
raised out of the parser an error its read loop only logs, leaving the connection up and deaf
until that same check. Each is now refused where it is read (the connection dropped, its
buffer with it), and the write that waited on the answer is :class:`SinkUnusable`: what sent
it is no NATS server answering the sink (as an answer that is no acknowledgement)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest
from bus_events import event
from nats_server import NatsServer, interposed

from consumer.config import NatsSinkSettings
from consumer.errors import SinkUnusable, TransientSinkError
from consumer.sinks.nats import NatsSink

SENT_AT_MOST = 64 * 1024 * 1024  # what the proxy sends of a hostile answer, at most
CHUNK = 1024 * 1024


def huge_message(reply: bytes, sid: bytes, n: int) -> bytes:
    return b"MSG %s %s 1073741824\r\n" % (reply, sid) if n == 0 else b"x" * CHUNK


def endless_line(reply: bytes, sid: bytes, n: int) -> bytes:
    return b"-ERR '" if n == 0 else b"y" * CHUNK


def bad_info(reply: bytes, sid: bytes, n: int) -> bytes:
    return b"INFO {this is no json}\r\n" if n == 0 else b""


def bad_error(reply: bytes, sid: bytes, n: int) -> bytes:
    return b"-ERR '\xff\xfe not utf-8'\r\n" if n == 0 else b""


Answer = Callable[[bytes, bytes, int], bytes]


class Hostile:
    """A TCP proxy on 127.0.0.1 to a real nats-server that answers the first publish to an
    event subject (``opera.``) itself, with ``answer(reply, sid, 0)``, ``answer(reply, sid,
    1)``... (``sid``: the client's inbox subscription) until an empty piece, :data:`SENT_AT_MOST`
    bytes, or the client hung up; ``sent``: the bytes of that answer the client took."""

    def __init__(self, target: NatsServer, answer: Answer) -> None:
        self.target, self.answer = target, answer
        self.sent = 0
        self.answered = False

    def listening(self) -> contextlib.AbstractAsyncContextManager[str]:
        return interposed(self.target, from_client=self._client_side)

    async def _client_side(
        self, cr: asyncio.StreamReader, sw: asyncio.StreamWriter, cw: asyncio.StreamWriter
    ) -> None:
        sid = b""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while line := await cr.readline():
                words = line.split()
                payload = b""
                if words[:1] in ([b"PUB"], [b"HPUB"]):
                    payload = await cr.readexactly(int(words[-1]) + 2)
                if words[:1] == [b"SUB"] and words[1].startswith(b"_INBOX."):
                    sid = words[-1]
                if words[:1] == [b"HPUB"] and words[1].startswith(b"opera.") and not self.answered:
                    self.answered = True
                    await self._answer(cw, words[2], sid)
                    continue
                sw.write(line + payload)
                await sw.drain()
        sw.close()

    async def _answer(self, cw: asyncio.StreamWriter, reply: bytes, sid: bytes) -> None:
        sent, n = 0, 0
        while sent < SENT_AT_MOST and (data := self.answer(reply, sid, n)):
            cw.write(data)
            await cw.drain()
            sent += len(data)
            self.sent += len(data)
            n += 1


@pytest.mark.parametrize(
    "answer",
    [huge_message, endless_line, bad_info, bad_error],
    ids=["message-of-1-GiB", "line-without-end", "info-not-json", "error-not-utf-8"],
)
async def test_what_no_nats_server_sends_is_refused_where_it_is_read(
    nats_server: NatsServer, answer: Answer
) -> None:
    await nats_server.add_stream("OPERA", ["opera.>"], duplicate_window=86400)
    hostile = Hostile(nats_server, answer)
    async with hostile.listening() as url:
        settings = NatsSinkSettings.model_validate(
            {"type": "nats", "servers": [url], "timeout_s": 2.0, "on_start": "must-exist"}
        )
        sink = NatsSink(settings, {"main": "DEMO"})
        await sink.open(None)
        try:
            async with asyncio.timeout(20):
                with pytest.raises(SinkUnusable, match="no NATS server") as caught:
                    await sink.write("main", [event(1)])
        finally:
            await sink.close()
    assert hostile.answered
    text = str(caught.value)
    assert url in text and len(text) < 1000, text
    # Refused at its start: at most what the sockets' buffers held when the client hung up
    # (the whole 64 MiB were read into memory before).
    assert hostile.sent < 16 * 1024 * 1024, hostile.sent
    assert await nats_server.message_count() == 0


async def test_once_the_stream_answers_again_a_timeout_is_transient_again(
    nats_server: NatsServer,
) -> None:
    """What was refused stops the daemon only while nothing answers since: after an
    acknowledgement (the connection back to a server that answers), a timeout is retried."""
    await nats_server.add_stream("OPERA", ["opera.>"], duplicate_window=86400)
    hostile = Hostile(nats_server, huge_message)
    async with hostile.listening() as url:
        settings = NatsSinkSettings.model_validate(
            {"type": "nats", "servers": [url], "timeout_s": 2.0, "on_start": "must-exist"}
        )
        sink = NatsSink(settings, {"main": "DEMO"})
        await sink.open(None)
        try:
            async with asyncio.timeout(30):
                with pytest.raises(SinkUnusable, match="no NATS server"):
                    await sink.write("main", [event(1)])
                await sink.write("main", [event(1)])  # answered once: passed on since
                with nats_server.frozen(), pytest.raises(TransientSinkError):
                    await sink.write("main", [event(2)])
        finally:
            await sink.close()
