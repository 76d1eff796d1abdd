"""A token answer with ``"expires_in": null`` says no more than one without it: the default
lifetime (3600 s). float(None) raised TypeError, so the answer was "unusable" and refused at
every retry: the stream never started."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from receiver import Receiver, Reply
from support import make_settings, running, sandbox_token, stream_config, wait_until

from consumer.runtime.auth import TokenProvider


def null_lifetime(value: str) -> Reply:
    body = json.dumps({"access_token": value, "token_type": "Bearer", "expires_in": None})
    return Reply(200, {"Content-Type": "application/json"}, body.encode())


async def test_a_null_expires_in_is_the_default_lifetime_and_the_token_is_used(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=5)
    good = await sandbox_token(gw)
    with Receiver(lambda request: null_lifetime(good)) as endpoint:
        token_url = f"http://127.0.0.1:{endpoint.port}/oauth/v1/tokens"
        auth = {**stream_config(gw.url)["auth"], "token_url": token_url}
        settings = make_settings(tmp_path, gw.url, auth=auth)
        async with aiohttp.ClientSession() as http:
            token = await TokenProvider(http, settings.streams["main"]).token(retry=False)
        assert (token.value, token.lifetime_s) == (good, 3600.0)
        async with running(settings) as daemon:
            await wait_until(lambda: daemon.pipelines["main"].delivered >= 5)
            assert daemon.runners["main"].token_failures == 0
    assert len(endpoint.requests) == 2  # one each: neither refused it nor asked again
    assert [x for x in gw.stats.subscribes if x]  # it subscribed with that token
