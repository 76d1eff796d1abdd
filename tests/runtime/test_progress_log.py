"""The progress lines (consumer/runtime/progress.py) from a status source driven by hand: when
a line is logged, what it says, and the one "caught up" line. The daemon's own are in
tests/commands/test_status_command.py."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from log_capture import log_records
from support import stream_status, wait_until

from consumer.core.watermark import Position
from consumer.runtime.progress import ProgressLog
from consumer.runtime.status import CommitStatus, FleetStatus, StreamStatus
from consumer.sandbox.templated import oracle_timestamp

T0 = 1_800_000_000.0


def stream(name: str, done: int, event_at: float | None, waiting: int = 0) -> StreamStatus:
    stamp = None if event_at is None else oracle_timestamp(int(event_at * 1_000_000))
    return stream_status(
        name=name,
        received=done + waiting,
        delivered=done,
        in_flight=waiting,
        position=Position(str(done), f"u{done}", stamp),
    )


class Source:
    """What the daemon's read-only view gives, set by the test."""

    def __init__(self) -> None:
        self.streams: list[StreamStatus] = []

    def stream_statuses(self) -> list[StreamStatus]:
        return self.streams

    def commit_status(self) -> CommitStatus:
        return CommitStatus(0, None, None)

    def sink_counters(self) -> dict[str, float]:
        return {}

    def fleet_status(self) -> FleetStatus | None:
        return None


def ticks(progress: ProgressLog, source: Source, *states: list[StreamStatus]) -> list[Any]:
    """One tick a second per list of statuses; the lines they logged."""
    with log_records() as logs:
        for i, streams in enumerate(states):
            source.streams = streams
            progress.tick(T0 + i)
    return logs


@pytest.fixture
def source() -> Source:
    return Source()


@pytest.fixture
def progress(source: Source) -> ProgressLog:
    return ProgressLog(source, interval_s=1.0, caught_up_s=60.0, event_timezone="UTC")


def test_a_line_a_tick_while_catching_up_then_one_caught_up_line(source, progress):
    # 1000 events a second, 100 s of event time a second: a 1000 s lag goes in about 10 s.
    behind = [[stream("main", 1000 * i, T0 + i - 1000 + 99 * i, 500)] for i in range(4)]
    logs = ticks(progress, source, *behind)
    assert [r["event"] for r in logs] == ["progress"] * 3  # none for the first sample
    line = logs[-1]
    assert line["stream"] == "main" and line["phase"] == "catching up"
    assert line["events_per_s"] == 1000.0 and line["speed"] == pytest.approx(100.0, abs=0.1)
    assert line["lag_s"] == pytest.approx(1000 - 99 * 3, abs=0.1)
    assert line["eta_s"] == pytest.approx((1000 - 99 * 3) / 99, abs=0.1)
    assert (line["waiting"], line["offset"]) == (500, "3000")
    # caught up (lag within 60 s): one line, then nothing while it stays so
    live = [[stream("main", 4000 + 10 * i, T0 + 4 + i - 0.5)] for i in range(3)]
    logs = ticks(progress, source, *live)
    assert [(r["event"], r["phase"]) for r in logs] == [("caught up", "live")]


def test_nothing_is_logged_for_a_live_or_idle_stream(source, progress):
    live = [[stream("main", 10 * i, T0 + i - 0.2)] for i in range(3)]
    quiet = [[stream("main", 30, T0 + 2 - 0.2)] for _ in range(3)]  # nothing new arrives
    assert ticks(progress, source, *live, *quiet) == []


def test_a_stuck_stream_is_behind_with_no_estimate(source, progress):
    stuck = [[stream("main", 100, T0 - 3600.0, waiting=2000)] for _ in range(3)]
    logs = ticks(progress, source, *stuck)
    assert [(r["event"], r["phase"], r["eta_s"]) for r in logs] == [
        ("progress", "behind", None)
    ] * 2
    assert logs[-1]["events_per_s"] == 0.0


def test_streams_are_followed_apart_and_forgotten_when_gone(source, progress):
    a = [stream("a", 1000 * i, T0 + i - 5000 + 50 * i, 10) for i in range(3)]
    b = [stream("b", 5 * i, T0 + i - 1.0) for i in range(3)]
    logs = ticks(progress, source, *([x, y] for x, y in zip(a, b, strict=True)))
    assert {r["stream"] for r in logs} == {"a"}
    ticks(progress, source, [b[2]])  # "a" stopped here (fleet: another member holds it)
    logs = ticks(progress, source, [replace(a[2], delivered=a[2].delivered + 1)])
    assert logs == []  # a new start: one sample, nothing to say yet


async def test_a_failing_sample_does_not_end_the_loop(source):
    """A bug in sampling is logged; the daemon (whose task this is) goes on."""
    calls: list[int] = []

    def statuses() -> list[StreamStatus]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return []

    source.stream_statuses = statuses  # type: ignore[method-assign]
    progress = ProgressLog(source, interval_s=0.01, caught_up_s=60.0, event_timezone="UTC")
    with log_records() as logs:
        task = asyncio.create_task(progress.run())
        try:
            await wait_until(lambda: len(calls) >= 3)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert [r["event"] for r in logs] == ["progress line failed"]
