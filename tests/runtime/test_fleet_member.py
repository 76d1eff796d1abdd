"""A fleet member's tick (runtime/fleet.py) against a real PostgreSQL state store, with the
daemon's start and stop of streams replaced by the test's own, which record what ran where.

Timers are short (4.3 s leases, 0.25 s ticks) with the shortest stop the settings allow for
them; every wait is for a positive condition, and what is asserted is an order of events
(who ran which stream when), never a duration."""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from fleet_support import fleet_settings
from log_capture import captured_logs, records
from pg import proxied, sql
from support import wait_until
from tcp_proxy import TcpProxy
from test_pipeline import ev, harness, jsonl_lines, uid_of

from consumer.core.records import CommitBatch, Staged
from consumer.core.watermark import Position
from consumer.errors import StoreError
from consumer.runtime.fleet import DuplicateMember, Fleet, ProbeOf, StreamProbe
from consumer.runtime.stream import StreamState
from consumer.sinks.jsonl import JsonlSink
from consumer.state import open_store
from consumer.state.fleet import FleetTable

# Most tests here wait out a lease (or the self-fence, or a handover past it): the shortest
# the settings allow. The streams' stop is the test's own, so the settings' may be the
# shortest (no wait for the server's close, no drain); a handover still takes up to
# 2 x STOP_GRACE_S (4 s), which must fit in the lease minus a 0.25 s tick. The self-fence
# comes a tick and CANCEL_GRACE_S (2 s) before the lease can expire: 2.05 s after a renewal.
TTL_S = 4.3


@dataclass
class Env:
    dsn: str
    schema: str
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (member, what, stream)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    fleets: list[Fleet] = field(default_factory=list)

    def member(
        self,
        name: str,
        *,
        dsn: str | None = None,
        start: Callable[[str], Awaitable[None]] | None = None,
        stop: Callable[[str, bool], Awaitable[None]] | None = None,
        label: str | None = None,
        streams: tuple[str, ...] = ("a", "b"),
        probe: ProbeOf | None = None,
        release_unreachable_after_s: float | None = None,
    ) -> Fleet:
        """A member whose starts and stops are logged under ``label`` (default: its name),
        ``start``/``stop`` say what else they do; ``started``/``stopped`` once they return."""
        who = label or name

        async def on_start(stream: str) -> None:
            self.log.append((who, "start", stream))
            if start is not None:
                await start(stream)
            self.log.append((who, "started", stream))

        async def on_stop(stream: str, lost: bool) -> None:
            self.log.append((who, "stop-lost" if lost else "stop", stream))
            if stop is not None:
                await stop(stream, lost)
            self.log.append((who, "stopped", stream))

        def spawn(coro: Any, task_name: str) -> asyncio.Task[None]:
            self.tasks.append(asyncio.create_task(coro, name=task_name))
            return self.tasks[-1]

        settings = fleet_settings(
            dsn or self.dsn,
            self.schema,
            name,
            streams=streams,
            lease_ttl_s=TTL_S,
            stop_step_s=0.0,
            release_unreachable_after_s=release_unreachable_after_s,
        )
        fleet = Fleet(
            settings, start_stream=on_start, stop_stream=on_stop, spawn=spawn, probe=probe
        )
        self.fleets.append(fleet)
        return fleet

    def run(self, fleet: Fleet) -> asyncio.Task[None]:
        self.tasks.append(asyncio.create_task(fleet.run(), name=f"run-{fleet.member}"))
        return self.tasks[-1]

    def before(self, first: tuple[str, str, str], then: tuple[str, str, str]) -> bool:
        """Both happened, ``first`` before ``then``."""
        return first in self.log and then in self.log[self.log.index(first) :]

    def has(self, member: str, what: str, stream: str | None = None) -> bool:
        return any(m == member and w == what and stream in (None, s) for m, w, s in self.log)

    def count(self, what: str) -> int:
        return sum(1 for _, w, _ in self.log if w == what)

    async def leases(self) -> list[tuple[str, str | None, int]]:
        q = f'SELECT stream, holder, epoch FROM "{self.schema}".stream_leases ORDER BY stream'
        return [tuple(r) for r in await sql(self.dsn, "fetch", q)]


@pytest.fixture
async def env(postgres_dsn: str) -> AsyncIterator[Env]:
    schema = f"t_{uuid.uuid4().hex[:16]}"
    await (await open_store(fleet_settings(postgres_dsn, schema, "x").state)).close()
    e = Env(postgres_dsn, schema)
    try:
        yield e
    finally:
        for t in e.tasks:
            t.cancel()
        await asyncio.gather(*e.tasks, return_exceptions=True)
        for f in e.fleets:
            await f.table.close()
        await sql(postgres_dsn, "execute", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def hang_after_the_first() -> tuple[Callable[[str], Awaitable[None]], list[str]]:
    """A start that returns for the first stream and hangs for the others (a start reading a
    stalled store), noting the starts cancelled."""
    cancelled: list[str] = []
    first: list[str] = []

    async def start(stream: str) -> None:
        if not first:
            first.append(stream)
            return
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(stream)
            raise

    return start, cancelled


async def test_a_stream_that_fails_to_start_gives_its_lease_back(env: Env) -> None:
    """A lease taken for a stream the member could not start (the store failed, say) must not
    stay in its name, renewed forever with nothing consuming: it is released at once, and
    taken again (a new epoch) at a later tick, when the start succeeds."""
    failed: list[str] = []

    async def start(stream: str) -> None:
        if stream == "b" and not failed:
            failed.append(stream)
            raise StoreError("state store unreachable (test)", retriable=True)

    # The rows are there already, at epoch 100 (a fleet ran before).
    q = f'INSERT INTO "{env.schema}".stream_leases (stream, epoch) VALUES ($1, 100), ($2, 100)'
    await sql(env.dsn, "execute", q, "a", "b")
    fleet = env.member("m1", start=start)
    env.run(fleet)
    await wait_until(lambda: env.has("m1", "started", "a") and env.has("m1", "started", "b"))
    # b: taken (epoch 101), given back when its start failed, taken again (epoch 102).
    assert await env.leases() == [("a", "m1", 101), ("b", "m1", 102)]
    assert failed == ["b"] and fleet.epochs == {"a": 101, "b": 102}


async def test_a_start_that_hangs_does_not_hold_up_the_renewals(env: Env) -> None:
    """Starting a stream reads the store; while one start hangs (a stalled store), the
    member's running streams must go on being renewed, or their leases would expire under
    them."""
    start, _ = hang_after_the_first()
    fleet = env.member("m1", start=start)
    env.run(fleet)
    await wait_until(lambda: env.count("started") == 1 and env.count("start") == 2)
    running = next(s for m, w, s in env.log if w == "started")
    q = (
        "SELECT expires_at, EXTRACT(EPOCH FROM clock_timestamp()) AS now "
        f'FROM "{env.schema}".stream_leases WHERE stream = $1'
    )
    hung_at = float((await sql(env.dsn, "fetchrow", q, running))["expires_at"])

    async def renewed_past_its_lease() -> bool:
        row = await sql(env.dsn, "fetchrow", q, running)
        return float(row["now"]) > hung_at and float(row["expires_at"]) > float(row["now"])

    # Positive condition: the database's clock is past the lease the stream had when the
    # start hung, and the lease is still live (renewed meanwhile). Without renewals it expires.
    async with asyncio.timeout(3 * TTL_S):
        while not await renewed_past_its_lease():
            await asyncio.sleep(0.05)
    assert not env.has("m1", "stop-lost") and fleet.counters.self_fenced == 0


async def test_a_slow_commit_holds_up_no_renewal(env: Env) -> None:
    """A commit's fence check locks its streams' lease rows till the commit ends; the tick
    renews every lease in one statement. A commit of one stream held open (a slow sink row, a
    lock wait) must not hold that statement up: with FOR SHARE it did, the renewals timed out
    and a healthy member stopped every stream once the commit outlasted the self-fence."""
    fleet = env.member("m1")
    env.run(fleet)
    await wait_until(lambda: env.count("started") == 2)
    store = await open_store(fleet_settings(env.dsn, env.schema, "m1").state)
    key = 0x0F1EE9
    held = await asyncpg.connect(env.dsn, timeout=10)
    try:
        await held.execute("SELECT pg_advisory_lock($1)", key)
        batch = CommitBatch(checkpoints={"a": Position("1", "u1")}, fence=fleet.fence())
        batch.staged.append(Staged("SELECT pg_advisory_xact_lock($1), $2::text", [(key, "a")]))
        commit = asyncio.create_task(store.commit(batch))
        q = f'SELECT stream, expires_at FROM "{env.schema}".stream_leases ORDER BY stream'

        async def at_the_lock() -> bool:  # the commit is past its fence check: rows locked
            n = "SELECT COUNT(*) FROM pg_locks WHERE NOT granted AND objid = $1"
            return not commit.done() and int(await sql(env.dsn, "fetchval", n, key)) == 1

        async with asyncio.timeout(TTL_S):
            while not await at_the_lock():
                await asyncio.sleep(0.02)
        locked_at = dict(await sql(env.dsn, "fetch", q))

        async def renewed_since() -> bool:
            now = dict(await sql(env.dsn, "fetch", q))
            return all(now[s] > locked_at[s] for s in ("a", "b"))

        # Positive condition: both leases renewed while the commit holds a's row.
        async with asyncio.timeout(TTL_S):
            while not await renewed_since():
                await asyncio.sleep(0.05)
        assert not commit.done()
        await held.execute("SELECT pg_advisory_unlock($1)", key)
        async with asyncio.timeout(10):
            assert await commit
    finally:
        await held.close()
        await store.close()
    assert fleet.counters.self_fenced == 0 and not env.has("m1", "stop-lost")


async def test_the_self_fence_does_not_wait_for_a_start_that_hangs(
    env: Env, pg_proxy: TcpProxy
) -> None:
    """Cut off from PostgreSQL while a start hangs, a member must still stop its running
    streams before their leases can expire: another member takes them only afterwards, and
    the start that hung is abandoned."""
    start, cancelled = hang_after_the_first()
    a = env.member("A", dsn=proxied(env.dsn, pg_proxy.port), start=start)
    env.run(a)
    await wait_until(lambda: env.count("started") == 1 and env.count("start") == 2)
    running = next(s for m, w, s in env.log if w == "started")
    hung = next(s for m, w, s in env.log if w == "start" and s != running)
    pg_proxy.blackhole()
    b = env.member("B")
    env.run(b)
    await wait_until(lambda: env.has("B", "started", running), timeout=6 * TTL_S)
    # A stopped the stream it ran before B started it, and gave up the start that hung.
    assert env.before(("A", "stopped", running), ("B", "start", running))
    assert cancelled == [hung] and not env.has("A", "started", hung)
    assert a.counters.self_fenced == 1


async def test_no_sink_write_once_a_member_that_cannot_renew_is_past_its_self_fence(
    env: Env, tmp_path: Path
) -> None:
    """A member whose renewals stop (here its tick is held, as a paused process's is) may
    have lost its leases by its self-fence deadline; a worker waking then (a process resumed
    after SIGSTOP) must not write what it holds before the timer stops the stream. The
    member's deadline goes to each pipeline (Fleet.past_fence): writes before it go
    through, none after it (the pipeline here is the test's, never stopped by the fleet)."""
    fleet = env.member("m1")
    env.run(fleet)
    await wait_until(lambda: env.count("started") == 2)
    sink = JsonlSink(tmp_path / "events.jsonl", fsync=False)
    past = functools.partial(fleet.past_fence, "a")  # the deadline: the member's, every stream's
    async with harness(tmp_path, sink, workers=1, past_fence=past) as (
        _,
        committer,
        pipeline,
    ):
        for i in range(5):
            await pipeline.put(ev(i))
        async with asyncio.timeout(TTL_S):
            await pipeline.drained()  # renewing: written
        written = sink.position()  # what the sink took, its buffer included
        renew, resume = fleet.table.tick, asyncio.Event()

        async def held(*args: Any, **kwargs: Any) -> Any:
            await resume.wait()
            return await renew(*args, **kwargs)

        fleet.table.tick = held  # type: ignore[method-assign]
        try:
            await wait_until(past, timeout=3 * TTL_S)
            for i in range(5, 10):
                await pipeline.put(ev(i))
            await wait_until(lambda: pipeline.writes_fenced == 1, timeout=TTL_S)
            async with asyncio.timeout(TTL_S):
                await pipeline.stop()
            assert sink.position() == written
            assert await committer.flush()
            assert [uid_of(x) for x in jsonl_lines(sink.path)] == [f"u{i}" for i in range(5)]
            assert pipeline.in_flight == 5 and pipeline.dead_lettered == 0
            await wait_until(lambda: fleet.counters.self_fenced == 1, timeout=TTL_S)  # its timer
        finally:
            fleet.table.tick = renew  # type: ignore[method-assign]
            resume.set()


async def test_a_stream_handed_over_stays_renewed_until_released(env: Env) -> None:
    """A graceful handover (complete, drain, commit) may take longer than the lease: the
    stream's lease is renewed until it is released, so the member taking it over does so from
    the release, never from an expired lease while the first still delivers."""
    stopping_s = TTL_S + 1.5  # a slow drain, past the lease

    async def slow_stop(stream: str, lost: bool) -> None:
        await asyncio.sleep(stopping_s)

    a = env.member("A", stop=slow_stop)
    env.run(a)
    await wait_until(lambda: env.count("started") == 2)
    b = env.member("B")
    env.run(b)
    await wait_until(lambda: any(m == "B" and w == "started" for m, w, _ in env.log), timeout=30)
    moved = next(s for m, w, s in env.log if m == "B" and w == "started")
    assert env.before(("A", "stopped", moved), ("B", "start", moved))
    assert not env.has("A", "stop-lost")
    assert b.counters.takeovers == 0  # taken from a released lease, not an expired one
    assert a.counters.lost == 0


async def test_a_stream_found_lost_twice_is_stopped_once(env: Env) -> None:
    """A commit refused while the renewal that finds the same stream lost is under way: one
    stop of the stream, not two."""
    fleet = env.member("m1")
    env.run(fleet)
    await wait_until(lambda: env.has("m1", "started", "a") and env.has("m1", "started", "b"))
    renew = fleet.table.tick
    renewals: list[frozenset[str]] = []

    async def tick_with_a_refused_commit(held: Any, timeout_s: float, **kwargs: Any) -> Any:
        if not renewals:
            # Another member took "a" (as after our lease expired: a new epoch in its name),
            # and our commit is refused while this renewal, which finds it lost, is under way.
            await sql(
                env.dsn,
                "execute",
                f'UPDATE "{env.schema}".stream_leases SET holder = $1, epoch = epoch + 1 '
                "WHERE stream = $2",
                "other",
                "a",
            )
            fleet.lost(frozenset({"a"}))
        renewal = await renew(held, timeout_s, **kwargs)
        renewals.append(frozenset(held) - renewal.renewed)
        return renewal

    fleet.table.tick = tick_with_a_refused_commit  # type: ignore[method-assign]
    # Till the stream is gone, and two renewals after: a second stop would have begun.
    await wait_until(lambda: "a" not in fleet.epochs and renewals[-2:] == [frozenset()] * 2)
    fleet.table.tick = renew  # type: ignore[method-assign]
    assert renewals[0] == frozenset({"a"})  # the renewal found it lost too
    assert [e for e in env.log if e[2] == "a" and e[1].startswith("stop")] == [
        ("m1", "stop-lost", "a"),
        ("m1", "stopped", "a"),
    ]
    assert fleet.counters.lost == 1


async def test_a_stream_only_some_members_are_configured_for_is_held(env: Env) -> None:
    """A rolling deploy that adds streams: m2 still runs the old config (a), m1 the new one
    (a..d). Each computes its share over its own list: m1's is 2, m2's 1, and d was held by
    nobody, for good. Unheld for a lease's TTL, it is taken by m1 beyond its share, and both
    warn once; when m2 restarts on the new config, the shares are fair again."""
    everything = ("a", "b", "c", "d")
    with captured_logs() as logs:
        old = env.member("m2", streams=("a",), label="m2-old")
        old_run = env.run(old)
        await wait_until(lambda: old.leases_held == 1)
        m1 = env.member("m1", streams=everything)
        env.run(m1)
        await wait_until(lambda: sorted(m1.epochs) == ["b", "c", "d"], timeout=6 * TTL_S)
        assert sorted(old.epochs) == ["a"]
        # A rolling deploy's next step: m2 stops (handing a over) and starts on the new config.
        old.stop_acquiring()
        old_run.cancel()
        await asyncio.gather(old_run, return_exceptions=True)
        await old.hand_over()
        new = env.member("m2", streams=everything, label="m2-new")
        env.run(new)
        await wait_until(
            lambda: len(m1.epochs) == len(new.epochs) == 2 and not m1._moving, timeout=6 * TTL_S
        )
    assert sorted([*m1.epochs, *new.epochs]) == list(everything)
    assert {s: h for s, h, _ in await env.leases()} == {
        **dict.fromkeys(m1.epochs, "m1"),
        **dict.fromkeys(new.epochs, "m2"),
    }
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    warned = [x for x in lines if "configured with different streams" in x["event"]]
    assert sorted(x["member"] for x in warned) == ["m1", "m2"], warned  # once each
    by = {x["member"]: x for x in warned}
    assert by["m1"]["unheld_for_a_lease"] == ["d"]
    assert {"b", "c"} <= set(by["m2"]["held_elsewhere_not_configured_here"]) <= {"b", "c", "d"}
    taken = [x for x in lines if x["event"] == "lease taken" and x.get("beyond_share")]
    assert [x["stream"] for x in taken] == ["d"]


async def test_a_drained_member_restarted_cleanly_stays_drained(env: Env) -> None:
    """An operator drains a member for maintenance and restarts it: it must not take
    streams again until `fleet drain --undo`, as after a crash. A clean stop deleted its
    row, and the flag with it."""
    first = env.member("m1", label="first")
    first_run = env.run(first)
    await wait_until(lambda: first.leases_held == 2)
    operator = FleetTable.for_operator(fleet_settings(env.dsn, env.schema, "x").state)
    try:
        assert await operator.set_draining("m1", True, 10.0)  # fleet drain m1
        await wait_until(lambda: first.leases_held == 0)
        # The daemon's clean stop: stop acquiring, stop the task, release and leave.
        first.stop_acquiring()
        first_run.cancel()
        await asyncio.gather(first_run, return_exceptions=True)
        await first.hand_over()
        again = env.member("m1", label="again")
        drained: list[bool] = []  # each renewal's flag
        renew = again.table.tick

        async def tick(held: Any, timeout_s: float, **kwargs: Any) -> Any:
            renewal = await renew(held, timeout_s, **kwargs)
            drained.append(renewal.draining)
            return renewal

        again.table.tick = tick  # type: ignore[method-assign]
        env.run(again)
        # Past the tick after which it takes its share: drained, it took nothing. And it
        # joined at once (the row its first process left is not waited out).
        await wait_until(lambda: len(drained) >= 6)
        assert all(drained) and again._other is None
        assert again.leases_held == 0 and not env.has("again", "start")
        assert [h for _, h, _ in await env.leases()] == [None, None]
        assert await operator.set_draining("m1", False, 10.0)  # fleet drain m1 --undo
        await wait_until(lambda: again.leases_held == 2)
    finally:
        await operator.close()


# --- one member name, one process ------------------------------------------------------------


async def test_two_processes_under_one_member_name_refuse(env: Env) -> None:
    """A second process given the same member name (a shared config, or <hostname>:<pid>
    colliding across containers) would renew and take the streams in the same name: it finds
    the name's row held by a live process and stops with an error naming the name and the
    fix; the first goes on undisturbed."""
    first = env.member("x", label="first")
    env.run(first)
    await wait_until(lambda: env.count("started") == 2)
    second = env.member("x", label="second")
    run = env.run(second)
    await wait_until(run.done, timeout=30)
    error = run.exception()
    assert isinstance(error, DuplicateMember)
    assert "'x'" in str(error) and "[fleet] member" in str(error)
    assert isinstance(error, StoreError) and not error.retriable  # the daemon exits 78
    # The first is undisturbed: it runs both streams, nothing was stopped or taken from it.
    assert not env.has("second", "start") and not any(w.startswith("stop") for _, w, _ in env.log)
    assert sorted(first.epochs) == ["a", "b"] and first.counters.lost == 0
    assert await env.leases() == [("a", "x", first.epochs["a"]), ("b", "x", first.epochs["b"])]
    await second.table.leave(10.0)  # what its shutdown does: never the first's row
    q = f'SELECT instance FROM "{env.schema}".fleet_members WHERE member = $1'
    assert await sql(env.dsn, "fetchval", q, "x") == first.table.instance


async def test_a_restart_under_the_same_name_waits_out_the_dead_process_row(env: Env) -> None:
    """The row a process that died left under our name (a restart after a crash) is not a
    second live process: it does not heartbeat, and once it expires the member joins."""
    q = f'"{env.schema}".fleet_members'
    await sql(
        env.dsn,
        "execute",
        f"INSERT INTO {q} (member, host, pid, weight, started_at, heartbeat_at, expires_at, "
        "instance) SELECT 'x', 'h', 7, 1, 0, n, n + 1.5, 'dead' "
        "FROM (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS n) t",
    )
    fleet = env.member("x")
    run = env.run(fleet)
    await wait_until(lambda: env.count("started") == 2, timeout=30)
    assert not run.done()
    instance = await sql(env.dsn, "fetchval", f"SELECT instance FROM {q} WHERE member = 'x'")
    assert instance == fleet.table.instance


# --- the shared tables are input from other processes -----------------------------------------

# Another process's member row, live for an hour, with the given weight and start time.
GHOST = (
    "INSERT INTO {q}.fleet_members (member, host, pid, weight, started_at, heartbeat_at, "
    "expires_at, draining) SELECT $1, 'h', 1, $2::text::float8, $3::text::float8, n, "
    "n + 3600, false FROM (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS n) t"
)


def views_read(fleet: Fleet) -> list[float]:
    """The database's time of each view of the fleet the member reads from now on (each
    tick that gets that far)."""
    seen: list[float] = []
    read = fleet.table.view

    async def view(timeout_s: float) -> Any:
        got = await read(timeout_s)
        seen.append(got.now)
        return got

    fleet.table.view = view  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("weight", ["Infinity", "NaN", "-1", "1e308"])
async def test_a_member_row_with_a_weight_out_of_range_stops_nobody_taking_streams(
    env: Env, weight: str
) -> None:
    """A row's weight of Infinity made every share NaN (ValueError at every tick, with a
    traceback, and no stream ever taken). Out of 0 to 1000, it counts as 0, and the member
    says so once."""
    q = f'"{env.schema}"'
    await sql(env.dsn, "execute", GHOST.format(q=q), "ghost", weight, "0")
    with captured_logs() as logs:
        fleet = env.member("m1")
        seen = views_read(fleet)
        env.run(fleet)
        await wait_until(lambda: env.count("started") == 2, timeout=3 * TTL_S)
        await wait_until(lambda: len(seen) >= 3)  # warned again at each tick, if at all
    lines = records(logs)
    assert not [x for x in lines if "unexpectedly" in x["event"]]
    warned = [x for x in lines if "weight that is not a number from 0 to 1000" in x["event"]]
    assert [(x["member"], x["level"]) for x in warned] == [("ghost", "warning")]


async def test_a_lease_row_at_the_top_epoch_blocks_no_other_stream(env: Env) -> None:
    """acquire() takes every wanted lease in one statement: one row whose epoch + 1
    overflows bigint failed it ("bigint out of range" at every tick), and no stream was taken.
    That row is passed by (said once); the others are taken."""
    q = f'"{env.schema}".stream_leases'
    await sql(
        env.dsn,
        "execute",
        f"INSERT INTO {q} (stream, holder, epoch, expires_at) VALUES ('b', NULL, $1, 0)",
        2**63 - 1,
    )
    with captured_logs() as logs:
        fleet = env.member("m1")
        seen = views_read(fleet)
        env.run(fleet)
        await wait_until(lambda: env.has("m1", "started", "a"), timeout=3 * TTL_S)
        ticked = len(seen)
        await wait_until(lambda: len(seen) >= ticked + 2)  # it would take b there, if at all
    assert "b" not in fleet.epochs
    lines = records(logs)
    assert not [x for x in lines if "failed" in x["event"]]
    warned = [x for x in lines if "at the largest epoch" in x["event"]]
    assert [x["stream"] for x in warned] == ["b"]


async def test_a_configured_streams_lease_row_removed_is_made_again(env: Env) -> None:
    """The README leaves old lease rows "until an operator removes them": one removed while
    its stream is configured was never made again (rows were made once, at the join; a
    takeover only updates rows), so nobody consumed the stream until a member restarted."""
    m1 = env.member("m1")
    env.run(m1)
    await wait_until(lambda: env.count("started") == 2, timeout=3 * TTL_S)
    await sql(env.dsn, "execute", f"DELETE FROM \"{env.schema}\".stream_leases WHERE stream = 'b'")
    await wait_until(lambda: env.has("m1", "stop-lost", "b"), timeout=3 * TTL_S)
    await wait_until(lambda: env.count("started") == 3, timeout=3 * TTL_S)
    assert env.before(("m1", "stopped", "b"), ("m1", "started", "b"))
    assert [(s, h) for s, h, _ in await env.leases()] == [("a", "m1"), ("b", "m1")]


async def test_another_process_host_is_bounded_and_escaped_in_the_duplicate_error(
    env: Env,
) -> None:
    """The host of another process's row went as it was into the warning while waiting and
    into DuplicateMember (logged, and the daemon's exit error): a megabyte, with terminal
    escapes."""
    q = f'"{env.schema}".fleet_members'
    await sql(
        env.dsn,
        "execute",
        f"INSERT INTO {q} (member, host, pid, weight, started_at, heartbeat_at, expires_at, "
        "instance) SELECT 'm1', $1, 1, 1, 0, n, n + 3600, 'other' "
        "FROM (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS n) t",
        "h\x1b[2J" + "x" * 1_000_000,
    )
    fleet = env.member("m1")
    with captured_logs() as logs:
        run = env.run(fleet)
        await wait_until(lambda: fleet._other is not None, timeout=3 * TTL_S)
        await sql(env.dsn, "execute", f"UPDATE {q} SET heartbeat_at = heartbeat_at + 1")
        await wait_until(run.done, timeout=3 * TTL_S)
    error = run.exception()
    assert isinstance(error, DuplicateMember)
    assert "on h\\x1b[2Jxxx" in str(error) and len(str(error)) < 1000
    text = logs.getvalue()
    assert "\\u001b" not in text and "\x1b" not in text
    assert max(len(line) for line in text.splitlines()) < 2000


async def test_offset_set_goes_through_once_every_member_is_drained(env: Env) -> None:
    """Draining only the holder hands the stream to another live member at its next tick,
    so the refusal (and the README) say to drain every member configured for it; that lets
    the change through, with the stream unheld."""
    from consumer.commands import offsets
    from consumer.errors import OffsetRefused

    m1, m2 = env.member("m1", streams=("a",)), env.member("m2", streams=("a",))
    env.run(m1)
    env.run(m2)
    await wait_until(lambda: env.count("started") == 1, timeout=3 * TTL_S)
    settings = fleet_settings(env.dsn, env.schema, "cli", streams=("a",))
    with pytest.raises(OffsetRefused, match="`opera-consumer fleet drain` every live member"):
        await offsets.plan(settings, "a", "1")
    operator = FleetTable.for_operator(settings.state)
    try:
        for name in ("m1", "m2"):
            assert await operator.set_draining(name, True, 10.0)
    finally:
        await operator.close()
    await wait_until(lambda: env.count("stopped") == 1 and not m1.epochs and not m2.epochs)
    planned = await offsets.plan(settings, "a", "1")
    assert planned.new == "1"


async def test_a_stream_the_gateway_says_another_consumer_holds_is_not_handed_over(
    env: Env,
) -> None:
    """m1 cannot subscribe its stream: the gateway keeps answering that another consumer
    holds it (status query Active, past status_active_limit: not ready). That is the gateway
    reached, not unreachable: m1 keeps it, though m2 streams. Once the answers stop (its
    network broken, say), m1 hands it over after release_unreachable_after_s, and m2 takes
    it; m1 does not take it back."""
    after = 2 * TTL_S
    answers = [0]
    answering = [True]

    def m1_probe(stream: str) -> StreamProbe | None:
        if answering[0]:
            answers[0] += 1  # asked again, told Active again
        return StreamProbe(StreamState.BACKOFF, answers[0])

    m1 = env.member("m1", probe=m1_probe, release_unreachable_after_s=after, streams=("a", "b"))
    m2 = env.member(
        "m2",
        probe=lambda s: StreamProbe(StreamState.STREAMING),
        release_unreachable_after_s=after,
    )
    env.run(m1)
    env.run(m2)
    await wait_until(lambda: m1.leases_held == 1 and m2.leases_held == 1, timeout=60)
    (mine,) = m1.epochs
    # Ticks at least renew_interval_s apart: this many span release_unreachable_after_s.
    ticks = m1.ticks + int(after / m1.settings.renew_interval_s) + 4
    await wait_until(lambda: m1.ticks >= ticks, timeout=120)
    assert list(m1.epochs) == [mine] and m1.counters.released_unreachable == 0
    answering[0] = False  # no answer from the gateway any more
    await wait_until(lambda: env.has("m2", "started", mine), timeout=120)
    assert m1.counters.released_unreachable == 1 and not m1.epochs
    assert [w for m, w, s in env.log if m == "m1" and s == mine] == [
        "start",
        "started",
        "stop",
        "stopped",
    ]
