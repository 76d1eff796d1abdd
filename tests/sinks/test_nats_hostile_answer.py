"""Something other than the stream answers a publish with bytes that are no acknowledgement.

A deeply nested answer made nats-py's json.loads raise RecursionError, which the sink did not
expect: it left write() as a plain exception, which the pipeline takes for the event's fault,
so every event answered so was dead-lettered as "unprocessable". Whatever reading the answer
raises is SinkUnusable, as documented (the daemon stops; nothing is checkpointed). The answer
is read with orjson, whose depth limit is a decode error, not a RecursionError (which, the
reviewer found, can also leave CPython 3.11 failing later compiles in the same process).

The server's INFO is as hostile: its ``max_payload`` was used unchecked (0 dead-lettered every
event for the server's fault; null or a string raised a TypeError at open)."""

from __future__ import annotations

import asyncio
import contextlib
import re

import nats
import pytest
from bus_events import event
from nats_server import NatsServer, interposed, pipe, subscribed

from consumer.config import NatsSinkSettings
from consumer.errors import PermanentSinkError, SinkUnusable
from consumer.sinks.nats import NatsSink


@pytest.mark.parametrize(
    "answer",
    [
        b"[" * 50_000 + b"]" * 50_000,
        b"[1, 2]",
        b'{"error": "no object"}',
        b'{"error": {"code": 503, "unexpected": 1}}',
        b'{"stream": "OPERA"}',
    ],
    ids=["nested", "a-list", "error-not-an-object", "error-of-unknown-fields", "no-seq"],
)
async def test_an_answer_that_is_no_acknowledgement_makes_the_sink_unusable(
    nats_server: NatsServer, answer: bytes
) -> None:
    await nats_server.add_stream("OPERA", ["opera.DEMO.HOTEL1.>"], duplicate_window=86400)
    settings = NatsSinkSettings.model_validate(
        {"type": "nats", "servers": [nats_server.url], "timeout_s": 5.0, "on_start": "must-exist"}
    )
    sink = NatsSink(settings, {"main": "DEMO"})
    await sink.open(None)
    impostor = await nats.connect(nats_server.url)
    try:

        async def respond(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(answer)

        await impostor.subscribe("opera.DEMO.HOTEL2.>", cb=respond)
        await subscribed(impostor)  # before the sink publishes
        await sink.write("main", [event(1)])  # the stream's subject: acknowledged
        with pytest.raises(SinkUnusable, match=r"not .*acknowledgement"):
            await sink.write("main", [event(2, hotel="HOTEL2")])
    finally:
        await impostor.close()
        await sink.close()
    assert await nats_server.message_count() == 1


class InfoRewriter:
    """A TCP proxy on 127.0.0.1 to a real nats-server that rewrites max_payload in the INFO
    line each connection starts with."""

    def __init__(self, target: NatsServer, max_payload: bytes) -> None:
        self.target, self.max_payload = target, max_payload

    def listening(self) -> contextlib.AbstractAsyncContextManager[str]:
        return interposed(self.target, from_server=self._rewrite_info)

    async def _rewrite_info(
        self, sr: asyncio.StreamReader, cw: asyncio.StreamWriter, _: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError):
            info = await sr.readline()
            cw.write(re.sub(rb'"max_payload":\s*-?\d+', b'"max_payload":' + self.max_payload, info))
        await pipe(sr, cw)


@pytest.mark.parametrize(
    "max_payload",
    [b"0", b"-1", b"100", b"null", b'"1048576"', b"true", b"[]"],
    ids=["zero", "minus-one", "below-the-headers", "null", "a-string", "a-boolean", "a-list"],
)
async def test_a_max_payload_no_message_fits_makes_the_sink_unusable_at_open(
    nats_server: NatsServer, max_payload: bytes
) -> None:
    """The server's INFO max_payload was taken at its word: 0 (or anything below the headers'
    size) let open() succeed (the JetStream API requests have empty bodies) and made every
    event a PermanentSinkError: the whole stream dead-lettered for the server's fault. null or
    a string raised a raw TypeError at open, -1 failed each request."""
    await nats_server.add_stream("OPERA", ["opera.>"], duplicate_window=86400)
    async with InfoRewriter(nats_server, max_payload).listening() as url:
        settings = NatsSinkSettings.model_validate(
            {"type": "nats", "servers": [url], "timeout_s": 5.0, "on_start": "must-exist"}
        )
        sink = NatsSink(settings, {"main": "DEMO"})
        with pytest.raises(SinkUnusable, match="announces max_payload") as caught:
            await sink.open(None)
        assert url in str(caught.value)
        with pytest.raises(SinkUnusable, match="announces max_payload"):
            await sink.preflight()
    assert await nats_server.message_count() == 0


async def test_the_servers_own_max_payload_is_kept(nats_server: NatsServer) -> None:
    """A limit a message fits in is taken as announced (an event above it is the event's)."""
    await nats_server.add_stream("OPERA", ["opera.>"], duplicate_window=86400)
    async with InfoRewriter(nats_server, b"4096").listening() as url:
        settings = NatsSinkSettings.model_validate(
            {"type": "nats", "servers": [url], "timeout_s": 5.0, "on_start": "must-exist"}
        )
        sink = NatsSink(settings, {"main": "DEMO"})
        await sink.open(None)
        try:
            await sink.write("main", [event(1)])
            with pytest.raises(PermanentSinkError, match="max_payload of 4096 bytes"):
                await sink.write("main", [event(2, detail="x" * 5000)])
        finally:
            await sink.close()
    assert await nats_server.message_count() == 1
