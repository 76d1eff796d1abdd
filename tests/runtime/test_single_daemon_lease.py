"""A daemon outside a fleet on PostgreSQL holds its schema by a session advisory lock, which the
server drops with the session (a restart, the backend terminated, a cut it gave up on) while the
daemon runs on. It watches the lease: takes it again, or, found taken by another daemon
meanwhile, stops its streams at once and exits 78. Against a real PostgreSQL; the streams'
gateway and the webhook are nowhere (127.0.0.1:9): what is tested is who may run."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from fleet_support import fleet_settings
from log_capture import captured_logs
from pg import PostgresServer, proxied, sql
from support import running
from tcp_proxy import TcpProxy

from consumer.config import Settings
from consumer.config.settings import FleetSettings
from consumer.errors import ExitCode, LeaseHeld
from consumer.runtime.daemon import Daemon
from consumer.state.lease import hold_streams

pytestmark = pytest.mark.usefixtures("contained_logging")

APP = f"opera-consumer lease pid={os.getpid()} role=daemon"[:63]  # every daemon in this process
HOLDERS = (
    "SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1"
)


def single_settings(dsn: str, schema: str) -> Settings:
    """A daemon outside any fleet, checking its lease every 0.1 s (each check within 1 s)."""
    settings = fleet_settings(dsn, schema, "-")
    state = settings.state.model_copy(update={"lease_check_interval_s": 0.1, "timeout_s": 1.0})
    return settings.model_copy(update={"fleet": FleetSettings(), "state": state})


async def lease_holders(dsn: str) -> list[int]:
    """The backends of this process's lease connections holding an advisory lock."""
    return [r["pid"] for r in await sql(dsn, "fetch", HOLDERS, APP)]


async def cut_off_and_lose_the_lease(dsn: str, proxy: TcpProxy) -> None:
    """The daemon behind ``proxy`` cut off from the server, which ends its lease session."""
    old = await lease_holders(dsn)
    assert len(old) == 1
    proxy.blackhole()
    await sql(dsn, "fetch", "SELECT pg_terminate_backend($1)", old[0])
    async with asyncio.timeout(30):
        while old[0] in await lease_holders(dsn):
            await asyncio.sleep(0.05)


async def until_held_anew(dsn: str, old: list[int]) -> None:
    """Until a lease connection other than ``old`` holds the lease."""
    async with asyncio.timeout(30):
        while not set(await lease_holders(dsn)) - set(old):
            await asyncio.sleep(0.05)


async def test_a_lease_whose_session_was_terminated_is_taken_again(
    postgres_dsn: str, schema: str
) -> None:
    """The lease's backend terminated (by an operator, an idle-session cull): the server
    dropped the lock, and a second daemon started then ran every stream beside the first.
    The first takes the lease again on a new connection: the second is refused (exit 78)."""
    settings = single_settings(postgres_dsn, schema)
    async with running(settings) as first:
        old = await lease_holders(postgres_dsn)
        assert len(old) == 1
        await sql(postgres_dsn, "fetch", "SELECT pg_terminate_backend($1)", old[0])
        await until_held_anew(postgres_dsn, old)
        with pytest.raises(LeaseHeld) as refused:
            await Daemon.create(settings)
        assert f"pid {os.getpid()}" in str(refused.value)
        assert first.exit_code == ExitCode.OK and not first._undrainable.is_set()
    assert first.exit_code == ExitCode.OK


async def test_a_lease_taken_again_after_a_server_restart(
    postgres_server: PostgresServer, postgres_dsn: str, schema: str
) -> None:
    """A PostgreSQL restart ends every session: the lease is taken again once the server is
    back (the attempts meanwhile fail and are retried), and a second daemon is refused."""
    settings = single_settings(postgres_dsn, schema)
    async with running(settings) as first:
        old = await lease_holders(postgres_dsn)
        postgres_server.stop()
        postgres_server.start()
        await until_held_anew(postgres_dsn, old)
        with pytest.raises(LeaseHeld):
            await Daemon.create(settings)
    assert first.exit_code == ExitCode.OK


async def test_a_daemon_whose_lease_another_took_meanwhile_stops_its_streams_and_exits_78(
    postgres_dsn: str, schema: str, pg_proxy: TcpProxy
) -> None:
    """Cut off from the server while it ended the first daemon's session, the first could not
    take its lease again before a second daemon took it. Once it reaches the server again it
    finds the lease taken: it cuts its streams at once (no complete, no drain, no commit) and
    exits 78, naming the holder; the second runs on."""
    via_proxy = proxied(postgres_dsn, pg_proxy.port)
    with captured_logs() as logs:
        first = await Daemon.create(single_settings(via_proxy, schema))
        first_run = asyncio.create_task(first.run())
        second_run: asyncio.Task[int] | None = None
        try:
            await cut_off_and_lose_the_lease(postgres_dsn, pg_proxy)
            second = await Daemon.create(single_settings(postgres_dsn, schema))
            second_run = asyncio.create_task(second.run())
            pg_proxy.restore()
            async with asyncio.timeout(30):
                code = await first_run
            assert code == ExitCode.CONFIG
            assert first._stream_tasks and all(t.cancelled() for t in first._stream_tasks.values())
            assert not second_run.done()
        finally:
            pg_proxy.restore()
            first.request_stop()
            async with asyncio.timeout(30):
                await asyncio.gather(first_run, return_exceptions=True)
            if second_run is not None:
                second.request_stop()
                async with asyncio.timeout(30):
                    assert await second_run == ExitCode.OK
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    taken = [ln for ln in lines if ln["event"].startswith("state store lease taken by another")]
    assert len(taken) == 1
    assert f"pid {os.getpid()} on 127.0.0.1 holds the state store" in taken[0]["error"]
    assert taken[0]["exit_code"] == ExitCode.CONFIG


async def test_an_operator_command_that_took_the_free_lease_gets_a_restart_not_78(
    postgres_dsn: str, schema: str, pg_proxy: TcpProxy
) -> None:
    """While the lease was lost, an operator's `offset set` (or `sink adopt`, `dlq replay`)
    took the free lease for a moment: the daemon took it for another daemon and exited 78,
    which systemd does not restart, so the stream stayed down though the command let go a
    second later. It still stops every stream at once (the command changes what it would
    commit), but exits 1: a restart takes the lease again."""
    via_proxy = proxied(postgres_dsn, pg_proxy.port)
    with captured_logs() as logs:
        daemon = await Daemon.create(single_settings(via_proxy, schema))
        run = asyncio.create_task(daemon.run())
        try:
            await cut_off_and_lose_the_lease(postgres_dsn, pg_proxy)
            op = single_settings(postgres_dsn, schema)
            held = await hold_streams(op.state, list(op.streams), role="offset", fleet=False)
            try:
                pg_proxy.restore()
                async with asyncio.timeout(30):
                    code = await run
            finally:
                await held.release()
            assert code == ExitCode.RUNTIME
            assert all(t.cancelled() for t in daemon._stream_tasks.values())
        finally:
            pg_proxy.restore()
            daemon.request_stop()
            async with asyncio.timeout(30):
                await asyncio.gather(run, return_exceptions=True)
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    taken = [ln for ln in lines if ln["event"].startswith("state store lease taken by an oper")]
    assert len(taken) == 1 and taken[0]["role"] == "offset"
