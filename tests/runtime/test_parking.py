"""park-key with a large DLQ (consumer/runtime/parking.py): the parked resources are the DLQ's
rows, asked of the store per batch; the daemon holds a bounded number of them in memory, not
one per row (a DLQ of a million letters was a GB), and the order guarantee is the README's: a
resource's later events go to the DLQ (``parked``) while it has a dead letter, durable or not,
across a restart, until ``dlq replay`` or ``dlq purge`` removed every one of its letters.

Real SqliteStore, Committer and StreamPipeline (a sink rejecting chosen events); the daemon's
test runs the real daemon against the sandbox gateway, the python sink and the dlq commands.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pysink
import pytest
from operator_support import (
    cli,
    dead_letters,
    key_with_events,
    processed_ids,
    settled,
    uid,
    write_config,
)
from support import running, wait_until

from consumer.config import load_settings
from consumer.core.events import Event
from consumer.core.protocol import event_from_raw
from consumer.core.records import CommitBatch, DeadLetter, DeadLetterRow
from consumer.errors import PermanentSinkError, StoreError
from consumer.runtime.committer import Committer
from consumer.runtime.pipeline import StreamPipeline
from consumer.sinks.base import PlainSink
from consumer.state.sqlite import SqliteStore

STREAM = "s"
WAIT_S = 20.0
PARKED = 3000  # resources with a dead letter
PAD = "x" * 600  # long keys (the decoder allows 1 KiB): one reference each would show
HELD_AT_MOST = 128 * 1024  # bytes of keys and answers the parking holds, whatever the DLQ


def key(i: int) -> str:
    return f"k{i:05d}-{PAD}"


def ev(offset: int, event_id: str, primary_key: str) -> Event:
    event = event_from_raw(
        {"metadata": {"offset": str(offset), "uniqueEventId": event_id}, "primaryKey": primary_key}
    )
    assert event is not None
    return event


def held_bytes(parking: object) -> int:
    """What the parking holds in its own containers (each dict, set, list or tuple it keeps,
    with the strings and tuples in them); the committer, store and lock are not its own."""
    seen: set[int] = set()

    def size(o: object) -> int:
        if id(o) in seen:
            return 0
        seen.add(id(o))
        n = sys.getsizeof(o)
        if isinstance(o, dict):
            n += sum(size(k) + size(v) for k, v in o.items())
        elif isinstance(o, tuple | list | set | frozenset):
            n += sum(size(x) for x in o)
        return n

    return sum(size(v) for v in vars(parking).values() if isinstance(v, dict | set | list | tuple))


class Rejecting(PlainSink):
    """Rejects the events of ``reject`` for good (naming each); records the others."""

    name = "rejecting"

    def __init__(self) -> None:
        self.reject: set[str] = set()
        self.got: list[tuple[str, str]] = []  # (uniqueEventId, primaryKey)

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        for e in events:
            if e.unique_event_id in self.reject:
                raise PermanentSinkError("422 rejected", unique_event_id=e.unique_event_id)
        self.got += [(e.unique_event_id, e.primary_key) for e in events]


class Store(SqliteStore):
    """The real store, counting the parking's lookups; ``failing``: that many of them fail
    first (a locked database), retriable."""

    lookups = 0
    failing = 0

    async def parked_among(
        self, stream: str, primary_keys: Sequence[str]
    ) -> tuple[dict[str, str], bool]:
        self.lookups += 1
        if self.failing:
            self.failing -= 1
            raise StoreError("database is locked", retriable=True)
        return await super().parked_among(stream, primary_keys)


@asynccontextmanager
async def life(
    state: Path, sink: Rejecting, workers: int
) -> AsyncIterator[tuple[Store, Committer, StreamPipeline]]:
    """One run of the daemon's parts on ``state``, park-key as the daemon sets it (no parked
    resource loaded at start)."""
    store = await Store.open(state)
    assert isinstance(store, Store)
    committer = Committer(store, sink, max_events=1000, interval_s=3600.0)
    pipeline = StreamPipeline(
        STREAM,
        sink=sink,
        committer=committer,
        workers=workers,
        queue_size=400,
        batch_max=100,
        retry_initial_s=0.01,
        retry_max_s=0.02,
        park_key=True,
    )
    pipeline.start()
    try:
        yield store, committer, pipeline
    finally:
        await pipeline.stop()
        await store.close()


async def put(
    pipeline: StreamPipeline, committer: Committer, events: Sequence[Event], *, commit: bool = True
) -> None:
    """Hand the events over, wait until each is done, and (``commit``) make that durable."""
    for e in events:
        await pipeline.put(e)
    async with asyncio.timeout(WAIT_S):
        await pipeline.drained()
    if commit:
        assert await committer.flush()


def letters_of(rows: list[DeadLetterRow], ids: set[str]) -> list[tuple[str, str, str]]:
    """The dead letters of these events, by event id (workers dead-letter in their own order)."""
    return sorted(
        (r.unique_event_id, r.reason, r.error)
        for r in rows
        if r.unique_event_id is not None and r.unique_event_id in ids
    )


def parked_behind(event_id: str, primary_key: str, behind: str) -> tuple[str, str, str]:
    return (event_id, "parked", f"primaryKey {primary_key} is parked behind {behind}")


@pytest.mark.parametrize("workers", [1, 4])
async def test_thousands_of_parked_resources_are_asked_of_the_store_not_held(
    tmp_path: Path, workers: int
) -> None:
    state = tmp_path / "state.db"
    sink = Rejecting()
    offsets = iter(range(1, 10**6))

    def events(prefix: str, keys: Sequence[str]) -> list[Event]:
        return [ev(next(offsets), f"{prefix}{i}", k) for i, k in enumerate(keys)]

    async with life(state, sink, workers) as (store, committer, pipeline):
        # An empty DLQ: the first batch may ask the store, no later batch asks again.
        free = events("f", [f"free-{i}" for i in range(300)])
        await put(pipeline, committer, free[:100])
        assert store.lookups <= 1
        asked = store.lookups
        await put(pipeline, committer, free[100:])
        assert store.lookups == asked
        assert len(sink.got) == 300

        # Thousands of resources dead-lettered (each one parks its key), durable in the DLQ.
        culprits = events("r", [key(i) for i in range(PARKED)])
        sink.reject = {e.unique_event_id for e in culprits}
        for at in range(0, PARKED, 500):
            await put(pipeline, committer, culprits[at : at + 500])
        assert pipeline.dead_lettered == PARKED
        assert len(await store.dead_letters(STREAM, payloads=False)) == PARKED

        # Their later events are held back behind their durable letters, the oldest resource
        # as the newest; other resources flow.
        first, middle, last = key(0), key(PARKED // 2), key(PARKED - 1)
        later = events("l", [first, middle, last, "free-0"])
        await put(pipeline, committer, later)
        rows = await store.dead_letters(STREAM, payloads=False)
        assert letters_of(rows, {"l0", "l1", "l2"}) == [
            parked_behind("l0", first, "r0"),
            parked_behind("l1", middle, f"r{PARKED // 2}"),
            parked_behind("l2", last, f"r{PARKED - 1}"),
        ]
        assert sink.got[-1] == ("l3", "free-0")  # the only one of them delivered
        # Not one reference per parked resource (the old dict held 3000 x ~700 bytes).
        held = held_bytes(pipeline._parking)
        assert held <= HELD_AT_MOST, f"{held} bytes held for {PARKED} parked resources"

        # Another process resolves letters while the daemon runs: `dlq purge` of every letter
        # of `first`, a `dlq replay` of every one of `middle` (its commit removes them), and a
        # purge of the culprit of `last` alone (its parked event stays: still parked).
        other = await SqliteStore.open(state)
        try:
            by_key: dict[str | None, list[int]] = {}
            for r in rows:
                by_key.setdefault(r.primary_key, []).append(r.id)
            assert await other.purge_dead_letters(by_key[first]) == 2
            await other.commit(CommitBatch(resolved=by_key[middle]))
            assert await other.purge_dead_letters(by_key[last][:1]) == 1
        finally:
            await other.close()
        again = events("a", [first, middle, last])
        await put(pipeline, committer, again)
        assert sorted(sink.got[-2:]) == [("a0", first), ("a1", middle)]
        rows = await store.dead_letters(STREAM, payloads=False)
        assert letters_of(rows, {"a0", "a1", "a2"}) == [parked_behind("a2", last, "l2")]

        # A dead letter not durable yet: the store does not show it, its resource is held all
        # the same, before the commit and after it.
        sink.reject = {"c0"}
        fresh = events("c", ["fresh"] * 3)
        await put(pipeline, committer, fresh[:1], commit=False)
        await put(pipeline, committer, fresh[1:2], commit=False)
        assert not [r for r in await store.dead_letters(STREAM) if r.primary_key == "fresh"]
        assert await committer.flush()
        await put(pipeline, committer, fresh[2:])
        rows = await store.dead_letters(STREAM, payloads=False)
        assert letters_of(rows, {"c0", "c1", "c2"}) == [
            ("c0", "sink_rejected", "422 rejected"),
            parked_behind("c1", "fresh", "c0"),
            parked_behind("c2", "fresh", "c0"),
        ]

    # A restart: nothing loaded, the store asked; still parked, still released.
    async with life(state, sink, workers) as (store, committer, pipeline):
        after = events("n", [last, key(7), first, "free-1"])
        await put(pipeline, committer, after)
        rows = await store.dead_letters(STREAM, payloads=False)
        assert letters_of(rows, {"n0", "n1", "n2"}) == [
            parked_behind("n0", last, "l2"),
            parked_behind("n1", key(7), "r7"),
        ]
        assert sorted(sink.got[-2:]) == [("n2", first), ("n3", "free-1")]
        assert held_bytes(pipeline._parking) <= HELD_AT_MOST


async def test_a_lookup_the_store_fails_is_retried_no_resource_guessed_free(
    tmp_path: Path,
) -> None:
    """A retriable failure of the per-batch lookup (a locked database): the batch waits and
    asks again; the parked resource stays parked, the free one is delivered once."""
    state = tmp_path / "state.db"
    sink = Rejecting()
    async with life(state, sink, 1) as (_, committer, pipeline):
        sink.reject = {"u1"}
        await put(pipeline, committer, [ev(1, "u1", "K")])
    async with life(state, sink, 1) as (store, committer, pipeline):
        store.failing = 2
        await put(pipeline, committer, [ev(2, "u2", "K"), ev(3, "u3", "L")])
        assert (store.failing, store.lookups) == (0, 3)
        rows = await store.dead_letters(STREAM)
    assert [(r.unique_event_id, r.reason) for r in rows] == [
        ("u1", "sink_rejected"),
        ("u2", "parked"),
    ]
    assert sink.got == [("u3", "L")]


# --- the daemon -------------------------------------------------------------------------------


def synthetic_letter(i: int, primary_key: str, event_id: str) -> DeadLetter:
    return DeadLetter(
        stream="main",
        reason="sink_rejected",
        error="422",
        payload="{}",
        offset=str(i),
        unique_event_id=event_id,
        event_name="E",
        primary_key=primary_key,
    )


@pytest.mark.usefixtures("fresh_pysink", "contained_logging")
async def test_the_daemon_loads_no_parked_resource_and_holds_them_until_purged(
    sandbox_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A DLQ of thousands of resources when the daemon starts: none is loaded, the one the
    gateway sends events of is held back behind its letter, and flows once `dlq purge`
    removed its letters while the daemon runs."""
    gw = await sandbox_factory(backlog=300)
    truth = gw.events("DEMO")
    k, key_events = key_with_events(truth)
    config = write_config(
        tmp_path,
        gw.url,
        sink={"type": "python", "target": "pysink:handle"},
        on_permanent_failure="park-key",
    )
    settings = load_settings(config)
    store = await SqliteStore.open(settings.state.path)
    try:
        letters = [synthetic_letter(i, key(i), f"old-{i}") for i in range(PARKED)]
        await store.commit(CommitBatch(dead_letters=[*letters, synthetic_letter(0, k, "old-k")]))
    finally:
        await store.close()
    others = [uid(e) for e in truth if e["primaryKey"] != k]
    async with running(settings) as daemon:
        await wait_until(settled(daemon, "main", len(truth)))
        await wait_until(
            lambda: len(processed_ids(settings.state.path)) >= len(truth), timeout=WAIT_S
        )
        held = held_bytes(daemon.pipelines["main"]._parking)
        assert held <= HELD_AT_MOST, f"{held} bytes held for {PARKED + 1} parked resources"
        rows = [r for r in await dead_letters(settings.state.path) if r.primary_key == k]
        assert [(r.unique_event_id, r.reason) for r in rows] == [
            ("old-k", "sink_rejected"),
            *((uid(e), "parked") for e in key_events),
        ]
        assert all(r.error.endswith(" is parked behind old-k") for r in rows[1:])
        assert Counter(pysink.delivered_ids()) == Counter(others)

        code, _, err = await cli(
            capsys, "dlq", "purge", *(str(r.id) for r in rows), "--config", str(config)
        )
        assert code == 0, err
        new = append_until_key(gw, k)
        await wait_until(settled(daemon, "main", len(truth) + len(new)))
    delivered = pysink.delivered_ids()
    new_of_key = [uid(e) for e in new if e["primaryKey"] == k]
    assert [i for i in delivered if i in set(new_of_key)] == new_of_key  # in order, once
    assert Counter(delivered) == Counter(others + [uid(e) for e in new])
    assert len(await dead_letters(settings.state.path)) == PARKED


def append_until_key(gw: Any, primary_key: str, *, step: int = 20) -> list[dict[str, Any]]:
    """Append events until one is about ``primary_key`` (the sandbox's follow-ups hit recent
    resources); deterministic for the sandbox's seed."""
    new: list[dict[str, Any]] = []
    while len(new) < 2000:
        new += gw.append("DEMO", step)
        if any(e["primaryKey"] == primary_key for e in new):
            return new
    raise AssertionError(f"no new event of primaryKey {primary_key} in {len(new)}")


@pytest.mark.parametrize("removed_by", ["dlq purge", "dlq replay"])
async def test_a_parked_letter_not_durable_yet_keeps_its_resource_parked(
    tmp_path: Path, removed_by: str
) -> None:
    """An event dead-lettered ``parked`` pins its resource until its letter is durable, as a
    refused one does: when the letter it waits behind is removed meanwhile (by another
    process), the resource's later events must still wait behind it. (Found by a review: the
    resource was freed, and a later event delivered while the earlier one was on its way to
    the DLQ.)"""
    state = tmp_path / "state.db"
    sink = Rejecting()
    async with life(state, sink, 1) as (store, committer, pipeline):
        sink.reject = {"r0"}
        await put(pipeline, committer, [ev(1, "r0", "K")])  # refused: K parked, durable
        await put(pipeline, committer, [ev(2, "l0", "K")], commit=False)  # parked, not durable
        (row,) = await store.dead_letters(STREAM)
        other = await Store.open(state)  # the operator's command
        try:
            if removed_by == "dlq purge":
                assert await other.purge_dead_letters([row.id]) == 1
            else:  # its commit removes the row it delivered
                await other.commit(CommitBatch(resolved=[row.id]))
        finally:
            await other.close()
        await put(pipeline, committer, [ev(3, "l1", "K")])
        left = [(r.unique_event_id, r.reason) for r in await store.dead_letters(STREAM)]
    assert left == [("l0", "parked"), ("l1", "parked")]
    assert sink.got == []
