"""The OAuth token provider against the sandbox's real token endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from log_capture import captured_logs
from receiver import Receiver, Reply
from support import (
    committed,
    make_settings,
    newest_offset,
    running,
    sandbox_token,
    sink_ids,
    stream_config,
    truth_ids,
    untrusted_tls_server,
    wait_until,
)
from tcp_proxy import TcpProxy
from trickle_server import trickling_server

from consumer.config import StreamSettings
from consumer.core.retry_after import RETRY_AFTER_MIN_S, retry_after_seconds
from consumer.errors import AuthError, ExitCode
from consumer.logs import REDACTOR
from consumer.runtime.assembly import http_client
from consumer.runtime.auth import TokenProvider
from consumer.runtime.daemon import Daemon
from consumer.sandbox import SandboxOptions


def stream(url: str, **auth: Any) -> StreamSettings:
    o = SandboxOptions()
    return StreamSettings.model_validate(
        {
            "gateway_url": url,
            "chain_code": "DEMO",
            "app_key": o.app_key,
            "auth": {"client_id": o.client_id, "client_secret": o.client_secret, **auth},
        }
    )


async def test_client_credentials_token_is_cached_until_near_expiry(sandbox_factory):
    gw = await sandbox_factory(token_ttl_s=3600)
    now = [1000.0]
    async with aiohttp.ClientSession() as http:
        tokens = TokenProvider(http, stream(gw.url), clock=lambda: now[0])
        first = await tokens.token()
        assert await tokens.token() is first  # never fetched per request
        now[0] += 3600 - 121  # more than refresh_margin_s (120 s) before expiry: still good
        assert await tokens.token() is first
        now[0] += 2  # within the margin: refreshed ahead of expiry
        second = await tokens.token()
    assert second.value != first.value
    assert gw.stats.token_requests == 2 == tokens.fetches
    assert first.value in gw.issued_tokens
    assert "***" in repr(first) and first.value not in repr(first)


async def test_password_grant(sandbox_factory):
    gw = await sandbox_factory()
    o = SandboxOptions()
    async with aiohttp.ClientSession() as http:
        settings = stream(gw.url, grant="password", username=o.username, password=o.password)
        token = await TokenProvider(http, settings).token()
    assert token.value in gw.issued_tokens


@pytest.mark.parametrize(
    "auth",
    [
        {"client_secret": "wrong-secret"},
        {"grant": "password", "username": "sandbox-user", "password": "nope"},
    ],
)
async def test_refused_credentials_fail_fast_and_say_what_to_check(sandbox_factory, auth):
    gw = await sandbox_factory()
    async with aiohttp.ClientSession() as http:
        tokens = TokenProvider(http, stream(gw.url, **auth))
        with pytest.raises(AuthError) as info:
            await tokens.token()
    assert not info.value.retriable
    assert "HTTP 401" in str(info.value) and "client_id/client_secret" in str(info.value)
    assert gw.stats.token_requests == 1  # not retried
    assert "wrong-secret" not in str(info.value)


async def test_transient_failures_are_retried_honouring_retry_after(sandbox_factory):
    gw = await sandbox_factory()
    gw.fail_token_requests([503, 429, 502], retry_after=0.05)
    async with aiohttp.ClientSession() as http:
        token = await TokenProvider(http, stream(gw.url)).token()
    assert token.value in gw.issued_tokens
    assert gw.stats.token_requests == 4


async def test_a_token_endpoint_that_keeps_failing_gives_a_retriable_error(sandbox_factory):
    """Issue #9 item 12: a retry budget of four waits of 0.5 s (the shortest Retry-After
    honoured), so a slow first request on a loaded machine still leaves room for a retry; at
    most 4 requests fit whatever the speed, far from the 50 failures queued."""
    gw = await sandbox_factory()
    gw.fail_token_requests([503] * 50, retry_after=RETRY_AFTER_MIN_S)
    async with aiohttp.ClientSession() as http:
        tokens = TokenProvider(http, stream(gw.url, retry_max_s=4 * RETRY_AFTER_MIN_S))
        with pytest.raises(AuthError) as info:
            await tokens.token()
    assert info.value.retriable
    assert 2 <= gw.stats.token_requests <= 4


async def test_enterprise_id_header_and_scope_are_sent(sandbox_factory):
    gw = await sandbox_factory()
    async with aiohttp.ClientSession() as http:
        settings = stream(gw.url, enterprise_id="ENT1", scope="urn:x")
        await TokenProvider(http, settings).token()
    headers, form = gw.token_requests[-1]
    assert headers["enterpriseid"] == "ENT1"
    assert headers["x-app-key"] == SandboxOptions().app_key
    assert headers["content-type"] == "application/x-www-form-urlencoded"
    assert form == {"grant_type": "client_credentials", "scope": "urn:x"}


async def test_a_404_before_any_token_is_a_configuration_error(sandbox_factory):
    """No token endpoint at the URL (a wrong gateway_url or token_url): it was retried for
    ever. A configuration error once it has lasted the token request's retries (retry_max_s:
    a gateway's passing 404 just after a restart stopped the daemon for good, exit 78). Once
    the endpoint has issued a token, a 404 is passing trouble, retried."""
    gw = await sandbox_factory()
    now = [1000.0]
    async with aiohttp.ClientSession() as http:
        wrong = stream(gw.url, token_url=f"{gw.url}/nowhere/oauth/v1/tokens", retry_max_s=60)
        provider = TokenProvider(http, wrong, clock=lambda: now[0])
        with pytest.raises(AuthError) as info:
            await provider.token(retry=False)
        assert info.value.retriable  # passing, for all it knows
        assert "HTTP 404" in str(info.value) and "check auth.token_url" in str(info.value)
        # A token URL has a path: not the gateway_url advice ("nothing after the host").
        assert "nothing after the host" not in str(info.value)
        assert "path and all" in str(info.value)
        beside = TokenProvider(http, stream(f"{gw.url}/nowhere"), clock=lambda: now[0])
        with pytest.raises(AuthError) as info:
            await beside.token(retry=False)
        assert "check gateway_url" in str(info.value)
        assert "nothing after the host" in str(info.value)
        now[0] += 59
        with pytest.raises(AuthError) as info:
            await provider.token(retry=False)
        assert info.value.retriable
        now[0] += 1  # 404 for retry_max_s: the URL is wrong
        with pytest.raises(AuthError) as info:
            await provider.token(retry=False)
        assert not info.value.retriable
        tokens = TokenProvider(http, stream(gw.url))
        await tokens.token()
        gw.fail_token_requests([404])
        tokens.invalidate()
        with pytest.raises(AuthError) as info:
            await tokens.token()
        assert info.value.retriable
        assert (await tokens.token()).value in gw.issued_tokens


async def test_the_daemon_stops_on_a_token_url_that_does_not_exist(sandbox_factory, tmp_path):
    gw = await sandbox_factory()
    auth = {
        "client_id": "c",
        "client_secret": "client-secret-0001",
        "token_url": f"{gw.url}/x/oauth/v1/tokens",
        "retry_max_s": 0.5,  # the 404 lasts that long: a wrong URL
    }
    settings = make_settings(tmp_path, gw.url, auth=auth)
    daemon = await Daemon.create(settings)
    async with asyncio.timeout(60):
        assert await daemon.run() == ExitCode.CONFIG
    assert "HTTP 404" in daemon.runners["main"].stats.last_close
    assert gw.stats.connections == 0


async def test_a_passing_404_at_start_is_retried(sandbox_factory, tmp_path):
    """The gateway answers its token endpoint with a 404 once, just as the daemon starts (no
    token issued yet in this process): retried, and the stream runs (it stopped for good)."""
    gw = await sandbox_factory(backlog=5)
    gw.fail_token_requests([404])
    async with running(make_settings(tmp_path, gw.url)) as daemon:
        await wait_until(lambda: daemon.pipelines["main"].delivered >= 5)
    assert daemon.exit_code == ExitCode.OK


async def test_a_gateway_url_with_the_subscriptions_path_streams(sandbox_factory, tmp_path):
    gw = await sandbox_factory(backlog=5)
    settings = make_settings(tmp_path, f"{gw.url}/subscriptions")
    async with running(settings) as daemon:
        await wait_until(lambda: daemon.pipelines["main"].delivered >= 5)
    assert [path for path in gw.stats.rest_paths if "subscriptions" in path] == []


async def test_client_credentials_without_enterprise_id_is_warned_and_refused_with_why(
    sandbox_factory, tmp_path
):
    """An OCIM environment (the sandbox with enterprise_id) refuses client_credentials without
    the enterpriseId header: the stream warns at start, naming the key and the fix, and the
    refusal says that enterprise_id is not set. With it, the stream runs."""
    gw = await sandbox_factory(backlog=5, enterprise_id="ENT1")
    o = SandboxOptions()
    auth = {"client_id": o.client_id, "client_secret": o.client_secret}
    with captured_logs() as logs:
        daemon = await Daemon.create(make_settings(tmp_path, gw.url, auth=auth))
        async with asyncio.timeout(60):
            assert await daemon.run() == ExitCode.CONFIG
    warned = [
        line
        for line in map(json.loads, logs.getvalue().splitlines())
        if line["event"] == "configuration warning"
    ]
    key = "streams.main.auth.enterprise_id"
    assert [(w["key"], w["stream"]) for w in warned] == [(key, "main")]
    assert "set enterprise_id" in warned[0]["fix"]
    assert "enterprise_id is not set" in daemon.runners["main"].stats.last_close
    settings = make_settings(tmp_path, gw.url, auth={**auth, "enterprise_id": "ENT1"})
    async with running(settings) as daemon:
        await wait_until(lambda: daemon.pipelines["main"].delivered >= 5)


def test_retry_after_forms():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("garbage") is None
    # In the past: at once, i.e. the shortest wait honoured (never a tight loop).
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == RETRY_AFTER_MIN_S
    assert retry_after_seconds("100000") == 300.0  # capped


@pytest.mark.parametrize("ttl", [float("nan"), -5.0, 0.0, 1e-300, 0.5])
async def test_an_absurd_expires_in_is_an_unusable_answer(sandbox_factory, ttl: float):
    """A lifetime from the wire is bounded like any other value from it: NaN, infinity or
    nothing left (under a second: 1e-300 passed "> 0") would otherwise set refresh timers
    that fire never or at once, and each caller would fetch a token of its own."""
    gw = await sandbox_factory(token_ttl_s=ttl)
    async with aiohttp.ClientSession() as http:
        tokens = TokenProvider(http, stream(gw.url, retry_max_s=0.5))
        with pytest.raises(AuthError, match="expires_in") as failed:
            await tokens._request()
    assert failed.value.retriable


async def test_a_lifetime_of_years_is_refreshed_at_least_daily(sandbox_factory):
    gw = await sandbox_factory(token_ttl_s=10 * 365 * 86400.0)
    async with aiohttp.ClientSession() as http:
        token = await TokenProvider(http, stream(gw.url)).token()
    assert token.lifetime_s == 86400.0


async def test_the_token_endpoints_certificate_is_verified(tmp_path: Path):
    """The client secret goes only to a verified endpoint: against a certificate no trusted CA
    signed, the request fails in the handshake, and the error says why."""
    async with untrusted_tls_server(tmp_path) as (port, requests):
        url = f"https://127.0.0.1:{port}"
        settings = make_settings(tmp_path, url)
        async with http_client(settings) as http:
            with pytest.raises(AuthError) as info:
                await TokenProvider(http, settings.streams["main"]).token(retry=False)
    assert "TLS error: certificate not accepted" in str(info.value), str(info.value)
    assert f"{url}/oauth/v1/tokens" in str(info.value)
    assert requests == []


@pytest.mark.parametrize("body", [False, True], ids=["header", "body"])
async def test_a_token_endpoint_trickling_its_answer_meets_a_deadline(body: bool) -> None:
    """Each byte comes within timeout_s, so only a bound on the whole request ends it."""
    async with trickling_server(body=body) as port, aiohttp.ClientSession() as http:
        tokens = TokenProvider(http, stream(f"http://127.0.0.1:{port}", timeout_s=0.5))
        async with asyncio.timeout(30):  # the test's own guard: the deadline is ~1.5 s
            with pytest.raises(AuthError) as info:
                await tokens.token(retry=False)
    assert "timed out" in str(info.value).lower() or "timeout" in str(info.value).lower()


UNUSABLE_TOKENS = {
    "one letter": "e",  # registered, the redactor would mask every "e" of every line
    "CR/LF": "tok-4f9a\r\nX-Injected: 1",  # aiohttp refuses it in every request made with it
    "a space": "tok 4f9a 77e1 b2c0",
    "a control": "tok-4f9a\x1b[2J-77e1",
    "non-ASCII": "tok-4f9a-\u00e9\u00e9-77e1",
    "endless": "t" * 16385,
    # Past what a log line's masking reaches beyond its cut (SCRUB_MARGIN): one across the
    # cut showed its start (found by a review).
    "past the masking": "eyJ" + "Q" * 9000,
    "past it once escaped": "eyJ" + "+" * 2000,  # .NET writes each "+" as \u002B
}


def token_reply(value: str) -> Reply:
    body = json.dumps({"access_token": value, "expires_in": 3600}).encode()
    return Reply(200, {"Content-Type": "application/json"}, body)


@pytest.mark.parametrize("value", UNUSABLE_TOKENS.values(), ids=UNUSABLE_TOKENS.keys())
async def test_an_unusable_access_token_is_refused_unquoted(value: str) -> None:
    """Issue: the access_token was trusted as is. "e" made the redactor mask every "e"; one
    with CR/LF made every orchestration GET raise, and every event was dead-lettered."""
    with Receiver(lambda request: token_reply(value)) as endpoint:
        token_url = f"http://127.0.0.1:{endpoint.port}/oauth/v1/tokens"
        settings = stream(token_url, token_url=token_url)
        async with aiohttp.ClientSession() as http:
            with pytest.raises(AuthError) as info:
                await TokenProvider(http, settings).token(retry=False)
    message = str(info.value)
    assert info.value.retriable
    assert f"{token_url} sent an unusable access_token (" in message
    assert (
        (len(value) < 4 or value not in message) and "\r" not in message and "\x1b" not in message
    )
    assert REDACTOR.scrub("state=streaming, token obtained") == "state=streaming, token obtained"


@pytest.mark.parametrize("expires_in", [True, False, [3600], {"s": 3600}], ids=repr)
async def test_an_expires_in_that_is_not_a_number_is_refused(expires_in: Any) -> None:
    """``true`` passed float() as a 1 s lifetime: a rotation twice a second."""
    body = json.dumps({"access_token": "tok-4f9a-77e1-b2c0", "expires_in": expires_in})

    def reply(request: Any) -> Reply:
        return Reply(200, {"Content-Type": "application/json"}, body.encode())

    with Receiver(reply) as endpoint:
        token_url = f"http://127.0.0.1:{endpoint.port}/oauth/v1/tokens"
        async with aiohttp.ClientSession() as http:
            provider = TokenProvider(http, stream(token_url, token_url=token_url))
            with pytest.raises(AuthError, match="unusable response") as info:
                await provider.token(retry=False)
    assert info.value.retriable


async def test_the_daemon_does_not_stream_with_an_unusable_token_and_says_why(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=5)
    good = await sandbox_token(gw)
    with Receiver(lambda request: token_reply(good)) as endpoint:
        bad = [UNUSABLE_TOKENS[k] for k in ("one letter", "CR/LF", "a space")]
        endpoint.script(*(token_reply(v) for v in bad))
        settings = make_settings(
            tmp_path,
            gw.url,
            auth={
                "client_id": "c",  # (the endpoint is ours: it takes any credentials)
                "client_secret": "client-secret-0001",
                "token_url": f"http://127.0.0.1:{endpoint.port}/oauth/v1/tokens",
            },
        )
        with captured_logs() as logs:
            async with running(settings) as daemon:
                await wait_until(lambda: "unusable access_token" in logs.getvalue())
                assert gw.stats.connections == 0  # no session with the bad token
                # It retries: the fourth answer is good, and the stream runs with it.
                await wait_until(lambda: daemon.pipelines["main"].delivered >= 5)
    assert len(endpoint.requests) >= 4
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    refused = [x for x in lines if "unusable access_token" in str(x)]
    assert refused and all(v not in str(x) for x in refused for v in bad if len(v) > 1)
    assert any(x["event"] == "token obtained" for x in lines)  # never "tok***n obtain***d"
    assert [x for x in gw.stats.subscribes if x]  # it subscribed, with the good token


async def test_the_wait_for_a_token_shows_no_secret_of_its_url_and_is_one_line() -> None:
    """aiohttp's error text holds the request's URL with its query: the status line (/readyz,
    systemd's STATUS=, `status`) showed ?client_assertion=... in clear, over several lines."""
    secret = uuid.uuid4().hex  # unknown to the process's redactor

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/oauth/v1/tokens?client_assertion={secret}"
    async with server, aiohttp.ClientSession() as http:
        tokens = TokenProvider(http, stream(url, token_url=url, retry_max_s=600.0))
        task = asyncio.create_task(tokens.token())
        try:
            await wait_until(lambda: tokens.waiting() is not None)
            waiting = tokens.waiting()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert waiting is not None
    assert waiting.startswith(f"waiting for token (http://127.0.0.1:{port}/oauth/v1/tokens?")
    assert "Bad status line" in waiting, waiting  # the reason is there, only masked
    # (The text is cut at 200 characters: not even the start of the secret may be there.)
    assert secret[:8] not in waiting and "\n" not in waiting and waiting.isprintable(), waiting


async def test_a_late_refusal_of_an_old_token_keeps_the_new_one(sandbox_factory):
    """Several REST calls in flight with a token the server revoked: the first 401 gets a new
    token; the slower 401s of the old one must not throw the new one away (each fetched one
    more before)."""
    gw = await sandbox_factory(token_ttl_s=3600)
    async with aiohttp.ClientSession() as http:
        tokens = TokenProvider(http, stream(gw.url))
        old = await tokens.access_token()
        tokens.invalidate(old)  # the first 401
        new = await tokens.access_token()
        tokens.invalidate(old)  # a slower one, of the same old token
        assert await tokens.access_token() == new != old
        tokens.invalidate()  # a session refused (4401): whatever token it had
        assert await tokens.access_token() not in (old, new)
    assert gw.stats.token_requests == 3


async def test_a_rotation_waits_for_the_next_token_and_streams_on_meanwhile(
    sandbox_factory, tmp_path: Path
):
    """The token endpoint fails when the session's token is due for rotation: the session
    was completed first and the new token fetched after, so the stream stopped until the
    endpoint answered again, while its token still had half its life. Now the session streams
    on with it (events arrive while the failures last) and rotates once a token comes."""
    gw = await sandbox_factory(backlog=5, token_ttl_s=8.0, stale_hold_s=30.0)
    settings = make_settings(tmp_path, gw.url)  # rotation half-way: 4 s in
    async with running(settings) as daemon:
        await wait_until(lambda: committed(tmp_path / "state.db", newest_offset(gw)))
        gw.fail_token_requests([503] * 1000)  # answered to the rotation's requests
        await wait_until(lambda: gw.token_failures_left < 1000, timeout=30)  # it is due
        gw.append("DEMO", 10)
        await wait_until(lambda: committed(tmp_path / "state.db", newest_offset(gw)))
        assert gw.token_failures_left > 0  # delivered while the endpoint still failed
        assert gw.stats.completes_received == 0  # the session was never ended for it
        gw.clear_token_failures()
        await wait_until(lambda: gw.stats.completes_received >= 1, timeout=30)  # rotated
        gw.append("DEMO", 10)
        await wait_until(lambda: committed(tmp_path / "state.db", newest_offset(gw)), timeout=30)
        assert daemon.runners["main"]._tokens.fetches >= 2
    assert 4401 not in gw.stats.close_codes_sent
    assert sorted(sink_ids(tmp_path / "events.jsonl")) == sorted(truth_ids(gw.events("DEMO")))


async def test_a_stop_while_the_rotations_token_request_hangs_completes_the_session(
    sandbox_factory, tmp_path: Path
):
    """The rotation's token request did not watch the stop: an endpoint that does not answer
    held the session for auth.timeout_s (15 s) after a SIGTERM, longer than the daemon waits
    for its streams (complete_timeout_s + 2), so the session was never completed and the next
    start (or the fleet member taking over) met 4409 and its lockout. (4 s tokens: the
    rotation is due 2 s in, the stop comes then, 2 s before the token's expiry.)"""
    gw = await sandbox_factory(backlog=5, token_ttl_s=4.0, stale_hold_s=30.0)
    port = urlsplit(gw.url).port
    assert port is not None
    with TcpProxy("127.0.0.1", port) as proxy:
        cfg = stream_config(gw.url)
        cfg["auth"] = {**cfg["auth"], "token_url": f"http://127.0.0.1:{proxy.port}/oauth/v1/tokens"}
        settings = make_settings(tmp_path, gw.url, streams={"main": cfg})
        daemon = await Daemon.create(settings)
        run = asyncio.create_task(daemon.run())
        try:
            await wait_until(lambda: committed(tmp_path / "state.db", newest_offset(gw)))
            tokens = daemon.runners["main"]._tokens
            proxy.blackhole()  # the token endpoint stops answering
            await wait_until(lambda: tokens.fetches >= 2, timeout=30)  # the rotation's, hanging
            daemon.request_stop()
            async with asyncio.timeout(60):
                await run
        finally:
            proxy.restore()
            daemon.request_stop()
            async with asyncio.timeout(60):
                await asyncio.gather(run, return_exceptions=True)
    assert gw.stats.completes_received == 1  # completed at the stop, not left open
