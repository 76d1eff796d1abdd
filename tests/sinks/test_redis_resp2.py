"""The sink speaks RESP2, which every Redis the README names (5.0 or newer) speaks: redis-py 8
opens each connection with ``HELLO 3`` (RESP3, from Redis 6), which Redis 5 answers "unknown
command": the sink refused to start (exit 78) saying "Redis >= 5 ... is required" to a Redis 5."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from bus_events import event
from fake_redis import SHA, handler, reply
from redis_server import RedisServer
from support import serving

from consumer.config import RedisSinkSettings
from consumer.sinks.redis import RedisSink


class Redis5:
    """RESP2 on 127.0.0.1, answering as Redis 5 does what the sink sends: HELLO unknown (it
    came with Redis 6), CONFIG and INFO refused (a user without those rights), EVALSHA with an
    entry id; ``commands``: the names received, in order."""

    def __init__(self) -> None:
        self.commands: list[bytes] = []

    @contextlib.asynccontextmanager
    async def listening(self) -> AsyncIterator[str]:
        async with serving(handler(self._answer)) as port:
            yield f"redis://127.0.0.1:{port}/0"

    async def _answer(self, command: bytes, w: asyncio.StreamWriter) -> None:
        self.commands.append(command)
        await reply(w, _answer(command))


def _answer(command: bytes) -> bytes:
    if command == b"PING":
        return b"+PONG\r\n"
    if command == b"SCRIPT":
        return b"$40\r\n" + SHA + b"\r\n"
    if command == b"EVALSHA":
        return b"$15\r\n1700000000000-0\r\n"
    if command in (b"CONFIG", b"INFO"):
        return b"-ERR unknown command or no right\r\n"
    return b"-ERR unknown command `%s`, with args beginning with: \r\n" % command


def settings(url: str, stream_key: str) -> RedisSinkSettings:
    return RedisSinkSettings.model_validate(
        {"type": "redis", "url": url, "timeout_s": 2.0, "stream_key": stream_key}
    )


async def test_a_server_without_hello_is_written_to() -> None:
    fake = Redis5()
    async with fake.listening() as url:
        sink = RedisSink(settings(url, "opera:{hotelId}"), {"main": "DEMO"})
        await sink.open(None)
        try:
            await sink.write("main", [event(1), event(2)])
        finally:
            await sink.close()
    assert b"HELLO" not in fake.commands
    assert fake.commands.count(b"EVALSHA") == 2


async def test_the_sinks_connections_speak_resp2(redis_server: RedisServer) -> None:
    sink = RedisSink(settings(redis_server.url(), "opera:{chainCode}"), {"main": "DEMO"})
    await sink.open(None)
    try:
        await sink.write("main", [event(1)])
        async with redis_server.client() as r:
            mine = str((await r.client_info())["id"])
            others = [c for c in await r.client_list() if str(c["id"]) != mine]
    finally:
        await sink.close()
    assert others and {c["resp"] for c in others} == {"2"}, others
    assert redis_server.length("opera:DEMO") == 1
