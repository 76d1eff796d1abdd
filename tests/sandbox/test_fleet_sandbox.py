"""The sandbox features fleet mode's tests rely on: several application keys, the
``connection`` query per key, dropping silent clients (``client_timeout_s``), why each 4409 was
sent, and the chain logs' ground truth as (uniqueEventId, offset, primaryKey)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from support import wait_until
from tcp_proxy import TcpProxy
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from consumer.core import protocol
from consumer.core.protocol import SubscribeInput
from consumer.sandbox import SandboxGateway, SandboxOptions

OPTS = SandboxOptions()
KEY2 = "second-app-key"
CONNECTION_QUERY = "query { connection { id status } }"


async def token(gw: SandboxGateway, app_key: str = OPTS.app_key) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(
            f"{gw.url}/oauth/v1/tokens",
            data={"grant_type": "client_credentials", "scope": "s"},
            auth=(OPTS.client_id, OPTS.client_secret),
            headers={"x-app-key": app_key},
        )


@asynccontextmanager
async def ws(
    gw: SandboxGateway,
    key: str = OPTS.app_key,
    *,
    init_key: str | None = None,
    init: bool = True,
    via: str | None = None,
    tok: str | None = None,
    **kwargs: Any,
) -> AsyncIterator[ClientConnection]:
    """A session on the URL of ``key`` (at ``via``, default the sandbox's), initialized with
    ``init_key`` (default: ``key``) and the token ``tok`` (default: a new one)."""
    url = protocol.subscription_url(via or gw.url, key)
    if tok is None:  # before connecting: no gap between the upgrade and connection_init
        tok = (await token(gw)).json()["access_token"]
    async with connect(url, subprotocols=["graphql-transport-ws"], **kwargs) as conn:  # type: ignore[list-item]
        if init:
            await conn.send(protocol.connection_init(tok, init_key or key))
            assert json.loads(await conn.recv())["type"] == "connection_ack"
        yield conn


async def recv(conn: ClientConnection, kind: str, timeout: float = 30.0) -> dict[str, Any]:
    """The next message of this type (others skipped: pings, events), within ``timeout``: a
    server that sends only other types (pings) must fail the test, not hang it."""
    async with asyncio.timeout(timeout):
        while True:
            msg = json.loads(await conn.recv())
            if msg["type"] == kind:
                return msg  # type: ignore[no-any-return]


async def status(conn: ClientConnection, query_id: str = "q") -> str:
    """Ask the ``connection`` query; its one answer, then its complete."""
    await conn.send(
        json.dumps({"id": query_id, "type": "subscribe", "payload": {"query": CONNECTION_QUERY}})
    )
    msg = await recv(conn, "next")
    assert msg["id"] == query_id
    assert (await recv(conn, "complete"))["id"] == query_id
    return str(msg["payload"]["data"]["connection"]["status"])


async def subscribe(conn: ClientConnection, sub_id: str, chain: str) -> dict[str, Any]:
    """Subscribe from the start of the chain; its first event."""
    await conn.send(protocol.subscribe(sub_id, SubscribeInput(chain_code=chain, offset="0")))
    return (await recv(conn, "next"))["payload"]["data"]["newEvent"]  # type: ignore[no-any-return]


async def close_code(conn: ClientConnection) -> int | None:
    """How the server ended the connection: its close code, None without a close frame."""
    with pytest.raises(ConnectionClosed) as info:
        for _ in range(1_000_000):
            await conn.recv()
    return info.value.rcvd.code if info.value.rcvd else None


Factory = Callable[..., Any]


# --- several application keys -------------------------------------------------------------------


async def test_every_accepted_app_key_gets_tokens_rest_and_websocket(sandbox_factory: Factory):
    gw: SandboxGateway = await sandbox_factory(backlog=20, app_keys=(KEY2,))
    for key in (OPTS.app_key, KEY2):
        assert (await token(gw, key)).status_code == 200
    assert (await token(gw, "unknown-key")).status_code == 401

    profile = next(e["primaryKey"] for e in gw.events("DEMO") if e["moduleName"] == "Profile")
    tok = (await token(gw, KEY2)).json()["access_token"]
    async with httpx.AsyncClient() as http:
        got = {
            key: (
                await http.get(
                    f"{gw.url}/crm/v1/profiles/{profile}",
                    headers={"Authorization": f"Bearer {tok}", "x-app-key": key},
                )
            ).status_code
            for key in (OPTS.app_key, KEY2, "unknown-key")
        }
    assert got == {OPTS.app_key: 200, KEY2: 200, "unknown-key": 401}

    async with ws(gw, KEY2) as conn:  # the second key's hash in the URL, the key in init
        assert (await subscribe(conn, "a", "DEMO")) == gw.events("DEMO")[0]
        await conn.send(protocol.complete("a"))
        assert await close_code(conn) == 1000  # (reading what is left: a prompt close)
    with pytest.raises(InvalidStatus) as info:
        async with ws(gw, "unknown-key", init=False):
            pass
    assert info.value.response.status_code == 400
    async with ws(gw, KEY2, init=False) as conn:
        tok = (await token(gw)).json()["access_token"]
        await conn.send(protocol.connection_init(tok, "unknown-key"))
        assert await close_code(conn) == 4401


async def test_only_app_key_when_app_keys_is_empty(sandbox_factory: Factory):
    gw: SandboxGateway = await sandbox_factory()
    assert (await token(gw, KEY2)).status_code == 401
    with pytest.raises(InvalidStatus):
        async with ws(gw, KEY2, init=False):
            pass


# --- the connection query per application key ---------------------------------------------------


async def test_connection_status_is_scoped_to_the_app_key(sandbox_factory: Factory):
    gw: SandboxGateway = await sandbox_factory(
        backlog=5, chains=("DEMO", "OTHER"), app_keys=(KEY2,)
    )
    async with ws(gw) as asker1, ws(gw, KEY2) as asker2:
        assert (await status(asker1, "q1"), await status(asker2, "q2")) == ("Inactive", "Inactive")
        async with ws(gw) as holder1:
            await subscribe(holder1, "s", "DEMO")
            # Same key: Active; the other key: Inactive, though DEMO is subscribed.
            assert await status(asker1, "q3") == "Active"
            assert await status(asker2, "q4") == "Inactive"
            async with ws(gw, KEY2) as holder2:
                await subscribe(holder2, "s", "OTHER")
                assert await status(asker2, "q5") == "Active"
                # The single-subscriber rule stays per chain, whatever the key.
                async with ws(gw, KEY2) as second:
                    await second.send(
                        protocol.subscribe("t", SubscribeInput(chain_code="DEMO", offset="0"))
                    )
                    assert await close_code(second) == 4409
            await wait_until(lambda: gw.stats.active_subscriptions["OTHER"] == 0, timeout=10)
            assert await status(asker2, "q6") == "Inactive"
            assert await status(asker1, "q7") == "Active"
    assert gw.stats.subscriber_conflicts == 1
    assert gw.stats.stale_refusals == 0


# --- client_timeout_s ---------------------------------------------------------------------------


async def test_a_silent_client_is_dropped_and_its_chain_held(sandbox_factory: Factory):
    """The client subscribes to a large backlog, then neither reads nor sends anything (as if
    frozen): the server, blocked on TCP backpressure, aborts the connection (no close frame)
    after client_timeout_s, and the chain is held as after any drop without complete."""
    gw: SandboxGateway = await sandbox_factory(
        backlog=10, client_timeout_s=0.5, stale_hold_s=30, ping_interval_s=0.1, send_batch=1
    )
    padding = "x" * 200_000
    for i in range(100):  # 20 MB: more than the socket buffers hold
        gw.inject_event(
            "DEMO", json.dumps({"metadata": {"uniqueEventId": f"big-{i}"}, "p": padding})
        )
    async with ws(gw, ping_interval=None, max_queue=4) as frozen:
        await subscribe(frozen, "a", "DEMO")
        await wait_until(lambda: gw.stats.client_timeouts == 1, timeout=10)
        assert gw.stats.events_sent < 110  # it was stuck sending
        assert await close_code(frozen) is None  # 1006: aborted, no close handshake
    await wait_until(lambda: gw.stats.active_subscriptions["DEMO"] == 0, timeout=10)
    async with ws(gw) as successor:
        await successor.send(protocol.subscribe("b", SubscribeInput(chain_code="DEMO")))
        assert await close_code(successor) == 4409
    assert (gw.stats.stale_refusals, gw.stats.subscriber_conflicts) == (1, 0)
    assert gw.stats.close_codes_sent == [4409]


async def test_a_client_that_sends_frames_is_kept(sandbox_factory: Factory):
    """Pings every 0.1 s keep a session alive well past client_timeout_s, while one that only
    receives (it never answers the server's pings) is dropped."""
    gw: SandboxGateway = await sandbox_factory(backlog=3, client_timeout_s=0.5)
    # Both tokens first: an httpx client's creation blocks the loop (the sandbox's too).
    idle_token = (await token(gw)).json()["access_token"]
    async with ws(gw, ping_interval=None) as lively:

        async def keep_alive() -> None:
            while True:
                await lively.send(protocol.PING)
                await asyncio.sleep(0.1)

        pinger = asyncio.create_task(keep_alive())
        try:
            await subscribe(lively, "a", "DEMO")
            async with ws(gw, ping_interval=None, tok=idle_token) as idle:
                assert await close_code(idle) is None
            assert gw.stats.client_timeouts == 1
            for _ in range(15):  # 1.5 s more: three timeouts
                await recv(lively, "pong")
            assert gw.stats.client_timeouts == 1
            assert gw.stats.active_subscriptions["DEMO"] == 1  # the lively one's
            new = gw.append("DEMO", 1)
            assert (await recv(lively, "next"))["payload"]["data"]["newEvent"] == new[0]
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)


async def test_a_client_behind_a_partition_is_dropped(sandbox_factory: Factory):
    """The combination fleet tests use: a partition (the proxy's blackhole) silences the
    client, the sandbox drops it; the client sees nothing of that until the link is back."""
    gw: SandboxGateway = await sandbox_factory(
        backlog=1, client_timeout_s=0.5, stale_hold_s=30, ping_interval_s=0
    )
    with TcpProxy("127.0.0.1", gw.port) as proxy:
        async with ws(gw, via=f"http://127.0.0.1:{proxy.port}", ping_interval=None) as conn:
            await subscribe(conn, "a", "DEMO")
            proxy.blackhole()
            await conn.send(protocol.PING)  # lost in the partition
            await wait_until(lambda: gw.stats.client_timeouts == 1, timeout=10)
            await wait_until(lambda: gw.stats.active_subscriptions["DEMO"] == 0, timeout=10)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(conn.recv(), 0.3)  # no pong, and no close either
            proxy.restore()
            assert await close_code(conn) is None  # the black-holed connection is reset
    assert gw.stats.pings_received == 0


async def test_a_completed_subscription_is_released_without_a_hold(sandbox_factory: Factory):
    gw: SandboxGateway = await sandbox_factory(backlog=3, stale_hold_s=30, client_timeout_s=0.5)
    async with ws(gw) as conn:
        await subscribe(conn, "a", "DEMO")
        await conn.send(protocol.complete("a"))
        assert await close_code(conn) == 1000
    async with ws(gw) as conn:
        assert (await subscribe(conn, "b", "DEMO"))["metadata"]["offset"]


# --- why each 4409 ------------------------------------------------------------------------------


async def test_a_second_subscribe_on_one_session_is_counted_apart(sandbox_factory: Factory):
    gw: SandboxGateway = await sandbox_factory(backlog=3, chains=("DEMO", "OTHER"))
    async with ws(gw) as conn:
        await subscribe(conn, "a", "DEMO")
        await conn.send(protocol.subscribe("b", SubscribeInput(chain_code="OTHER")))
        assert await close_code(conn) == 4409
    assert gw.stats.duplicate_subscribe_ids == 1
    assert (gw.stats.subscriber_conflicts, gw.stats.stale_refusals) == (0, 0)
    assert gw.stats.close_codes_sent == [4409]


async def test_stale_refusals_and_conflicts_are_told_apart(sandbox_factory: Factory):
    gw: SandboxGateway = await sandbox_factory(backlog=3, stale_hold_s=30)
    async with ws(gw) as first:
        await subscribe(first, "a", "DEMO")
        async with ws(gw) as second:
            await second.send(protocol.subscribe("b", SubscribeInput(chain_code="DEMO")))
            assert await close_code(second) == 4409
    await wait_until(lambda: gw.stats.active_subscriptions["DEMO"] == 0, timeout=10)
    async with ws(gw) as third:  # the first left without complete: the hold
        await third.send(protocol.subscribe("c", SubscribeInput(chain_code="DEMO")))
        assert await close_code(third) == 4409
    assert (gw.stats.subscriber_conflicts, gw.stats.stale_refusals) == (1, 1)
    assert gw.stats.duplicate_subscribe_ids == 0
    assert gw.stats.close_codes_sent == [4409, 4409]


# --- ground truth -------------------------------------------------------------------------------


async def test_event_keys_are_the_valid_events_in_log_order(sandbox_factory: Factory):
    gw: SandboxGateway = await sandbox_factory(backlog=30, malformed_every=7)
    gw.inject_event("DEMO", '{"metadata":{"offset":"1","uniqueEventId":"injected"}}')
    gw.append("DEMO", 5)
    keys = gw.event_keys("DEMO")
    events = gw.events("DEMO")
    assert len(keys) == 35 and len(gw.malformed["DEMO"]) == 5
    assert keys == [
        (e["metadata"]["uniqueEventId"], e["metadata"]["offset"], e["primaryKey"]) for e in events
    ]
    assert all(isinstance(pk, str) for _, _, pk in keys)
    async with ws(gw) as conn:  # what a subscriber receives, in order
        await conn.send(protocol.subscribe("a", SubscribeInput(chain_code="DEMO", offset="0")))
        got: list[tuple[str, str, str | None]] = []
        while len(got) < len(keys):
            try:
                msg = json.loads(await conn.recv())
            except ValueError:
                continue  # a malformed frame
            ev = (
                msg.get("payload", {}).get("data", {}).get("newEvent")
                if isinstance(msg, dict)
                else None
            )
            if isinstance(ev, dict) and ev.get("primaryKey"):
                got.append(
                    (ev["metadata"]["uniqueEventId"], ev["metadata"]["offset"], ev["primaryKey"])
                )
        assert got == keys
