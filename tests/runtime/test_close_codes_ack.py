"""4401s with acknowledged connections between them are not "in a row": the daemon streams on.
It counted every 4401 since the last long or productive session, so 4401, a connection
acknowledged and closed with 1001, then 4401 twice stopped it with "3 times in a row: check
app_key" (exit 78), a configuration error it was not."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from support import count_lines, make_settings, wait_until

from consumer.errors import ExitCode
from consumer.runtime.daemon import Daemon


async def test_4401s_between_acknowledged_connections_do_not_stop_the_stream(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=5)
    gw.close_on("connection_init", [4401])  # refused before the ack
    gw.close_on("subscribe", [1001, 4401, 4401])  # after it: each connection was acknowledged
    daemon = await Daemon.create(make_settings(tmp_path, gw.url))  # max_auth_failures: 3
    run = asyncio.create_task(daemon.run())
    try:
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 5 or run.done())
        assert not run.done(), daemon.runners["main"].stats.last_close
    finally:
        daemon.request_stop()
        async with asyncio.timeout(30):
            assert await run == ExitCode.OK
    assert gw.stats.close_codes_sent[:4] == [4401, 1001, 4401, 4401]
    assert daemon.runners["main"].stats.closes["4401"] == 3
