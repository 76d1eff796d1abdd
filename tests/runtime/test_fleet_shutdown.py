"""A fleet member asked to stop while it hands a stream over: the handover drops the stream from
the daemon's tables while the shutdown walks them. The shutdown must still drain, commit, hand
over and close everything, and exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pysink
import pytest
from log_capture import captured_logs
from pg import sql
from support import stream_config, wait_until

from consumer.config import Settings
from consumer.errors import ExitCode, SinkUnusable
from consumer.runtime.daemon import Daemon

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")

# A member's first subscribe of a stream waits a random takeover jitter (up to 2 s by default
# in fleet mode): nothing here is about it.
NO_JITTER = {"takeover_jitter_s": 0.0}


def handing_over(stream: str) -> bool:
    """Whether the fleet's handover task of ``stream`` is running."""
    return any(
        t.get_name() == f"fleet-release-{stream}" and not t.done() for t in asyncio.all_tasks()
    )


async def test_a_handover_during_the_shutdown(sandbox_factory, postgres_dsn, tmp_path) -> None:
    """The handover outlasts the shutdown's own drain: the gateway never closes after a
    ``complete`` (so each session ends on its ``complete_timeout_s``: a's 2.5 s, b's 0.5 s) and
    a's sink hangs. The shutdown is past its drain (b stopped, a's drain deadline of 0.5 s gone)
    while a's handover still waits for its session to end (1.5 s more); it must let the
    handover finish (release a itself) rather than cancel it."""
    gw = await sandbox_factory(
        backlog=0, chains=("DEMO", "OTHER"), app_keys=("key2",), complete_close_delay_s=60.0
    )
    schema = f"t_{uuid.uuid4().hex[:16]}"
    settings = Settings(
        streams={  # type: ignore[arg-type]
            "a": stream_config(gw.url, connection={"complete_timeout_s": 2.5, **NO_JITTER}),
            "b": stream_config(
                gw.url,
                chain_code="OTHER",
                app_key="key2",
                connection={"complete_timeout_s": 0.5, **NO_JITTER},
            ),
        },
        state={"backend": "postgres", "dsn": postgres_dsn, "schema": schema},  # type: ignore[arg-type]
        sink={"type": "python", "target": "pysink:handle"},  # type: ignore[arg-type]
        pipeline={"workers": 1, "drain_timeout_s": 0.5},  # type: ignore[arg-type]
        fleet={"enabled": True, "member": "m1", "lease_ttl_s": 20.0, "renew_interval_s": 0.2},  # type: ignore[arg-type]
        metrics={"port": 0},  # type: ignore[arg-type]
    )
    pysink.STUCK_STREAMS.add("a")  # a's downstream hangs: its handover takes the drain time
    daemon = await Daemon.create(settings)
    task = asyncio.create_task(daemon.run())
    await wait_until(lambda: len(daemon.runners) == 2)
    await wait_until(lambda: all(r.state.value == "streaming" for r in daemon.runners.values()))
    gw.append("DEMO", 3)
    gw.append("OTHER", 3)
    await wait_until(lambda: "a" in daemon.pipelines and daemon.pipelines["a"].in_flight == 3)
    await wait_until(lambda: len(pysink.delivered_ids("b")) == 3)
    assert daemon.fleet is not None
    daemon.fleet._move("a", lost=False)  # what a tick does when another member needs its share
    # The handover is under way: its task runs and a's session has sent `complete`.
    await wait_until(lambda: handing_over("a") and daemon.runners["a"].state.value == "completing")
    daemon.request_stop()  # and SIGTERM meanwhile
    async with asyncio.timeout(60):
        assert await task == 0
    assert not handing_over("a")
    rows = await sql(postgres_dsn, "fetch", f'SELECT stream, holder FROM "{schema}".stream_leases')
    # Both handed over; a by its handover (cancelled, it would leave a held by m1 until the
    # lease ran out: the shutdown releases only what the handovers did not take charge of).
    assert {r[0]: r[1] for r in rows} == {"a": None, "b": None}
    members = await sql(postgres_dsn, "fetch", f'SELECT member FROM "{schema}".fleet_members')
    assert members == []  # left the fleet


@contextlib.asynccontextmanager
async def held_stream(
    gw: Any,
    postgres_dsn: str,
    schema: str,
    *,
    drain_timeout_s: float,
    renew_interval_s: float,
    complete_timeout_s: float = 4.0,
) -> AsyncIterator[tuple[Daemon, asyncio.Event]]:
    """Member m1 running stream ``a`` into the python sink, whose first write is held (the
    gate) with 20 events in flight; a ``complete`` the gateway never answers with a close."""
    connection = {"complete_timeout_s": complete_timeout_s, **NO_JITTER}
    settings = Settings(
        streams={"a": stream_config(gw.url, connection=connection)},  # type: ignore[arg-type]
        state={"backend": "postgres", "dsn": postgres_dsn, "schema": schema},  # type: ignore[arg-type]
        sink={"type": "python", "target": "pysink:handle"},  # type: ignore[arg-type]
        pipeline={"workers": 1, "batch_max": 5, "drain_timeout_s": drain_timeout_s},  # type: ignore[arg-type]
        fleet={  # type: ignore[arg-type]
            "enabled": True,
            "member": "m1",
            "lease_ttl_s": 20.0,
            "renew_interval_s": renew_interval_s,
        },
        metrics={"port": 0},  # type: ignore[arg-type]
    )
    pysink.GATES["a"] = gate = asyncio.Event()
    daemon = await Daemon.create(settings)
    task = asyncio.create_task(daemon.run())
    try:
        await wait_until(lambda: "a" in daemon.runners)
        await wait_until(lambda: daemon.runners["a"].state.value == "streaming")
        gw.append("DEMO", 20)
        await wait_until(lambda: pysink.CALLS[0] == 1 and daemon.pipelines["a"].in_flight == 20)
        yield daemon, gate
    finally:
        daemon.request_stop()
        async with asyncio.timeout(60):
            await task


async def test_a_lost_stream_stops_delivering_at_once(
    sandbox_factory, postgres_dsn, tmp_path
) -> None:
    """A stream found lost may be another member's already: its workers stop before anything
    else. They used to go on through the session's grace (here the 0.5 s tick: the gateway
    never closes after ``complete``), delivering what was queued."""
    gw = await sandbox_factory(backlog=0, complete_close_delay_s=60.0)
    schema = f"t_{uuid.uuid4().hex[:16]}"
    held = held_stream(gw, postgres_dsn, schema, drain_timeout_s=1.0, renew_interval_s=0.5)
    async with held as (daemon, gate):
        assert daemon.fleet is not None
        delivered_when_stopped: list[int] = []
        stop = daemon.fleet._stop_stream

        async def recorded(stream: str, lost: bool) -> None:
            await stop(stream, lost)
            delivered_when_stopped.append(len(pysink.delivered_ids("a")))

        daemon.fleet._stop_stream = recorded  # type: ignore[method-assign]
        daemon.fleet._move("a", lost=True)  # what a renewal that leaves it out does
        gate.set()  # the held write could end now: nothing may be delivered after the loss
        await wait_until(lambda: bool(delivered_when_stopped))
        assert delivered_when_stopped == [0]


async def test_a_stream_lost_during_its_handover_stops_delivering_at_once(
    sandbox_factory, postgres_dsn
) -> None:
    """A stream being handed over (``complete`` sent, the drain to come) that is found lost
    meanwhile (another member took it: this one froze past its lease mid-handover) is
    another member's: its stop goes on as a lost one's. Its workers used to go on delivering
    the queued events through the session's grace and the drain, beside the new holder."""
    gw = await sandbox_factory(backlog=0, complete_close_delay_s=60.0)
    schema = f"t_{uuid.uuid4().hex[:16]}"
    try:
        held = held_stream(gw, postgres_dsn, schema, drain_timeout_s=5.0, renew_interval_s=0.25)
        async with held as (daemon, gate):
            fleet = daemon.fleet
            assert fleet is not None
            fleet._move("a", lost=False)  # a tick's handover (a member joined, or a drain)
            await wait_until(
                lambda: handing_over("a") and daemon.runners["a"].state.value == "completing"
            )
            # Another member takes the lease (as after this member froze past it).
            await sql(
                postgres_dsn,
                "execute",
                f"UPDATE \"{schema}\".stream_leases SET holder = 'm2', epoch = epoch + 1, "
                "expires_at = EXTRACT(EPOCH FROM clock_timestamp()) + 60 WHERE stream = 'a'",
            )
            await wait_until(lambda: fleet.counters.lost == 1)  # a renewal found it lost
            gate.set()  # the held write could end now: nothing may be delivered after the loss
            await wait_until(lambda: not handing_over("a") and "a" not in fleet.epochs, timeout=30)
            assert pysink.delivered_ids("a") == []
            rows = await sql(postgres_dsn, "fetch", f'SELECT holder FROM "{schema}".stream_leases')
            assert [r[0] for r in rows] == ["m2"]  # not released: it is the other member's
    finally:
        await sql(postgres_dsn, "execute", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def test_a_sink_found_unusable_during_a_handover_ends_its_drain(
    sandbox_factory, postgres_dsn
) -> None:
    """A handover waits for its stream's drain (up to ``drain_timeout_s``), but a sink found
    unusable meanwhile ends the worker that met it: the drain can never come. The daemon stops
    (78) without waiting it out, as its shutdown's drain does."""
    gw = await sandbox_factory(backlog=0, complete_close_delay_s=60.0)
    schema = f"t_{uuid.uuid4().hex[:16]}"

    async def unusable() -> None:
        raise SinkUnusable("the sink's file was replaced underneath us")

    try:
        # A drain far past the rest of the test (paid only if the handover waits it out), and
        # a session that ends 1.5 s after `complete` (the settings: 2 x (1.5 + 2) + 7 < 19.75).
        held = held_stream(
            gw,
            postgres_dsn,
            schema,
            drain_timeout_s=7.0,
            renew_interval_s=0.25,
            complete_timeout_s=1.5,
        )
        with captured_logs() as logs:
            async with held as (daemon, gate):
                fleet = daemon.fleet
                assert fleet is not None
                pysink.ON_EVENT[gw.event_keys("DEMO")[0][0]] = unusable  # the held write's
                fleet._move("a", lost=False)  # a tick's handover (a member joined, a drain)
                await wait_until(
                    lambda: handing_over("a") and daemon.runners["a"].state.value == "completing"
                )
                gate.set()  # the held write goes on, and meets the unusable sink
                await wait_until(lambda: daemon.exit_code == ExitCode.CONFIG)
                await wait_until(lambda: "a" not in daemon.pipelines, timeout=60)
            said = [json.loads(line)["event"] for line in logs.getvalue().splitlines()]
        assert "stream stopped here" in said
        assert "drain deadline passed; the next holder replays the rest" not in said
        assert pysink.delivered_ids("a") == []
    finally:
        await sql(postgres_dsn, "execute", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
