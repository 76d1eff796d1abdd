"""An event larger than the server's proto-max-bulk-len when the sink's user may not read it
(no CONFIG right, as the README's ACL line grants, as on managed Redis): the server answers
"Protocol error: invalid bulk length" and drops the connection (the answer mostly lost to the
reset). That was a TransientSinkError at every retry, the stream wedged behind the event. It is
the event's fault: a PermanentSinkError naming it (dead-lettered with the reason), the other
events of the batch delivered. A server that is down while such an event goes is not taken
for a refusal."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from bus_events import event
from redis_server import RedisServer, event_ids

from consumer.config import RedisSinkSettings
from consumer.core.events import Event
from consumer.errors import PermanentSinkError, TransientSinkError
from consumer.sinks.redis import RedisSink

PASSWORD = "redis-Bulk-pw-5521"
RULES = "~opera:* -@all +ping +script|load +evalsha +exists +type +xadd +set +xlen"
KEY = "opera:DEMO"


def big(i: int, key: str, mib: int = 2) -> Event:
    return event(i, key=key, detail=[{"elementName": "x", "newValue": "v" * (mib << 20)}])


async def opened_on(
    redis_factory: Callable[..., RedisServer], max_bulk: str = "1mb"
) -> tuple[RedisServer, RedisSink]:
    server = redis_factory(
        users={"opera": (PASSWORD, RULES)}, options=["--proto-max-bulk-len", max_bulk]
    )
    url = server.url(user="opera", password=PASSWORD)
    sink = RedisSink(
        RedisSinkSettings.model_validate({"type": "redis", "url": url, "timeout_s": 5.0}),
        {"main": "DEMO"},
    )
    await sink.open(None)
    return server, sink


# 2 MiB: the server's answer is sometimes read before its reset; 20 MiB: never (the reset
# comes while the event is being sent).
@pytest.mark.parametrize("mib", [2, 20])
async def test_an_event_over_the_servers_limit_is_dead_lettered_the_others_delivered(
    redis_factory: Callable[..., RedisServer], mib: int
) -> None:
    server, sink = await opened_on(redis_factory)
    batch = [event(1, key="a"), event(2, key="b"), big(3, key="b", mib=mib), event(4, key="b")]
    dead: list[str] = []
    try:
        remaining = batch
        for _ in range(len(batch)):  # as the pipeline does: the culprit out, the rest again
            try:
                await sink.write("main", remaining)
                break
            except PermanentSinkError as exc:
                assert exc.unique_event_id is not None
                dead.append(exc.unique_event_id)
                reason = str(exc)
                remaining = [e for e in remaining if e.unique_event_id != exc.unique_event_id]
    finally:
        await sink.close()
    assert dead == ["u00003"]
    assert "proto-max-bulk-len" in reason and PASSWORD not in reason
    assert event_ids(server.entries(KEY)) == ["u00001", "u00002", "u00004"]


async def test_a_big_event_while_the_server_is_down_is_retried(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server, sink = await opened_on(redis_factory)
    try:
        server.stop()
        with pytest.raises(TransientSinkError):
            await sink.write("main", [big(1, key="a")])
    finally:
        await sink.close()


async def test_a_big_event_written_before_the_drops_is_not_taken_for_a_refusal(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """Two drops of the connection at a big event's call are the refusal's sign, unless the
    event's guard is there: then it was written, the drops came after it, and the retry finds
    it a duplicate. Judged against a server that takes 2 MiB (its limit unknown to the sink)."""
    server, sink = await opened_on(redis_factory, max_bulk="512mb")
    written, unwritten = big(1, key="a"), big(2, key="a")
    drop = ConnectionError("Connection reset by peer")
    try:
        await sink.write("main", [written])
        assert event_ids(server.entries(KEY)) == ["u00001"]
        client = sink._client
        assert client is not None
        assert await sink._too_long(client, sink._make_call("main", written), drop) is None
        refusal = await sink._too_long(client, sink._make_call("main", unwritten), drop)
        assert isinstance(refusal, PermanentSinkError)
        assert refusal.unique_event_id == "u00002"
        await sink.write("main", [written])  # the retry: a duplicate, nothing added
    finally:
        await sink.close()
    assert event_ids(server.entries(KEY)) == ["u00001"]
