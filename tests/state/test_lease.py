"""The daemon's lease on its state store: a second daemon on the same store is refused, the
first is unaffected, and the lease is released at the stop (Issue #10 item 7: split out of
test_operator_tools.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from fleet_support import fleet_settings
from operator_support import settled, write_config
from pg import sql
from stalled_pg import stalled_postgres
from support import running, wait_until

from consumer.config import StateSettings, load_settings
from consumer.config.settings import FleetSettings
from consumer.errors import LeaseHeld, StoreError
from consumer.runtime.daemon import Daemon
from consumer.state import holder, open_store
from consumer.state.fleet import FleetTable
from consumer.state.postgres import PostgresLease

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")


async def test_a_second_daemon_on_the_same_state_store_is_refused(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=50)
    config = write_config(tmp_path, gw.url, sink={"type": "jsonl", "path": tmp_path / "e.jsonl"})
    settings = load_settings(config)
    state = settings.state.path
    async with running(settings) as first:
        await wait_until(settled(first, "main", 50))
        info = holder(state)
        assert info is not None
        assert (info["pid"], info["role"], info["streams"]) == (os.getpid(), "daemon", ["main"])
        with pytest.raises(LeaseHeld) as refused:
            await Daemon.create(settings)
        assert f"pid {os.getpid()}" in str(refused.value)
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "consumer", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 78, proc.stderr
        assert f"pid {os.getpid()}" in proc.stderr
        # The first one is unaffected.
        gw.append("DEMO", 10)
        await wait_until(settled(first, "main", 60))
    assert holder(state) is None
    assert first.exit_code == 0
    async with running(settings) as again:  # released at the stop: a new daemon may start
        await wait_until(lambda: again.runners["main"].state == "streaming")


async def test_a_daemon_outside_the_fleet_is_refused_beside_a_member_holding_no_lease(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """A fleet member that holds no lease yet (its first tick, or drained) takes streams at
    any tick: a single daemon started beside it on the same schema would consume them too,
    so it is refused as beside a member holding leases."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    fleet = fleet_settings(postgres_dsn, schema, "m1")
    store = await open_store(fleet.state)
    await store.close()
    member = FleetTable(
        fleet.state, "m1", host="h", pid=1, weight=1.0, started_at=0.0, lease_ttl_s=60.0
    )
    try:
        await member.join(fleet.streams, 10.0)
        renewal = await member.tick({}, 10.0)  # a heartbeat, no lease
        assert renewal.owned and renewal.renewed == frozenset()
        single = fleet.model_copy(update={"fleet": FleetSettings()})
        with pytest.raises(LeaseHeld, match="fleet member m1 holds the state store"):
            await Daemon.create(single)
        await member.leave(10.0)
        await member.close()  # as its shutdown does: the fleet lock goes with the connection
        async with running(single) as alone:  # the member left: nothing in the way
            assert alone.fleet is None
    finally:
        await member.close()
        await sql(postgres_dsn, "execute", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def test_the_postgres_lease_ends_in_time_on_a_silent_server() -> None:
    """A server that accepts the connection and then never answers (tests/stalled_pg.py):
    asking who holds the lease, and taking it, end with a StoreError naming the store and
    the timeout. They waited for ever (no statement timeout, an unbounded goodbye). The
    bound only catches a hang."""
    async with stalled_postgres() as server:
        st = StateSettings(
            backend="postgres",
            dsn=f"postgresql://opera:pw-0003@127.0.0.1:{server.port}/opera",
            timeout_s=0.5,
        )
        where = f"state store PostgreSQL 127.0.0.1:{server.port}/opera (schema opera_consumer)"
        async with asyncio.timeout(60):
            with pytest.raises(StoreError) as asked:
                await PostgresLease.holder(st)
            with pytest.raises(StoreError) as taken:
                await PostgresLease.acquire(st, ["a"])
        assert server.connections >= 2
    for exc, doing in (
        (asked.value, "asking who holds the lease"),
        (taken.value, "taking the lease"),
    ):
        assert str(exc).startswith(f"{where}: {doing}: no answer within 0.5 s ([state] timeout_s)")
        assert exc.retriable
