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
from fake_redis import handler, reply, usual
from support import serving

from consumer.config import RedisSinkSettings
from consumer.errors import SinkError, SinkUnusable
from consumer.sinks.redis import RedisSink


class FakeRedis:
    """RESP2 on 127.0.0.1, answering as a server that refuses CONFIG and INFO (no such right)
    would; ``replies`` overrides the answer to a command (upper-case name -> raw reply)."""

    def __init__(self, replies: dict[bytes, bytes]) -> None:
        self.replies = replies
        self.counts: dict[bytes, int] = {}

    @contextlib.asynccontextmanager
    async def listening(self) -> AsyncIterator[str]:
        async with serving(handler(self._answer)) as port:
            yield f"redis://127.0.0.1:{port}/0"

    async def _answer(self, command: bytes, w: asyncio.StreamWriter) -> None:
        self.counts[command] = self.counts.get(command, 0) + 1
        await reply(w, self.replies.get(command) or usual(command))


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


async def test_an_error_quoting_the_password_again_and_again_shows_no_piece_of_it() -> None:
    """A server (hostile, or a proxy) whose refusal of AUTH quotes the password, many times:
    the sink cut the text at 2,400 characters, then masked it, then kept 300: the whole copies
    shrank to "***" and the copy cut at 2,400 was left as its prefix within the 300 shown
    (the exit message, the log line). Now it is masked before any cut."""
    password = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    refusal = b"-ERR invalid password " + (password + " ").encode() * 80 + b"\r\n"
    fake = FakeRedis({b"AUTH": refusal, b"HELLO": refusal})
    async with fake.listening() as url:
        settings = RedisSinkSettings.model_validate(
            {
                "type": "redis",
                "url": url,
                "password": password,
                "timeout_s": 2.0,
                "stream_key": "opera:{hotelId}",
            }
        )
        s = RedisSink(settings, {"main": "DEMO"})
        with pytest.raises(SinkError) as caught:
            await s.open(None)
        await s.close()
    text = str(caught.value)
    assert "invalid password ***" in text, text
    leaked = [password[i : i + 8] for i in range(len(password) - 7) if password[i : i + 8] in text]
    assert not leaked, f"a piece of the Redis password is shown: {text!r}"
