"""A stream's catch-up progress, without I/O: from samples taken now and then (events done so far,
the own timestamp of the newest done event) the rate, the event-time lag and the time left to
catch up.

Lag is event time: the sample's wall clock minus the newest done event's timestamp. Reading a
backlog, the consumer goes through ``speed`` seconds of event time per wall-clock second, while
the wall clock moves on by one: the lag shrinks by ``speed - 1`` a second, and the estimate of
the time to catch up is ``lag / (speed - 1)`` (the rest of the backlog assumed as dense in
events as the part read over the window). Unknown when the lag does not shrink.

The samples are the caller's (the daemon's progress lines, the ``status`` command's scrapes):
events/s is over the last interval between two, the speed (so the estimate) over the last
``window`` of them, steadier.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum


class Phase(StrEnum):
    LIVE = "live"  # the lag is within caught_up_s
    IDLE = "idle"  # nothing done over the window and nothing waiting: no events to read
    CATCHING_UP = "catching up"  # the lag shrinks: eta_s says when it is gone
    BEHIND = "behind"  # the lag does not shrink, and events arrive or wait: eta unknown


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # wall clock, epoch seconds
    done: int  # events done so far: a counter (one that goes down was restarted)
    event_at: float | None  # own timestamp of the newest done event, epoch seconds
    waiting: int = 0  # events read and not done yet


@dataclass(frozen=True, slots=True)
class Progress:
    phase: Phase
    lag_s: float | None  # None: no event done yet
    events_per_s: float | None  # over the last interval (None: one sample so far)
    speed: float | None  # seconds of event time gone through per second (None: not known yet)
    eta_s: float | None  # to catch up: 0.0 when live or idle, None when unknown

    @property
    def behind(self) -> bool:
        return self.phase in (Phase.CATCHING_UP, Phase.BEHIND)


class Estimator:
    """One stream's samples (the last ``window``) and what they say. ``caught_up_s``: a lag up to
    this is live (events take a moment to arrive; a quiet stream's newest event gets older)."""

    def __init__(self, *, window: int = 6, caught_up_s: float = 60.0) -> None:
        if window < 2:
            raise ValueError("a rate needs a window of at least 2 samples")
        self._samples: deque[Sample] = deque(maxlen=window)
        self._caught_up_s = caught_up_s

    def add(self, sample: Sample) -> Progress:
        samples = self._samples
        if samples and (sample.done < samples[-1].done or sample.at <= samples[-1].at):
            samples.clear()  # a restarted counter, or a clock that went back: start over
        samples.append(sample)
        return self._progress()

    def _progress(self) -> Progress:
        first, last = self._samples[0], self._samples[-1]
        lag = None if last.event_at is None else max(0.0, last.at - last.event_at)
        rate = speed = None
        if len(self._samples) > 1:
            before = self._samples[-2]  # the rate now: a catch-up's end shows at once
            rate = (last.done - before.done) / (last.at - before.at)
            timed = [(s.at, s.event_at) for s in self._samples if s.event_at is not None]
            if len(timed) > 1:
                (t0, e0), (t1, e1) = timed[0], timed[-1]
                speed = (e1 - e0) / (t1 - t0)
        if lag is not None and lag <= self._caught_up_s:
            return Progress(Phase.LIVE, lag, rate, speed, 0.0)
        if last.waiting == 0 and (lag is None or (rate is not None and last.done == first.done)):
            return Progress(Phase.IDLE, lag, rate, speed, 0.0)
        if lag is not None and speed is not None and speed > 1.0:
            return Progress(Phase.CATCHING_UP, lag, rate, speed, lag / (speed - 1.0))
        return Progress(Phase.BEHIND, lag, rate, speed, None)


def rounded(value: float | None) -> float | None:
    """A figure for a person or a log line: one decimal."""
    return None if value is None else round(value, 1)
