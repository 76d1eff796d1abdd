"""A fleet member's tick renews its leases, then reads the fleet and takes leases: those reads
end by the time the next renewal is due (consumer.runtime.fleet.Fleet._tick). Each statement
had a whole renew_interval_s of its own: a database answering each within it, only slowly,
pushed the next renewal past the self-fence (two ticks after the last one at the tightest
ratio the settings allow: FleetSettings.self_fence_after_s), and a healthy member stopped every
stream, again and again. Real PostgreSQL (tests/pg.py); the member's own statements slowed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from fleet_support import fleet_settings
from support import wait_until
from test_fleet_member import Env, env  # noqa: F401  # env: a fixture

from consumer.config.settings import CANCEL_GRACE_S
from consumer.runtime.fleet import Fleet
from consumer.state.fleet import FleetTable

RENEW_S = 1.5  # a handover (4 s with no drain) fits in lease_ttl_s - renew_interval_s
# The tightest the settings allow: the self-fence 2 ticks after a renewal. With ticks under
# CANCEL_GRACE_S (2 s) the self-fence leaves that grace and a tick before the lease can expire,
# so a quarter (6 s) is not enough: 3 ticks + the grace.
TTL_S = 3 * RENEW_S + CANCEL_GRACE_S


class SlowReads(FleetTable):
    """Every statement but the renewal answers after 80% of a tick (within its timeout, when
    it has a tick's)."""

    slow = False

    async def _call(self, doing: str, timeout_s: float, fn: str, sql: str, *args: Any) -> Any:
        if self.slow and doing != "renewing leases":
            async with asyncio.timeout(timeout_s):  # as the statement's own timeout
                await asyncio.sleep(0.8 * RENEW_S)
        return await super()._call(doing, timeout_s, fn, sql, *args)


async def test_slow_reads_never_push_the_renewal_past_the_self_fence(env: Env) -> None:  # noqa: F811
    base = fleet_settings(
        env.dsn, env.schema, "m1", streams=("a", "b", "c"), lease_ttl_s=TTL_S, stop_step_s=0.0
    )
    data = base.model_dump(mode="python")
    data["fleet"]["renew_interval_s"] = RENEW_S
    settings = type(base).model_validate(data)
    table = SlowReads(
        settings.state, "m1", host="h", pid=1, weight=1.0, started_at=0.0, lease_ttl_s=TTL_S
    )
    stopped: list[tuple[str, bool]] = []

    async def start(stream: str) -> None:
        return None

    async def stop(stream: str, lost: bool) -> None:
        stopped.append((stream, lost))

    def spawn(coro: Any, name: str) -> asyncio.Task[None]:
        env.tasks.append(asyncio.create_task(coro, name=name))
        return env.tasks[-1]

    fleet = Fleet(settings, start_stream=start, stop_stream=stop, spawn=spawn, table=table)
    env.fleets.append(fleet)
    env.run(fleet)
    await wait_until(lambda: fleet.leases_held == 3, timeout=20)
    # Stream c given back and its row held (as an operator's `offset set` holds it): free in
    # the fleet's view but skipped by the taking, so every tick reads the fleet (two
    # statements) and tries to take it (a third).
    await fleet.table.release({"c": fleet.epochs.pop("c")}, 5)
    blocker = await asyncpg.connect(env.dsn, timeout=10)
    try:
        async with blocker.transaction():
            await blocker.execute(
                f'SELECT stream FROM "{env.schema}".stream_leases WHERE stream = $1 FOR UPDATE',
                "c",
            )
            table.slow = True
            ticks = fleet.ticks
            await wait_until(lambda: fleet.ticks >= ticks + 6, timeout=60)
    finally:
        await blocker.close()
    assert fleet.counters.self_fenced == 0, stopped
    assert stopped == []
    assert fleet.leases_held == 2
