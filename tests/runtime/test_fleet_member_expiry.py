"""A fleet member beside a member row expiring when no heartbeat sets it (Infinity, NaN, a
year ahead: another process's row, a manual edit), against a real PostgreSQL state store.
The environment is tests/runtime/test_fleet_member.py's."""

from __future__ import annotations

import pytest
from log_capture import captured_logs, records
from pg import sql
from support import wait_until
from test_fleet_member import TTL_S, Env, env, views_read  # noqa: F401  # env: a fixture

GHOST = (
    "INSERT INTO {q}.fleet_members (member, host, pid, weight, started_at, heartbeat_at, "
    "expires_at, draining) SELECT 'ghost', 'h', 1, 1, 0, n, {expires}, false "
    "FROM (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS n) t"
)


@pytest.mark.parametrize("expires", ["'Infinity'::float8", "'NaN'::float8", "n + 1e9"])
async def test_a_member_row_expiring_when_no_heartbeat_sets_is_no_live_member(
    env: Env,  # noqa: F811  # the fixture
    expires: str,
) -> None:
    """Such a row was live for ever: its weight in every member's share (the streams it
    would hold taken only once starved, and handed back at each join). It counts as gone,
    and the member says so once."""
    await sql(env.dsn, "execute", GHOST.format(q=f'"{env.schema}"', expires=expires))
    with captured_logs() as logs:
        fleet = env.member("m1")
        seen = views_read(fleet)
        env.run(fleet)
        await wait_until(lambda: env.count("started") == 2, timeout=3 * TTL_S)
        ticked = len(seen)
        await wait_until(lambda: len(seen) >= ticked + 2)  # warned again at each tick, if at all
    assert fleet.members_live == 1
    lines = records(logs)
    warned = [x for x in lines if "expires at a time no member's heartbeat sets" in x["event"]]
    assert [(x["member"], x["level"]) for x in warned] == [("ghost", "warning")]


@pytest.mark.parametrize("expires", ["'Infinity'::float8", "'NaN'::float8", "n + 1e9"])
async def test_a_lease_row_expiring_when_no_renewal_sets_is_taken(
    env: Env,  # noqa: F811  # the fixture
    expires: str,
) -> None:
    """A lease row held by a name no live member uses, expiring at Infinity (NaN, a year
    ahead: a renewal sets now + lease_ttl_s): its stream was consumed by nobody, for ever.
    It counts as expired: the member takes it, at a new epoch."""
    await sql(
        env.dsn,
        "execute",
        f'INSERT INTO "{env.schema}".stream_leases (stream, holder, epoch, expires_at) '
        f"SELECT 'b', 'ghost', 5, {expires} "
        "FROM (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS n) t",
    )
    with captured_logs() as logs:
        fleet = env.member("m1")
        env.run(fleet)
        await wait_until(lambda: env.count("started") == 2, timeout=3 * TTL_S)
    assert fleet.epochs["b"] == 6
    assert await env.leases() == [("a", "m1", fleet.epochs["a"]), ("b", "m1", 6)]
    warned = [x for x in records(logs) if "no member's renewal sets" in x["event"]]
    assert [(x["stream"], x["holder"]) for x in warned] == [("b", "ghost")], warned
