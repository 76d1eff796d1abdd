"""preflight beside a running fleet member on its host: the member's own metrics port is
taken by an opera-consumer (a WARN), not by "another program" (a FAIL). A member holds no
single-daemon lease, which was all the check asked about."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from support import stream_config, wait_until

from consumer.commands import preflight
from consumer.config import Settings
from consumer.runtime.daemon import Daemon

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")


async def test_a_running_members_metrics_port_is_a_warning(sandbox_factory, postgres_dsn) -> None:
    gw = await sandbox_factory(backlog=0)
    schema = f"t_{uuid.uuid4().hex[:16]}"
    common: dict[str, Any] = {
        "streams": {"a": stream_config(gw.url)},
        "state": {"backend": "postgres", "dsn": postgres_dsn, "schema": schema},
        "sink": {"type": "python", "target": "pysink:handle"},
        "fleet": {"enabled": True, "member": "m1", "lease_ttl_s": 40.0, "renew_interval_s": 0.2},
    }
    daemon = await Daemon.create(Settings(**common, metrics={"port": 0}))
    task = asyncio.create_task(daemon.run())
    try:
        await wait_until(lambda: daemon.metrics_server is not None and daemon.metrics_server.port)
        await wait_until(lambda: "a" in daemon.runners)
        assert daemon.metrics_server is not None
        port = daemon.metrics_server.port
        # The operator runs preflight with the member's config on its host.
        same = Settings(**common, metrics={"port": port, "address": "127.0.0.1"})
        items: list[Any] = []
        await preflight._metrics_address(preflight._Checks(items.append), same)
        (line,) = [i for i in items if i.what == "metrics address"]
        assert line.level == "WARN", line
        assert "m1" in line.detail, line
    finally:
        daemon.request_stop()
        async with asyncio.timeout(60):
            await task
