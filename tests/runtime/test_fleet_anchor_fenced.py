"""A fleet member's stream with no checkpoint records where it begins at its first event
(runtime/stream.py: the anchor), a write the store fences as it does commits. Refused there (the
lease lost, another member holding the stream), the stream is stopped as lost, as for a refused
commit; but nothing said why, or the stream's loop said "unexpected error in the stream" with a
traceback, as for a bug. The refusal is said as a refused commit's is: a warning naming who
holds the lease. A real fleet daemon on PostgreSQL and the sandbox gateway."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from log_capture import log_records
from pg import sql
from support import stream_config, wait_until

from consumer.config import Settings
from consumer.runtime.daemon import Daemon

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")


@contextlib.asynccontextmanager
async def lease_taken_before_the_first_event(
    gw: Any, dsn: str, schema: str
) -> AsyncIterator[Daemon]:
    """Member m1 streaming ``a``, which has no checkpoint yet, its lease just taken by another
    member (a newer epoch), and m1's renewals held: its anchor is the first to find the lease
    gone (well before the self-fence, 17.8 s after the last renewal)."""
    settings = Settings(
        streams={"a": stream_config(gw.url, connection={"takeover_jitter_s": 0.0})},  # type: ignore[arg-type]
        state={"backend": "postgres", "dsn": dsn, "schema": schema},  # type: ignore[arg-type]
        sink={"type": "python", "target": "pysink:handle"},  # type: ignore[arg-type]
        pipeline={"drain_timeout_s": 1.0},  # type: ignore[arg-type]
        fleet={"enabled": True, "member": "m1", "lease_ttl_s": 20.0, "renew_interval_s": 0.2},  # type: ignore[arg-type]
        metrics={"port": 0},  # type: ignore[arg-type]
    )
    daemon = await Daemon.create(settings)
    run = asyncio.create_task(daemon.run())
    fleet = daemon.fleet
    assert fleet is not None
    renew, entered, resume = fleet.table.tick, asyncio.Event(), asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await resume.wait()
        return await renew(*args, **kwargs)

    try:
        await wait_until(lambda: "a" in daemon.runners)
        await wait_until(lambda: daemon.runners["a"].state.value == "streaming")
        fleet.table.tick = held  # type: ignore[method-assign]
        await wait_until(entered.is_set)  # no renewal under way from here
        taken = await sql(
            dsn,
            "execute",
            f'UPDATE "{schema}".stream_leases SET holder = $1, epoch = epoch + 1 WHERE stream = $2',
            "other",
            "a",
        )
        assert taken == "UPDATE 1"
        yield daemon
    finally:
        fleet.table.tick = renew  # type: ignore[method-assign]
        resume.set()
        daemon.request_stop()
        async with asyncio.timeout(60):
            await run
        await sql(dsn, "execute", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def said_fenced_once(lines: list[dict[str, Any]]) -> None:
    """One warning that the anchor was refused, naming who holds the lease; nothing of a bug
    (no "unexpected error", no traceback)."""
    assert not [x for x in lines if "unexpected" in x["event"] or "exception" in x], lines
    refused = [x for x in lines if "refused" in x["event"]]
    assert [(x["level"], x["streams"]) for x in refused] == [("warning", ["a"])], lines
    assert "another member holds the lease now" in refused[0]["event"]


async def test_an_anchor_refused_for_a_lost_lease_says_so_and_stops_the_stream(
    sandbox_factory: Any, postgres_dsn: str
) -> None:
    gw = await sandbox_factory(backlog=0)  # no event until the test appends one
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with log_records() as lines:
        async with lease_taken_before_the_first_event(gw, postgres_dsn, schema) as daemon:
            gw.append("DEMO", 1)  # the stream's first event: anchored, refused
            await wait_until(lambda: daemon.committer.fencing_rejections == 1)
            await wait_until(lambda: "a" not in daemon.runners)  # stopped as lost
    said_fenced_once(lines)


async def test_the_stream_loop_reached_by_a_refused_anchor_reports_no_bug(
    sandbox_factory: Any, postgres_dsn: str
) -> None:
    """The refusal reaches the stream's loop when the stop it starts has not cut the session
    yet. Here the member is only told (the test's own reaction), so it always does."""
    gw = await sandbox_factory(backlog=0)
    schema = f"t_{uuid.uuid4().hex[:16]}"
    told: list[frozenset[str]] = []
    with log_records() as lines:
        async with lease_taken_before_the_first_event(gw, postgres_dsn, schema) as daemon:
            assert daemon.fleet is not None
            daemon.committer.configure_fence(daemon.fleet.fence, told.append)
            runner = daemon.runners["a"]
            gw.append("DEMO", 1)
            await wait_until(lambda: runner.stats.last_close != "")  # the loop took it
            assert told == [frozenset({"a"})]
            assert "fenced" in runner.stats.last_close
    said_fenced_once(lines)
