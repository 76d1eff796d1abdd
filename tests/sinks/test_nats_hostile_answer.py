"""Something other than the stream answers a publish with bytes that are no acknowledgement.

A deeply nested answer made nats-py's json.loads raise RecursionError, which the sink did not
expect: it left write() as a plain exception, which the pipeline takes for the event's fault,
so every event answered so was dead-lettered as "unprocessable". Whatever reading the answer
raises is SinkUnusable, as documented (the daemon stops; nothing is checkpointed). The answer
is read with orjson, whose depth limit is a decode error, not a RecursionError (which, the
reviewer found, can also leave CPython 3.11 failing later compiles in the same process)."""

from __future__ import annotations

import nats
import pytest
from bus_events import event
from nats_server import NatsServer

from consumer.config import NatsSinkSettings
from consumer.errors import SinkUnusable
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
        await impostor.flush()  # subscribed before the sink publishes
        await sink.write("main", [event(1)])  # the stream's subject: acknowledged
        with pytest.raises(SinkUnusable, match=r"not .*acknowledgement"):
            await sink.write("main", [event(2, hotel="HOTEL2")])
    finally:
        await impostor.close()
        await sink.close()
    assert await nats_server.message_count() == 1
