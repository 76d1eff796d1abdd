"""A PostgreSQL state store that refuses writes for a while under a running daemon (real
PostgreSQL, the sandbox gateway, the jsonl sink): the commits are retried, the stream goes on
once the server takes them, each event once. Both cases stopped the daemon with exit 78,
which systemd does not restart (RestartPreventExitStatus=78)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from pg import DATABASE, PostgresServer, sql
from support import (
    as_received,
    assert_each_once_in_order,
    make_settings,
    newest_offset,
    read_sink,
)

from consumer.config.settings import PostgresSinkSettings
from consumer.core.events import Event
from consumer.errors import TransientSinkError
from consumer.runtime.daemon import Daemon
from consumer.sinks.postgres import PostgresSink


async def _checkpoint(dsn: str, schema: str) -> str | None:
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError):
        return None
    try:
        return await conn.fetchval(
            f'SELECT "offset" FROM {schema}.checkpoints WHERE stream = $1', "main"
        )
    except asyncpg.PostgresError:
        return None
    finally:
        await conn.close()


async def _until_committed(
    dsn: str, schema: str, offset: str, run: asyncio.Task[int], timeout: float = 60.0
) -> None:
    """Until the stream's checkpoint is ``offset``; fails at once if the daemon ended."""
    async with asyncio.timeout(timeout):
        while await _checkpoint(dsn, schema) != offset:
            assert not run.done(), f"the daemon ended (exit {run.result()}) instead of retrying"
            await asyncio.sleep(0.05)


@pytest.fixture
async def database(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A database of its own (the test changes its settings), dropped afterwards."""
    name = "review_" + uuid.uuid4().hex[:10]
    admin = postgres_server.dsn()
    await sql(admin, "execute", f'CREATE DATABASE "{name}"')
    try:
        yield postgres_server.dsn(name)
    finally:
        await sql(
            admin,
            "execute",
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
        )
        await sql(admin, "execute", f'DROP DATABASE IF EXISTS "{name}"')


def _settings(tmp_path: Path, url: str, dsn: str, schema: str):  # type: ignore[no-untyped-def]
    return make_settings(
        tmp_path,
        url,
        state={
            "backend": "postgres",
            "dsn": dsn,
            "schema": schema,
            "timeout_s": 2.0,
            "lease_check_interval_s": 0.5,
        },
    )


async def test_a_postgres_failover_read_only_window_does_not_stop_the_daemon(
    sandbox_factory, tmp_path: Path, database: str, postgres_server: PostgresServer
) -> None:
    """A failover: for a moment the server the DSN reaches accepts sessions but is read-only
    (the old primary demoted, a DNS name not yet moved): commits fail with SQLSTATE 25006
    ("cannot execute INSERT in a read-only transaction"). That clears by itself, as READONLY
    does for the Redis sink (README: retried): the daemon must retry its commits (the stream
    waits, /readyz and opera_consumer_commit_failures say why) and go on once the server is
    writable, each event once. The error was not retriable: the daemon exited 78 and the
    stream was down until an operator came."""
    gw = await sandbox_factory(backlog=50)
    schema = "s_" + uuid.uuid4().hex[:8]
    name = database.rsplit("/", 1)[1]
    admin = postgres_server.dsn(DATABASE)
    daemon = await Daemon.create(_settings(tmp_path, gw.url, database, schema))
    run = asyncio.create_task(daemon.run())
    try:
        await _until_committed(database, schema, newest_offset(gw), run)
        # The failover begins: sessions reach a server that is read-only now.
        await sql(
            admin, "execute", f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'
        )
        await sql(
            admin,
            "execute",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND application_name = 'opera-consumer'",
        )
        gw.append("DEMO", 50)
        async with asyncio.timeout(30):  # positive condition: a commit met the read-only server
            while daemon.committer.failures == 0 and not run.done():
                await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)  # the failover takes a moment
        await sql(admin, "execute", f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await _until_committed(database, schema, newest_offset(gw), run)
        daemon.request_stop()
        async with asyncio.timeout(30):
            assert await run == 0
    finally:
        if not run.done():
            daemon.request_stop()
            async with asyncio.timeout(30):
                await asyncio.gather(run, return_exceptions=True)
    assert_each_once_in_order(read_sink(tmp_path / "events.jsonl"), gw.events("DEMO"))


async def test_a_lock_timeout_while_a_dba_holds_a_lock_does_not_stop_the_daemon(
    sandbox_factory, tmp_path: Path, database: str, postgres_server: PostgresServer
) -> None:
    """A DBA's policy (``lock_timeout`` on the database or role, common to keep lock queues
    short) and maintenance holding a table lock for a few seconds (an ALTER TABLE, a VACUUM
    FULL, an operator's LOCK): the commit's statement gives up with SQLSTATE 55P03. The same
    wait under ``statement_timeout`` (57014) or the daemon's own ``timeout_s`` is retried; this
    one must be too. It stopped the daemon with exit 78 (not restarted)."""
    gw = await sandbox_factory(backlog=50)
    schema = "s_" + uuid.uuid4().hex[:8]
    name = database.rsplit("/", 1)[1]
    admin = postgres_server.dsn(DATABASE)
    await sql(admin, "execute", f"ALTER DATABASE \"{name}\" SET lock_timeout = '300ms'")
    daemon = await Daemon.create(_settings(tmp_path, gw.url, database, schema))
    run = asyncio.create_task(daemon.run())
    dba = None
    try:
        await _until_committed(database, schema, newest_offset(gw), run)
        dba = await asyncpg.connect(database)
        tx = dba.transaction()
        await tx.start()
        await dba.execute(f"LOCK TABLE {schema}.checkpoints IN EXCLUSIVE MODE")
        gw.append("DEMO", 50)
        async with asyncio.timeout(30):  # positive condition: a commit met the lock
            while daemon.committer.failures == 0 and not run.done():
                await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)  # the maintenance takes a moment
        await tx.rollback()
        await _until_committed(database, schema, newest_offset(gw), run)
        daemon.request_stop()
        async with asyncio.timeout(30):
            assert await run == 0
    finally:
        if dba is not None:
            await dba.close()
        if not run.done():
            daemon.request_stop()
            async with asyncio.timeout(30):
                await asyncio.gather(run, return_exceptions=True)
    assert_each_once_in_order(read_sink(tmp_path / "events.jsonl"), gw.events("DEMO"))


async def test_the_postgres_sink_writes_again_once_its_server_is_writable(
    database: str, postgres_server: PostgresServer
) -> None:
    """The sink's pooled sessions opened in a read-only window stay read-only (a session keeps
    what it started with; a demoted primary keeps its sessions): every write was retried on
    them for ever. A read-only refusal now replaces the pool's sessions."""
    name = database.rsplit("/", 1)[1]
    admin = postgres_server.dsn(DATABASE)
    sink = PostgresSink(
        PostgresSinkSettings(type="postgres", dsn=database, table="events", timeout_s=5.0)  # type: ignore[arg-type]
    )

    def event(i: int) -> Event:
        return as_received({"metadata": {"offset": str(i), "uniqueEventId": f"u{i}"}})

    await sink.open(None)
    try:
        await sink.write("main", [event(1)])
        read_only = f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'
        await sql(admin, "execute", read_only)
        await sql(
            admin,
            "execute",
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
        )
        with pytest.raises(TransientSinkError):  # the pool reconnects, read-only now
            await sink.write("main", [event(2)])
        await sql(admin, "execute", f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        for attempt in range(5):  # the pipeline's retries; was: read-only sessions for ever
            try:
                await sink.write("main", [event(2)])
                break
            except TransientSinkError:
                assert attempt < 4, "still read-only after the server became writable"
    finally:
        await sink.close()
    rows = await sql(database, "fetch", "SELECT unique_event_id FROM events ORDER BY 1")
    assert [r["unique_event_id"] for r in rows] == ["u1", "u2"]
