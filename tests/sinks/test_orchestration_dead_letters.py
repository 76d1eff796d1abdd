"""A resource that fails for good (a 4xx, broken JSON...) in a batch: the pipeline dead-letters
that event with the reason and writes the others, each resource fetched once. The fetch's
error named no event: the pipeline split the batch one by one, GETting every other event's
resource again (rate limit, cost). A real pipeline, SQLite store and jsonl sink, and a real
loopback HTTP server as the REST API."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from bus_events import event
from receiver import Received, Receiver, Reply
from support import make_settings

from consumer.config import OrchestrationSettings
from consumer.core.events import Event
from consumer.core.records import DeadLetter
from consumer.runtime.committer import Committer
from consumer.runtime.pipeline import StreamPipeline
from consumer.sinks import orchestration
from consumer.sinks.jsonl import JsonlSink
from consumer.sinks.orchestration import OrchestratingSink, Orchestrator
from consumer.state.sqlite import SqliteStore

RESOURCES = {"Reservation": "/rsv/v1/hotels/{hotelId}/reservations/{primaryKey}"}
JSON = {"Content-Type": "application/json"}
WAIT_S = 10.0

# How the REST API answers the resources these tests make fail.
FAILING: dict[str, Reply] = {
    "400": Reply(400, JSON, b'{"title": "Bad reservation id"}'),
    "422": Reply(422, JSON, b'{"title": "Unprocessable reservation"}'),
    "broken-json": Reply(200, JSON, b'{"reservationId": "R'),
    # 2 MiB of empty arrays: estimated at 98 MiB once parsed (it takes 48), over the 64 one
    # resource may take
    "dense": Reply(200, JSON, b"[" + b"[]," * (2 * 1024 * 1024 // 3) + b"[]]"),
    "403": Reply(403, JSON, b'{"title": "Forbidden"}'),
    "404": Reply(404, JSON, b'{"title": "Not found"}'),
}
WHY = {
    "400": 'HTTP 400: {"title": "Bad reservation id"}',
    "422": "HTTP 422",
    "broken-json": "not valid JSON",
    "dense": "too dense to read",
    "403": "HTTP 403",
    "404": "HTTP 404",
}


class Tokens:
    async def access_token(self) -> str:
        return "tok-abcdef"

    def invalidate(self, rejected: str | None = None) -> None:
        pass


def rest_api(failing: dict[str, str]) -> Receiver:
    """Each reservation's JSON, but for the keys in ``failing`` (key -> FAILING's name)."""

    def answer(request: Received) -> Reply:
        key = request.path.rsplit("/", 1)[1]
        if key in failing:
            return FAILING[failing[key]]
        return Reply(200, JSON, json.dumps({"reservationId": key}).encode())

    return Receiver(answer)


@asynccontextmanager
async def pipeline_to(
    tmp_path: Path, rx: Receiver, **orchestration: Any
) -> AsyncIterator[tuple[SqliteStore, Committer, StreamPipeline, JsonlSink]]:
    """A pipeline (one worker, not started) writing to a jsonl sink through orchestration."""
    settings = make_settings(tmp_path, "http://127.0.0.1:9")
    orch = OrchestrationSettings(
        **{
            "enabled": True,
            "resources": RESOURCES,
            "coalesce_ms": 0.0,  # no answer reused: every GET the server sees is one made
            "base_url": f"http://127.0.0.1:{rx.port}",
            "max_attempts": 1,
            "rate_per_s": 1000,
            "burst": 1000,
            **orchestration,
        }
    )
    store = await SqliteStore.open(tmp_path / "state.db")
    async with aiohttp.ClientSession() as http:
        jsonl = JsonlSink(tmp_path / "events.jsonl", fsync=False)
        orchestrator = Orchestrator(orch, http, {"main": (settings.streams["main"], Tokens())})
        sink = OrchestratingSink(jsonl, orchestrator)
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
                queue_max_bytes=16 * 1024 * 1024,
                batch_max=50,
                retry_initial_s=0.01,
                retry_max_s=0.02,
            )
            yield store, committer, pipeline, jsonl
        finally:
            if pipeline is not None:
                await pipeline.stop()
            await sink.close()
            await store.close()


async def deliver(
    tmp_path: Path, rx: Receiver, events: Sequence[Event], **orchestration: Any
) -> tuple[list[DeadLetter], list[dict[str, Any]]]:
    """``events`` put as one batch; the dead letters and the lines written once all is done."""
    async with pipeline_to(tmp_path, rx, **orchestration) as (store, committer, pipeline, sink):
        for ev in events:  # the worker not started yet: one queue, one batch
            await pipeline.put(ev)
        pipeline.start()
        async with asyncio.timeout(WAIT_S):
            await pipeline.drained()
        assert await committer.flush()
        dead = await store.dead_letters()
        lines = [json.loads(line) for line in sink.path.read_text().splitlines()]
    return dead, lines


def gets(rx: Receiver) -> Counter[str]:
    """The GETs the REST API saw, by reservation."""
    return Counter(r.path.rsplit("/", 1)[1] for r in rx.requests)


@pytest.mark.parametrize("answer", sorted(FAILING))
async def test_the_events_resource_failing_dead_letters_it_alone(
    tmp_path: Path, answer: str
) -> None:
    events = [event(i, key=f"R{i}") for i in range(1, 9)]
    with rest_api({"R4": answer}) as rx:
        dead, lines = await deliver(tmp_path, rx, events, on_not_found="dead-letter")
    [letter] = dead
    assert letter.unique_event_id == "u00004" and letter.reason == "sink_rejected"
    assert WHY[answer] in letter.error and "/reservations/R4" in letter.error
    assert "tok-abcdef" not in letter.error
    written = [line["metadata"]["uniqueEventId"] for line in lines]
    assert written == [f"u{i:05d}" for i in range(1, 9) if i != 4]  # each once, in order
    assert all(line["resource"] == {"reservationId": line["primaryKey"]} for line in lines)
    # Each resource fetched once: the others' not again for the writes after the dead letter.
    assert gets(rx) == {f"R{i}": 1 for i in range(1, 9)}


async def test_several_failing_resources_in_one_batch_cost_one_get_each(tmp_path: Path) -> None:
    """Two events of one failing resource, another failing resource, and a good resource of
    two events: every failing event dead-lettered with its own reason, each GET made once."""
    keys = ["R1", "BAD", "R2", "R3", "BAD", "JUNK", "R2", "R4"]
    events = [event(i, key=key) for i, key in enumerate(keys, start=1)]
    with rest_api({"BAD": "400", "JUNK": "broken-json"}) as rx:
        dead, lines = await deliver(tmp_path, rx, events)
    why = {d.unique_event_id: d.error for d in dead}
    assert sorted(why) == ["u00002", "u00005", "u00006"]
    assert "HTTP 400" in why["u00002"] and "HTTP 400" in why["u00005"]
    assert "not valid JSON" in why["u00006"]
    written = [line["metadata"]["uniqueEventId"] for line in lines]
    assert written == ["u00001", "u00003", "u00004", "u00007", "u00008"]
    assert gets(rx) == {"R1": 1, "BAD": 1, "R2": 1, "R3": 1, "JUNK": 1, "R4": 1}


async def test_what_a_failed_batch_fetched_is_not_held_for_long(tmp_path: Path) -> None:
    """The others' resources are held for the writes that follow at once, not for ever: a
    write that comes later (a dead letter replayed, a sink outage) gets its resource anew."""
    now = [1000.0]
    settings = make_settings(tmp_path, "http://127.0.0.1:9")
    with rest_api({"BAD": "400"}) as rx:
        orch = OrchestrationSettings(
            enabled=True,
            resources=RESOURCES,
            coalesce_ms=0.0,
            base_url=f"http://127.0.0.1:{rx.port}",
            max_attempts=1,
        )
        async with aiohttp.ClientSession() as http:
            orchestrator = Orchestrator(
                orch, http, {"main": (settings.streams["main"], Tokens())}, clock=lambda: now[0]
            )
            batch = [event(1, key="R1"), event(2, key="BAD"), event(3, key="R3")]
            with pytest.raises(Exception, match="HTTP 400") as info:
                await orchestrator.enrich("main", batch)
            assert getattr(info.value, "unique_event_id", None) == "u00002"
            [one] = await orchestrator.enrich("main", batch[:1])  # held: no GET
            assert one.resource == {"reservationId": "R1"}
            assert gets(rx) == {"R1": 1, "BAD": 1, "R3": 1}
            now[0] += 3600
            [three] = await orchestrator.enrich("main", batch[2:])  # let go: fetched anew
            assert three.resource == {"reservationId": "R3"}
            assert gets(rx) == {"R1": 1, "BAD": 1, "R3": 2}
            orchestrator.close()


async def test_past_the_held_bound_what_is_written_next_is_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past HELD_MAX_BYTES, the oldest held were let go: the first events of a batch, written
    next (and, when a part's GETs ran ahead, the next part's: each GETting them again, and
    16 more ahead). What does not fit now is the furthest ahead, not held."""
    body = len(json.dumps({"reservationId": "R1"}))
    monkeypatch.setattr(orchestration, "HELD_MAX_BYTES", 3 * (body + 200), raising=False)
    settings = make_settings(tmp_path, "http://127.0.0.1:9")
    with rest_api({"BAD": "400"}) as rx:
        orch = OrchestrationSettings(
            enabled=True,
            resources=RESOURCES,
            coalesce_ms=0.0,
            base_url=f"http://127.0.0.1:{rx.port}",
            max_attempts=1,
        )
        async with aiohttp.ClientSession() as http:
            orchestrator = Orchestrator(orch, http, {"main": (settings.streams["main"], Tokens())})
            batch = [event(i, key=f"R{i}") for i in range(1, 7)] + [event(7, key="BAD")]
            with pytest.raises(Exception, match="HTTP 400"):
                await orchestrator.enrich("main", batch)
            got = await orchestrator.enrich("main", batch[:3])  # held: no GET
            assert [ev.resource for ev in got] == [{"reservationId": f"R{i}"} for i in (1, 2, 3)]
            assert gets(rx) == {f"R{i}": 1 for i in range(1, 7)} | {"BAD": 1}
            await orchestrator.enrich("main", batch[3:6])  # not held: fetched again
            assert gets(rx) == {f"R{i}": 1 if i <= 3 else 2 for i in range(1, 7)} | {"BAD": 1}
            orchestrator.close()
