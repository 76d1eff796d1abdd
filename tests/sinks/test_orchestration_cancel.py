"""A GET shared by the writes of two streams (coalescing) whose starter is stopped (a fleet
handover or a loss cancels that stream's workers): the other write was handed the starter's
CancelledError, which it was never asked for. Its pipeline took it for a retry of the whole
batch, writing again the events the inner sink had already taken (twice in the jsonl file).
A real aiohttp REST API on loopback, real pipelines, SQLite store and jsonl sink."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from bus_events import event
from orchestration_support import Tokens, quick_orchestration
from support import make_settings, serving_web

from consumer.runtime.committer import Committer
from consumer.runtime.pipeline import StreamPipeline
from consumer.sinks.jsonl import JsonlSink
from consumer.sinks.orchestration import OrchestratingSink, Orchestrator
from consumer.state.sqlite import SqliteStore

WAIT_S = 20.0
SHARED = "SHARED"  # the reservation both streams' events name: its GETs wait for release


class RestApi:
    """Each reservation's JSON; the GETs of :data:`SHARED` held until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.gets: Counter[str] = Counter()

    async def reservation(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        self.gets[key] += 1
        if key == SHARED:
            await self.release.wait()
        return web.json_response({"reservationId": key})

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_get("/rsv/v1/hotels/{hotel}/reservations/{key}", self.reservation)
        async with serving_web(app, shutdown_timeout=0.1) as url:
            try:
                yield url
            finally:
                self.release.set()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition()``, :data:`WAIT_S` at most (then fail naming ``what``)."""
    try:
        async with asyncio.timeout(WAIT_S):
            while not condition():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"waited {WAIT_S} s in vain for {what}") from None


def orchestrator(tmp_path: Path, http: aiohttp.ClientSession, rest_url: str) -> Orchestrator:
    settings = make_settings(tmp_path, "http://127.0.0.1:9")
    orch = quick_orchestration(rest_url)  # a GET is shared while in flight only
    stream = settings.streams["main"]
    return Orchestrator(orch, http, {"a": (stream, Tokens()), "b": (stream, Tokens())})


def pipeline(name: str, sink: OrchestratingSink, committer: Committer) -> StreamPipeline:
    return StreamPipeline(
        name,
        sink=sink,
        committer=committer,
        workers=1,
        queue_size=1000,
        queue_max_bytes=16 * 1024 * 1024,
        batch_max=50,
        retry_initial_s=0.01,
        retry_max_s=0.02,
    )


async def test_a_stopped_streams_shared_get_leaves_the_other_streams_write_whole(
    tmp_path: Path,
) -> None:
    """Stream a's write starts the GET of SHARED; stream b's batch (OTHER, then SHARED) shares
    it. Stream a is stopped as a handover does (its pipeline's workers cancelled) while the GET
    is held: b's write GETs SHARED itself and delivers its batch once, its worker alive and its
    checkpoint past it; b goes on."""
    api = RestApi()
    store = await SqliteStore.open(tmp_path / "state.db")
    async with api.running() as rest_url, aiohttp.ClientSession() as http:
        orch = orchestrator(tmp_path, http, rest_url)
        jsonl = JsonlSink(tmp_path / "events.jsonl", fsync=False)
        sink = OrchestratingSink(jsonl, orch)
        await sink.open(await store.sink_state(sink.name))
        committer = Committer(store, sink, max_events=10_000, interval_s=3600.0)
        a, b = pipeline("a", sink, committer), pipeline("b", sink, committer)
        try:
            await a.put(event(1, key=SHARED, uid="a-1"))
            a.start()
            await until(lambda: api.gets[SHARED] == 1, "a's GET of SHARED")
            for ev in (event(2, key="OTHER", uid="b-2"), event(3, key=SHARED, uid="b-3")):
                await b.put(ev)
            b.start()
            # b's fetch of SHARED joined a's GET; OTHER's was answered.
            await until(lambda: orch.coalesced == 1 and api.gets["OTHER"] == 1, "b's fetches")
            await a.stop()  # the handover's (or a loss's) stop of stream a's workers
            # b GETs SHARED itself (the old code: its retry, after writing OTHER).
            await until(lambda: api.gets[SHARED] == 2, "b's own GET of SHARED")
            api.release.set()
            async with asyncio.timeout(WAIT_S):
                await b.drained()
            assert await committer.flush()
            assert not any(t.done() for t in b.tasks)  # its worker goes on
            # And the stream goes on: the next event of SHARED is delivered too.
            await b.put(event(4, key=SHARED, uid="b-4"))
            async with asyncio.timeout(WAIT_S):
                await b.drained()
            assert await committer.flush()
            checkpoint = await store.checkpoint("b")
            dead = await store.dead_letters()
        finally:
            await a.stop()
            await b.stop()
            await sink.close()
            await store.close()
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    written = Counter(line["metadata"]["uniqueEventId"] for line in lines)
    assert written == Counter({"b-2": 1, "b-3": 1, "b-4": 1})  # each once, a's not at all
    assert all(line["resource"] == {"reservationId": line["primaryKey"]} for line in lines)
    assert dead == []
    assert checkpoint is not None and checkpoint.offset == "4"
    assert b.delivered == 3


async def test_a_waiters_own_cancellation_leaves_the_shared_get_to_its_starter(
    tmp_path: Path,
) -> None:
    """The other way round: the fetch that joined a GET is cancelled (its own write stopped):
    it ends cancelled, and the GET's starter gets its answer, one GET in all."""
    api = RestApi()
    async with api.running() as rest_url, aiohttp.ClientSession() as http:
        orch = orchestrator(tmp_path, http, rest_url)
        url = f"{rest_url}/rsv/v1/hotels/HOTEL1/reservations/{SHARED}"
        starter = asyncio.create_task(orch.fetch("a", url, "HOTEL1"))
        await until(lambda: api.gets[SHARED] == 1, "the starter's GET")
        waiter = asyncio.create_task(orch.fetch("b", url, "HOTEL1"))
        await until(lambda: orch.coalesced == 1, "the waiter joined")
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        api.release.set()
        async with asyncio.timeout(WAIT_S):
            got = await starter
    assert json.loads(got) == {"reservationId": SHARED}
    assert orch.requests == 1 and api.gets[SHARED] == 1


async def test_the_waiters_of_a_stopped_starter_share_one_get_again(tmp_path: Path) -> None:
    """Its starter cancelled, a shared GET's waiters do not each GET the resource: the first
    to wake GETs it, the others join that one."""
    api = RestApi()
    async with api.running() as rest_url, aiohttp.ClientSession() as http:
        orch = orchestrator(tmp_path, http, rest_url)
        url = f"{rest_url}/rsv/v1/hotels/HOTEL1/reservations/{SHARED}"
        starter = asyncio.create_task(orch.fetch("a", url, "HOTEL1"))
        await until(lambda: api.gets[SHARED] == 1, "the starter's GET")
        waiters = [asyncio.create_task(orch.fetch("b", url, "HOTEL1")) for _ in range(3)]
        await until(lambda: orch.coalesced == 3, "the waiters joined")
        starter.cancel()
        await until(lambda: api.gets[SHARED] == 2, "a waiter's own GET")
        api.release.set()
        async with asyncio.timeout(WAIT_S):
            got = await asyncio.gather(*waiters)
    assert [json.loads(g) for g in got] == [{"reservationId": SHARED}] * 3
    assert starter.cancelled()
    assert orch.requests == 2 and api.gets[SHARED] == 2


async def test_a_waiter_abandoned_twice_gets_the_resource_itself(tmp_path: Path) -> None:
    """Bounded: the waiter that took over the GET is stopped too; the last waiter does not
    wait on a third one's, it GETs the resource itself."""
    api = RestApi()
    async with api.running() as rest_url, aiohttp.ClientSession() as http:
        orch = orchestrator(tmp_path, http, rest_url)
        url = f"{rest_url}/rsv/v1/hotels/HOTEL1/reservations/{SHARED}"
        starter = asyncio.create_task(orch.fetch("a", url, "HOTEL1"))
        await until(lambda: api.gets[SHARED] == 1, "the starter's GET")
        first = asyncio.create_task(orch.fetch("b", url, "HOTEL1"))
        last = asyncio.create_task(orch.fetch("b", url, "HOTEL1"))
        await until(lambda: orch.coalesced == 2, "the waiters joined")
        starter.cancel()
        # The first waiter woken (they are woken in the order they joined) GETs it itself.
        await until(lambda: api.gets[SHARED] == 2, "the first waiter's own GET")
        first.cancel()
        await until(lambda: api.gets[SHARED] == 3, "the last waiter's own GET")
        api.release.set()
        async with asyncio.timeout(WAIT_S):
            got = await last
    assert json.loads(got) == {"reservationId": SHARED}
    assert starter.cancelled() and first.cancelled()
    assert orch.requests == 3
