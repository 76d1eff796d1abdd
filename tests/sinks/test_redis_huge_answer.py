"""A "Redis" (a hostile server, something else at the URL's address) whose answer announces a
huge value and sends it as fast as the network goes: redis-py reads a bulk string of the length
the server announces, and an array of as many elements, whole, into memory; only
``timeout_s`` (for the whole answer) ended it, and then redis-py sent the command again and took
another one. Every reply the sink reads is an id, a count, a short text or INFO's few KB: one
past :data:`~consumer.sinks.redis.REPLY_LIMIT` is no Redis answer to our commands
(:class:`SinkUnusable`, as a reply no parser takes), refused at its announced length, before it
is read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from bus_events import event
from fake_redis import handler, reply, usual
from support import serving

from consumer.config import RedisSinkSettings
from consumer.errors import SinkUnusable
from consumer.sinks.redis import RedisSink

SENT_AT_MOST = 64 * 1024 * 1024  # what the server sends of its answer, at most
CHUNK = 1024 * 1024
ELEMENT = 60_000  # an array's element: a value well under the limit, the array far over it


def bulk(n: int) -> bytes:
    return b"$1073741824\r\n" if n == 0 else b"x" * CHUNK


def array(n: int) -> bytes:
    element = b"$%d\r\n%s\r\n" % (ELEMENT, b"y" * ELEMENT)
    return b"*100000000\r\n" if n == 0 else element * (CHUNK // len(element))


class HugeAnswer:
    """RESP on 127.0.0.1, answering EVALSHA with ``piece(0)``, ``piece(1)``... until
    :data:`SENT_AT_MOST` bytes are sent or the client hung up; ``sent``: the bytes of those
    answers the client took (written and drained)."""

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self.piece = piece
        self.sent = 0
        self.answers = 0

    async def answer(self, command: bytes, w: asyncio.StreamWriter) -> None:
        if command != b"EVALSHA":
            await reply(w, usual(command))
            return
        self.answers += 1
        sent, n = 0, 0
        while sent < SENT_AT_MOST:
            data = self.piece(n)
            await reply(w, data)
            sent += len(data)
            self.sent += len(data)
            n += 1


@pytest.mark.parametrize("piece", [bulk, array], ids=["bulk-string", "array"])
async def test_a_huge_answer_is_refused_at_its_length_not_read(
    piece: Callable[[int], bytes],
) -> None:
    fake = HugeAnswer(piece)
    async with serving(handler(fake.answer)) as port:
        settings = RedisSinkSettings.model_validate(
            {
                "type": "redis",
                "url": f"redis://127.0.0.1:{port}/0",
                "timeout_s": 5.0,
                "stream_key": "opera:{hotelId}",  # a key per event: nothing probed at open
            }
        )
        sink = RedisSink(settings, {"main": "DEMO"})
        await sink.open(None)
        started = time.monotonic()
        try:
            with pytest.raises(SinkUnusable, match="is not a Redis answer") as caught:
                await sink.write("main", [event(1)])
        finally:
            await sink.close()
        took = time.monotonic() - started
    assert "EVALSHA" in str(caught.value) and len(str(caught.value)) < 1000
    # Refused at once, not after timeout_s, and not sent again; of the answer, at most what
    # the sockets' buffers held when the sink hung up (the server sent 64 MiB unread before).
    assert took < 2.5, took
    assert fake.answers == 1
    assert fake.sent < 16 * 1024 * 1024, fake.sent
