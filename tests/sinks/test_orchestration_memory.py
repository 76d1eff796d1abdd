"""What orchestration holds in memory for the sink: the resources of failed writes kept for
their retries (bounded in bytes, not kept for events the pipeline dead-letters), and the
copies one write hands the sink (one coalesced GET is not parsed again for every event of a
batch at once). A real aiohttp REST API and webhook receiver on loopback, a real pipeline,
SQLite store and webhook sink."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from bus_events import event
from orchestration_support import Tokens, quick_orchestration
from support import make_settings, serving_web

from consumer.config import WebhookSinkSettings
from consumer.core.events import Event
from consumer.core.records import DeadLetter
from consumer.errors import TransientSinkError
from consumer.runtime.committer import Committer
from consumer.runtime.pipeline import StreamPipeline
from consumer.sinks import orchestration
from consumer.sinks.base import PlainSink, Sink
from consumer.sinks.orchestration import OrchestratingSink, Orchestrator
from consumer.sinks.webhook import WebhookSink
from consumer.state.sqlite import SqliteStore

WAIT_S = 60.0  # tracemalloc slows a write of 6 MiB of tiny values to 7 s on a quiet machine


class RestApi:
    """An OHIP-like REST API: each reservation's resource made by ``resource`` from its key
    and how many times it was asked (a new version at each GET); the GETs counted by key."""

    def __init__(self, resource: Callable[[str, int], bytes]) -> None:
        self.resource = resource
        self.gets: Counter[str] = Counter()

    async def reservation(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        self.gets[key] += 1
        body = self.resource(key, self.gets[key])
        return web.Response(body=body, content_type="application/json")

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_get("/rsv/v1/hotels/{hotel}/reservations/{key}", self.reservation)
        async with serving_web(app) as url:
            yield url


class Hook:
    """A webhook receiver with a body limit (413 past ``limit`` bytes, like a proxy's), or
    answering 503 while ``outage``: what it accepted, each event's uniqueEventId and the
    resource's version, in order (bodies are not kept)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.outage = False
        self.accepted: list[tuple[str, Any]] = []

    async def post(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.outage:
            return web.Response(status=503)
        if len(body) > self.limit:
            return web.Response(status=413, text="payload too large")
        docs = json.loads(body)
        for doc in docs if isinstance(docs, list) else [docs]:
            resource = doc.get("resource")
            version = resource.get("version") if isinstance(resource, dict) else None
            self.accepted.append((doc["metadata"]["uniqueEventId"], version))
        return web.Response(status=200)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/hook", self.post)
        async with serving_web(app) as url:
            yield url + "/hook"


def sized(size: int) -> Callable[[str, int], bytes]:
    """Resources of about ``size`` bytes, with their key and version."""

    def make(key: str, version: int) -> bytes:
        return json.dumps({"id": key, "version": version, "blob": "x" * size}).encode()

    return make


def orchestrator(
    tmp_path: Path, http: aiohttp.ClientSession, rest_url: str, **over: Any
) -> Orchestrator:
    settings = make_settings(tmp_path, "http://127.0.0.1:9")
    orch = quick_orchestration(rest_url, **over)
    return Orchestrator(orch, http, {"main": (settings.streams["main"], Tokens())})


def webhook(tmp_path: Path, http: aiohttp.ClientSession, url: str, batch_size: int) -> WebhookSink:
    settings = make_settings(
        tmp_path,
        "http://127.0.0.1:9",
        sink={"type": "webhook", "url": url, "timeout_s": 10.0, "batch_size": batch_size},
    )
    assert isinstance(settings.sink, WebhookSinkSettings)
    return WebhookSink(settings.sink, http)


def unsent_bytes(sink: OrchestratingSink) -> int:
    """The resource bytes the sink keeps for the retries of failed writes."""
    return sum(len(kept[1] or b"") for kept in sink._unsent.values())


async def deliver(
    tmp_path: Path, sink: Sink, events: Sequence[Event], *, batch_max: int = 50
) -> tuple[list[DeadLetter], StreamPipeline]:
    """``events`` put as one batch (of up to ``batch_max``) through a real pipeline (one
    worker) and SQLite store: the dead letters once all is done."""
    store = await SqliteStore.open(tmp_path / "state.db")
    pipeline: StreamPipeline | None = None
    try:
        await sink.open(await store.sink_state(sink.name))
        committer = Committer(store, sink, max_events=10_000, interval_s=3600.0)
        pipeline = StreamPipeline(
            "main",
            sink=sink,
            committer=committer,
            workers=1,
            queue_size=1000,
            queue_max_bytes=64 * 1024 * 1024,
            batch_max=batch_max,
            retry_initial_s=0.01,
            retry_max_s=0.02,
        )
        for ev in events:  # the worker not started yet: one queue, one batch
            await pipeline.put(ev)
        pipeline.start()
        async with asyncio.timeout(WAIT_S):
            await pipeline.drained()
        assert await committer.flush()
        return await store.dead_letters(), pipeline
    finally:
        if pipeline is not None:
            await pipeline.stop()
        await store.close()


# --- the resources of failed writes, kept for their retries ----------------------------------


# aiohttp warns when a body over 1 MiB is POSTed from bytes
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("batch_size", [1, 4], ids=["named", "split"])
async def test_the_resources_of_dead_lettered_events_are_not_kept(
    tmp_path: Path, batch_size: int
) -> None:
    """A receiver with a body limit answers 413 to the events whose resource is large: each is
    dead-lettered, named by the webhook (one per POST) or found by the pipeline's split (a
    chunk of four), and never written again. Their entries of the failed writes, with the
    resource bytes, were kept for a retry that never comes: up to UNSENT_MAX (2,000) of them,
    of up to 16 MiB each."""
    big = {"BIG3", "BIG6"}
    api = RestApi(lambda key, v: sized(1024 * 1024 if key in big else 100)(key, v))
    hook = Hook(limit=512 * 1024)
    events = [event(i, key=f"BIG{i}" if f"BIG{i}" in big else f"R{i}") for i in range(1, 9)]
    async with (
        api.running() as rest_url,
        hook.running() as hook_url,
        aiohttp.ClientSession() as http,
    ):
        sink = OrchestratingSink(
            webhook(tmp_path, http, hook_url, batch_size),
            orchestrator(tmp_path, http, rest_url),
        )
        try:
            dead, _ = await deliver(tmp_path, sink, events)
            kept = sorted(uid for _, uid in sink._unsent)
            kept_bytes = unsent_bytes(sink)
        finally:
            await sink.close()
    assert sorted(d.unique_event_id for d in dead) == ["u00003", "u00006"]
    assert all("HTTP 413" in d.error for d in dead)
    assert [uid for uid, _ in hook.accepted] == [f"u0000{i}" for i in (1, 2, 4, 5, 7, 8)]
    assert kept == [] and kept_bytes == 0, f"{kept_bytes} bytes kept for {kept}"
    # The others were sent again with what was fetched for them: one GET per resource.
    assert api.gets == Counter({ev.primary_key: 1 for ev in events})


async def test_what_failed_writes_keep_is_bounded_in_bytes_and_nothing_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes failing in a long receiver outage (their retries may never come: the stream
    stopped, the events dead-lettered as parked behind an older one of their reservation)
    kept every resource they sent, bounded in count only. Within UNSENT_MAX_BYTES the newest
    are kept; one let go is fetched again at its write, and delivered."""
    resource = 256 * 1024
    monkeypatch.setattr(
        orchestration, "UNSENT_MAX_BYTES", 3 * resource + resource // 2, raising=False
    )
    api = RestApi(sized(resource))
    hook = Hook(limit=64 * 1024 * 1024)
    hook.outage = True
    events = [event(i, key=f"R{i}") for i in range(1, 9)]
    async with (
        api.running() as rest_url,
        hook.running() as hook_url,
        aiohttp.ClientSession() as http,
    ):
        sink = OrchestratingSink(
            webhook(tmp_path, http, hook_url, 1), orchestrator(tmp_path, http, rest_url)
        )
        await sink.open(None)
        for ev in events:
            with pytest.raises(TransientSinkError, match="HTTP 503"):
                await sink.write("main", [ev])
        kept = [uid for _, uid in sink._unsent]
        kept_bytes = unsent_bytes(sink)
        hook.outage = False
        for ev in events:  # the retries, each writes its event
            await sink.write("main", [ev])
        after = dict(sink._unsent)
        hook.outage = True  # and one failing again when the sink closes
        with pytest.raises(TransientSinkError):
            await sink.write("main", [event(9, key="R9")])
        await sink.close()
        closed = dict(sink._unsent)
    assert kept_bytes <= orchestration.UNSENT_MAX_BYTES, f"{kept_bytes} bytes kept for {kept}"
    assert kept == ["u00006", "u00007", "u00008"]  # the newest
    # Every event delivered once: those kept with what they were sent (version 1), those let
    # go fetched again (version 2).
    assert hook.accepted == [(f"u0000{i}", 2 if i <= 5 else 1) for i in range(1, 9)]
    assert api.gets == Counter({f"R{i}": 2 if i <= 5 else 1 for i in range(1, 10)})
    assert after == {}
    assert closed == {}, "close() let go of what failed writes kept"


# --- what one write hands the sink -----------------------------------------------------------


class _Measuring(PlainSink):
    """An inner sink that records each write: its events' ids, the heap at the call (by
    tracemalloc) and whether each event has a resource object of its own."""

    name = "measuring"

    def __init__(self) -> None:
        self.writes: list[list[str]] = []
        self.heap: list[int] = []
        self.own_objects = True
        self.resources: list[Any] = []

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        self.heap.append(tracemalloc.get_traced_memory()[0])
        self.writes.append([ev.unique_event_id for ev in events])
        self.own_objects &= len({id(ev.resource) for ev in events}) == len(events)
        self.resources.append(events[0].resource[:3])


async def test_one_coalesced_resource_is_not_parsed_for_the_whole_batch_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of updates to one reservation arrives as one batch: one GET, but each event
    was handed its own object parsed from it, all in one write: batch_max (200) times the
    parsed resource (several times its text; the text up to 16 MiB) at once. The sink now
    gets the batch in parts of at most WRITE_RESOURCE_BYTES of resource text, each event
    still with its own object, in order."""
    budget = 2 * 1024 * 1024
    monkeypatch.setattr(orchestration, "WRITE_RESOURCE_BYTES", budget, raising=False)
    n = 40
    text = json.dumps(["x" * 1000] * 1000).encode()  # 1 MB, and as much once parsed
    api = RestApi(lambda key, v: text)
    inner = _Measuring()
    events = [event(i, key="GROUP-BLOCK-1") for i in range(1, n + 1)]
    async with api.running() as rest_url, aiohttp.ClientSession() as http:
        orch = orchestrator(tmp_path, http, rest_url, coalesce_ms=60e3)
        sink = OrchestratingSink(inner, orch)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await sink.write("main", events)
        finally:
            tracemalloc.stop()
        await sink.close()
    assert api.gets == Counter({"GROUP-BLOCK-1": 1})  # coalesced: one GET for the burst
    # At each write: its part's parsed copies (~2 MB here); all at once they were ~40 MB.
    grown = max(inner.heap) - before
    assert grown < 16 * 1024 * 1024, f"heap +{grown / 2**20:.0f} MiB at a write"
    assert [uid for ids in inner.writes for uid in ids] == [ev.unique_event_id for ev in events]
    assert max(len(ids) for ids in inner.writes) <= budget // len(text)
    assert inner.own_objects  # a handler changing one event's resource changes no other's
    assert inner.resources == [["x" * 1000] * 3] * len(inner.writes)


class _Storing(PlainSink):
    """A handler that stores each event as it goes, and fails at ``failing`` before storing
    it: with a TransientSinkError the first time (a timeout), or a ValueError every time (an
    event it cannot store), naming no event and saying nothing of those it stored."""

    name = "python"

    def __init__(self, failing: str, error: str) -> None:
        self.failing, self.error = failing, error
        self.stored: list[str] = []
        self.failed = 0

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        for ev in events:
            if ev.unique_event_id == self.failing and (self.error == "value" or not self.failed):
                self.failed += 1
                if self.error == "value":
                    raise ValueError("cannot store this one")
                raise TransientSinkError("downstream timed out")
            self.stored.append(ev.unique_event_id)


@pytest.mark.parametrize("error", ["transient", "value"])
async def test_a_write_failing_in_a_later_part_delivers_the_parts_before_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    """The parts the sink took before one failed are delivered (SinkError.delivered): the
    pipeline neither writes them again nor dead-letters them; only the rest is retried, or
    split to find the culprit."""
    resource = 64 * 1024
    monkeypatch.setattr(orchestration, "WRITE_RESOURCE_BYTES", 2 * resource + 1024, raising=False)
    api = RestApi(sized(resource))
    inner = _Storing("u00005", error)  # the first of the third part
    events = [event(i, key=f"R{i}") for i in range(1, 9)]
    async with api.running() as rest_url, aiohttp.ClientSession() as http:
        sink = OrchestratingSink(inner, orchestrator(tmp_path, http, rest_url))
        try:
            dead, pipeline = await deliver(tmp_path, sink, events)
        finally:
            await sink.close()
    ids = [ev.unique_event_id for ev in events]
    if error == "transient":
        assert dead == [] and inner.stored == ids
        assert pipeline.delivered == 8
    else:
        [letter] = dead
        assert letter.unique_event_id == "u00005" and "cannot store this one" in letter.error
        assert inner.stored == [uid for uid in ids if uid != "u00005"]
        assert pipeline.delivered == 7
    assert api.gets == Counter({ev.primary_key: 1 for ev in events})


class _Recording(PlainSink):
    """An inner sink that keeps each write's events' ids and resources' ids (not the
    resources)."""

    name = "recording"

    def __init__(self) -> None:
        self.writes: list[list[str]] = []

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        assert all(ev.resource["id"] == ev.primary_key for ev in events)
        self.writes.append([ev.unique_event_id for ev in events])


class _Streaming:
    """A REST API answering each reservation with about ``size`` bytes of JSON, sent in small
    chunks (the server holds little of it); ``BAD`` is answered 400. The GETs counted by key."""

    CHUNK = 64 * 1024

    def __init__(self, size: int) -> None:
        self.chunks = size // self.CHUNK
        self.gets: Counter[str] = Counter()

    async def reservation(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        self.gets[key] += 1
        if key == "BAD":
            return web.Response(status=400, text="no such reservation")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(json.dumps({"id": key})[:-1].encode() + b', "blob": "')
        for _ in range(self.chunks):
            await resp.write(b"x" * self.CHUNK)
        await resp.write(b'"}')
        await resp.write_eof()
        return resp

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_get("/rsv/v1/hotels/{hotel}/reservations/{key}", self.reservation)
        async with serving_web(app) as url:
            yield url


async def test_a_batch_of_large_resources_is_fetched_a_part_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of 150 events, each about another resource of 1 MiB: every resource was fetched
    before the first part was written, the batch's 150 MiB held at once (200 of 16 MiB: 3.2
    GB). Each part is now fetched as it is written: the heap holds about a part and the GETs
    ahead of it. Every event is delivered once, in order, each resource fetched once; the
    failure of one in a later part dead-letters that event alone, after the parts before it."""
    part = 4 * 1024 * 1024
    monkeypatch.setattr(orchestration, "WRITE_RESOURCE_BYTES", part, raising=False)
    resource = 1024 * 1024
    api = _Streaming(resource)
    keys = [f"R{i}" if i != 120 else "BAD" for i in range(1, 151)]
    events = [event(i, key=key) for i, key in enumerate(keys, start=1)]
    inner = _Recording()
    async with api.running() as rest_url, aiohttp.ClientSession() as http:
        sink = OrchestratingSink(inner, orchestrator(tmp_path, http, rest_url))
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            dead, pipeline = await deliver(tmp_path, sink, events, batch_max=200)
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
            await sink.close()
    total = len(events) * resource
    assert peak < total // 4, f"heap +{peak / 2**20:.0f} MiB for {total / 2**20:.0f} MiB fetched"
    [letter] = dead
    assert letter.unique_event_id == "u00120" and "HTTP 400" in letter.error
    written = [uid for ids in inner.writes for uid in ids]
    assert written == [ev.unique_event_id for ev in events if ev.primary_key != "BAD"]
    assert max(len(ids) for ids in inner.writes) <= part // resource
    assert pipeline.delivered == 149
    assert api.gets == Counter(keys)  # each resource once, the others' not again after BAD


class _Counting(PlainSink):
    """An inner sink that keeps the ids of the events it is handed (not their resources)."""

    name = "counting"

    def __init__(self) -> None:
        self.written: list[str] = []

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        self.written += [ev.unique_event_id for ev in events]


@pytest.mark.parametrize("mib", [1, 6, 12])
async def test_each_resource_of_a_batch_is_fetched_once_whatever_its_size(
    tmp_path: Path, mib: int
) -> None:
    """A batch of 24 events, each about its own resource of 1, 6 or 12 MiB (within
    MAX_RESOURCE_BYTES). Each part started FETCH_WINDOW (16) GETs, its guess of their size 0
    until one answered; those beyond the part were held, and past HELD_MAX_BYTES the oldest
    held, the very next ones needed, were let go: fetched again at the next part, which
    started 16 more (12 MiB: 178 GETs for 24 resources, up to 12 of one, against rate_per_s
    and OHIP's quota; the heap +638 MiB). The GETs ahead of a part are now no more than its
    room holds at the largest resource seen, and what is held ahead is the next part's."""
    size = mib * 1024 * 1024
    api = RestApi(sized(size))
    events = [event(i, key=f"R{i}") for i in range(1, 25)]
    inner = _Counting()
    async with api.running() as rest_url, aiohttp.ClientSession() as http:
        sink = OrchestratingSink(inner, orchestrator(tmp_path, http, rest_url))
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            dead, pipeline = await deliver(tmp_path, sink, events, batch_max=200)
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
            await sink.close()
    assert not dead and pipeline.delivered == len(events)
    assert inner.written == [ev.unique_event_id for ev in events]
    assert api.gets == Counter({ev.primary_key: 1 for ev in events}), dict(api.gets)
    # A part's text and its parsed objects, the GETs ahead of it (its room, a resource
    # besides), and both ends of those in flight (the server is this process): the batch's
    # resources are never all held (6 MiB: +269 MiB, 12 MiB: +641 MiB before).
    bound = 4 * orchestration.WRITE_RESOURCE_BYTES + 4 * size
    assert peak < bound, f"heap +{peak / 2**20:.0f} MiB, more than {bound / 2**20:.0f} MiB"


# --- what a resource's text becomes once parsed ----------------------------------------------


def ohip_reservation(key: str, nights: int, guests: int) -> dict[str, Any]:
    """A reservation shaped like OHIP's (``GET .../reservations/{id}``): deeply nested, small
    values, a rate and a package consumption per night, a profile per guest."""

    def night(i: int) -> dict[str, Any]:
        day = f"2024-{i // 28 % 12 + 1:02d}-{i % 28 + 1:02d}"
        return {
            "rates": {
                "rate": [
                    {
                        "base": {"amountBeforeTax": 120.5 + i % 7, "currencyCode": "USD"},
                        "startDate": day,
                        "endDate": day,
                        "shareDistributionInstruction": "Full",
                    }
                ]
            },
            "guestCounts": {"adults": 2, "children": 0},
            "roomType": "KING",
            "ratePlanCode": "BAR",
            "marketCode": "LEISURE",
            "sourceCode": "WEB",
            "numberOfUnits": 1,
            "pseudoRoom": False,
            "start": day,
            "end": day,
            "total": {"amountBeforeTax": 120.5 + i % 7},
        }

    def guest(g: int) -> dict[str, Any]:
        return {
            "profileInfo": {
                "profileIdList": [{"id": str(1000 + g), "type": "Profile"}],
                "profile": {
                    "customer": {
                        "personName": [
                            {"givenName": "Anne", "surname": f"Smith{g}", "nameType": "Primary"}
                        ],
                        "language": "E",
                    },
                    "addresses": {
                        "addressInfo": [
                            {
                                "address": {
                                    "addressLine": ["1 Main St", "", ""],
                                    "cityName": "Springfield",
                                    "postalCode": "12345",
                                    "country": {"code": "US"},
                                    "type": "HOME",
                                    "primaryInd": True,
                                },
                                "id": str(50 + g),
                                "type": "Address",
                            }
                        ]
                    },
                    "emails": {"emailInfo": [{"email": {"emailAddress": f"g{g}@example.com"}}]},
                    "profileType": "Guest",
                    "statusCode": "Active",
                },
            },
            "primary": g == 0,
        }

    return {
        "reservations": {
            "reservation": [
                {
                    "reservationIdList": [
                        {"id": key, "type": "Reservation"},
                        {"id": f"C{key}", "type": "Confirmation"},
                    ],
                    "roomStay": {
                        "roomRates": [night(i) for i in range(nights)],
                        "guarantee": {"guaranteeCode": "CC", "onHold": False},
                        "arrivalDate": "2024-01-01",
                        "departureDate": "2024-12-31",
                    },
                    "reservationGuests": [guest(g) for g in range(guests)],
                    "packages": [
                        {
                            "packageCode": "BRKF",
                            "amount": {"amount": 25.0, "currencyCode": "USD"},
                            "consumptionDetails": [
                                {"consumptionDate": f"D{i}", "quantity": 2} for i in range(nights)
                            ],
                        }
                    ],
                    "comments": [{"comment": {"text": {"value": "Late arrival, high floor."}}}],
                    "hotelId": "HOTEL1",
                    "reservationStatus": "Reserved",
                    "createDateTime": "2024-01-01 10:00:00.0",
                }
            ]
        },
        "links": [{"href": f"https://gw/rsv/v1/reservations/{key}", "rel": "self"}],
    }


def compact(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def tiny_values(size: int) -> bytes:
    """A JSON array of about ``size`` bytes of empty arrays: some 22 times that once parsed."""
    return b"[" + b"[]," * (size // 3 - 1) + b"[]]"


class _Keeping(PlainSink):
    """An inner sink that keeps each write's events' ids, each event's resource compared with
    what the REST API made (not the resource), and the heap's size at each write."""

    name = "keeping"

    def __init__(self, expected: Callable[[Event], bool]) -> None:
        self.expected = expected
        self.writes: list[list[str]] = []
        self.intact: list[bool] = []
        self.heap: list[int] = []

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        self.heap.append(tracemalloc.get_traced_memory()[0])
        self.writes.append([ev.unique_event_id for ev in events])
        self.intact += [self.expected(ev) for ev in events]


async def test_a_resource_of_tiny_values_is_dead_lettered_unparsed(tmp_path: Path) -> None:
    """One answer of 8 MiB (within MAX_RESOURCE_BYTES) made of empty arrays was parsed to be
    checked, and again for the sink: some 190 MiB of objects (22 times its text) for one
    event, as many times over as a part held such resources. Its objects are now estimated
    from its text before it is parsed: beyond MAX_RESOURCE_OBJECTS it is refused, unparsed,
    and its event dead-lettered with why, as a resource too large is; the reservations of the
    batch, up to a year of nights and 30 guests, are written whole."""
    dense = tiny_values(8 * 1024 * 1024)
    sizes = {"R1": (3, 1), "R2": (365, 30), "R3": (30, 4), "R4": (120, 2)}
    docs = {key: ohip_reservation(key, n, g) for key, (n, g) in sizes.items()}
    texts = {key: compact(doc) for key, doc in docs.items()}
    api = RestApi(lambda key, v: dense if key == "DENSE" else texts[key])
    keys = ["R1", "R2", "DENSE", "R3", "R4"]
    events = [event(i, key=key) for i, key in enumerate(keys, start=1)]
    inner = _Keeping(lambda ev: bool(ev.resource == docs.get(ev.primary_key)))
    async with api.running() as rest_url, aiohttp.ClientSession() as http:
        sink = OrchestratingSink(inner, orchestrator(tmp_path, http, rest_url))
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            dead, pipeline = await deliver(tmp_path, sink, events)
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
            await sink.close()
    [letter] = dead
    assert letter.unique_event_id == "u00003" and letter.reason == "sink_rejected"
    assert "/reservations/DENSE" in letter.error and "too dense to read" in letter.error
    written = [uid for ids in inner.writes for uid in ids]
    assert written == ["u00001", "u00002", "u00004", "u00005"] and all(inner.intact)
    assert pipeline.delivered == 4
    assert api.gets == Counter(keys)  # each once: the others' not again after the dead letter
    # The answer's text, as read and as served (the server is this process); no objects.
    assert peak < 4 * len(dense), f"heap +{peak / 2**20:.0f} MiB"


async def test_a_part_holds_its_resources_objects_not_only_their_text(tmp_path: Path) -> None:
    """Resources of 1 MiB of tiny values (22 MiB each once parsed: within what one resource
    may weigh, so written): a part held up to WRITE_RESOURCE_BYTES (16 MiB) of their text,
    all parsed at once for its write (6 of them: +140 MiB; 16: +360 MiB). A resource now
    takes of a part's room its objects' estimate over OBJECTS_PER_BYTE when that is more than
    its text: the objects of a write stay within OBJECTS_PER_BYTE times the part's room,
    whatever the resources are made of; each still written whole, in order, fetched once."""
    text = tiny_values(1024 * 1024)
    items = len(json.loads(text))
    api = RestApi(lambda key, v: text)
    events = [event(i, key=f"R{i}") for i in range(1, 7)]
    inner = _Keeping(lambda ev: isinstance(ev.resource, list) and len(ev.resource) == items)
    async with api.running() as rest_url, aiohttp.ClientSession() as http:
        sink = OrchestratingSink(inner, orchestrator(tmp_path, http, rest_url))
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            dead, pipeline = await deliver(tmp_path, sink, events)
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
            await sink.close()
    assert not dead and pipeline.delivered == len(events)
    written = [uid for ids in inner.writes for uid in ids]
    assert written == [ev.unique_event_id for ev in events] and all(inner.intact)
    assert api.gets == Counter({ev.primary_key: 1 for ev in events})
    bound = 64 * 1024 * 1024  # OBJECTS_PER_BYTE (4) times WRITE_RESOURCE_BYTES (16 MiB)
    assert peak < bound, f"heap +{peak / 2**20:.0f} MiB, more than {bound / 2**20:.0f} MiB"


# Texts made of one kind of value, each the worst of its kind for the heap per byte of text,
# and OHIP resources; a parse of each (its peak) stays within OBJECTS_PER_BYTE times what the
# resource weighs, as a part's room counts it. The string widened to 4 bytes a character
# (one character beyond the BMP) is bounded by its length, besides the text decoded for the
# parse (as much again).
_N = 50_000
SHAPES: dict[str, tuple[bytes, int]] = {
    "empty arrays": (b"[" + b"[]," * _N + b"[]]", 0),
    "empty objects": (b"[" + b"{}," * _N + b"{}]", 0),
    "arrays of one": (b"[" + b"[0]," * _N + b"[0]]", 0),
    "arrays in arrays": (b"[" + b"[[0]]," * _N + b"[[0]]]", 0),
    "objects of one key": (b"[" + b'{"":0},' * _N + b'{"":0}]', 0),
    "objects of their own key": (b"[" + b",".join(b'{"k%d":0}' % i for i in range(_N)) + b"]", 0),
    "one object of distinct keys": (
        b"{" + b",".join(b'"k%d":0' % i for i in range(_N)) + b"}",
        0,
    ),
    "short strings": (b"[" + b'"ab",' * _N + b'"ab"]', 0),
    "distinct strings": (b"[" + b",".join(b'"s%d"' % i for i in range(_N)) + b"]", 0),
    "floats": (b"[" + b"1e9," * _N + b"1e9]", 0),
    "ints": (b"[" + b"300," * _N + b"300]", 0),
    "big ints": (b"[" + b"1234567890123456789012345678901234567890," * _N + b"1]", 0),
    "widened string": (b'["\\ud83d\\ude00' + b"a" * (8 * _N) + b'"]', 1),
    "OHIP reservation": (compact(ohip_reservation("R1", 30, 2)), 0),
    "OHIP reservation, a year": (compact(ohip_reservation("R2", 365, 30)), 0),
    "OHIP reservation, indented": (json.dumps(ohip_reservation("R3", 30, 2), indent=2).encode(), 0),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_what_a_resource_weighs_covers_its_parse(shape: str) -> None:
    text, decoded = SHAPES[shape]
    weight = orchestration.weight_of(text)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        parsed = json.loads(text)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    del parsed
    assert weight >= len(text)
    bound = orchestration.OBJECTS_PER_BYTE * weight + decoded * 4 * len(text)
    assert peak <= bound, f"{shape}: parsed {peak / len(text):.1f} x its text, weighs {weight}"
    if shape.startswith("OHIP"):  # a legitimate resource: a few MiB of them fit in a part
        assert weight < 4 * len(text)
