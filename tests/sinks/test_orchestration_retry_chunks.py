"""Orchestration and a webhook with batch_size > 1: a part cut short (a REST fetch failing
for a moment) ends in a short chunk, whose POST the receiver takes but whose answer is lost
(a timeout). The retry writes from that chunk on; its part ran on past the old end, so the
same event went in a chunk with another, under another Idempotency-Key, and a receiver keyed
by it stored the event twice. The retry's part now ends where the failed one did (found by
a review). Real REST API and receiver (aiohttp), pipeline, webhook sink and SQLite store."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path

import aiohttp
from aiohttp import web
from bus_events import event
from orchestration_support import Tokens, quick_orchestration
from support import make_settings, serving_web

from consumer.config import WebhookSinkSettings
from consumer.runtime.committer import Committer
from consumer.runtime.pipeline import StreamPipeline
from consumer.sinks.orchestration import OrchestratingSink, Orchestrator
from consumer.sinks.webhook import WebhookSink
from consumer.state.sqlite import SqliteStore


async def test_retry_after_short_chunk_keeps_its_idempotency_key(tmp_path: Path) -> None:
    gets: dict[str, int] = defaultdict(int)

    async def reservation(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        gets[key] += 1
        if key == "R4" and gets[key] == 1:
            return web.Response(status=503)  # a passing outage of the REST API
        return web.json_response({"id": key})

    seen: list[tuple[str, list[str]]] = []  # (Idempotency-Key, uniqueEventIds) as taken
    slow_once = [True]

    async def hook(request: web.Request) -> web.Response:
        docs = json.loads(await request.read())
        ids = [d["metadata"]["uniqueEventId"] for d in docs]
        seen.append((request.headers["Idempotency-Key"], ids))  # taken (stored)
        if "u00003" in ids and slow_once[0]:
            slow_once[0] = False
            await asyncio.sleep(5)  # the answer is lost: the client times out
        return web.Response(status=200)

    rest = web.Application()
    rest.router.add_get("/rsv/v1/hotels/{hotel}/reservations/{key}", reservation)
    rx = web.Application()
    rx.router.add_post("/hook", hook)
    async with (
        serving_web(rest, shutdown_timeout=0.1) as rest_url,
        serving_web(rx, shutdown_timeout=0.1) as hook_url,
        aiohttp.ClientSession() as http,
    ):
        settings = make_settings(
            tmp_path,
            "http://127.0.0.1:9",
            sink={"type": "webhook", "url": hook_url + "/hook", "timeout_s": 0.3, "batch_size": 2},
        )
        assert isinstance(settings.sink, WebhookSinkSettings)
        orch = quick_orchestration(rest_url)
        sink = OrchestratingSink(
            WebhookSink(settings.sink, http),
            Orchestrator(orch, http, {"main": (settings.streams["main"], Tokens())}),
        )
        store = await SqliteStore.open(tmp_path / "state.db")
        await sink.open(None)
        committer = Committer(store, sink, max_events=10_000, interval_s=3600.0)
        pipeline = StreamPipeline(
            "main",
            sink=sink,
            committer=committer,
            workers=1,
            queue_size=1000,
            batch_max=50,
            retry_initial_s=0.01,
            retry_max_s=0.02,
        )
        try:
            for i in range(1, 6):
                await pipeline.put(event(i, key=f"R{i}"))
            pipeline.start()
            async with asyncio.timeout(20):
                await pipeline.drained()
            assert await committer.flush()
        finally:
            await pipeline.stop()
            await sink.close()
            await store.close()

    keys_of: dict[str, set[str]] = defaultdict(set)
    for key, ids in seen:
        for uid in ids:
            keys_of[uid].add(key)

    assert sorted(keys_of) == [f"u{i:05d}" for i in range(1, 6)]
    twice = {uid: keys for uid, keys in keys_of.items() if len(keys) > 1}
    assert not twice, f"events sent again under another Idempotency-Key: {sorted(twice)}"
