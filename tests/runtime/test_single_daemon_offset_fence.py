"""A daemon outside a fleet on PostgreSQL whose lease session ended (a server restart, the
backend terminated) runs on until its next lease check. An operator's `offset set` in that
gap took the free lease, set the offset and let go, and the daemon's next commit wrote its
in-memory position over the change: the operator's offset was lost. The commits are fenced
by the streams' lease epochs, which the operator's hold moves: the daemon's commit is refused,
it stops every stream and exits 1, and its restart resumes where the operator said.

Against a real PostgreSQL (tests/pg.py) and the sandbox gateway."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from log_capture import captured_logs
from pg import proxied, sql
from support import cli, newest_offset, toml_config, until
from tcp_proxy import TcpProxy

from consumer.config import load_settings
from consumer.errors import ExitCode
from consumer.runtime.daemon import Daemon

pytestmark = pytest.mark.usefixtures("contained_logging")

APP = f"opera-consumer lease pid={os.getpid()} role=daemon"[:63]
HOLDERS = (
    "SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1"
)


async def stored_offset(dsn: str, schema: str) -> str | None:
    return await sql(  # type: ignore[no-any-return]
        dsn, "fetchval", f'SELECT "offset" FROM "{schema}".checkpoints WHERE stream = $1', "main"
    )


@pytest.mark.parametrize("retaken", [False, True])
async def test_an_offset_set_while_the_lease_was_lost_is_not_written_over(
    sandbox_factory: Any,
    postgres_dsn: str,
    schema: str,
    pg_proxy: TcpProxy,
    tmp_path: Path,
    *,
    retaken: bool,
) -> None:
    """``retaken``: the daemon, cut off from the server meanwhile, checks its lease often
    and takes it again once the operator let go, before its next commit. Else the gap is
    held open: its lease check is an hour off."""
    gw = await sandbox_factory(backlog=20)
    config = toml_config(tmp_path, gw.url)
    text = config.read_text()
    state = f'[state]\nbackend = "postgres"\nschema = "{schema}"\ntimeout_s = 1.0\n'
    config.write_text(text.replace("[state]\n", f'{state}dsn = "{postgres_dsn}"\n'))
    own = tmp_path / "daemon.toml"
    dsn = proxied(postgres_dsn, pg_proxy.port) if retaken else postgres_dsn
    check = f"lease_check_interval_s = {0.1 if retaken else 3600}\n"
    own.write_text(text.replace("[state]\n", f'{state}dsn = "{dsn}"\n{check}'))
    settings = load_settings(own)
    with captured_logs() as logs:
        daemon = await Daemon.create(settings)
        run = asyncio.create_task(daemon.run())
        try:
            newest = newest_offset(gw)

            async def at_newest() -> bool:
                return await stored_offset(postgres_dsn, schema) == newest

            await until(at_newest, 60)
            # The lease's session ends (as at a server restart): the lock is free.
            [lease] = [r["pid"] for r in await sql(postgres_dsn, "fetch", HOLDERS, APP)]
            if retaken:
                pg_proxy.blackhole()  # the daemon cannot take it again before the operator
            await sql(postgres_dsn, "fetch", "SELECT pg_terminate_backend($1)", lease)

            async def lease_free() -> bool:
                return not await sql(postgres_dsn, "fetch", HOLDERS, APP)

            await until(lease_free, 30)
            done = await asyncio.to_thread(
                cli, "offset", "set", "main", "1", "--execute", "--config", str(config)
            )
            assert done.returncode == 0, done.stderr
            assert await stored_offset(postgres_dsn, schema) == "1"
            if retaken:
                pg_proxy.restore()

                async def held_again() -> bool:
                    return bool(await sql(postgres_dsn, "fetch", HOLDERS, APP))

                await until(held_again, 30)
            # New events: the daemon delivers them, and commits (or tries to).
            gw.append("DEMO", 5)

            async def stopped_or_written_over() -> bool:
                return run.done() or await stored_offset(postgres_dsn, schema) != "1"

            await until(stopped_or_written_over, 60)
            assert await stored_offset(postgres_dsn, schema) == "1"
            async with asyncio.timeout(30):
                code = await run
        finally:
            pg_proxy.restore()
            daemon.request_stop()
            async with asyncio.timeout(30):
                await asyncio.gather(run, return_exceptions=True)
    assert code == ExitCode.RUNTIME
    assert await stored_offset(postgres_dsn, schema) == "1"
    assert "changed by an operator's command" in logs.getvalue()
    # The committer's own line says who moved the stream on: no fleet here.
    assert "commit refused: an operator's command changed the stream" in logs.getvalue()
    assert "another member" not in logs.getvalue()
