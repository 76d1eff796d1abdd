"""Progress lines: while a stream is behind, a ``progress`` line per stream every ``[log]
progress_interval_s`` (phase "catching up" or "behind", events/s, event-time lag, the estimated
time to catch up: ``eta_s``, None when unknown), and one ``caught up`` line when it is not
behind any more. A long catch-up is no longer silent between
"subscribed" and its end.

Only samples and logs: the estimate is :mod:`consumer.core.progress`'s. A sample is the
daemon's read-only view (:class:`~.status.StreamStatus`): events done so far, events waiting,
and the timestamp of the newest done event (the checkpoint's position), parsed once a sample.
"""

from __future__ import annotations

import asyncio
import time
from zoneinfo import ZoneInfo

import structlog

from ..core.events import event_time
from ..core.progress import Estimator, Progress, Sample, rounded
from .status import StatusSource, StreamStatus

log = structlog.get_logger(__name__)

WINDOW = 6  # samples the rates are taken over: a minute at the default interval


class ProgressLog:
    def __init__(
        self, source: StatusSource, *, interval_s: float, caught_up_s: float, event_timezone: str
    ) -> None:
        self._source = source
        self._interval = interval_s
        self._caught_up_s = caught_up_s
        self._zone = ZoneInfo(event_timezone)
        self._streams: dict[str, tuple[Estimator, bool]] = {}  # name -> estimator, was behind

    async def run(self) -> None:
        """Sample and log every interval (the first sample at once), until cancelled."""
        while True:
            try:
                self.tick()
            except Exception:  # a bug here must not stop the daemon: it only reports
                log.exception("progress line failed")
            await asyncio.sleep(self._interval)

    def tick(self, now: float | None = None) -> dict[str, Progress]:
        """One sample of every stream; logs what is to be logged. Returns the progress."""
        now = time.time() if now is None else now
        out: dict[str, Progress] = {}
        for st in self._source.stream_statuses():
            estimator, was_behind = self._streams.get(st.name) or (self._estimator(), False)
            p = out[st.name] = estimator.add(self.sample(st, now))
            # Two samples give a rate, two with an event time the speed: nothing said before.
            known = p.events_per_s is not None and (p.speed is not None or p.lag_s is None)
            behind = p.behind and known
            if behind:
                log.info(
                    "progress",
                    stream=st.name,
                    phase=p.phase.value,
                    events_per_s=round(p.events_per_s or 0.0, 1),
                    lag_s=rounded(p.lag_s),
                    speed=rounded(p.speed),  # seconds of event time gone through a second
                    eta_s=rounded(p.eta_s),
                    waiting=st.in_flight,
                    offset=st.position.offset if st.position else None,
                )
            elif was_behind and not p.behind:
                log.info("caught up", stream=st.name, lag_s=rounded(p.lag_s), phase=p.phase.value)
            self._streams[st.name] = (estimator, behind or (was_behind and p.behind))
        for gone in set(self._streams) - set(out):  # stopped here (fleet): its counters too
            del self._streams[gone]
        return out

    def sample(self, st: StreamStatus, now: float) -> Sample:
        done = st.delivered + st.duplicates + st.dead_lettered + sum(st.filtered.values())
        stamp = st.position.timestamp if st.position is not None else None
        return Sample(now, done, event_time(stamp, self._zone), st.in_flight)

    def _estimator(self) -> Estimator:
        return Estimator(window=WINDOW, caught_up_s=self._caught_up_s)
