"""Fleet mode in the daemon itself (runtime/daemon.py with runtime/fleet.py), against a real
PostgreSQL state store; the streams' gateway and the webhook are nowhere (127.0.0.1:9): what is
tested is which process may run as which member."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from fleet_support import fleet_settings
from pg import sql
from support import running, wait_until

from consumer.errors import ExitCode
from consumer.runtime.daemon import Daemon
from consumer.state import lease

pytestmark = pytest.mark.usefixtures("contained_logging")


@pytest.fixture
async def schema(postgres_dsn: str) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield name
    await sql(postgres_dsn, "execute", f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


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
