"""What /metrics exposes besides the pipeline's figures: the process and build, timestamps as
Unix time, and a gzipped answer for the clients that ask for one (Prometheus does)."""

from __future__ import annotations

import gzip
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from support import (
    as_received,
    committed_sink_length,
    count_lines,
    make_settings,
    running,
    stream_status,
    wait_until,
)

from consumer import __version__
from consumer.core.events import ORACLE_TIMESTAMP
from consumer.runtime.daemon import Daemon
from consumer.runtime.metrics import Metrics
from consumer.runtime.status import CommitStatus, FleetStatus, StreamStatus

Key = tuple[str, tuple[tuple[str, str], ...]]


def samples(text: str) -> dict[Key, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def base_url(daemon: Daemon) -> str:
    assert daemon.metrics_server is not None
    return f"http://127.0.0.1:{daemon.metrics_server.port}"


async def streamed(sandbox_factory: Any, tmp_path: Path, events: int = 20) -> Any:
    gw = await sandbox_factory(backlog=events)
    return running(make_settings(tmp_path, gw.url))


async def test_process_metrics_and_build_info_are_exposed(sandbox_factory: Any, tmp_path: Path):
    async with (
        await streamed(sandbox_factory, tmp_path) as daemon,
        httpx.AsyncClient(base_url=base_url(daemon)) as http,
    ):
        text = (await http.get("/metrics")).text
    got = samples(text)
    names = {name for name, _ in got}
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "python_info",
        "python_gc_collections_total",
    ):
        assert name in names, name
    assert 0 < got[("process_start_time_seconds", ())] <= time.time()
    build = {k: v for k, v in got.items() if k[0] == "opera_consumer_build_info"}
    labels = (("python", platform.python_version()), ("version", __version__))
    assert build == {("opera_consumer_build_info", labels): 1.0}


async def test_gzip_is_answered_to_who_accepts_it(sandbox_factory: Any, tmp_path: Path):
    sink = tmp_path / "events.jsonl"
    async with await streamed(sandbox_factory, tmp_path) as daemon:
        await wait_until(lambda: count_lines(sink) >= 20)
        async with httpx.AsyncClient(base_url=base_url(daemon)) as http:
            # httpx would inflate the body itself: read the bytes as sent
            gzip_headers = {"Accept-Encoding": "gzip"}
            async with http.stream("GET", "/metrics", headers=gzip_headers) as zipped:
                raw = b"".join([chunk async for chunk in zipped.aiter_raw()])
            plain = await http.get("/metrics", headers={"Accept-Encoding": "identity"})
            head = await http.head("/metrics", headers=gzip_headers)
    assert zipped.status_code == 200
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.headers["content-length"] == str(len(raw))
    assert zipped.headers["content-type"].startswith("text/plain")
    assert "content-encoding" not in plain.headers
    text = gzip.decompress(raw).decode()
    # The same families in the same order, and the same figures where nothing moves between
    # two scrapes once the backlog is delivered.
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments == [line for line in plain.text.splitlines() if line.startswith("#")]
    still = ("opera_consumer_events_", "opera_consumer_connections_total", "opera_consumer_build")
    zipped_still = {k: v for k, v in samples(text).items() if k[0].startswith(still)}
    assert zipped_still and zipped_still == {
        k: v for k, v in samples(plain.text).items() if k[0].startswith(still)
    }
    assert head.headers["content-encoding"] == "gzip" and head.content == b""


async def test_timestamps_are_unix_time(sandbox_factory: Any, tmp_path: Path):
    """The runtime keeps monotonic times; the gauges carry wall-clock Unix time."""
    before = time.time()
    sink = tmp_path / "events.jsonl"
    async with await streamed(sandbox_factory, tmp_path) as daemon:
        await wait_until(lambda: count_lines(sink) >= 20)
        await wait_until(lambda: committed_sink_length(tmp_path / "state.db") > 0)  # a commit
        async with httpx.AsyncClient(base_url=base_url(daemon)) as http:
            text = (await http.get("/metrics")).text
        after = time.time()
    got = samples(text)
    main = (("stream", "main"),)
    assert before < got[("opera_consumer_last_event_timestamp_seconds", main)] < after
    assert before < got[("opera_consumer_checkpoint_timestamp_seconds", main)] < after
    assert "# TYPE opera_consumer_commit_started_timestamp_seconds gauge" in text
    # The "seconds since" gauges they replace are gone.
    assert "opera_consumer_seconds_since_last_event" not in text
    assert "opera_consumer_checkpoint_age_seconds" not in text


class Frozen:
    """A daemon's view frozen at monotonic times ``ago`` seconds in the past."""

    def __init__(self, ago: float) -> None:
        self.at = time.monotonic() - ago

    def stream_statuses(self) -> list[StreamStatus]:
        return [
            stream_status(
                received=1, delivered=1, checkpoint_moved_at=self.at, last_event_at=self.at
            )
        ]

    def commit_status(self) -> CommitStatus:
        return CommitStatus(failures=0, failing_since=None, busy_since=self.at)

    def sink_counters(self) -> dict[str, float]:
        return {}

    def fleet_status(self) -> FleetStatus | None:
        return None


def test_monotonic_times_are_exported_as_unix_time():
    """An hour-old monotonic time is exported as an hour before now, whatever the machine's
    uptime (the monotonic clock's origin)."""
    before = time.time()
    got = samples(Metrics(Frozen(ago=3600.0)).scrape().decode())
    after = time.time()
    main = (("stream", "main"),)
    slack = 0.001  # float rounding of Unix times (about 2e-7 s at today's values)
    for key in (
        ("opera_consumer_last_event_timestamp_seconds", main),
        ("opera_consumer_checkpoint_timestamp_seconds", main),
        ("opera_consumer_commit_started_timestamp_seconds", ()),
    ):
        assert before - 3600 - slack <= got[key] <= after - 3600 + slack, key


def oracle_time(unix: float) -> str:
    """Unix time in the timestamp format of OHIP's events (UTC: the default event_timezone)."""
    return datetime.fromtimestamp(unix, UTC).strftime(ORACLE_TIMESTAMP).upper()


def test_a_timestamp_from_the_future_does_not_hold_the_lag_at_zero():
    """One event dated 2068 used to make the lag 0 for the life of the process (the newest
    time ever delivered): now a timestamp far ahead of our clock is not taken for being caught
    up, and the lag goes on following the events; one a few seconds ahead (clocks disagree)
    still counts."""
    metrics = Metrics(Frozen(ago=0.0))
    observe = metrics.observer("main")
    main = (("stream", "main"),)

    def lag_after(uid: str, timestamp: str) -> float:
        meta = {"offset": "1", "uniqueEventId": uid}
        observe(0.01, as_received({"metadata": meta, "timestamp": timestamp}))
        return samples(metrics.scrape().decode())[("opera_consumer_lag_seconds", main)]

    day = 86400.0
    start = time.time()
    assert lag_after("a", oracle_time(start - 30 * day)) >= 30 * day
    assert lag_after("b", "01-JAN-68 12.00.00.000000 AM") >= 30 * day  # 2068: ignored
    assert lag_after("c", oracle_time(start + 1000 * day)) >= 30 * day  # ignored too
    # the next events move it on, as before
    assert 10 * day <= lag_after("d", oracle_time(start - 10 * day)) < 11 * day
    # a few seconds ahead, as two clocks may be: caught up
    assert lag_after("e", oracle_time(time.time() + 20)) == 0.0
