"""A database the server does not have (redis://host/16 on a default 16-database server):
SELECT fails at every connection ("ERR DB index is out of range"). That was a transient error:
`run` exited 1 ("let the supervisor retry") and was restarted for ever. It is the operator's to
fix: SinkUnusable (exit 78) naming sink.url, at open and in preflight."""

from __future__ import annotations

import pytest
from redis_server import RedisServer

from consumer.config import RedisSinkSettings
from consumer.errors import ExitCode, SinkUnusable, exit_code_for
from consumer.sinks.redis import RedisSink


async def test_a_database_the_server_does_not_have_is_unusable(redis_server: RedisServer) -> None:
    settings = RedisSinkSettings.model_validate(
        {"type": "redis", "url": redis_server.url(db=16), "timeout_s": 5.0}
    )
    sink = RedisSink(settings, {"main": "DEMO"})
    try:
        with pytest.raises(SinkUnusable) as refused:
            await sink.open(None)
    finally:
        await sink.close()
    text = str(refused.value)
    assert "no database 16" in text and "sink.url" in text and "DB index" in text
    assert exit_code_for(refused.value) == ExitCode.CONFIG
    with pytest.raises(SinkUnusable, match=r"sink\.url"):
        await sink.preflight()
