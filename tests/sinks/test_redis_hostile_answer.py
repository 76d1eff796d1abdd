"""Something other than Redis running the sink's script answers it (a broken proxy, a server
that only speaks RESP): whatever it answers is no fault of the events.

redis-py's parser raises a plain ValueError for an integer reply that is no number (``:abc``):
it left write() as is, and the pipeline took it for the event's fault (every event answered so
dead-lettered as "unprocessable"). An integer (``held back``) for the first call of a round,
which the script cannot answer (that call names no guard before it), made the sink send the
same call again at once, for ever (some 22,000 EVALSHA in 5 s, the stream stopped silently).
Both are :class:`SinkUnusable`, as a reply to open's commands and probe that is none."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from bus_events import event
from support import serving

from consumer.config import RedisSinkSettings
from consumer.errors import SinkUnusable
from consumer.sinks.redis import RedisSink

SHA = b"a" * 40


class FakeRedis:
    """RESP2 on 127.0.0.1, answering as a server that refuses CONFIG and INFO (no such right)
    would; ``replies`` overrides the answer to a command (upper-case name -> raw reply)."""

    def __init__(self, replies: dict[bytes, bytes]) -> None:
        self.replies = replies
        self.counts: dict[bytes, int] = {}

    @contextlib.asynccontextmanager
    async def listening(self) -> AsyncIterator[str]:
        async with serving(self._serve) as port:
            yield f"redis://127.0.0.1:{port}/0"

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while line := await r.readline():
                args = []
                for _ in range(int(line[1:])):
                    n = int((await r.readline())[1:])
                    args.append((await r.readexactly(n + 2))[:-2])
                command = args[0].upper()
                self.counts[command] = self.counts.get(command, 0) + 1
                w.write(self.replies.get(command) or _usual(command))
                await w.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()


def _usual(command: bytes) -> bytes:
    if command == b"PING":
        return b"+PONG\r\n"
    if command == b"SCRIPT":
        return b"$40\r\n" + SHA + b"\r\n"
    if command in (b"CONFIG", b"INFO"):
        return b"-NOPERM this user has no permissions to run this command\r\n"
    return b"+OK\r\n"


def sink(url: str, stream_key: str = "opera:{hotelId}") -> RedisSink:
    """{hotelId}: a key per event, so open() has no key to probe."""
    settings = RedisSinkSettings.model_validate(
        {"type": "redis", "url": url, "timeout_s": 2.0, "stream_key": stream_key}
    )
    return RedisSink(settings, {"main": "DEMO"})


@pytest.mark.parametrize(
    "reply", [b":abc\r\n", b"$abc\r\n"], ids=["integer-not-a-number", "length-not-a-number"]
)
async def test_a_reply_no_parser_takes_makes_the_sink_unusable(reply: bytes) -> None:
    fake = FakeRedis({b"EVALSHA": reply})
    async with fake.listening() as url:
        s = sink(url)
        await s.open(None)
        try:
            with pytest.raises(SinkUnusable, match="is not a Redis answer") as caught:
                await s.write("main", [event(1)])
        finally:
            await s.close()
    assert f"{url.removeprefix('redis://')}" in str(caught.value)
    assert "EVALSHA" in str(caught.value)


async def test_held_back_for_the_first_call_makes_the_sink_unusable_at_once() -> None:
    fake = FakeRedis({b"EVALSHA": b":1\r\n"})
    async with fake.listening() as url:
        s = sink(url)
        await s.open(None)
        try:
            async with asyncio.timeout(30):  # was: for ever, the same call again and again
                with pytest.raises(SinkUnusable, match="held back"):
                    await s.write("main", [event(1), event(8)])  # two events of one key
        finally:
            await s.close()
    assert fake.counts[b"EVALSHA"] == 2  # one round: the batch's two calls, once


@pytest.mark.parametrize(
    "replies",
    [
        {b"PING": b":abc\r\n"},
        {b"CONFIG": b":abc\r\n"},
        # The probe script's five values, its XLEN not a number.
        {b"EVALSHA": b"*5\r\n$6\r\nstream\r\n$3\r\nabc\r\n$2\r\nno\r\n$2\r\nno\r\n$2\r\nno\r\n"},
        {b"EVALSHA": b"*2\r\n:1\r\n:2\r\n"},  # not five values
    ],
    ids=["ping", "config-get", "probe-length", "probe-shape"],
)
async def test_a_reply_that_is_none_at_open_makes_the_sink_unusable(
    replies: dict[bytes, bytes],
) -> None:
    fake = FakeRedis(replies)
    async with fake.listening() as url:
        s = sink(url, stream_key="opera:{chainCode}")  # keys known at open: probed
        with pytest.raises(SinkUnusable, match="is not a Redis answer"):
            await s.open(None)
