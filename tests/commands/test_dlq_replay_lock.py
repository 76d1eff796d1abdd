"""One `dlq replay` at a time per state store: two would each read the same dead letters and
deliver them before either resolved them (a daemon running beside them or not). The replay
holds a lock of its own, and reads again, under it, which of its rows are still there."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pg
import pysink
import pytest
from operator_support import PYSINK, write_config
from support import replayed, wait_until

from consumer.config import load_settings
from consumer.core.records import CommitBatch, DeadLetter, DeadLetterRow
from consumer.errors import ReplayRefused
from consumer.state import acquire, acquire_replay, open_store
from consumer.state.sqlite import SqliteStore

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")


def letter(n: int) -> DeadLetter:
    uid = f"u{n}"
    event = {
        "metadata": {"offset": str(n), "uniqueEventId": uid},
        "eventName": "E",
        "primaryKey": f"k{n}",
        "detail": [],
    }
    return DeadLetter(
        stream="main",
        reason="sink_rejected",
        error="no",
        payload=json.dumps(event),
        offset=str(n),
        unique_event_id=uid,
        event_name="E",
        primary_key=f"k{n}",
    )


async def seeded(tmp_path: Path, n: int) -> Path:
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        await store.commit(CommitBatch(dead_letters=[letter(i) for i in range(n)]))
    finally:
        await store.close()
    return write_config(tmp_path, "http://127.0.0.1:9", sink=PYSINK)


async def rows_of(tmp_path: Path) -> list[DeadLetterRow]:
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        return await store.dead_letters()
    finally:
        await store.close()


async def test_a_second_replay_is_refused_while_one_delivers(tmp_path: Path) -> None:
    settings = load_settings(await seeded(tmp_path, 3))
    gate = pysink.GATES["main"] = asyncio.Event()
    first = asyncio.create_task(replayed(settings))
    await wait_until(lambda: pysink.CALLS[0] >= 1)  # the first is in its first write
    try:
        async with asyncio.timeout(10):
            with pytest.raises(ReplayRefused, match="another dlq replay"):
                await replayed(settings)
    finally:
        gate.set()
    outcomes = await first
    assert [o.result for o in outcomes] == ["delivered"] * 3
    assert pysink.delivered_ids() == ["u0", "u1", "u2"]
    assert await rows_of(tmp_path) == []


async def test_rows_a_replay_delivered_since_they_were_listed_are_not_delivered_again(
    tmp_path: Path,
) -> None:
    """The rows are read under the replay's lock: the ones another replay delivered since an
    operator listed them are no longer there."""
    settings = load_settings(await seeded(tmp_path, 3))
    listed = [r.id for r in await rows_of(tmp_path)]
    done = await replayed(settings, listed[:2])  # another replay, meanwhile
    assert [o.result for o in done] == ["delivered"] * 2
    outcomes = await replayed(settings, listed)
    assert [(o.unique_event_id, o.result) for o in outcomes] == [("u2", "delivered")]
    assert pysink.delivered_ids() == ["u0", "u1", "u2"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_the_replay_lock_is_the_replays_alone(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """Not the store's lease: a replay takes it beside a daemon holding the store, and a
    second replay is refused whoever holds the store."""
    state: dict[str, Any] = {}
    if backend == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")  # skips when no server is installed
        state = {"backend": "postgres", "dsn": dsn, "schema": f"t_{uuid.uuid4().hex[:16]}"}
    config = write_config(tmp_path, "http://127.0.0.1:9", sink=PYSINK, state=state)
    st = load_settings(config).state
    daemon = await acquire(st, ["main"])
    try:
        held = await acquire_replay(st)
        try:
            with pytest.raises(ReplayRefused, match=f"another dlq replay \\(pid {os.getpid()}\\)"):
                await acquire_replay(st)
        finally:
            await held.release()
        await (await acquire_replay(st)).release()  # given back
    finally:
        await daemon.release()


async def test_a_replay_whose_lock_was_lost_and_taken_stops_before_its_next_write(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """On PostgreSQL the replay's locks are session locks: the server drops them with their
    sessions (terminated here, as a restart or a cut would), and another replay can take them.
    The first replay finds that before its next write and stops, without committing what it
    delivered since its last commit (it stays in the DLQ, for whoever holds the lock now).
    Before, it delivered and resolved every row beside the newcomer: lost and twice."""
    dsn = request.getfixturevalue("postgres_dsn")  # skips when no server is installed
    state = {"backend": "postgres", "dsn": dsn, "schema": f"t_{uuid.uuid4().hex[:16]}"}
    config = write_config(tmp_path, "http://127.0.0.1:9", sink=PYSINK, state=state)
    settings = load_settings(config)
    store = await open_store(settings.state)
    try:
        await store.commit(CommitBatch(dead_letters=[letter(i) for i in range(3)]))
    finally:
        await store.close()
    gate = pysink.GATES["main"] = asyncio.Event()
    first = asyncio.create_task(replayed(settings))
    await wait_until(lambda: pysink.CALLS[0] >= 1)  # in its first write, holding its locks
    ended = await pg.sql(
        dsn,
        "fetchval",
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name LIKE '%dlq-replay%' AND pid <> pg_backend_pid()",
    )
    assert ended >= 1
    newcomer = await acquire_replay(settings.state)  # another replay, once the lock is free
    try:
        gate.set()
        with pytest.raises(ReplayRefused, match="the replay's lock on the state store was lost"):
            async with asyncio.timeout(30):
                await first
    finally:
        await newcomer.release()
    assert pysink.delivered_ids() == ["u0"]  # the write under way, then no other
    store = await open_store(settings.state)
    try:
        assert [r.unique_event_id for r in await store.dead_letters()] == ["u0", "u1", "u2"]
    finally:
        await store.close()
