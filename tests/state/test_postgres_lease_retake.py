""":class:`PostgresLease`'s check and retake, against a real PostgreSQL: a session the server
still has after a cut (it never saw the close) is our own, ended and its locks taken; one
another process holds now is :class:`LeaseHeld`, naming it."""

from __future__ import annotations

import asyncio
import os

import pytest
from pg import proxied, sql
from tcp_proxy import TcpProxy

from consumer.config import StateSettings
from consumer.errors import LeaseHeld
from consumer.pg_target import Target
from consumer.state.postgres import PostgresLease

APP = f"opera-consumer lease pid={os.getpid()} role=daemon"[:63]
HOLDERS = (
    "SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1"
)


def state(dsn: str, schema: str) -> StateSettings:
    return StateSettings(backend="postgres", dsn=dsn, schema=schema, timeout_s=1.0)  # type: ignore[arg-type]


async def holders(dsn: str) -> list[int]:
    return [r["pid"] for r in await sql(dsn, "fetch", HOLDERS, APP)]


async def test_our_session_left_at_the_server_by_a_cut_is_ended_and_its_lease_taken(
    postgres_dsn: str, schema: str, pg_proxy: TcpProxy
) -> None:
    """The network cut, the check gets no answer, and the server still has the session that
    holds the locks (it saw no close). The retake over a working path finds them held by that
    session, ours: it ends it and takes them, rather than take itself for another daemon."""
    via_proxy = proxied(postgres_dsn, pg_proxy.port)
    held = await PostgresLease.acquire(state(via_proxy, schema), (), outside_fleet=True)
    try:
        assert await held.check()
        old = await holders(postgres_dsn)
        assert len(old) == 1
        pg_proxy.blackhole()
        assert not await held.check()
        held._target = Target(postgres_dsn)  # the path back, as a route that healed
        await held.retake()
        assert await held.check()
        async with asyncio.timeout(30):
            while (now := await holders(postgres_dsn)) == old:
                await asyncio.sleep(0.05)
        assert len(now) == 1 and now != old
        with pytest.raises(LeaseHeld):
            await PostgresLease.acquire(state(postgres_dsn, schema), (), outside_fleet=True)
    finally:
        pg_proxy.restore()
        await held.release()


async def test_a_lease_another_took_is_named_at_the_retake(postgres_dsn: str, schema: str) -> None:
    settings = state(postgres_dsn, schema)
    held = await PostgresLease.acquire(settings, (), outside_fleet=True)
    other: PostgresLease | None = None
    try:
        [old] = await holders(postgres_dsn)
        await sql(postgres_dsn, "fetch", "SELECT pg_terminate_backend($1)", old)
        async with asyncio.timeout(30):
            while old in await holders(postgres_dsn):
                await asyncio.sleep(0.05)
        assert not await held.check()
        other = await PostgresLease.acquire(settings, (), role="other", outside_fleet=True)
        with pytest.raises(LeaseHeld) as refused:
            await held.retake()
        assert f"pid {os.getpid()}" in str(refused.value) and schema in str(refused.value)
        assert refused.value.holder is not None and refused.value.holder["role"] == "other"
    finally:
        await held.release()
        if other is not None:
            await other.release()
