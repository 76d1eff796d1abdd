"""consumer.state.fleet.FleetTable against a real PostgreSQL server (tests/pg.py), and the
fence the PostgreSQL store checks in every commit: a member that lost a stream's lease makes
nothing of that stream durable.

Each test has a schema of its own, created by opening the store (the migrations run), dropped
at the end."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from pg import PostgresServer, sql
from pydantic import SecretStr
from support import until

import consumer.state.fleet as fleet_module
from consumer.config import StateSettings
from consumer.config.settings import MAX_LEASE_TTL_S
from consumer.core.assignment import MAX_EXPIRY_AHEAD_S, Member, fair_share, plan
from consumer.core.records import CommitBatch, DeadLetter, Fence, Staged
from consumer.core.watermark import Position
from consumer.errors import Fenced, OperatorRefused
from consumer.state import StateStore, open_store
from consumer.state.fleet import AVOIDING_READ, Acquired, FleetTable, FleetView
from consumer.state.lease import current_holder, in_the_way

T = 10.0  # the timeout of each FleetTable call


@dataclass
class Env:
    settings: StateSettings
    store: StateStore
    dsn: str
    schema: str
    tables: list[FleetTable] = field(default_factory=list)

    @property
    def q(self) -> str:
        return f'"{self.schema}"'

    def member(self, name: str, *, ttl: float = 30.0, weight: float = 1.0) -> FleetTable:
        table = FleetTable(
            self.settings,
            name,
            host="test-host",
            pid=4242,
            weight=weight,
            started_at=time.time(),
            lease_ttl_s=ttl,
        )
        self.tables.append(table)
        return table

    async def fetch(self, statement: str, *args: Any) -> list[Any]:
        return list(await sql(self.dsn, "fetch", statement, *args))

    async def execute(self, statement: str, *args: Any) -> str:
        return str(await sql(self.dsn, "execute", statement, *args))

    async def epochs(self) -> dict[str, int]:
        """Each lease row's epoch, as it is now."""
        rows = await self.fetch(f"SELECT stream, epoch FROM {self.q}.stream_leases")
        return {str(r[0]): int(r[1]) for r in rows}

    async def clock_us(self) -> int:
        """The database's clock, in microseconds."""
        rows = await self.fetch("SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1e6)::bigint")
        return int(rows[0][0])

    async def count(self, table: str, stream: str | None = None) -> int:
        if stream is None:
            rows = await self.fetch(f"SELECT COUNT(*) FROM {self.q}.{table}")
        else:
            rows = await self.fetch(
                f"SELECT COUNT(*) FROM {self.q}.{table} WHERE stream = $1", stream
            )
        return int(rows[0][0])


@pytest.fixture
async def env(postgres_server: PostgresServer) -> AsyncIterator[Env]:
    dsn = postgres_server.dsn()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    settings = StateSettings(backend="postgres", dsn=SecretStr(dsn), schema=schema)
    store = await open_store(settings)
    e = Env(settings, store, dsn, schema)
    try:
        yield e
    finally:
        for table in e.tables:
            await table.close()
        await store.close()
        await e.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def until_expired(table: FleetTable, stream: str) -> None:
    """Until the database's clock is past the stream's lease (a positive condition, never a
    fixed sleep)."""

    async def expired() -> bool:
        view = await table.view(T)
        return view.now > view.leases[stream].expires_at

    await until(expired)


def pos(stream: str, i: int) -> Position:
    return Position(f"{i:06d}", f"{stream}-u{i}")


def batch_for(stream: str, i: int, fence: Fence | None) -> CommitBatch:
    return CommitBatch(
        checkpoints={stream: pos(stream, i)},
        processed={stream: [f"{stream}-u{i}", f"{stream}-v{i}"]},
        done_counts={stream: 2},
        dead_letters=[
            DeadLetter(
                stream=stream,
                reason="malformed",
                error="bad frame",
                payload=f"{{{i}",
                primary_key=f"pk-{stream}",
            )
        ],
        fence=fence,
    )


# --- join, acquire, tick, release, leave -------------------------------------------------------


async def test_join_creates_a_free_lease_row_per_stream(env: Env) -> None:
    """A row starts at the database's clock in microseconds (see FIRST_EPOCH)."""
    a = env.member("a")
    before = await env.clock_us()
    await a.join(["s2", "s1"], T)
    after = await env.clock_us()
    view = await a.view(T)
    assert sorted(view.leases) == ["s1", "s2"]
    for stream, lease in view.leases.items():
        assert (lease.stream, lease.holder, lease.expires_at) == (stream, None, 0)
        assert before <= lease.epoch <= after
    assert view.members == []  # joining is not a heartbeat
    assert view.now > 0

    # joining again (another member, more streams) keeps the rows there are
    got = await a.acquire(["s1"], T)
    b = env.member("b")
    await b.join(["s1", "s2", "s3"], T)
    view = await b.view(T)
    assert sorted(view.leases) == ["s1", "s2", "s3"]
    assert view.leases["s1"].holder == "a"
    assert view.leases["s1"].epoch == got[0].epoch


async def test_acquire_bumps_the_epoch_and_names_the_previous_holder(env: Env) -> None:
    a = env.member("a")
    await a.join(["s1", "s2"], T)
    first = await env.epochs()
    got = await a.acquire(["s1", "s2"], T)
    assert sorted(got, key=lambda x: x.stream) == [
        Acquired("s1", first["s1"] + 1, None),
        Acquired("s2", first["s2"] + 1, None),
    ]
    view = await a.view(T)
    lease = view.leases["s1"]
    assert lease.holder == "a"
    assert view.now < lease.expires_at <= view.now + 30.0

    # a lease in its own name (a restart under the same name) is taken again: a new epoch
    assert await a.acquire(["s1"], T) == [Acquired("s1", first["s1"] + 2, "a")]
    # a stream without a row is not taken (join first)
    assert await a.acquire(["nope"], T) == []


async def test_acquire_passes_a_lease_at_the_top_epoch_by_and_takes_the_others(
    env: Env,
) -> None:
    """Every wanted lease is taken in one statement: one row whose epoch + 1 overflows
    bigint failed it whole ("bigint out of range"), and no stream was taken."""
    a = env.member("a")
    await a.join(["s1", "s2"], T)
    await env.execute(f"UPDATE {env.q}.stream_leases SET epoch = $1 WHERE stream = 's2'", 2**63 - 1)
    first = await env.epochs()
    assert await a.acquire(["s1", "s2"], T) == [Acquired("s1", first["s1"] + 1, None)]
    assert (await a.view(T)).leases["s2"].holder is None


@pytest.mark.parametrize(
    ("weight", "started_at"),
    [("Infinity", "0"), ("-Infinity", "0"), ("NaN", "NaN"), ("-1", "0"), ("1001", "Infinity")],
)
async def test_a_member_row_out_of_range_counts_as_weight_0(
    env: Env, weight: str, started_at: str
) -> None:
    """The members' rows are anyone's (another version, a manual edit): a weight of Infinity
    made every share NaN (ValueError, at every member's every tick). Out of the range a
    config allows, it counts as 0; a start time not finite, as 0 (NaN never equals itself:
    a new process at every tick)."""
    a = env.member("a")
    await a.tick({}, T)
    await env.execute(
        f"INSERT INTO {env.q}.fleet_members (member, host, pid, weight, started_at, "
        "heartbeat_at, expires_at) SELECT 'odd', 'h', 1, $1::text::float8, $2::text::float8, "
        "n, n + 3600 FROM (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS n) t",
        weight,
        started_at,
    )
    view = await a.view(T)
    odd = next(m for m in view.members if m.member == "odd")
    assert not odd.weight_ok and odd.as_member().weight == 0.0
    assert odd.as_member().started_at == (0.0 if started_at != "0" else odd.started_at)
    live = [m.as_member() for m in view.live()]
    me = next(m for m in live if m.id == "a")
    assert fair_share(me, live, 4) == 4
    assert next(m for m in view.members if m.member == "a").weight_ok


# Another process's member row expiring at $2 (SQL over n, the database's time now).
EXPIRING = (
    "INSERT INTO {q}.fleet_members (member, host, pid, weight, started_at, heartbeat_at, "
    "expires_at, instance) SELECT $1, 'h', 1, 1, 0, n, {expires}, 'other' "
    "FROM (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS n) t"
)
# Expiries no member's heartbeat sets (now + lease_ttl_s, at most 3600 s).
NO_HEARTBEATS = ["'Infinity'::float8", "'NaN'::float8", "n + 1e9", "n + 7300"]


@pytest.mark.parametrize("expires", NO_HEARTBEATS)
async def test_a_member_row_expiring_when_no_heartbeat_sets_counts_as_gone(
    env: Env, expires: str
) -> None:
    """A row expiring at Infinity (or a year ahead) was live for ever: its weight in every
    member's share, and `fleet forget` refused it (PostgreSQL sorts NaN above every number:
    a NaN row too). Beyond twice the largest lease_ttl_s ahead, it counts as expired; a row
    at the largest lease_ttl_s ahead is live."""
    a = env.member("a")
    await a.tick({}, T)
    await env.execute(EXPIRING.format(q=env.q, expires=expires), "odd")
    await env.execute(EXPIRING.format(q=env.q, expires="n + 3600"), "far")
    view = await a.view(T)
    assert [m.member for m in view.live()] == ["a", "far"]
    live = [m.as_member() for m in view.live()]
    me = next(m for m in live if m.id == "a")
    assert fair_share(me, live, 4) == 2  # "far" counts, "odd" does not
    operator = FleetTable.for_operator(env.settings)
    try:
        assert await operator.forget("far", T) is False
        assert await operator.forget("odd", T) is True
    finally:
        await operator.close()
    assert [m.member for m in (await a.view(T)).members] == ["a", "far"]
    odd = next(m for m in view.members if m.member == "odd")
    assert not odd.expiry_ok(view.now) and not odd.live_at(view.now)
    assert all(m.expiry_ok(view.now) for m in view.members if m.member != "odd")


@pytest.mark.parametrize("expires", NO_HEARTBEATS)
async def test_a_member_takes_its_names_row_back_from_an_expiry_no_heartbeat_sets(
    env: Env, expires: str
) -> None:
    """A row in this member's name, of another process, expiring at Infinity: the member
    waited for it to expire for ever (another live process, as far as it could tell)."""
    await env.execute(EXPIRING.format(q=env.q, expires=expires), "a")
    a = env.member("a", ttl=30.0)
    renewal = await a.tick({}, T)
    assert renewal.owned and renewal.holder is not None and renewal.holder.instance == "other"
    [row] = (await a.view(T)).members
    assert row.live_at(renewal.now) and row.expires_at == pytest.approx(renewal.now + 30.0)


async def test_a_live_lease_is_not_taken_an_expired_one_is(env: Env) -> None:
    a = env.member("a", ttl=0.3)
    b = env.member("b", ttl=30.0)
    await a.join(["s"], T)
    e = (await env.epochs())["s"]
    assert await a.acquire(["s"], T) == [Acquired("s", e + 1, None)]
    assert await b.acquire(["s"], T) == []
    view = await b.view(T)
    assert (view.leases["s"].holder, view.leases["s"].epoch) == ("a", e + 1)

    await until_expired(b, "s")
    assert await b.acquire(["s"], T) == [Acquired("s", e + 2, "a")]
    view = await b.view(T)
    assert (view.leases["s"].holder, view.leases["s"].epoch) == ("b", e + 2)
    assert view.leases["s"].expires_at > view.now + 20
    # and now a cannot take it back
    assert await a.acquire(["s"], T) == []


# A lease row held by `holder`, at `epoch`, expiring at {expires} (SQL over n, the
# database's time now): another process's row, or a manual edit.
LEASED = (
    "UPDATE {q}.stream_leases SET holder = $2, epoch = $3, expires_at = {expires} "
    "FROM (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS n) t WHERE stream = $1"
)


def test_an_expiry_beyond_twice_the_largest_lease_ttl_is_no_members() -> None:
    """The core's constant (it imports no configuration) is the configuration's rule."""
    assert MAX_EXPIRY_AHEAD_S == 2 * MAX_LEASE_TTL_S


@pytest.mark.parametrize("expires", NO_HEARTBEATS)
async def test_a_lease_expiring_when_no_renewal_sets_is_taken_with_a_new_epoch(
    env: Env, expires: str
) -> None:
    """A renewal sets now + lease_ttl_s (at most 3600 s). A lease row expiring at Infinity
    (NaN, a year ahead), held by a name no live member uses, was never taken: its stream
    consumed by nobody. It counts as expired: the plan and the acquire statement take it,
    a new epoch fencing whoever held it. A lease at the largest lease_ttl_s ahead is live."""
    a = env.member("a")
    await a.join(["odd", "real"], T)
    await env.execute(LEASED.format(q=env.q, expires=expires), "odd", "ghost", 5)
    await env.execute(LEASED.format(q=env.q, expires="n + 3600"), "real", "b", 3)
    await a.tick({}, T)
    view = await a.view(T)
    me = Member("a", 1.0)
    assert plan(me, [me], view.leases, ["odd", "real"], held=[], now=view.now).acquire == ("odd",)
    assert not view.leases["odd"].live_at(view.now) and view.leases["real"].live_at(view.now)

    assert await a.acquire(["odd", "real"], T) == [Acquired("odd", 6, "ghost")]
    view = await a.view(T)
    odd, real = view.leases["odd"], view.leases["real"]
    assert (odd.holder, odd.epoch) == ("a", 6)
    assert view.now < odd.expires_at <= view.now + 30.0  # renewable: a's own now
    assert (real.holder, real.epoch) == ("b", 3)
    with pytest.raises(Fenced):  # the ghost's epoch makes nothing durable any more
        await env.store.commit(batch_for("odd", 1, Fence("ghost", {"odd": 5})))
    await env.store.commit(batch_for("odd", 1, Fence("a", {"odd": 6})))
    renewal = await a.tick({"odd": 6}, T)
    assert renewal.renewed == frozenset({"odd"})


@pytest.mark.parametrize("expires", NO_HEARTBEATS)
async def test_an_operator_holds_a_lease_expiring_when_no_renewal_sets(
    env: Env, expires: str
) -> None:
    """`offset set` refused such a stream for ever, naming a holder that does not exist
    (and the daemon's start beside it): the hold fences it as an expired one."""
    a = env.member("a")
    await a.join(["odd", "real"], T)  # a join is no heartbeat: no live member
    await env.execute(LEASED.format(q=env.q, expires=expires), "odd", "ghost", 5)
    assert await in_the_way(env.settings, ["odd"], fleet=True) is None
    assert await current_holder(env.settings, fleet=True) is None
    operator = FleetTable.for_operator(env.settings)
    try:
        assert await operator.hold_for_change(["odd"], T) == {}
    finally:
        await operator.close()
    lease = (await a.view(T)).leases["odd"]
    assert (lease.holder, lease.epoch, lease.expires_at) == (None, 6, 0)

    await env.execute(LEASED.format(q=env.q, expires="n + 3600"), "real", "b", 3)
    who = await in_the_way(env.settings, ["real"], fleet=True)
    assert who is not None and who["member"] == "b"
    operator = FleetTable.for_operator(env.settings)
    try:
        assert await operator.hold_for_change(["odd", "real"], T) == {"real": "b"}
    finally:
        await operator.close()


async def test_tick_heartbeats_and_renews_the_leases_held_at_their_epoch(env: Env) -> None:
    a = env.member("a", ttl=5.0, weight=2.5)
    await a.join(["s1", "s2", "s3"], T)
    got = {x.stream: x.epoch for x in await a.acquire(["s1", "s2"], T)}
    before = await a.view(T)

    async def clock_moved() -> bool:
        return (await a.view(T)).now > before.now + 0.05

    await until(clock_moved)
    renewal = await a.tick(got, T)
    assert renewal.renewed == frozenset({"s1", "s2"})
    assert renewal.draining is False
    after = await a.view(T)
    assert before.now < renewal.now <= after.now
    for s in ("s1", "s2"):
        assert after.leases[s].expires_at == pytest.approx(renewal.now + 5.0)
        assert after.leases[s].expires_at > before.leases[s].expires_at
    assert after.leases["s3"].holder is None  # not held: untouched

    # the heartbeat: a member row on the database's clock
    [row] = after.members
    assert (row.member, row.host, row.pid, row.weight, row.draining) == (
        "a",
        "test-host",
        4242,
        2.5,
        False,
    )
    assert row.heartbeat_at == pytest.approx(renewal.now)
    assert row.expires_at == pytest.approx(renewal.now + 5.0)
    assert [m.member for m in after.live()] == ["a"]
    assert row.as_member().id == "a" and row.as_member().weight == 2.5


async def test_an_operator_hold_refuses_lease_rows_at_the_top_epoch(env: Env) -> None:
    """The hold fences whoever held a row with epoch + 1: at the largest epoch that overflowed
    bigint, a raw store error for the command. Refused instead, naming the streams and the
    fix; nothing is held or changed, and the other streams are held as before."""
    a = env.member("a")
    await a.join(["s1", "s2", "s3"], T)
    await env.execute(
        f"UPDATE {env.q}.stream_leases SET epoch = $1, holder = 'gone' WHERE stream <> 's3'",
        2**63 - 1,
    )
    before = await env.epochs()
    operator = FleetTable.for_operator(env.settings)
    try:
        with pytest.raises(OperatorRefused) as refused:
            await operator.hold_for_change(["s1", "s2", "s3"], T)
    finally:
        await operator.close()
    text = str(refused.value)
    assert text.startswith("streams s1, s2: their lease rows are at the largest epoch"), text
    assert f"delete their rows from {env.schema}.stream_leases" in text
    assert await env.epochs() == before
    view = await a.view(T)
    assert [view.leases[x].holder for x in ("s1", "s2", "s3")] == ["gone", "gone", None]
    operator = FleetTable.for_operator(env.settings)
    try:
        assert await operator.hold_for_change(["s3"], T) == {}
    finally:
        await operator.close()
    assert (await env.epochs())["s3"] == before["s3"] + 1


async def test_the_heartbeat_says_when_a_stream_was_last_connected(env: Env) -> None:
    """``connected_at`` (the evidence a member needs before it hands over a stream it cannot
    connect, consumer.core.failover): NULL until a tick with a stream connected sets it to
    that tick's time; a tick without one keeps it."""
    a = env.member("a")
    assert (await a.tick({}, T)).owned
    [row] = (await a.view(T)).members
    assert row.connected_at is None
    up = await a.tick({}, T, connected=True)
    [row] = (await a.view(T)).members
    assert row.connected_at == pytest.approx(up.now)

    async def clock_moved() -> bool:
        return (await a.view(T)).now > up.now + 0.05

    await until(clock_moved)
    down = await a.tick({}, T)
    [row] = (await a.view(T)).members
    assert row.connected_at == pytest.approx(up.now) and row.heartbeat_at > up.now
    assert down.now > up.now
    assert row.avoiding == ()
    await a.tick({}, T, avoiding=["s2", "s1"])
    [row] = (await a.view(T)).members
    assert row.avoiding == ("s1", "s2") and row.connected_at == pytest.approx(up.now)
    # A row of a version before (neither written): NULL, read as no evidence, nothing avoided.
    await env.execute(
        f"INSERT INTO {env.q}.fleet_members (member, host, pid, weight, started_at, "
        "heartbeat_at, expires_at) VALUES ('old', 'h', 1, 1, 0, 0, 1e12)"
    )
    # Anyone's to fill: NULL entries are skipped, and at most AVOIDING_READ streams read.
    await env.execute(
        f"INSERT INTO {env.q}.fleet_members (member, host, pid, weight, started_at, "
        "heartbeat_at, expires_at, avoiding) VALUES ('odd', 'h', 1, 1, 0, 0, 1e12, "
        "array_append(ARRAY(SELECT 'x' || i FROM generate_series(1, 500) i), NULL))"
    )
    await env.execute(
        f"INSERT INTO {env.q}.fleet_members (member, host, pid, weight, started_at, "
        "heartbeat_at, expires_at, avoiding) VALUES ('null', 'h', 1, 1, 0, 0, 1e12, "
        "ARRAY[NULL, 's9']::text[])"
    )
    rows = {m.member: m for m in (await a.view(T)).members}
    assert rows["old"].connected_at is None and rows["old"].avoiding == ()
    assert len(rows["odd"].avoiding) == AVOIDING_READ
    assert rows["null"].avoiding == ("s9",)


async def test_tick_renews_only_at_the_given_epoch(env: Env) -> None:
    a = env.member("a")
    await a.join(["s1", "s2"], T)
    held = {x.stream: x.epoch for x in await a.acquire(["s1", "s2"], T)}
    renewal = await a.tick({"s1": held["s1"], "s2": held["s2"] - 1, "unknown": 1}, T)
    assert renewal.renewed == frozenset({"s1"})
    # a stream it never took is not renewed either
    b = env.member("b")
    assert (await b.tick({"s1": held["s1"]}, T)).renewed == frozenset()
    assert (await b.tick({}, T)).renewed == frozenset()


async def test_tick_drops_a_stream_another_member_took(env: Env) -> None:
    a = env.member("a", ttl=0.3)
    b = env.member("b")
    await a.join(["s1", "s2"], T)
    held = {x.stream: x.epoch for x in await a.acquire(["s1", "s2"], T)}
    await until_expired(b, "s1")
    assert await b.acquire(["s1"], T) == [Acquired("s1", held["s1"] + 1, "a")]
    b_expiry = (await b.view(T)).leases["s1"].expires_at

    renewal = await a.tick(held, T)
    assert renewal.renewed == frozenset({"s2"})  # s2 expired too, but nobody took it
    view = await a.view(T)
    assert (view.leases["s1"].holder, view.leases["s1"].epoch) == ("b", held["s1"] + 1)
    assert view.leases["s1"].expires_at == b_expiry  # a's tick did not touch b's lease
    assert view.leases["s2"].holder == "a"
    assert view.leases["s2"].expires_at > view.now


async def test_release_frees_a_lease_at_once(env: Env) -> None:
    a = env.member("a")
    b = env.member("b")
    await a.join(["s1", "s2"], T)
    held = {x.stream: x.epoch for x in await a.acquire(["s1", "s2"], T)}
    assert await b.acquire(["s1"], T) == []

    await a.release({"s1": held["s1"]}, T)
    view = await b.view(T)
    assert (view.leases["s1"].holder, view.leases["s1"].expires_at) == (None, 0)
    assert view.leases["s1"].epoch == held["s1"]  # kept: the next holder bumps it
    assert view.leases["s2"].holder == "a"
    assert await b.acquire(["s1"], T) == [Acquired("s1", held["s1"] + 1, None)]

    # a release at a stale epoch, or by a member that does not hold it, does nothing
    await a.release({"s1": held["s1"]}, T)
    await b.release({"s2": held["s2"]}, T)
    await a.release({}, T)
    view = await a.view(T)
    assert view.leases["s1"].holder == "b"
    assert view.leases["s2"].holder == "a"


async def test_leave_deletes_the_member_row(env: Env) -> None:
    a = env.member("a")
    b = env.member("b")
    await a.join(["s"], T)
    held = {x.stream: x.epoch for x in await a.acquire(["s"], T)}
    await a.tick(held, T)
    await b.tick({}, T)
    assert [m.member for m in (await a.view(T)).members] == ["a", "b"]
    await a.leave(T)
    view = await b.view(T)
    assert [m.member for m in view.members] == ["b"]
    assert view.leases["s"].holder == "a"  # leases are released (or expire) on their own
    await a.leave(T)  # twice: nothing to delete


async def test_a_drained_member_leaving_keeps_its_flag_for_its_next_process(env: Env) -> None:
    """`fleet drain` outlived a crash (the row stays; the heartbeat never resets the flag)
    but not a clean stop (leave deleted the row): a member drained for maintenance took
    streams again when restarted cleanly. Its row now stays, expired at once: the name's
    next process joins without waiting, drained, until `fleet drain --undo`."""
    a = env.member("a")
    await a.tick({}, T)
    operator = FleetTable.for_operator(env.settings)
    env.tables.append(operator)
    assert await operator.set_draining("a", True, T) is True
    await a.leave(T)
    view = await operator.view(T)
    [row] = view.members
    assert row.draining is True and row.expires_at <= view.now  # gone, and still drained
    again = env.member("a")  # the same name, another process
    renewal = await again.tick({}, T)
    assert renewal.owned and renewal.draining is True  # joined at once, drained
    assert await operator.set_draining("a", False, T) is True
    assert (await again.tick({}, T)).draining is False
    await again.leave(T)  # not draining: its row goes
    assert (await operator.view(T)).members == []


async def test_set_draining_marks_a_member_and_its_tick_says_so(env: Env) -> None:
    a = env.member("a")
    await a.tick({}, T)
    operator = FleetTable.for_operator(env.settings)
    env.tables.append(operator)
    assert operator.member.startswith("cli:")

    assert await operator.set_draining("a", True, T) is True
    assert (await a.tick({}, T)).draining is True
    [row] = (await operator.view(T)).members
    assert row.draining is True and row.as_member().draining is True

    # the heartbeat does not undo it
    assert (await a.tick({}, T)).draining is True
    assert await operator.set_draining("a", False, T) is True
    assert (await a.tick({}, T)).draining is False

    assert await operator.set_draining("nobody", True, T) is False
    assert [m.member for m in (await operator.view(T)).members] == ["a"]  # operator: no row


async def test_a_tick_is_one_statement_for_many_streams(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scale property: heartbeat and every lease held renewed in one statement."""
    streams = [f"stream-{i:04d}" for i in range(500)]
    a = env.member("a")
    await a.join(streams, T)
    first = await env.epochs()
    held = {x.stream: x.epoch for x in await a.acquire(streams, T)}
    assert held == {s: first[s] + 1 for s in streams}

    calls: list[str] = []
    real_call = FleetTable._call

    async def counting(self: FleetTable, doing: str, *args: Any) -> Any:
        calls.append(doing)
        return await real_call(self, doing, *args)

    monkeypatch.setattr(fleet_module.FleetTable, "_call", counting)
    renewal = await a.tick(held, T)
    assert calls == ["renewing leases"]
    assert renewal.renewed == frozenset(streams)

    calls.clear()
    view: FleetView = await a.view(T)
    assert len(calls) == 2  # the view too: two statements whatever the number of streams
    assert all(
        lease.holder == "a" and lease.expires_at == pytest.approx(renewal.now + 30.0)
        for lease in view.leases.values()
    )


# --- the fence in the store's commit -----------------------------------------------------------


async def test_a_commit_under_a_held_lease_goes_through(env: Env) -> None:
    a = env.member("a")
    await a.join(["s"], T)
    [got] = await a.acquire(["s"], T)
    await env.store.commit(batch_for("s", 1, Fence("a", {"s": got.epoch})))
    cp = await env.store.checkpoint("s")
    assert cp is not None and (cp.offset, cp.unique_event_id) == ("000001", "s-u1")
    assert await env.store.seen("s", ["s-u1", "s-v1"]) == {"s-u1", "s-v1"}
    assert await env.count("dead_letters", "s") == 1


async def test_a_commit_with_a_stale_fence_writes_nothing(env: Env) -> None:
    a = env.member("a", ttl=0.3)
    b = env.member("b")
    await a.join(["s"], T)
    [got] = await a.acquire(["s"], T)
    fence = Fence("a", {"s": got.epoch})
    await env.store.commit(batch_for("s", 1, fence))

    await until_expired(b, "s")
    assert await b.acquire(["s"], T) == [Acquired("s", got.epoch + 1, "a")]
    with pytest.raises(Fenced) as caught:
        await env.store.commit(batch_for("s", 2, fence))
    assert caught.value.streams == frozenset({"s"})
    assert "s" in str(caught.value)

    cp = await env.store.checkpoint("s")
    assert cp is not None
    assert (cp.offset, cp.processed_count) == ("000001", 2)  # unchanged
    assert await env.store.seen("s", ["s-u2", "s-v2"]) == set()
    assert await env.count("dead_letters", "s") == 1  # the first batch's only
    assert await env.count("processed_events") == 2

    # the new holder commits with its own fence; a's epoch with b's name is refused too
    await env.store.commit(batch_for("s", 3, Fence("b", {"s": got.epoch + 1})))
    with pytest.raises(Fenced):
        await env.store.commit(batch_for("s", 4, Fence("b", {"s": got.epoch})))
    with pytest.raises(Fenced):
        await env.store.commit(batch_for("s", 4, Fence("a", {"s": got.epoch + 1})))
    cp = await env.store.checkpoint("s")
    assert cp is not None and cp.offset == "000003"


async def test_a_refusal_says_whether_a_commit_or_an_anchor_was_refused(env: Env) -> None:
    a = env.member("a")
    await a.join(["s"], T)
    [got] = await a.acquire(["s"], T)
    stale = Fence("a", {"s": got.epoch - 1})
    with pytest.raises(Fenced) as caught:
        await env.store.anchor("s", pos("s", 1), stale)
    assert str(caught.value) == "lease lost for s: anchor refused"
    with pytest.raises(Fenced) as caught:
        await env.store.commit(batch_for("s", 1, stale))
    assert str(caught.value) == "lease lost for s: commit refused"
    assert await env.store.checkpoint("s") is None


@pytest.mark.parametrize("made_by", ["member", "operator"])
async def test_a_lease_row_made_again_fences_whoever_held_the_row_before(
    env: Env, made_by: str
) -> None:
    """An operator deletes a stream's lease row while member a holds it at epoch E (its
    process frozen, say); a member's next join, or an operator's hold, makes it again and a
    takes it, and takes it again. The new row started at epoch 0: a few takeovers on, it
    was at E again, and a commit fenced with (a, E) from the frozen process went through,
    a stale checkpoint with it. A row made again starts above any epoch the one before
    reached."""
    takes = 3
    a = env.member("a")
    await a.join(["s"], T)
    for _ in range(takes):  # taken, and taken again (a restart under the same name)
        [old] = await a.acquire(["s"], T)
    stale = Fence("a", {"s": old.epoch})
    await env.store.commit(batch_for("s", 1, stale))
    await env.execute(f"DELETE FROM {env.q}.stream_leases WHERE stream = 's'")
    if made_by == "member":
        await a.join(["s"], T)
    else:
        operator = FleetTable.for_operator(env.settings)
        try:
            assert await operator.hold_for_change(["s"], T) == {}
        finally:
            await operator.close()
    for i in range(takes):
        [new] = await a.acquire(["s"], T)
        with pytest.raises(Fenced):
            await env.store.commit(batch_for("s", 2 + i, stale))
    assert new.epoch > old.epoch + takes
    await env.store.commit(batch_for("s", 9, Fence("a", {"s": new.epoch})))
    cp = await env.store.checkpoint("s")
    assert cp is not None and cp.offset == "000009"


async def test_a_batch_with_one_fenced_stream_is_refused_whole(env: Env) -> None:
    a = env.member("a")
    await a.join(["x", "y"], T)
    epochs = {g.stream: g.epoch for g in await a.acquire(["x", "y"], T)}
    # another member takes y (as after an expiry)
    await env.execute(
        f"UPDATE {env.q}.stream_leases SET holder = 'other', epoch = epoch + 1 WHERE stream = 'y'"
    )
    both = batch_for("x", 1, Fence("a", epochs))
    y = batch_for("y", 1, None)
    both.checkpoints.update(y.checkpoints)
    both.processed.update(y.processed)
    both.done_counts.update(y.done_counts)
    both.dead_letters += y.dead_letters
    with pytest.raises(Fenced) as caught:
        await env.store.commit(both)
    assert caught.value.streams == frozenset({"y"})
    for stream in ("x", "y"):
        assert await env.store.checkpoint(stream) is None
        assert await env.store.seen(stream, [f"{stream}-u1"]) == set()
    assert await env.count("dead_letters") == 0

    # without y's part (what the committer does) it goes through
    await env.store.commit(both.without(frozenset({"y"})))
    assert await env.store.checkpoint("x") is not None
    assert await env.store.checkpoint("y") is None


async def test_a_fence_without_the_stream_or_without_its_row_is_refused(env: Env) -> None:
    a = env.member("a")
    await a.join(["s"], T)
    [got] = await a.acquire(["s"], T)
    with pytest.raises(Fenced) as caught:
        await env.store.commit(batch_for("s", 1, Fence("a", {})))
    assert caught.value.streams == frozenset({"s"})
    with pytest.raises(Fenced) as caught:
        await env.store.commit(batch_for("no-row", 1, Fence("a", {"no-row": 1})))
    assert caught.value.streams == frozenset({"no-row"})
    assert await env.count("checkpoints") == 0
    # a dead letter alone is a write for its stream: fenced as well
    letter_only = CommitBatch(
        dead_letters=batch_for("s", 1, None).dead_letters, fence=Fence("a", {"s": 99})
    )
    with pytest.raises(Fenced):
        await env.store.commit(letter_only)
    assert await env.count("dead_letters") == 0
    await env.store.commit(batch_for("s", 1, Fence("a", {"s": got.epoch})))


async def test_a_takeover_leaves_the_lease_alone_while_its_holder_commits(env: Env) -> None:
    """The fence check locks the lease row (FOR KEY SHARE) until the commit ends: a member taking
    the stream over meanwhile (its lease expired) leaves the row alone (SKIP LOCKED), and takes
    it at its next try, after the commit, reading the checkpoint that commit wrote. Without
    the lock the takeover would read the checkpoint before it and resume behind the commit.

    The commit is held open at a known point from the test: its last statement (rows a sink
    stages in the transaction) waits for an advisory lock the test holds."""
    a, b = env.member("a", ttl=0.3), env.member("b")
    await a.join(["s"], T)
    [got] = await a.acquire(["s"], T)
    fence = Fence("a", {"s": got.epoch})
    await env.store.commit(batch_for("s", 1, fence))
    await until_expired(b, "s")  # b may take it over now

    key = 0x0F1EE7
    held = await asyncpg.connect(env.dsn, timeout=T)
    try:
        await held.execute("SELECT pg_advisory_lock($1)", key)
        batch = batch_for("s", 2, fence)
        batch.staged.append(Staged("SELECT pg_advisory_xact_lock($1), $2::text", [(key, "s")]))
        commit = asyncio.create_task(env.store.commit(batch))

        async def waiting() -> bool:  # the commit is past its fence check, at the lock
            assert not commit.done(), commit
            rows = await env.fetch(
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            return int(rows[0][0]) == 1

        await until(waiting)
        assert await b.acquire(["s"], T) == []  # not from under the commit
        cp = await env.store.checkpoint("s")
        assert cp is not None and cp.offset == "000001"  # (what b would have resumed at)
        await held.execute("SELECT pg_advisory_unlock($1)", key)
        async with asyncio.timeout(T):
            await commit
    finally:
        await held.close()
    assert await b.acquire(["s"], T) == [Acquired("s", got.epoch + 1, "a")]
    cp = await env.store.checkpoint("s")
    assert cp is not None and cp.offset == "000002"  # the new holder resumes after the commit
    with pytest.raises(Fenced):
        await env.store.commit(batch_for("s", 3, fence))


@contextlib.asynccontextmanager
async def commit_held_open(env: Env, batch: CommitBatch) -> AsyncIterator[asyncio.Task[bool]]:
    """A commit of ``batch`` held open past its fence check: its last statement (rows a sink
    stages in the transaction) waits for an advisory lock the test holds till the end."""
    key = 0x0F1EE8
    held = await asyncpg.connect(env.dsn, timeout=T)
    try:
        await held.execute("SELECT pg_advisory_lock($1)", key)
        batch.staged.append(Staged("SELECT pg_advisory_xact_lock($1), $2::text", [(key, "s")]))
        commit = asyncio.create_task(env.store.commit(batch))

        async def waiting() -> bool:  # past its fence check, at the lock
            assert not commit.done(), commit
            rows = await env.fetch(
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND objid = $1",
                key,
            )
            return int(rows[0][0]) == 1

        await until(waiting)
        yield commit
        await held.execute("SELECT pg_advisory_unlock($1)", key)
        async with asyncio.timeout(T):
            await commit
    finally:
        await held.close()


async def test_a_commit_holds_up_neither_a_renewal_nor_a_release(env: Env) -> None:
    """A member renews all of its leases in one statement, once per tick: a commit's fence
    check on one stream's row must not hold that statement up (FOR SHARE did: one slow commit
    stopped every renewal, and a healthy member fenced itself). Nor a release, whose row the
    next member then takes only once the commit has ended: it resumes after the commit."""
    a, b = env.member("a"), env.member("b")
    await a.join(["s", "t"], T)
    epochs = {g.stream: g.epoch for g in await a.acquire(["s", "t"], T)}
    fence = Fence("a", epochs)
    await env.store.commit(batch_for("s", 1, fence))
    async with commit_held_open(env, batch_for("s", 2, fence)) as commit:
        before = {lv.stream: lv.expires_at for lv in (await b.view(T)).leases.values()}
        renewal = await a.tick(epochs, 2.0)  # old code: waits for the commit, times out
        assert renewal.renewed == frozenset({"s", "t"})
        after = (await b.view(T)).leases
        assert all(after[x].expires_at > before[x] for x in ("s", "t"))
        await a.release({"s": epochs["s"]}, 2.0)
        assert (await b.view(T)).leases["s"].holder is None
        assert await b.acquire(["s"], T) == []  # the commit still holds the row it released
        assert not commit.done()
    assert await b.acquire(["s"], T) == [Acquired("s", epochs["s"] + 1, None)]
    cp = await env.store.checkpoint("s")
    assert cp is not None and cp.offset == "000002"  # b resumes after a's last commit


async def test_anchor_with_a_stale_fence_creates_no_checkpoint(env: Env) -> None:
    a = env.member("a")
    await a.join(["s", "t"], T)
    epochs = {g.stream: g.epoch for g in await a.acquire(["s", "t"], T)}
    await env.execute(
        f"UPDATE {env.q}.stream_leases SET holder = 'other', epoch = epoch + 1 WHERE stream = 's'"
    )
    with pytest.raises(Fenced) as caught:
        await env.store.anchor("s", pos("s", 7), Fence("a", epochs))
    assert caught.value.streams == frozenset({"s"})
    assert await env.store.checkpoint("s") is None

    await env.store.anchor("t", pos("t", 7), Fence("a", epochs))
    cp = await env.store.checkpoint("t")
    assert cp is not None and cp.offset == "000007"
