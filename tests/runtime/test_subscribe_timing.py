"""OHIP's two timing rules around ``subscribe``, against a sandbox that enforces them:

* the gap after a completed subscription (4409 otherwise): a restarted daemon, or a fleet
  member taking over a stream another one just handed over, waits out what is left of
  ``resubscribe_gap_s`` since the close the state store recorded;
* ``subscribe`` within ``subscribe_deadline_s`` of ``connection_init``: a slow ack or a long
  takeover jitter never makes the daemon subscribe late.

The sandbox's counters of refusals are what is asserted, never how long something took.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path
from unittest import mock

import pysink
import pytest
from fleet_support import fleet_settings
from pg import sql
from support import count_lines, make_settings, running, stream_config, wait_until

from consumer.config import Settings
from consumer.runtime.daemon import Daemon
from consumer.runtime.stream import StreamRunner, StreamState
from consumer.state import SqliteStore, open_store

SANDBOX_GAP_S = 1.0
# Above the sandbox's: its clock starts at the close it sends, the daemon's a moment later,
# once the close is received (and recorded: on the database's clock in a fleet).
DAEMON_GAP_S = 2.0


async def closed_at(state: Path, stream: str = "main") -> float | None:
    store = await SqliteStore.open(state)
    try:
        return await store.completed_closed_at(stream)
    finally:
        await store.close()


async def test_a_restarted_daemon_waits_out_the_gap(sandbox_factory, tmp_path: Path) -> None:
    """systemctl restart: the old process completes, the server closes, it exits; the new one
    must not subscribe within the gap (4409 and minutes of lockout)."""
    gw = await sandbox_factory(backlog=5, resubscribe_gap_s=SANDBOX_GAP_S)
    sink = tmp_path / "events.jsonl"
    settings = make_settings(tmp_path, gw.url, connection={"resubscribe_gap_s": DAEMON_GAP_S})
    async with running(settings):
        await wait_until(lambda: count_lines(sink) >= 5)
    assert gw.stats.completes_received == 1
    gw.append("DEMO", 3)
    async with running(settings) as daemon:
        runner = daemon.runners["main"]
        await wait_until(lambda: "gap after the previous subscription" in runner.waiting_for())
        await wait_until(lambda: count_lines(sink) >= 8)
    assert (gw.stats.gap_refusals, gw.stats.stale_refusals, gw.stats.subscriber_conflicts) == (
        0,
        0,
        0,
    )
    assert len(gw.stats.subscribes) == 2
    assert await closed_at(tmp_path / "state.db") is not None


async def test_a_clean_restart_shows_the_gap_and_a_4409_the_lockout(
    sandbox_factory, tmp_path: Path
) -> None:
    """Every clean restart showed "lockout" for the resubscribe gap in `status` and systemd's
    STATUS=, as if OHIP had refused the stream (4409): it is the gap, said so; a 4409 is still
    the lockout."""
    gw = await sandbox_factory(backlog=5, resubscribe_gap_s=30.0)
    sink = tmp_path / "events.jsonl"
    settings = make_settings(tmp_path, gw.url, connection={"resubscribe_gap_s": 30.0})
    async with running(settings):
        await wait_until(lambda: count_lines(sink) >= 5)
    async with running(settings) as daemon:
        runner = daemon.runners["main"]
        await wait_until(lambda: runner.state is StreamState.GAP)
        line = daemon.status_line()
        assert line.startswith("main: gap, offset ") and "lockout" not in line, line
        assert "waiting out the resubscribe gap after the previous subscription" in line
        assert runner.state.ready
        daemon.request_stop()  # ends the wait at once
    assert gw.stats.gap_refusals == 0

    # Without the gap here, the sandbox's gap refuses the subscribe: 4409, the lockout.
    hasty = make_settings(tmp_path, gw.url, connection={"resubscribe_gap_s": 0.0})
    async with running(hasty) as daemon:
        runner = daemon.runners["main"]
        await wait_until(lambda: runner.state is StreamState.LOCKOUT)
        line = daemon.status_line()
        assert line.startswith("main: lockout, offset ") and "(4409)" in line, line
        assert "resubscribe gap" not in line
    assert gw.stats.gap_refusals >= 1


async def test_a_subscription_the_server_completed_waits_out_the_gap(
    sandbox_factory, tmp_path: Path
) -> None:
    """Reference 2.5: the gap runs from a completed subscription's close, whoever completed
    it. Only our own `complete` applied it: after the server's, the next subscribe came after
    the close's short backoff (4409, and the lockout), and no close time was recorded for a
    process subscribing next."""
    gw = await sandbox_factory(backlog=5, resubscribe_gap_s=SANDBOX_GAP_S)
    sink = tmp_path / "events.jsonl"
    settings = make_settings(tmp_path, gw.url, connection={"resubscribe_gap_s": DAEMON_GAP_S})
    async with running(settings) as daemon:
        await wait_until(lambda: count_lines(sink) >= 5)
        gw.complete_subscriptions()
        runner = daemon.runners["main"]
        await wait_until(lambda: runner.stats.closes["1000"] == 1)  # the server's, after it
        # A wait the protocol asks for: ready meanwhile (GAP: the resubscribe gap, not a 4409
        # lockout), not a failure's BACKOFF.
        assert runner.state is StreamState.GAP and runner.state.ready
        assert "waiting out the resubscribe gap" in runner.waiting_for()
        assert await closed_at(tmp_path / "state.db") is not None
        gw.append("DEMO", 3)
        await wait_until(lambda: count_lines(sink) >= 8)
    assert gw.stats.completes_received == 1  # ours, at the end; the first was the server's
    assert (gw.stats.gap_refusals, gw.stats.stale_refusals, gw.stats.subscriber_conflicts) == (
        0,
        0,
        0,
    )
    assert len(gw.stats.subscribes) == 2


async def test_the_gap_wait_is_bounded_and_ends_on_stop(sandbox_factory, tmp_path: Path) -> None:
    """A close recorded "in the future" (the clock jumped back since) waits the gap at most;
    a stop request ends the wait at once, without connecting."""
    gw = await sandbox_factory(backlog=1)
    settings = make_settings(tmp_path, gw.url, connection={"resubscribe_gap_s": 600.0})
    store = await SqliteStore.open(tmp_path / "state.db")
    await store.set_completed_closed_at("main", time.time() + 3600.0)
    await store.close()
    daemon = await Daemon.create(settings)
    task = asyncio.create_task(daemon.run())
    runner = daemon.runners["main"]
    await wait_until(lambda: runner.state is StreamState.GAP)
    assert "waiting out the resubscribe gap after the previous" in runner.waiting_for()
    shown = re.search(r"retry in (\d+) s", runner.waiting_for())
    assert shown is not None and 0 < int(shown.group(1)) <= 600, runner.waiting_for()
    daemon.request_stop()
    async with asyncio.timeout(30):
        assert await task == 0
    assert gw.stats.upgrades == []


def gap_runner(store: object, gap_s: float) -> tuple[StreamRunner, list[float]]:
    """A runner of stream "a" on ``store`` (nothing else of it is used), and the waits it
    makes before subscribing (recorded, not waited)."""
    st = stream_config("http://127.0.0.1:9", connection={"resubscribe_gap_s": gap_s})
    settings = Settings(streams={"a": st}, metrics={"enabled": False})  # type: ignore[arg-type]
    runner = StreamRunner(
        "a",
        settings.streams["a"],
        tokens=mock.MagicMock(),
        pipeline=mock.MagicMock(),
        store=store,  # type: ignore[arg-type]
        budget=mock.MagicMock(),
    )
    waits: list[float] = []

    async def wait(seconds: float) -> None:
        waits.append(seconds)

    runner._wait_or_stop = wait  # type: ignore[method-assign]
    return runner, waits


@pytest.mark.parametrize("skewed", ["closer behind", "taker ahead"])
async def test_a_fleet_handover_waits_the_gap_whatever_the_hosts_clocks(
    postgres_dsn: str, skewed: str
) -> None:
    """Fleet: the member that completed the subscription and the one taking the stream over
    are two hosts. The close was written with the first's wall clock and held against the
    second's: with the taker's clock 5 s ahead of the closer's (no NTP on one VM), it
    subscribed at once after a handover (4409, and minutes of lockout). Both ends use the
    database's clock now."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    store = await open_store(fleet_settings(postgres_dsn, schema, "x").state)
    try:
        gap, skew = 3.0, 5.0
        closer, _ = gap_runner(store, gap)
        taker, waits = gap_runner(store, gap)
        real = time.time
        behind = skew if skewed == "closer behind" else 0.0
        with mock.patch("consumer.runtime.stream.time.time", lambda: real() - behind):
            await closer._record_completed()  # closed just now
        ahead = skew if skewed == "taker ahead" else 0.0
        with mock.patch("consumer.runtime.stream.time.time", lambda: real() + ahead):
            await taker._wait_out_gap()  # took the released lease at once
        assert len(waits) == 1, f"no wait before subscribing, {gap} s after a close: 4409"
        assert gap - 1.0 <= waits[0] <= gap
        assert "gap after the previous subscription" in taker.waiting_for()
    finally:
        await store.close()
        await sql(postgres_dsn, "execute", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def test_a_slow_ack_never_makes_a_late_subscribe(sandbox_factory, tmp_path: Path) -> None:
    """The ack comes after the deadline: the daemon closes and reconnects with backoff; it
    never sends the subscribe the gateway would refuse."""
    # The daemon gives up on the ack SUBSCRIBE_MARGIN_S (0.5 s) before the deadline.
    gw = await sandbox_factory(backlog=1, ack_delay_s=1.5, subscribe_deadline_s=1.0)
    settings = make_settings(tmp_path, gw.url, connection={"subscribe_deadline_s": 1.0})
    async with running(settings) as daemon:
        runner = daemon.runners["main"]
        await wait_until(lambda: runner.stats.closes["subscribe_deadline"] >= 2)
        assert "within 1 s of connection_init" in runner.stats.last_close
        assert runner.state in (StreamState.BACKOFF, StreamState.CONNECTING)
    assert gw.stats.subscribes == []
    assert gw.stats.subscribe_timeouts == 0 and 4408 not in gw.stats.close_codes_sent


async def test_the_takeover_jitter_fits_in_the_deadline(sandbox_factory, tmp_path: Path) -> None:
    """A takeover jitter far longer than the deadline is cut to what the deadline leaves after
    the ack and the status answer: the daemon subscribes in time and streams."""
    gw = await sandbox_factory(backlog=5, subscribe_deadline_s=1.5)
    connection = {"status_check": "on", "takeover_jitter_s": 1000.0, "subscribe_deadline_s": 1.5}
    settings = make_settings(tmp_path, gw.url, connection=connection)
    async with running(settings):
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 5)
    assert gw.stats.subscribe_timeouts == 0 and 4408 not in gw.stats.close_codes_sent
    assert len(gw.stats.subscribes) == 1


@pytest.mark.usefixtures("fresh_pysink", "contained_logging")
async def test_a_fleet_handover_waits_out_the_gap(sandbox_factory, postgres_dsn, tmp_path) -> None:
    """A second member joins: the first hands one stream over (complete, the server's close,
    commit, release); the second must not subscribe it within the gap."""
    gap = {"resubscribe_gap_s": 2.0, "takeover_jitter_s": 0.0}
    gw = await sandbox_factory(
        backlog=2, chains=("DEMO", "OTHER"), app_keys=("key2",), resubscribe_gap_s=1.5
    )
    schema = f"t_{uuid.uuid4().hex[:16]}"

    def member(name: str) -> Settings:
        return Settings(
            streams={  # type: ignore[arg-type]
                "a": stream_config(gw.url, connection=gap),
                "b": stream_config(gw.url, chain_code="OTHER", app_key="key2", connection=gap),
            },
            state={"backend": "postgres", "dsn": postgres_dsn, "schema": schema},  # type: ignore[arg-type]
            sink={"type": "python", "target": "pysink:handle"},  # type: ignore[arg-type]
            pipeline={"workers": 1, "drain_timeout_s": 1.0},  # type: ignore[arg-type]
            fleet={"enabled": True, "member": name, "lease_ttl_s": 20.0, "renew_interval_s": 0.2},  # type: ignore[arg-type]
            metrics={"enabled": False},  # type: ignore[arg-type]
        )

    try:
        async with running(member("m1")) as m1:
            await wait_until(lambda: len(pysink.delivered_ids("a")) == 2)
            await wait_until(lambda: len(pysink.delivered_ids("b")) == 2)
            async with running(member("m2")) as m2:
                await wait_until(lambda: len(m1.runners) == 1 and len(m2.runners) == 1)
                moved = next(iter(m2.runners))
                runner = m2.runners[moved]
                await wait_until(lambda: runner.state is StreamState.STREAMING, timeout=60)
                gw.append("DEMO", 2)
                gw.append("OTHER", 2)
                await wait_until(lambda: len(pysink.delivered_ids("a")) >= 4)
                await wait_until(lambda: len(pysink.delivered_ids("b")) >= 4)
    finally:
        await sql(postgres_dsn, "execute", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    assert gw.stats.completes_received >= 1  # the handover completed its subscription
    assert (gw.stats.gap_refusals, gw.stats.stale_refusals, gw.stats.subscriber_conflicts) == (
        0,
        0,
        0,
    )
