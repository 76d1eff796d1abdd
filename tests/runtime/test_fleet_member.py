"""A fleet member's tick (runtime/fleet.py) against a real PostgreSQL state store, with the
daemon's start and stop of streams replaced by the test's own."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from pg import sql
from support import stream_config, wait_until

from consumer.config import Settings
from consumer.errors import StoreError
from consumer.runtime.fleet import Fleet
from consumer.state import open_store


async def test_a_stream_that_fails_to_start_gives_its_lease_back(postgres_dsn: str) -> None:
    """A lease taken for a stream the member could not start (the store failed, say) must not
    stay in its name, renewed forever with nothing consuming: it is released at once, and
    taken again (a new epoch) at a later tick, when the start succeeds."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    settings = Settings(
        streams={
            "a": stream_config("http://127.0.0.1:9"),
            "b": stream_config("http://127.0.0.1:9"),
        },  # type: ignore[dict-item]
        state={"backend": "postgres", "dsn": postgres_dsn, "schema": schema},  # type: ignore[arg-type]
        sink={"type": "webhook", "url": "http://127.0.0.1:9/hook"},  # type: ignore[arg-type]
        fleet={"enabled": True, "member": "m1", "lease_ttl_s": 4.0, "renew_interval_s": 0.05},  # type: ignore[arg-type]
    )
    await (await open_store(settings.state)).close()  # the schema, as the daemon creates it
    started: list[str] = []
    failed: list[str] = []

    async def start(stream: str) -> None:
        if stream == "b" and not failed:
            failed.append(stream)
            raise StoreError("state store unreachable (test)", retriable=True)
        started.append(stream)

    async def stop(stream: str, lost: bool) -> None:
        raise AssertionError(f"nothing to stop: {stream}")

    tasks: list[asyncio.Task[None]] = []

    def spawn(coro: Any, name: str) -> asyncio.Task[None]:
        tasks.append(asyncio.create_task(coro, name=name))
        return tasks[-1]

    fleet = Fleet(settings, start_stream=start, stop_stream=stop, spawn=spawn)
    try:
        runner = asyncio.create_task(fleet.run())
        await wait_until(lambda: sorted(started) == ["a", "b"], timeout=30)
        q = f'SELECT stream, holder, epoch FROM "{schema}".stream_leases ORDER BY stream'
        rows = [tuple(r) for r in await sql(postgres_dsn, "fetch", q)]
        # b: taken (epoch 1), given back when its start failed, taken again (epoch 2).
        assert rows == [("a", "m1", 1), ("b", "m1", 2)]
        assert failed == ["b"] and fleet.epochs == {"a": 1, "b": 2}
    finally:
        runner.cancel()
        await asyncio.gather(runner, *tasks, return_exceptions=True)
        await fleet.table.close()
        await sql(postgres_dsn, "execute", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
