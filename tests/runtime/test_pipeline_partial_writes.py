"""A write the sink has taken in part, and a sink whose position is committed with the
checkpoint (jsonl): the part taken is recorded as processed (its ids, the watermark past it)
as soon as the sink has taken it, not when the whole write returns.

The jsonl sink's position covers every line appended so far, and every commit records it. So
a commit made while the rest of the write is still under way (another worker's events done,
or the final commit of a stop) stores a file length with those lines; were their events not
recorded with it, a stop (SIGTERM, or kill -9 after that commit) left them in the committed
file unrecorded, the checkpoint before them, and the restart wrote them a second time. Two
ways in, both the orchestrating sink's (it writes a batch to the jsonl sink a part at a time,
fetching each part's resources first):

* a part taken before a transient failure (the REST API down for a later part's resource):
  the pipeline backs off and retries only the rest, the part taken unrecorded meanwhile;
* a batch written a part at a time, the pipeline stopped (or a commit made) between parts.

Real parts: the sandbox gateway and its REST API, or an aiohttp REST API on loopback that
holds or fails a resource's GETs; the orchestrating sink over a jsonl file; real SQLite state
stores; the daemon in-process or the pipeline and committer as it runs them."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from bus_events import event
from operator_support import processed_ids
from orchestration_support import Tokens, quick_orchestration
from support import (
    committed,
    committed_sink_length,
    make_settings,
    newest_offset,
    running,
    serving_web,
    sink_ids,
    sink_length,
    wait_until,
)

from consumer.config import OrchestrationSettings
from consumer.core.events import Event
from consumer.runtime.committer import Committer
from consumer.runtime.pipeline import StreamPipeline
from consumer.sinks import orchestration
from consumer.sinks.jsonl import JsonlSink
from consumer.sinks.orchestration import OrchestratingSink, Orchestrator
from consumer.state.sqlite import SqliteStore

pytestmark = pytest.mark.usefixtures("contained_logging")

WAIT_S = 20.0


# --- the daemon: a part taken before a transient failure, then SIGTERM's stop ---------------


def injected(offset: str, uid: str, key: str, name: str) -> str:
    return json.dumps(
        {
            "metadata": {"offset": offset, "uniqueEventId": uid},
            "moduleName": "Reservation",
            "eventName": name,
            "primaryKey": key,
            "hotelId": "HOTEL1",
            "timestamp": "28-APR-24 06.18.59.028027 AM",
            "detail": [],
        }
    )


async def test_a_part_taken_before_a_transient_failure_is_recorded_and_written_once(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """Resource K-1's two events in one batch: the first needs no GET (written to the jsonl
    file), the second's GET fails (the REST API answers 503): the write fails transiently
    with the first taken. While the pipeline retries the rest, the other resources' events
    are done and committed, the file's length with them; the daemon is stopped then. The
    first event is recorded as processed with that length; the restart (the REST API back)
    skips it and writes the second: every event once.

    Was: the first event's line was committed in the file without its processed id (the
    checkpoint before it); the restart wrote it again."""
    gw = await sandbox_factory(backlog=5)
    offset = newest_offset(gw)  # injected events resume from here (the sandbox's rule)
    gw.inject_event("DEMO", injected(offset, "first-of-k", "K-1", "NO FETCH"))
    gw.inject_event("DEMO", injected(offset, "second-of-k", "K-1", "FETCH ME"))
    for n in range(40):  # other resources (other workers' too): done meanwhile, commits go on
        gw.inject_event("DEMO", injected(offset, f"other-{n}", f"O-{n}", "NO FETCH"))
    gw.fail_rest([503] * 100_000)  # the REST API down: every GET answers 503
    settings = make_settings(
        tmp_path,
        gw.url,
        pipeline={
            "workers": 4,
            "sink_retry_initial_s": 0.01,
            "sink_retry_max_s": 0.05,
            "drain_timeout_s": 1.0,
        },
    )
    orch = OrchestrationSettings(
        enabled=True,
        resources={"FETCH ME": "/rsv/v1/hotels/{hotelId}/reservations/{primaryKey}"},
        coalesce_ms=0.0,
        max_attempts=1,
        rate_per_s=1000,
        burst=100,
    )
    settings = settings.model_copy(update={"orchestration": orch})
    sink = tmp_path / "events.jsonl"
    state = tmp_path / "state.db"

    async with running(settings):
        # The first event of K-1 is in the file and a commit covers it (the others of the
        # stream are done meanwhile); its resource's second event still waits for its GET.
        await wait_until(
            lambda: (
                "first-of-k" in sink_ids(sink)
                and committed_sink_length(state) >= sink.stat().st_size
            ),
            timeout=WAIT_S,
        )
    # Stopped (SIGTERM's path) while the REST API is still down: the committed file holds
    # the first event's line, and the store has it processed.
    assert "first-of-k" in sink_ids(sink)
    assert "first-of-k" in processed_ids(state)
    assert "second-of-k" not in sink_ids(sink)

    gw._chaos.rest_failures.clear()  # the REST API is back
    async with running(settings):
        newest = newest_offset(gw)
        await wait_until(
            lambda: "second-of-k" in sink_ids(sink) and committed(state, newest), timeout=WAIT_S
        )
    counts = Counter(sink_ids(sink))
    assert {u: n for u, n in counts.items() if n > 1} == {}
    assert {"first-of-k", "second-of-k"} | {f"other-{n}" for n in range(40)} <= set(counts)


# --- the pipeline as the daemon runs it, a REST API that holds or fails a resource ---------


class RestApi:
    """Each reservation's JSON; the GETs of the keys in ``held`` wait until ``release`` is
    set, those of the keys in ``failing`` answer 503 while they are there."""

    def __init__(self, *, held: Iterable[str] = (), failing: Iterable[str] = ()) -> None:
        self.held, self.failing = set(held), set(failing)
        self.release = asyncio.Event()
        self.gets: Counter[str] = Counter()

    async def reservation(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        self.gets[key] += 1
        if key in self.held:
            await self.release.wait()
        if key in self.failing:
            return web.json_response({"title": "down"}, status=503)
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


class Life:
    """One daemon's life, in parts: the store, the orchestrating sink over the jsonl file
    (restored to the committed length, as at a start), a committer and a pipeline."""

    def __init__(self, tmp_path: Path, http: aiohttp.ClientSession, rest_url: str) -> None:
        settings = make_settings(tmp_path, "http://127.0.0.1:9")
        orch = quick_orchestration(rest_url)
        stream = (settings.streams["main"], Tokens())
        self.orchestrator = Orchestrator(orch, http, {"main": stream, "other": stream})
        self.path = tmp_path / "events.jsonl"
        self.state = tmp_path / "state.db"

    async def __aenter__(self) -> Life:
        self.store = await SqliteStore.open(self.state)
        self.sink = OrchestratingSink(JsonlSink(self.path, fsync=False), self.orchestrator)
        await self.sink.open(await self.store.sink_state(self.sink.name))
        self.committer = Committer(self.store, self.sink, max_events=10_000, interval_s=3600.0)
        self.pipeline, self.other = (
            StreamPipeline(
                name,
                sink=self.sink,
                committer=self.committer,
                workers=1,
                queue_size=1000,
                batch_max=50,
                retry_initial_s=0.01,
                retry_max_s=0.02,
            )
            for name in ("main", "other")
        )
        self.other.start()
        return self

    async def meanwhile(self, ev: Event) -> None:
        """Another stream's event (another worker's) written and done: a commit has work."""
        await self.other.put(ev)
        async with asyncio.timeout(WAIT_S):
            await self.other.drained()

    async def deliver(self, events: list[Event]) -> None:
        """The events in one batch (queued before the worker starts)."""
        for ev in events:
            await self.pipeline.put(ev)
        self.pipeline.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.pipeline.stop()
        await self.other.stop()
        await self.sink.close()
        await self.store.close()


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def restarted(tmp_path: Path, api: RestApi, rest_url: str, events: list[Event]) -> Life:
    """The next start, the REST API answering: the gateway sends the events again (here all
    of them: more than the replay from the checkpoint), each written once in the end."""
    api.held.clear()
    api.failing.clear()
    api.release.set()
    async with aiohttp.ClientSession() as http, Life(tmp_path, http, rest_url) as life:
        await life.deliver(events)
        async with asyncio.timeout(WAIT_S):
            await life.pipeline.drained()
        assert await life.committer.flush()
        checkpoint = await life.store.checkpoint("main")
    assert checkpoint is not None and checkpoint.offset == events[-1].offset
    return life


@pytest.mark.parametrize("final_commit", [True, False], ids=["stopped", "killed"])
async def test_a_write_stopped_between_its_parts_records_the_parts_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, final_commit: bool
) -> None:
    """A batch the orchestrating sink writes a part at a time (parts of 16 MiB of resources,
    scaled down to one resource a part): A's part is in the jsonl file while the next part's
    GET (of HELD) is held. A commit now records the file's length, A processed with it and
    the checkpoint at A. Then the pipeline is stopped between the parts, with the stop's final
    commit (``stopped``) or without it (``killed``: kill -9 after that commit). The restart
    skips A and writes the rest: every event once, each with its resource.

    Was: the pipeline recorded A only once the whole write returned: the commit stored A's
    line with the checkpoint before it and A unknown, and the restart wrote A again."""
    monkeypatch.setattr(orchestration, "WRITE_RESOURCE_BYTES", 1)
    api = RestApi(held={"HELD"})
    batch = [event(1, key="A", uid="a"), event(2, key="B", uid="b"), event(3, key="HELD", uid="h")]
    async with api.running() as rest_url:
        async with aiohttp.ClientSession() as http, Life(tmp_path, http, rest_url) as life:
            await life.deliver(batch)
            # HELD's GET is asked for once A's part is written (B's answer fetched with it).
            await wait_until(lambda: api.gets["HELD"] == 1, timeout=WAIT_S)  # the part after A's
            await life.meanwhile(event(9, key="O", uid="o"))
            taken = sink_length(life.sink.position())
            assert taken > 0  # A's line (and O's), in the position the commit records
            assert await life.committer.flush()
            assert committed_sink_length(life.state) == taken
            assert await life.store.seen("main", ["a", "b", "h"]) == {"a"}
            checkpoint = await life.store.checkpoint("main")
            assert checkpoint is not None and checkpoint.offset == "1"
            await life.pipeline.stop()  # between the parts
            if final_commit:
                await life.committer.flush()
        assert [line["metadata"]["uniqueEventId"] for line in lines(life.path)] == ["a", "o"]
        await restarted(tmp_path, api, rest_url, batch)
    written = lines(tmp_path / "events.jsonl")
    assert Counter(line["metadata"]["uniqueEventId"] for line in written) == Counter("aobh")
    assert all(line["resource"] == {"reservationId": line["primaryKey"]} for line in written)


async def test_a_part_taken_before_a_transient_failure_is_recorded_before_the_backoff(
    tmp_path: Path,
) -> None:
    """A batch whose first resource is answered and whose second one's GET fails (503): the
    orchestrating sink writes A's part, then fails transiently with A taken. A is recorded at
    once: a commit while the pipeline retries the rest has A processed with the file's length
    and the checkpoint past it, and a kill -9 then (no final commit) leaves nothing to write
    twice: the restart writes F alone.

    Was: A was recorded only when a retry of the rest succeeded; the commit stored A's line
    without it, and the restart wrote A again."""
    api = RestApi(failing={"F"})
    batch = [event(1, key="A", uid="a"), event(2, key="F", uid="f")]
    async with api.running() as rest_url:
        async with aiohttp.ClientSession() as http, Life(tmp_path, http, rest_url) as life:
            await life.deliver(batch)
            await wait_until(lambda: api.gets["F"] >= 3, timeout=WAIT_S)  # the rest's retries
            await life.meanwhile(event(9, key="O", uid="o"))
            assert await life.committer.flush()
            assert await life.store.seen("main", ["a", "f"]) == {"a"}
            checkpoint = await life.store.checkpoint("main")
            assert checkpoint is not None and checkpoint.offset == "1"
            assert life.pipeline.delivered == 1
            # killed: no final commit
        assert api.gets["A"] == 1  # the retries asked for F alone
        await restarted(tmp_path, api, rest_url, batch)
    written = lines(tmp_path / "events.jsonl")
    assert Counter(line["metadata"]["uniqueEventId"] for line in written) == Counter("aof")
