"""A single daemon on a PostgreSQL state store with a jsonl sink: an operator's `offset set`
while the daemon's lease was lost moves a stream's epoch, and the next commit is refused for it
(Fenced, OPERATOR_FENCE; the daemon then stops, exit 1). The commit of the rest carried the
sink's position, which covers the refused stream's lines too: they became committed while the
stream's ids and checkpoint were dropped, and the restart wrote its events a second time. Now
nothing more is committed: the restart cuts the file back to the last commit and every stream
replays from its checkpoint. Real JsonlSink, Committer and PostgreSQL state store (tests/pg.py)
(found by a review).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pg import PostgresServer, sql
from pydantic import SecretStr

from consumer.config import StateSettings
from consumer.core.events import Event
from consumer.core.protocol import event_from_raw
from consumer.core.records import Fence
from consumer.core.watermark import Position
from consumer.runtime.assembly import open_sink
from consumer.runtime.committer import Committer
from consumer.sinks.jsonl import JsonlSink
from consumer.state import StateStore, open_store


def event(stream: str, i: int) -> Event:
    uid = f"{stream}-u{i}"
    ev = event_from_raw({"metadata": {"offset": f"{i:04d}", "uniqueEventId": uid}})
    assert ev is not None
    return ev


@pytest.fixture
async def pg_store(postgres_server: PostgresServer) -> AsyncIterator[tuple[StateStore, str, str]]:
    dsn, schema = postgres_server.dsn(), f"t_{uuid.uuid4().hex[:16]}"
    store = await open_store(StateSettings(backend="postgres", dsn=SecretStr(dsn), schema=schema))
    try:
        yield store, dsn, schema
    finally:
        await store.close()
        await sql(dsn, "execute", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def run(store: StateStore, path: Path, fence: Fence | None) -> tuple[JsonlSink, Committer]:
    sink = JsonlSink(path)
    await open_sink(sink, store, "state")
    committer = Committer(store, sink, max_events=10_000, interval_s=3600.0)
    if fence is not None:
        committer.configure_fence(lambda: fence, lambda streams: None)
    return sink, committer


async def deliver(committer: Committer, sink: JsonlSink, stream: str, ev: Event) -> None:
    if await committer.seen(stream, [ev.unique_event_id]):
        return  # a duplicate: skipped, as the pipeline does
    seq = committer.arrived(stream, Position(ev.offset, ev.unique_event_id))
    await sink.write(stream, [ev])
    committer.processed(stream, [ev.unique_event_id], [seq])


@pytest.mark.parametrize("others", ["another stream's work", "none"])
async def test_a_refused_streams_lines_are_never_committed(
    pg_store: tuple[StateStore, str, str], tmp_path: Path, others: str
) -> None:
    store, dsn, schema = pg_store
    path = tmp_path / "events.jsonl"
    sink, committer = await run(store, path, Fence("", await store.stream_epochs(["a", "b"])))
    try:
        await deliver(committer, sink, "b", event("b", 1))
        assert await committer.flush()
        committed = await store.sink_state(sink.name)
        await deliver(committer, sink, "a", event("a", 1))
        if others == "another stream's work":
            await deliver(committer, sink, "b", event("b", 2))
        await sql(
            dsn,
            "execute",
            f'UPDATE "{schema}".stream_leases SET epoch = epoch + 1 WHERE stream = $1',
            "a",
        )
        assert not await committer.flush()
        assert await store.sink_state(sink.name) == committed
        assert await store.seen("a", ["a-u1"]) == set()
    finally:
        await sink.close()
    # The restart (the daemon exits 1): the file cut back to the last commit, each stream
    # replayed from its checkpoint.
    sink, committer = await run(store, path, None)
    try:
        for stream, i in [("a", 1), ("b", 1), ("b", 2)]:
            await deliver(committer, sink, stream, event(stream, i))
        assert await committer.flush()
    finally:
        await sink.close()
    lines = [json.loads(x)["metadata"]["uniqueEventId"] for x in path.read_bytes().splitlines()]
    assert sorted(lines) == ["a-u1", "b-u1", "b-u2"]
