"""A read-only view of a running daemon, for whoever reports on it (metrics, readiness,
systemd's STATUS=): snapshots taken on the event loop, so they never see a half-made change."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..core.watermark import Position
from .stream import StreamState


@dataclass(frozen=True, slots=True)
class StreamStatus:
    name: str
    state: StreamState
    last_close: str
    received: int
    delivered: int
    duplicates: int
    dead_lettered: int
    ignored: int
    malformed: int
    connections: int
    token_fetches: int
    token_failures: int
    closes: Mapping[str, int]  # close code ("4409", "http_429"...) -> sessions ended so
    in_flight: int
    position: Position | None  # newest done: where a new session resumes
    checkpoint_moved_at: float | None  # monotonic
    last_event_at: float | None  # monotonic
    srtt_s: float | None
    filtered: Mapping[str, int] = field(default_factory=dict)  # reason -> events filtered out
    waiting: str = ""  # what it waits for (e.g. a token endpoint that fails), for a person
    resume_gaps: int = 0  # resumes whose replay skipped past the checkpoint's event
    paused_pings: int = 0  # server pings answered while the reader waited for room
    sink_retries: int = 0  # failed sink writes retried
    sink_failing_since: float | None = None  # monotonic: writes retrying a failure since


@dataclass(frozen=True, slots=True)
class CommitStatus:
    failures: int  # consecutive failed commits
    failing_since: float | None  # monotonic
    busy_since: float | None  # monotonic start of the commit under way
    last_error: str = ""  # of the last failed commit while they fail, masked, one line


@dataclass(frozen=True, slots=True)
class FleetStatus:
    member: str
    leases_held: int
    members_live: int
    takeovers: int
    lost: int
    fencing_rejections: int
    self_fenced: int
    released_unreachable: int = 0  # handed over: not connected here for long


class StatusSource(Protocol):
    def stream_statuses(self) -> list[StreamStatus]: ...

    def commit_status(self) -> CommitStatus: ...

    def sink_counters(self) -> dict[str, float]:
        """The sink's own figures (e.g. orchestration GETs), by metric name."""
        ...

    def fleet_status(self) -> FleetStatus | None:
        """Fleet mode: this member's leases and what happened to them; else None."""
        ...
