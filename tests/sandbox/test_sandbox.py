"""The sandbox gateway itself, driven by a bare websockets client and httpx."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from support import sandbox_token
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from consumer.core import protocol
from consumer.core.protocol import SubscribeInput
from consumer.sandbox import SandboxGateway, SandboxOptions, launcher

OPTS = SandboxOptions()


token = sandbox_token


@asynccontextmanager
async def ws(
    gw: SandboxGateway, *, init: bool = True, key: str = OPTS.app_key
) -> AsyncIterator[ClientConnection]:
    url = protocol.subscription_url(gw.url, key)
    async with connect(url, subprotocols=["graphql-transport-ws"]) as conn:  # type: ignore[list-item]
        if init:
            await conn.send(protocol.connection_init(await token(gw), OPTS.app_key))
            assert json.loads(await conn.recv())["type"] == "connection_ack"
        yield conn


async def events(conn: ClientConnection, n: int) -> list[dict[str, Any]]:
    got = []
    while len(got) < n:
        msg = json.loads(await conn.recv())
        if msg["type"] == "next":
            got.append(msg["payload"]["data"]["newEvent"])
    return got


async def close_code(conn: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as info:
        for _ in range(100_000):
            await conn.recv()
    return info.value.rcvd.code if info.value.rcvd else None


async def test_token_endpoint(sandbox_factory):
    gw = await sandbox_factory()
    async with httpx.AsyncClient() as http:
        ok = await http.post(
            f"{gw.url}/oauth/v1/tokens",
            data={"grant_type": "password", "username": OPTS.username, "password": OPTS.password},
            auth=(OPTS.client_id, OPTS.client_secret),
            headers={"x-app-key": OPTS.app_key},
        )
        bad = await http.post(
            f"{gw.url}/oauth/v1/tokens",
            data={"grant_type": "client_credentials", "scope": "s"},
            auth=(OPTS.client_id, "nope"),
            headers={"x-app-key": OPTS.app_key},
        )
        no_grant = await http.post(
            f"{gw.url}/oauth/v1/tokens", data={}, auth=(OPTS.client_id, OPTS.client_secret)
        )
    assert ok.status_code == 200 and ok.json()["token_type"] == "Bearer"
    assert ok.json()["expires_in"] == 3600
    assert bad.status_code == 401 and no_grant.status_code == 400


async def test_the_token_endpoint_can_require_the_enterprise_id(sandbox_factory):
    """OCIM: client_credentials needs the enterpriseId header; the password grant does not."""
    gw = await sandbox_factory(enterprise_id="ENT1")

    async def status(grant: dict[str, str], **headers: str) -> int:
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                f"{gw.url}/oauth/v1/tokens",
                data=grant,
                auth=(OPTS.client_id, OPTS.client_secret),
                headers={"x-app-key": OPTS.app_key, **headers},
            )
        return answer.status_code

    credentials = {"grant_type": "client_credentials", "scope": "s"}
    user = {"grant_type": "password", "username": OPTS.username, "password": OPTS.password}
    assert await status(credentials) == 400
    assert await status(credentials, enterpriseId="OTHER") == 400
    assert await status(credentials, enterpriseId="ENT1") == 200
    assert await status(user) == 200


async def test_the_upgrade_can_require_a_bearer_token(sandbox_factory):
    gw = await sandbox_factory(require_upgrade_authorization=True)
    url = protocol.subscription_url(gw.url, OPTS.app_key)
    graphql_ws = [Subprotocol("graphql-transport-ws")]
    for header in ({}, {"Authorization": "Bearer not-a-token"}):
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, subprotocols=graphql_ws, additional_headers=header):
                pass
        assert info.value.response.status_code == 401
    issued = await token(gw)
    good = {"Authorization": f"Bearer {issued}"}
    async with connect(url, subprotocols=graphql_ws, additional_headers=good) as conn:
        assert conn.subprotocol == "graphql-transport-ws"
    assert gw.stats.upgrade_tokens == ["", "not-a-token", issued]


async def test_backlog_replay_highest_and_filters(sandbox_factory):
    gw = await sandbox_factory(backlog=200)
    truth = gw.events("DEMO")
    offsets = [int(e["metadata"]["offset"]) for e in truth]
    assert offsets == sorted(offsets) and len(set(offsets)) == 200
    assert any(b - a > 1 for a, b in itertools.pairwise(offsets))  # gaps
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe("a", SubscribeInput(chain_code="DEMO", offset="0")))
        assert await events(conn, 200) == truth
        await conn.send(protocol.complete("a"))
        assert await close_code(conn) == 1000
    start = truth[120]["metadata"]["offset"]
    async with ws(gw) as conn:  # inclusive replay from an offset
        await conn.send(protocol.subscribe("b", SubscribeInput(chain_code="DEMO", offset=start)))
        assert await events(conn, 80) == truth[120:]
        await conn.send(protocol.complete("b"))
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe("c", SubscribeInput(chain_code="DEMO", highest=True)))
        assert await events(conn, 1) == truth[-1:]
        new = gw.append("DEMO", 2)
        assert await events(conn, 2) == new
        await conn.send(protocol.complete("c"))
    async with ws(gw) as conn:
        sub = SubscribeInput(chain_code="DEMO", offset="0", delta=True, hotel_codes=("HOTEL1",))
        await conn.send(protocol.subscribe("d", sub))
        wanted = [e for e in gw.events("DEMO") if e["hotelId"] == "HOTEL1"]
        got = await events(conn, len(wanted))
        assert [e["metadata"] for e in got] == [e["metadata"] for e in wanted]
        for g, w in zip(got, wanted, strict=True):
            assert g["detail"] == [d for d in w["detail"] if d["oldValue"] != d["newValue"]]
        assert (
            sum(len(w["detail"]) - len(g["detail"]) for g, w in zip(got, wanted, strict=True)) > 0
        )


async def test_an_offset_older_than_the_retention_replays_from_the_oldest_retained(
    sandbox_factory,
):
    """As OHIP after its 7 days: no error, the replay starts at the oldest event retained."""
    gw = await sandbox_factory(backlog=10, retention_events=4)
    truth = gw.events("DEMO")
    async with ws(gw) as conn:
        first = truth[0]["metadata"]["offset"]
        await conn.send(protocol.subscribe("a", SubscribeInput(chain_code="DEMO", offset=first)))
        assert await events(conn, 4) == truth[6:]
        await conn.send(protocol.complete("a"))
        assert await close_code(conn) == 1000


async def test_resume_without_offset_continues_after_what_was_sent(sandbox_factory):
    gw = await sandbox_factory(backlog=10, send_batch=4)
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe("a", SubscribeInput(chain_code="DEMO")))
        await events(conn, 10)
        await conn.send(protocol.complete("a"))
    new = gw.append("DEMO", 3)
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe("b", SubscribeInput(chain_code="DEMO")))
        assert await events(conn, 3) == new


async def test_wrong_key_hash_is_refused_with_http_400(sandbox_factory):
    gw = await sandbox_factory()
    with pytest.raises(InvalidStatus) as info:
        async with ws(gw, init=False, key="another-key"):
            pass
    assert info.value.response.status_code == 400


async def test_missing_subprotocol_is_closed_4406(sandbox_factory):
    gw = await sandbox_factory()
    async with connect(protocol.subscription_url(gw.url, OPTS.app_key)) as conn:
        assert await close_code(conn) == 4406


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"Authorization": "Bearer not-a-token", "x-app-key": OPTS.app_key}, 4401),
        ("GOOD", 4401),  # the right token with the key's hash instead of the key
    ],
)
async def test_bad_connection_init_is_closed_4401(sandbox_factory, payload: Any, code: int):
    gw = await sandbox_factory()
    if payload == "GOOD":
        payload = {
            "Authorization": f"Bearer {await token(gw)}",
            "x-app-key": protocol.key_hash(OPTS.app_key),
        }
    async with ws(gw, init=False) as conn:
        await conn.send(json.dumps({"type": "connection_init", "payload": payload}))
        assert await close_code(conn) == code


@pytest.mark.parametrize(
    ("query", "code"),
    [
        (
            'subscription { newEvent(input: { chainCode: "DEMO" offset: "12a" }) { eventName } }',
            4400,
        ),
        ('subscription { newEvent(input: { chainCode: "DEMO" bogus: "1" }) { eventName } }', 4400),
        ("query { getHelp { overview } }", 4400),
        ('subscription { newEvent(input: { chainCode: "NOPE" }) { eventName } }', 4403),
    ],
)
async def test_invalid_subscriptions(sandbox_factory, query: str, code: int):
    gw = await sandbox_factory()
    async with ws(gw) as conn:
        await conn.send(json.dumps({"id": "x", "type": "subscribe", "payload": {"query": query}}))
        assert await close_code(conn) == code


async def test_single_consumer_per_chain(sandbox_factory):
    gw = await sandbox_factory(backlog=5)
    async with ws(gw) as first:
        await first.send(protocol.subscribe("a", SubscribeInput(chain_code="DEMO", offset="0")))
        await events(first, 5)
        async with ws(gw) as second:
            await second.send(
                protocol.subscribe("b", SubscribeInput(chain_code="DEMO", offset="0"))
            )
            assert await close_code(second) == 4409
        new = gw.append("DEMO", 1)
        assert await events(first, 1) == new


async def test_stale_hold_after_a_drop_without_complete(sandbox_factory):
    gw = await sandbox_factory(backlog=1, stale_hold_s=30)
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe("a", SubscribeInput(chain_code="DEMO")))
        await events(conn, 1)
    async with ws(gw) as conn:  # the first one never sent complete
        await conn.send(protocol.subscribe("b", SubscribeInput(chain_code="DEMO")))
        assert await close_code(conn) == 4409


async def test_the_gap_after_a_completed_subscription(sandbox_factory):
    """With resubscribe_gap_s, a subscribe to a chain whose subscription was just completed
    (and closed) is refused with 4409, as OHIP does; another chain is not held up."""
    gw = await sandbox_factory(backlog=1, chains=("DEMO", "OTHER"), resubscribe_gap_s=30)
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe("a", SubscribeInput(chain_code="DEMO")))
        await events(conn, 1)
        await conn.send(protocol.complete("a"))
        assert await close_code(conn) == 1000
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe("b", SubscribeInput(chain_code="DEMO")))
        assert await close_code(conn) == 4409
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe("c", SubscribeInput(chain_code="OTHER")))
        await events(conn, 1)
    assert (gw.stats.gap_refusals, gw.stats.stale_refusals, gw.stats.subscriber_conflicts) == (
        1,
        0,
        0,
    )


async def test_subscribe_deadline_after_connection_init(sandbox_factory):
    """With subscribe_deadline_s, a connection that has not subscribed that long after its
    connection_init is closed with 4408; one that subscribes in time streams."""
    gw = await sandbox_factory(backlog=1, subscribe_deadline_s=0.3)
    async with ws(gw) as conn:  # acked, never subscribes
        assert await close_code(conn) == 4408
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe("a", SubscribeInput(chain_code="DEMO")))
        await events(conn, 1)
    assert gw.stats.subscribe_timeouts == 1


async def test_the_sandbox_command_enforces_the_timing_rules(tmp_path) -> None:
    """`opera-consumer sandbox --subscribe-deadline 0.3 --resubscribe-gap 30`, as a process: a
    connection that does not subscribe in time is closed 4408; a subscribe right after a
    completed one gets 4409."""
    proc, url = launcher.start(
        ["--backlog", "1", "--rate", "0", "--subscribe-deadline", "0.3", "--resubscribe-gap", "30"],
        tmp_path / "sandbox.log",
    )
    try:
        ws_url = protocol.subscription_url(url, OPTS.app_key)
        init = protocol.connection_init(await launcher.token(url), OPTS.app_key)
        async with connect(ws_url, subprotocols=["graphql-transport-ws"]) as conn:  # type: ignore[list-item]
            await conn.send(init)
            assert await close_code(conn) == 4408
        for sub_id, code in (("a", 1000), ("b", 4409)):
            async with connect(ws_url, subprotocols=["graphql-transport-ws"]) as conn:  # type: ignore[list-item]
                await conn.send(init)
                assert json.loads(await conn.recv())["type"] == "connection_ack"
                await conn.send(protocol.subscribe(sub_id, SubscribeInput(chain_code="DEMO")))
                if code == 1000:
                    await events(conn, 1)
                    await conn.send(protocol.complete(sub_id))
                assert await close_code(conn) == code
    finally:
        launcher.stop(proc)


async def test_pings_both_ways_and_init_rules(sandbox_factory):
    gw = await sandbox_factory(ping_interval_s=0.05)
    async with ws(gw) as conn:
        await conn.send(protocol.PING)
        kinds = {json.loads(await conn.recv())["type"] for _ in range(4)}
        assert kinds == {"pong", "ping"}  # our pong, and the server's own pings
        await conn.send(protocol.connection_init("x", OPTS.app_key))
        assert await close_code(conn) == 4429
    gw2 = await sandbox_factory(init_timeout_s=0.1)
    async with ws(gw2, init=False) as conn:
        assert await close_code(conn) == 4408


async def test_token_expiry_closes_4401(sandbox_factory):
    """Issue #9 item 12: a 2 s token, so that connecting and connection_init (which need it
    valid) fit in its life on a loaded machine; it then expires during the subscription."""
    gw = await sandbox_factory(token_ttl_s=2.0)
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe("a", SubscribeInput(chain_code="DEMO", offset="0")))
        assert await close_code(conn) == 4401


async def test_malformed_frames_are_sent_verbatim_in_place(sandbox_factory):
    gw = await sandbox_factory(backlog=2)
    gw.inject_malformed("DEMO", "{broken")
    gw.append("DEMO", 1)
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe("a", SubscribeInput(chain_code="DEMO", offset="0")))
        frames = [await conn.recv() for _ in range(4)]
    assert frames[2] == "{broken"
    assert [json.loads(f)["type"] for i, f in enumerate(frames) if i != 2] == ["next"] * 3


async def test_disconnect_all_without_close_frame(sandbox_factory):
    gw = await sandbox_factory(backlog=1)
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe("a", SubscribeInput(chain_code="DEMO")))
        await events(conn, 1)
        await gw.disconnect_all(code=None)
        assert await close_code(conn) is None  # 1006: no close frame
