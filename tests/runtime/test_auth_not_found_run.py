"""A 404 from the token endpoint before any token is a wrong URL only when the 404s last
``auth.retry_max_s`` in a row: any other outcome between them (a 5xx, a refused connection)
starts the count again. The first 404's time was kept through them, so 404, a long outage of
5xx or refused connections, then one more 404 stopped the daemon for good (exit 78)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from receiver import Receiver, Reply
from support import make_settings, sandbox_token, stream_config, wait_until
from tcp_proxy import TcpProxy

from consumer.config import StreamSettings
from consumer.errors import AuthError, ExitCode
from consumer.runtime.auth import TokenProvider
from consumer.runtime.daemon import Daemon


def settings(url: str, **auth: Any) -> StreamSettings:
    cfg = stream_config(url)
    return StreamSettings.model_validate({**cfg, "auth": {**cfg["auth"], **auth}})


async def answer(provider: TokenProvider) -> AuthError:
    with pytest.raises(AuthError) as info:
        await provider.token(retry=False)
    return info.value


@pytest.mark.parametrize("between", ["HTTP 503", "connection refused"])
async def test_an_outage_between_two_404s_restarts_their_count(
    sandbox_factory: Any, between: str
) -> None:
    gw = await sandbox_factory()
    port = urlsplit(gw.url).port
    assert port is not None
    now = [1000.0]
    with TcpProxy("127.0.0.1", port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        async with aiohttp.ClientSession() as http:
            tokens = TokenProvider(http, settings(url, retry_max_s=60), clock=lambda: now[0])
            gw.fail_token_requests([404])
            assert (await answer(tokens)).retriable
            now[0] += 30
            if between == "HTTP 503":
                gw.fail_token_requests([503])
            else:
                proxy.cut()
            failed = await answer(tokens)
            assert failed.retriable and between in str(failed), str(failed)
            proxy.restore()
            now[0] += 40  # 70 s after the first 404, but not 404s all along
            gw.fail_token_requests([404])
            again = await answer(tokens)
            assert again.retriable and "HTTP 404" in str(again)
            # A run of 404s that lasts retry_max_s from its own start is a wrong URL.
            now[0] += 59
            gw.fail_token_requests([404, 404])
            assert (await answer(tokens)).retriable
            now[0] += 1
            assert not (await answer(tokens)).retriable
            # The endpoint answering again clears that run too: a token.
            assert (await tokens.token(retry=False)).value in gw.issued_tokens


async def test_the_daemon_gets_its_token_after_404s_with_an_outage_between(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """404, 503s for longer than retry_max_s, 404, then tokens: the stream runs."""
    gw = await sandbox_factory(backlog=5)
    good = await sandbox_token(gw)
    body = json.dumps({"access_token": good, "expires_in": 3600}).encode()
    retry_max_s = 0.5

    def token(request: Any) -> Reply:
        return Reply(200, {"Content-Type": "application/json"}, body)

    with Receiver(token) as endpoint:
        outage = [Reply(503, delay_s=0.2) for _ in range(4)]  # 0.8 s at least
        endpoint.script(Reply(404), *outage, Reply(404))
        token_url = f"http://127.0.0.1:{endpoint.port}/oauth/v1/tokens"
        auth = {**stream_config(gw.url)["auth"], "token_url": token_url}
        auth["retry_max_s"] = retry_max_s
        daemon = await Daemon.create(make_settings(tmp_path, gw.url, auth=auth))
        run = asyncio.create_task(daemon.run())
        try:
            await wait_until(lambda: daemon.pipelines["main"].delivered >= 5 or run.done())
            assert not run.done(), daemon.runners["main"].stats.last_close
        finally:
            daemon.request_stop()
            async with asyncio.timeout(30):
                assert await run == ExitCode.OK
    statuses = [reply.status for _, reply in endpoint.exchanges]
    assert statuses[:7] == [404, 503, 503, 503, 503, 404, 200]
    first, second = (r for r, reply in endpoint.exchanges if reply.status == 404)
    assert second.received_at - first.received_at > retry_max_s  # past it, 404s not in a row
