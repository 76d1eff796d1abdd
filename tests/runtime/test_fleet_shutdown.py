"""A fleet member asked to stop while it hands a stream over: the handover drops the stream from
the daemon's tables while the shutdown walks them. The shutdown must still drain, commit, hand
over and close everything, and exit 0."""

from __future__ import annotations

import asyncio
import uuid

import pysink
import pytest
from pg import sql
from support import stream_config, wait_until

from consumer.config import Settings
from consumer.runtime.daemon import Daemon

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")


async def test_a_handover_during_the_shutdown(sandbox_factory, postgres_dsn, tmp_path) -> None:
    gw = await sandbox_factory(backlog=0, chains=("DEMO", "OTHER"), app_keys=("key2",))
    schema = f"t_{uuid.uuid4().hex[:16]}"
    settings = Settings(
        streams={  # type: ignore[arg-type]
            "a": stream_config(gw.url),
            "b": stream_config(gw.url, chain_code="OTHER", app_key="key2"),
        },
        state={"backend": "postgres", "dsn": postgres_dsn, "schema": schema},  # type: ignore[arg-type]
        sink={"type": "python", "target": "pysink:handle"},  # type: ignore[arg-type]
        pipeline={"workers": 1, "drain_timeout_s": 3.0},  # type: ignore[arg-type]
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
    await asyncio.sleep(0.2)  # the handover is under way
    daemon.request_stop()  # and SIGTERM meanwhile
    async with asyncio.timeout(60):
        assert await task == 0
    rows = await sql(postgres_dsn, "fetch", f'SELECT stream, holder FROM "{schema}".stream_leases')
    assert {r[0]: r[1] for r in rows} == {"a": None, "b": None}  # both handed over
    members = await sql(postgres_dsn, "fetch", f'SELECT member FROM "{schema}".fleet_members')
    assert members == []  # left the fleet
