"""The [filter] table in the pipeline: filtered events never reach the sink nor the DLQ, the
checkpoint moves past them, and they are counted by reason.

Unit level (a StreamPipeline with a real Store and Committer) and end to end (a daemon
in-process against the sandbox, a jsonl sink, /metrics).
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from support import committed, make_settings, newest_offset, read_sink, running, wait_until

from consumer.config import FilterSettings
from consumer.core.events import Event
from consumer.core.filters import EventFilter
from consumer.errors import PermanentSinkError
from consumer.runtime.committer import Committer
from consumer.runtime.pipeline import StreamPipeline
from consumer.sinks.base import PlainSink
from consumer.state.sqlite import SqliteStore as Store

STREAM = "main"
WAIT_S = 5.0


def ev(i: int, key: str, name: str = "UPDATE RESERVATION", hotel: str | None = "H1") -> Event:
    offset, uid = f"{i:05d}", f"u{i}"
    raw = {
        "metadata": {"offset": offset, "uniqueEventId": uid},
        "moduleName": "Reservation",
        "eventName": name,
        "primaryKey": key,
        "hotelId": hotel,
    }
    return Event(offset, uid, name, "Reservation", key, hotel, None, raw)


class RecordingSink(PlainSink):
    name = "recording"

    def __init__(self, poison: set[str] | None = None) -> None:
        self.delivered: list[Event] = []
        self.poison = poison or set()

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        for e in events:
            if e.unique_event_id in self.poison:
                raise PermanentSinkError("rejected", unique_event_id=e.unique_event_id)
        self.delivered.extend(events)


@asynccontextmanager
async def harness(
    tmp_path: Path,
    sink: RecordingSink,
    event_filter: EventFilter | None,
    *,
    workers: int = 3,
    parked: dict[str, str] | None = None,
) -> AsyncIterator[tuple[Store, Committer, StreamPipeline]]:
    store = await Store.open(tmp_path / "state.db")
    committer = Committer(store, sink, max_events=10_000, interval_s=3600.0)
    pipeline = StreamPipeline(
        STREAM,
        sink=sink,
        committer=committer,
        workers=workers,
        queue_size=1000,
        batch_max=50,
        retry_initial_s=0.01,
        retry_max_s=0.02,
        park_key=parked is not None,
        event_filter=event_filter,
    )
    try:
        yield store, committer, pipeline
    finally:
        await pipeline.stop()
        await store.close()


async def drained(pipeline: StreamPipeline) -> None:
    async with asyncio.timeout(WAIT_S):
        await pipeline.drained()


# --- unit level -------------------------------------------------------------------------------


async def test_filtered_events_are_done_without_the_sink_and_counted(tmp_path: Path):
    sink = RecordingSink()
    names = ["NEW RESERVATION", "CANCEL RESERVATION", "CHECK IN", "UPDATE PROFILE"]
    hotels = ["H1", "H2", None]
    events = [ev(i, f"pk{i % 5}", names[i % 4], hotels[i % 3]) for i in range(120)]
    # The newest events are filtered out: the checkpoint must reach them all the same.
    events += [ev(120 + i, "pk0", "CANCEL RESERVATION") for i in range(3)]
    f = EventFilter(
        event_names=["* RESERVATION", "CHECK *"],
        exclude_event_names=["CANCEL *"],
        hotel_ids=["H1", ""],  # "" keeps the events without a hotel
    )
    async with harness(tmp_path, sink, f) as (store, committer, pipeline):
        pipeline.start()
        for e in events:
            await pipeline.put(e)
        await drained(pipeline)
        assert await committer.flush()
        cp = await store.checkpoint(STREAM)
        letters = await store.dead_letters(STREAM)
    passing = [e for e in events if f.reason(e) is None]
    assert 0 < len(passing) < len(events)
    assert Counter(e.unique_event_id for e in sink.delivered) == Counter(
        e.unique_event_id for e in passing
    )
    for key in {e.primary_key for e in events}:  # per-key order of what is left
        got = [e.unique_event_id for e in sink.delivered if e.primary_key == key]
        assert got == [e.unique_event_id for e in passing if e.primary_key == key]
    assert pipeline.filtered == Counter(r for e in events if (r := f.reason(e)) is not None)
    assert set(pipeline.filtered) == {
        "event_name_excluded",
        "event_name_not_included",
        "hotel_id_not_included",
    }
    assert pipeline.delivered == len(passing)
    assert pipeline.duplicates == 0 and pipeline.dead_lettered == 0
    assert letters == []
    assert cp is not None and (cp.offset, cp.unique_event_id) == ("00122", "u122")
    # only delivered events are recorded as processed (a filtered one is not "seen")
    assert cp.processed_count == len(passing)


async def test_a_batch_filtered_out_entirely_moves_the_checkpoint(tmp_path: Path):
    sink = RecordingSink()
    f = EventFilter(exclude_hotel_ids=["*"])
    async with harness(tmp_path, sink, f, workers=1) as (store, committer, pipeline):
        for i in range(10):
            await pipeline.put(ev(i, "pk"))
        pipeline.start()
        await drained(pipeline)
        await committer.flush()
        cp = await store.checkpoint(STREAM)
    assert sink.delivered == []
    assert pipeline.filtered == {"hotel_id_excluded": 10}
    assert cp is not None and cp.offset == "00009"


async def test_no_filter_or_an_empty_one_delivers_everything(tmp_path: Path):
    for i, f in enumerate([None, EventFilter()]):
        sink = RecordingSink()
        (tmp_path / str(i)).mkdir()
        async with harness(tmp_path / str(i), sink, f) as (_, _, pipeline):
            pipeline.start()
            for n in range(20):
                await pipeline.put(ev(n, f"pk{n % 3}"))
            await drained(pipeline)
        assert len(sink.delivered) == 20
        assert not pipeline.filtered


async def test_filtered_event_of_a_parked_resource_is_not_dead_lettered(tmp_path: Path):
    """park-key: once u0 is dead-lettered its resource is parked; u1 (passes the filter) is
    held back in the DLQ as "parked", u2 (filtered out) is dropped and counted, like any
    filtered event: it would never have reached the sink."""
    sink = RecordingSink(poison={"u0"})
    f = EventFilter(exclude_event_names=["CANCEL *"])
    events = [
        ev(0, "k"),
        ev(1, "k"),
        ev(2, "k", "CANCEL RESERVATION"),
        ev(3, "other"),
        ev(4, "other", "CANCEL RESERVATION"),
    ]
    async with harness(tmp_path, sink, f, workers=1, parked={}) as (store, committer, pipeline):
        for e in events:
            await pipeline.put(e)
        pipeline.start()
        await drained(pipeline)
        assert await committer.flush()
        letters = await store.dead_letters(STREAM)
        cp = await store.checkpoint(STREAM)
    assert sorted((d.unique_event_id, d.reason) for d in letters) == [
        ("u0", "sink_rejected"),
        ("u1", "parked"),
    ]
    assert [e.unique_event_id for e in sink.delivered] == ["u3"]
    assert pipeline.filtered == {"event_name_excluded": 2}
    assert cp is not None and cp.offset == "00004"


# --- end to end: a daemon against the sandbox -------------------------------------------------

FILTER = FilterSettings(
    exclude_event_names=("CANCEL *",),
    module_names=("Reservation", "Prof*"),
    hotel_ids=("HOTEL[12]",),
    exclude_hotel_ids=("HOTEL2",),
)


def expected_reason(e: dict[str, Any]) -> str | None:
    """The documented semantics, written out independently of consumer.core.filters."""

    def any_match(value: str | None, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(value or "", p) for p in patterns)

    for field, label in (("eventName", "event_name"), ("moduleName", "module_name")):
        include = getattr(FILTER, f"{label}s")
        exclude = getattr(FILTER, f"exclude_{label}s")
        if any_match(e.get(field), exclude):
            return f"{label}_excluded"
        if include and not any_match(e.get(field), include):
            return f"{label}_not_included"
    if any_match(e.get("hotelId"), FILTER.exclude_hotel_ids):
        return "hotel_id_excluded"
    if FILTER.hotel_ids and not any_match(e.get("hotelId"), FILTER.hotel_ids):
        return "hotel_id_not_included"
    return None


def filtered_samples(text: str) -> dict[str, float]:
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "opera_consumer_events_filtered_total" and s.labels["stream"] == "main"
    }


def sample(text: str, name: str) -> float:
    return next(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and s.labels.get("stream") == "main"
    )


async def test_daemon_delivers_exactly_what_the_filter_passes(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=400)
    # The newest events of the log are filtered out: the checkpoint must still reach them.
    for _ in range(500):
        if expected_reason(gw.events("DEMO")[-1]) is not None:
            break
        gw.append("DEMO", 1)
    truth = gw.events("DEMO")
    assert expected_reason(truth[-1]) is not None
    passing = [e for e in truth if expected_reason(e) is None]
    reasons = Counter(r for e in truth if (r := expected_reason(e)) is not None)
    # the sandbox's data really exercises every branch of this filter
    assert passing and set(reasons) == {
        "event_name_excluded",
        "module_name_not_included",
        "hotel_id_excluded",
        "hotel_id_not_included",
    }
    settings = make_settings(tmp_path, gw.url).model_copy(update={"filter": FILTER})
    newest = newest_offset(gw)
    state = tmp_path / "state.db"
    async with running(settings) as daemon:
        await wait_until(lambda: committed(state, newest))
        assert daemon.metrics_server is not None
        url = f"http://127.0.0.1:{daemon.metrics_server.port}/metrics"
        async with httpx.AsyncClient() as http:
            text = (await http.get(url)).text
        status = next(s for s in daemon.stream_statuses() if s.name == "main")
    assert filtered_samples(text) == {k: float(v) for k, v in reasons.items()}
    assert sample(text, "opera_consumer_events_processed_total") == len(passing)
    assert sample(text, "opera_consumer_events_received_total") == len(truth)
    assert sample(text, "opera_consumer_events_dead_lettered_total") == 0
    assert dict(status.filtered) == reasons
    lines = read_sink(tmp_path / "events.jsonl")
    assert Counter(e["metadata"]["uniqueEventId"] for e in lines) == Counter(
        e["metadata"]["uniqueEventId"] for e in passing
    )
    by_key: dict[str, list[str]] = defaultdict(list)
    for e in passing:
        by_key[e["primaryKey"]].append(e["metadata"]["uniqueEventId"])
    got: dict[str, list[str]] = defaultdict(list)
    for e in lines:
        got[e["primaryKey"]].append(e["metadata"]["uniqueEventId"])
    assert got == by_key
    store = await Store.open(state)
    try:
        assert await store.dead_letters("main") == []
        cp = await store.checkpoint("main")
    finally:
        await store.close()
    last = truth[-1]["metadata"]
    assert cp is not None and (cp.offset, cp.unique_event_id) == (
        last["offset"],
        last["uniqueEventId"],
    )


async def test_without_a_filter_the_family_is_declared_and_empty(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=30)
    newest = newest_offset(gw)
    async with running(make_settings(tmp_path, gw.url)) as daemon:
        await wait_until(lambda: committed(tmp_path / "state.db", newest))
        assert daemon.metrics_server is not None
        url = f"http://127.0.0.1:{daemon.metrics_server.port}/metrics"
        async with httpx.AsyncClient() as http:
            text = (await http.get(url)).text
    assert "# TYPE opera_consumer_events_filtered_total counter" in text
    assert filtered_samples(text) == {}
    assert len(read_sink(tmp_path / "events.jsonl")) == 30
