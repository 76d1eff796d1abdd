"""Fleet failover (consumer.core.failover) with real daemons: two members in this process on
one PostgreSQL state store, the sandbox gateway, and the Python sink (tests/pysink.py) the two
share. A member whose gateway URL is a closed loopback port (its own network broken, as it
were) reaches PostgreSQL, so it keeps its leases renewed; it must hand its stream over to the
member that reaches the gateway, and not take it back. With no member reaching the gateway,
nobody hands anything over.

Timers are scaled: 5 s leases (a handover of 2 x (0.2 + 2) + 0.2 s must fit in a lease minus a
tick), 0.25 s ticks, release_unreachable_after_s at its least, twice the lease. Every wait is
for a positive condition."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pysink
import pytest
from log_capture import log_records
from pg import sql
from support import stream_config, wait_until

from consumer.config import Settings
from consumer.runtime.daemon import Daemon

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")

TTL_S = 5.0
TICK_S = 0.25
AFTER_S = 2 * TTL_S
CHAINS = {"a": ("DEMO", "sandbox-app-key"), "b": ("OTHER", "key2")}
FAST_STOP = {"complete_timeout_s": 0.2, "takeover_jitter_s": 0.0}


def closed_port() -> str:
    """A loopback URL nothing listens on: every connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def member(name: str, url: str, dsn: str, schema: str) -> Settings:
    return Settings(
        streams={  # type: ignore[arg-type]
            s: stream_config(url, chain_code=chain, app_key=key, connection=FAST_STOP)
            for s, (chain, key) in CHAINS.items()
        },
        state={"backend": "postgres", "dsn": dsn, "schema": schema},  # type: ignore[arg-type]
        sink={"type": "python", "target": "pysink:handle"},  # type: ignore[arg-type]
        pipeline={"drain_timeout_s": 0.2},  # type: ignore[arg-type]
        metrics={"enabled": False},  # type: ignore[arg-type]
        fleet={  # type: ignore[arg-type]
            "enabled": True,
            "member": name,
            "lease_ttl_s": TTL_S,
            "renew_interval_s": TICK_S,
            "release_unreachable_after_s": AFTER_S,
        },
    )


@pytest.fixture
async def members() -> AsyncIterator[Any]:
    """Start daemons (``await start(settings)``); each is stopped at the end, cleanly."""
    async with AsyncExitStack() as stack:
        daemons: list[Daemon] = []
        tasks: list[asyncio.Task[int]] = []

        async def start(settings: Settings) -> Daemon:
            daemon = await Daemon.create(settings)
            daemons.append(daemon)
            tasks.append(asyncio.create_task(daemon.run()))
            return daemon

        async def stop() -> None:
            for d in daemons:
                d.request_stop()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)

        stack.push_async_callback(stop)
        yield start


async def lease(dsn: str, schema: str, stream: str) -> tuple[str | None, int]:
    row = await sql(
        dsn,
        "fetchrow",
        f'SELECT holder, epoch FROM "{schema}".stream_leases WHERE stream = $1',
        stream,
    )
    return row["holder"], int(row["epoch"])


def held(daemon: Daemon) -> set[str]:
    assert daemon.fleet is not None
    return {s for s in daemon.fleet.epochs if s in daemon.runners}


async def test_a_member_that_cannot_reach_the_gateway_hands_its_stream_over(
    sandbox_factory: Any, postgres_dsn: str, schema: str, members: Any
) -> None:
    gw = await sandbox_factory(backlog=20, chains=("DEMO", "OTHER"), app_keys=("key2",))
    with log_records("info") as logs:
        a = await members(member("A", closed_port(), postgres_dsn, schema))
        b = await members(member("B", gw.url, postgres_dsn, schema))
        assert a.fleet is not None and b.fleet is not None
        # One stream each (their fair shares), A's never connecting.
        await wait_until(lambda: len(held(a)) == 1 and len(held(b)) == 1, timeout=60)
        (stuck,) = held(a)
        (other,) = held(b)
        taken_at = a.fleet.epochs[stuck]
        # A hands it over (B has a stream connected), and says in its row that it avoids it.
        await wait_until(lambda: a.fleet.counters.released_unreachable == 1, timeout=60)

        async def avoiding() -> list[str] | None:
            q = f'SELECT avoiding FROM "{schema}".fleet_members WHERE member = $1'
            return await sql(postgres_dsn, "fetchval", q, "A")  # type: ignore[no-any-return]

        async with asyncio.timeout(30):
            while await avoiding() != [stuck]:
                await asyncio.sleep(0.05)
        # B takes it over, and consumes all of it.
        await wait_until(lambda: held(b) == {stuck, other}, timeout=60)
        gw.append(CHAINS[stuck][0], 5)
        truth = [uid for uid, _, _ in gw.event_keys(CHAINS[stuck][0])]
        newest = gw.event_keys(CHAINS[stuck][0])[-1][1]

        async def checkpointed() -> bool:
            cp = await b.store.checkpoint(stuck)
            return cp is not None and cp.offset == newest

        async with asyncio.timeout(60):
            while not await checkpointed():
                await asyncio.sleep(0.1)
        # Handed over once, taken once by B: A did not take it back in between.
        assert await lease(postgres_dsn, schema, stuck) == ("B", taken_at + 1)
        assert a.fleet.counters.released_unreachable == 1
        assert b.fleet.counters.released_unreachable == 0
        assert not held(a)
    delivered = pysink.delivered_ids(stuck)
    assert sorted(delivered) == sorted(truth)  # every event, once
    said = [r for r in logs if r["event"].startswith("handing a stream over: not connected")]
    assert [(r["member"], r["stream"]) for r in said] == [("A", stuck)]
    # Taken once since A took it: by B, beyond its share (A avoids it, B is at its share).
    taken = [
        r
        for r in logs
        if r["event"] == "lease taken" and r["stream"] == stuck and r["epoch"] > taken_at
    ]
    assert [(r["epoch"], r.get("beyond_share")) for r in taken] == [(taken_at + 1, True)]
    # B took it beyond its share because A avoids it (A's row says so): no stream lists differ.
    assert not [r for r in logs if "configured with different streams" in r["event"]]


async def test_nobody_hands_over_when_no_member_reaches_the_gateway(
    postgres_dsn: str, schema: str, members: Any
) -> None:
    """A gateway outage for every member: each waits past release_unreachable_after_s, says
    so once, and keeps its stream (no bouncing them around)."""
    with log_records("info") as logs:
        a = await members(member("A", closed_port(), postgres_dsn, schema))
        b = await members(member("B", closed_port(), postgres_dsn, schema))
        assert a.fleet is not None and b.fleet is not None
        await wait_until(lambda: len(held(a)) == 1 and len(held(b)) == 1, timeout=60)
        before = {s: await lease(postgres_dsn, schema, s) for s in CHAINS}

        def stranded(d: Daemon) -> bool:
            assert d.fleet is not None
            return bool(d.fleet._stranded)

        # Both found their stream overdue, with no evidence; then a few more ticks each.
        await wait_until(lambda: stranded(a) and stranded(b), timeout=60)
        ticks = (a.fleet.ticks, b.fleet.ticks)
        await wait_until(
            lambda: a.fleet.ticks >= ticks[0] + 8 and b.fleet.ticks >= ticks[1] + 8, timeout=60
        )
        assert {s: await lease(postgres_dsn, schema, s) for s in CHAINS} == before
        assert a.fleet.counters.released_unreachable == b.fleet.counters.released_unreachable == 0
    said = [r for r in logs if r["event"].startswith("a stream is not connected here")]
    assert sorted(r["member"] for r in said) == ["A", "B"]  # once each
