"""/metrics, /healthz and /readyz scraped from a running daemon."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from harness import SwitchableSink
from prometheus_client.parser import text_string_to_metric_families
from support import (
    DownSink,
    committed,
    count_lines,
    make_settings,
    newest_offset,
    running,
    wait_until,
)
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from consumer.config import OrchestrationSettings
from consumer.core.events import event_time
from consumer.core.protocol import SUBPROTOCOL
from consumer.runtime.assembly import register_secrets
from consumer.runtime.daemon import Daemon
from consumer.runtime.metrics import fleet_families
from consumer.runtime.status import FleetStatus
from consumer.sandbox import SandboxOptions
from consumer.sandbox.launcher import free_port


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted({"stream": "main", **labels}.items())))]


async def test_metrics_follow_the_events_and_readiness_follows_the_stream(
    sandbox_factory, tmp_path: Path
):
    """Issue #9 item 12: 60 s (not 10) for the daemon to notice the gateway has gone, so
    that a loaded machine does not fail it."""
    gw = await sandbox_factory(backlog=300)
    gw.inject_malformed("DEMO", "{oops")
    sink = tmp_path / "events.jsonl"
    async with running(make_settings(tmp_path, gw.url)) as daemon:
        assert daemon.metrics_server is not None
        base = f"http://127.0.0.1:{daemon.metrics_server.port}"
        async with httpx.AsyncClient(base_url=base) as http:
            await wait_until(lambda: count_lines(sink) >= 300)
            text = (await http.get("/metrics")).text
            assert value(text, "opera_consumer_events_processed_total") == 300
            assert value(text, "opera_consumer_events_received_total") == 300
            assert value(text, "opera_consumer_events_dead_lettered_total") == 1
            assert value(text, "opera_consumer_sink_retries_total") == 0
            assert value(text, "opera_consumer_connected") == 1
            assert value(text, "opera_consumer_end_to_end_seconds_count") >= 1
            assert value(text, "opera_consumer_sink_write_seconds_count") >= 1
            gw.append("DEMO", 20)
            await wait_until(lambda: count_lines(sink) >= 320)
            text = (await http.get("/metrics")).text
            assert value(text, "opera_consumer_events_processed_total") == 320
            assert (await http.get("/healthz")).status_code == 200
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["ready"] is True
            await gw.close()  # the gateway goes away
            await wait_until(lambda: daemon.runners["main"].state == "backoff", timeout=60)
            ready = await http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["streams"]["main"]["state"] == "backoff"
            assert (await http.get("/healthz")).status_code == 200  # alive all the same
            text = (await http.get("/metrics")).text
            assert value(text, "opera_consumer_connected") == 0
            assert (
                sum(v for (n, _), v in samples(text).items() if n == "opera_consumer_closes_total")
                >= 1
            )


async def test_failed_sink_writes_retried_are_counted(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=20)
    outage, sink_path = tmp_path / "outage", tmp_path / "events.jsonl"
    outage.touch()  # down from the start
    settings = make_settings(tmp_path, gw.url, pipeline={"sink_retry_max_s": 0.05})
    async with running(settings, sink=SwitchableSink(sink_path, outage)) as daemon:
        assert daemon.metrics_server is not None
        base = f"http://127.0.0.1:{daemon.metrics_server.port}"
        async with httpx.AsyncClient(base_url=base) as http:

            async def retried() -> float:
                return value((await http.get("/metrics")).text, "opera_consumer_sink_retries_total")

            async with asyncio.timeout(60):
                while await retried() < 3:
                    await asyncio.sleep(0.05)
            # Nothing flows while the writes fail: not ready, whatever the stream's state
            # (it said ready while its reader waited for room; found by a review).
            down = await http.get("/readyz")
            assert down.status_code == 503, down.text
            assert down.json()["streams"]["main"]["sink_failing_for_s"] >= 0
            outage.unlink()  # back: the retries stop, the events go through
            await wait_until(lambda: count_lines(sink_path) >= 20)
            assert await retried() >= 3
            async with asyncio.timeout(30):
                while (await http.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.05)
            up = (await http.get("/readyz")).json()["streams"]["main"]
            assert up["sink_failing_for_s"] is None


async def test_token_failures_are_counted_apart_from_requests(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=5)
    gw.fail_token_requests([503, 500], retry_after=0.05)
    async with running(make_settings(tmp_path, gw.url)) as daemon:
        assert daemon.metrics_server is not None
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 5)
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{daemon.metrics_server.port}/metrics")).text
    assert value(text, "opera_consumer_token_failures_total") == 2
    assert value(text, "opera_consumer_token_refreshes_total") == 3  # the third one answered


async def test_the_checkpoint_gauge_is_exported_before_any_commit(sandbox_factory, tmp_path: Path):
    """With the sink down from the start no commit moves the checkpoint: the gauge (and with it
    OperaConsumerCheckpointStuck) had no series. It has one from the stream's start: the start
    itself for a stream without a checkpoint, else when the store last wrote it."""
    gw = await sandbox_factory(backlog=20)
    pipeline = {"sink_retry_max_s": 0.2, "drain_timeout_s": 0.5}
    sink = tmp_path / "events.jsonl"

    async def scrape(daemon: Daemon) -> str:
        assert daemon.metrics_server is not None
        async with httpx.AsyncClient() as http:
            url = f"http://127.0.0.1:{daemon.metrics_server.port}/metrics"
            return (await http.get(url)).text

    before = time.time()
    async with running(
        make_settings(tmp_path, gw.url, pipeline=pipeline), sink=DownSink(sink)
    ) as d:
        await wait_until(lambda: d.pipelines["main"].in_flight > 0)  # events wait
        text = await scrape(d)
    moved = value(text, "opera_consumer_checkpoint_timestamp_seconds")
    assert before - 0.01 <= moved <= time.time()
    # A checkpoint stored by an earlier run; started again with the gateway gone (no event,
    # so no commit, can come): the time it was stored.
    async with running(make_settings(tmp_path, gw.url)):
        await wait_until(lambda: committed(tmp_path / "state.db", newest_offset(gw)))
    with closing(sqlite3.connect(tmp_path / "state.db")) as db:
        (stored,) = db.execute(
            "SELECT updated_at FROM checkpoints WHERE stream = 'main'"
        ).fetchone()
    gone = f"http://127.0.0.1:{free_port()}"
    async with running(make_settings(tmp_path, gone)) as d:
        text = await scrape(d)
    moved = value(text, "opera_consumer_checkpoint_timestamp_seconds")
    assert moved == pytest.approx(stored, abs=0.01)


def test_event_time_parses_oracle_timestamps():
    from zoneinfo import ZoneInfo

    utc = ZoneInfo("UTC")
    assert event_time("28-APR-24 06.18.59.028027 AM", utc) == 1714285139.028027
    assert event_time("28-APR-24 12.00.00.000000 AM", utc) == 1714262400.0  # midnight
    assert event_time("not a timestamp", utc) is None
    assert event_time(None, utc) is None


async def test_the_grafana_dashboard_only_uses_metrics_that_exist(sandbox_factory, tmp_path: Path):
    """And so do the alert rules (deploy/prometheus/alerts.yaml)."""
    import json
    import re

    deploy = Path(__file__).parents[2] / "deploy"
    dashboard = json.loads((deploy / "grafana" / "opera-consumer.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append((deploy / "prometheus" / "alerts.yaml").read_text())
    names = r"\b(?:opera_consumer|process|python)_[a-z_]+"
    used = {n for e in exprs for n in re.findall(names, e)}
    gw = await sandbox_factory(backlog=20)
    settings = make_settings(tmp_path, gw.url)
    # With orchestration on, so that its metrics (in the dashboard too) are exposed.
    orchestration = OrchestrationSettings(
        enabled=True, resources={"Profile": "/crm/v1/profiles/{primaryKey}"}
    )
    settings = settings.model_copy(update={"orchestration": orchestration})
    async with running(settings) as daemon:
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 20)
        assert daemon.metrics_server is not None
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{daemon.metrics_server.port}/metrics")).text
    # families declared (even before their first sample: no close yet, no pong yet) and samples
    exposed = {s_name for (s_name, _) in samples(text)} | set(re.findall(r"# TYPE (\S+)", text))
    # A fleet member's own families (a daemon outside a fleet has none).
    fleet = FleetStatus("m1", 1, 2, 3, 4, 5, 6)
    exposed |= {f"{m.name}_total" if m.type == "counter" else m.name for m in fleet_families(fleet)}
    assert used and used <= exposed, used - exposed


async def test_a_close_reason_holding_a_secret_and_a_newline_is_shown_masked_on_one_line(
    sandbox_factory, tmp_path: Path
) -> None:
    """A gateway whose close reason carries the key's hash (a registered secret) and a
    newline: /readyz (last_close, waiting) and systemd's STATUS= line show it masked, with the
    newline escaped (STATUS= would take a raw one for another assignment)."""
    tokens = await sandbox_factory(backlog=0)  # the token endpoint
    hashes: list[str] = []

    async def close_at_once(ws: ServerConnection) -> None:
        assert ws.request is not None
        key = parse_qs(urlsplit(ws.request.path).query)["key"][0]
        hashes.append(key)
        await ws.close(4000, f"go away\nkey={key}")

    protocols = [Subprotocol(SUBPROTOCOL)]
    async with serve(close_at_once, "127.0.0.1", 0, subprotocols=protocols) as server:
        port = server.sockets[0].getsockname()[1]
        o = SandboxOptions()
        auth = {
            "client_id": o.client_id,
            "client_secret": o.client_secret,
            "token_url": f"{tokens.url}/oauth/v1/tokens",
        }
        # A backoff long enough for the wait to be seen.
        slow = {"backoff_initial_s": 20.0, "backoff_max_s": 20.0}
        settings = make_settings(tmp_path, f"http://127.0.0.1:{port}", auth=auth, connection=slow)
        register_secrets(settings)  # as daemon.run does: the key's hash among them
        async with running(settings) as daemon:
            await wait_until(lambda: "retry in" in daemon.status_line())
            line = daemon.status_line()
            assert daemon.metrics_server is not None
            url = f"http://127.0.0.1:{daemon.metrics_server.port}/readyz"
            async with httpx.AsyncClient() as http:
                main = (await http.get(url)).json()["streams"]["main"]
    [key] = set(hashes)
    shown = [line, main["last_close"], main["waiting"]]
    assert main["last_close"] == "closed by server (4000): go away\\nkey=***"
    for text in shown:
        assert key not in text and key[:12] not in text, text
        assert "go away\\nkey=***" in text, text
        assert "\n" not in text and "\r" not in text, text
