"""Fleet mode in the daemon itself (runtime/daemon.py with runtime/fleet.py), against a real
PostgreSQL state store; the streams' gateway and the webhook are nowhere (127.0.0.1:9): what is
tested is which process may run as which member."""

from __future__ import annotations

import asyncio

import pytest
from fleet_support import fleet_settings
from pg import proxied, sql
from support import running, wait_until
from tcp_proxy import TcpProxy

from consumer.config import Settings
from consumer.config.settings import FleetSettings
from consumer.errors import ExitCode, LeaseHeld
from consumer.runtime.daemon import Daemon
from consumer.state import lease

pytestmark = pytest.mark.usefixtures("contained_logging")


async def test_a_second_daemon_under_a_member_name_in_use_exits_78(
    postgres_dsn: str, schema: str
) -> None:
    """Two daemons given one member name would take each other's streams every tick: the
    second finds the name held by a live process and stops with exit status 78 (a restart
    cannot help), leaving the first, its leases and its member row alone."""
    settings = fleet_settings(postgres_dsn, schema, "x")
    async with running(settings) as first:
        assert first.fleet is not None
        await wait_until(lambda: first.fleet is not None and first.fleet.leases_held == 2)
        epochs = dict(first.fleet.epochs)
        second = await Daemon.create(settings)
        async with asyncio.timeout(30):
            code = await second.run()
        assert code == ExitCode.CONFIG
        assert first.fleet.epochs == epochs and first.fleet.counters.lost == 0
        q = f'SELECT instance FROM "{schema}".fleet_members WHERE member = $1'
        assert await sql(postgres_dsn, "fetchval", q, "x") == first.fleet.table.instance
        rows = await sql(
            postgres_dsn, "fetch", f'SELECT stream, holder, epoch FROM "{schema}".stream_leases'
        )
        assert {r["stream"]: (r["holder"], r["epoch"]) for r in rows} == {
            s: ("x", e) for s, e in epochs.items()
        }
    assert first.exit_code == ExitCode.OK


async def test_a_member_starts_while_a_dlq_replay_holds_the_store(
    postgres_dsn: str, schema: str
) -> None:
    """A `dlq replay` takes the schema's lock for its run; a member (re)starting meanwhile is
    no daemon outside the fleet, and must not be refused (exit 78 keeps systemd from
    restarting it)."""
    settings = fleet_settings(postgres_dsn, schema, "m1")
    replay = await lease.acquire(settings.state, (), role="dlq-replay")
    try:
        daemon = await Daemon.create(settings)
        await daemon.close()
    finally:
        await replay.release()


def single_settings(dsn: str, schema: str) -> Settings:
    """A daemon outside any fleet, on the fleet's schema (its streams: the members')."""
    settings = fleet_settings(dsn, schema, "-")
    return settings.model_copy(update={"fleet": FleetSettings()})


async def test_a_daemon_outside_the_fleet_is_refused_beside_a_member_not_yet_ticking(
    postgres_dsn: str, schema: str
) -> None:
    """A member and a daemon outside the fleet started together: the member writes its row
    at its first tick, so the row check at the daemon's start saw nothing, and both ran every
    stream. The member holds the fleet lock from its start: the daemon is refused, naming it
    and the fix."""
    member = await Daemon.create(fleet_settings(postgres_dsn, schema, "m1"))
    try:
        with pytest.raises(LeaseHeld) as refused:
            await Daemon.create(single_settings(postgres_dsn, schema))
        assert "fleet member m1 holds the state store" in str(refused.value)
        assert "set [fleet] enabled" in str(refused.value)
    finally:
        await member.close()
    async with running(single_settings(postgres_dsn, schema)) as alone:  # the member is gone
        assert alone.fleet is None
        with pytest.raises(LeaseHeld, match="a daemon outside the fleet"):
            await Daemon.create(fleet_settings(postgres_dsn, schema, "m2"))


async def test_a_member_reconnecting_beside_a_daemon_outside_the_fleet_stops(
    postgres_dsn: str, schema: str, pg_proxy: TcpProxy
) -> None:
    """After an outage longer than a lease, every member row has expired: a daemon outside
    the fleet started then finds no member, and a member reconnecting afterwards went on
    renewing and running its streams beside it. The member takes the fleet lock again before
    anything else on every new connection: refused, it stops its streams and exits 78."""
    name = f"m-{schema}"
    via_proxy = proxied(postgres_dsn, pg_proxy.port)
    member = await Daemon.create(fleet_settings(via_proxy, schema, name))
    member_run = asyncio.create_task(member.run())
    single_run: asyncio.Task[int] | None = None
    try:
        await wait_until(lambda: member.fleet is not None and member.fleet.leases_held == 2)
        # The outage, as the server sees it: the member's sessions end (a restart), nothing
        # reaches it from the member, and its rows have expired.
        pg_proxy.blackhole()
        app = f"opera-consumer fleet {name}"[:63]
        q = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1"
        await sql(postgres_dsn, "fetch", q, app)
        gone = "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = $1"
        async with asyncio.timeout(30):
            while await sql(postgres_dsn, "fetchval", gone, app):
                await asyncio.sleep(0.05)
        for table in ("fleet_members", "stream_leases"):
            await sql(postgres_dsn, "execute", f'UPDATE "{schema}".{table} SET expires_at = 0')
        single = await Daemon.create(single_settings(postgres_dsn, schema))
        single_run = asyncio.create_task(single.run())
        pg_proxy.restore()
        async with asyncio.timeout(30):
            code = await member_run
        assert code == ExitCode.CONFIG
        assert member.fleet is not None and member.fleet.leases_held == 0
        assert not member.runners
        assert not single_run.done()
    finally:
        pg_proxy.restore()
        member.request_stop()
        async with asyncio.timeout(30):
            await asyncio.gather(member_run, return_exceptions=True)
        if single_run is not None:
            single.request_stop()
            async with asyncio.timeout(30):
                await single_run
