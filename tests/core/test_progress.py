"""The catch-up estimator (consumer/core/progress.py): rates, event-time lag and the time left
to catch up, from samples given by hand."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.core.progress import Estimator, Phase, Sample

T0 = 1_800_000_000.0  # a wall clock, epoch seconds


def catch_up(lag0: float, speed: float, rate: float, t: float, waiting: int = 100) -> Sample:
    """``t`` seconds into a catch-up that started ``lag0`` behind, going through ``speed``
    seconds of event time and ``rate`` events a wall-clock second."""
    return Sample(T0 + t, int(rate * t), T0 - lag0 + speed * t, waiting)


@given(
    lag0=st.floats(3600.0, 30 * 86400.0),
    speed=st.floats(1.5, 10_000.0),
    interval=st.floats(0.1, 60.0),
    n=st.integers(2, 10),
)
def test_a_steady_catch_up_is_estimated_exactly(lag0, speed, interval, n):
    """Lag shrinks by speed - 1 a second: the estimate is the time left, at every sample."""
    est = Estimator(window=4, caught_up_s=60.0)
    for i in range(n):
        t = i * interval
        lag = lag0 - (speed - 1.0) * t
        if lag < 61.0:  # caught up (within caught_up_s): another test
            break
        p = est.add(Sample(T0 + t, 100 * i, T0 - lag0 + speed * t, 100))  # 100 per sample
        assert p.lag_s == pytest.approx(lag, rel=1e-6, abs=1e-3)
        if i == 0:  # one sample: no rate yet
            assert (p.phase, p.events_per_s, p.eta_s) == (Phase.BEHIND, None, None)
            continue
        assert p.phase is Phase.CATCHING_UP and p.behind
        # (T0 + t in a double: about 0.2 µs apart, so 1e-4 of a tenth of a second)
        assert p.events_per_s == pytest.approx(100.0 / interval, rel=1e-4)
        assert p.speed == pytest.approx(speed, rel=1e-4)
        assert p.eta_s == pytest.approx(lag / (speed - 1.0), rel=1e-3)


def test_the_estimate_follows_the_last_window_of_samples():
    est = Estimator(window=3, caught_up_s=60.0)
    for t in range(3):  # 100x: a day of lag goes in about 873 s
        est.add(catch_up(86400.0, 100.0, 500.0, t))
    before = est.add(catch_up(86400.0, 100.0, 500.0, 3))
    assert before.eta_s == pytest.approx((86400.0 - 99 * 3) / 99)
    # The sink slows down: 10x from t=3 on. Once the window holds only slow samples, so
    # does the estimate.
    lag3 = 86400.0 - 99 * 3
    slower = [
        est.add(Sample(T0 + t, 1500 + 50 * (t - 3), T0 - lag3 + 3 + 10 * (t - 3), 9))
        for t in (4, 5)
    ]
    # events/s is the last interval's at once; the speed (the estimate) is the window's
    assert slower[0].events_per_s == pytest.approx(50.0)
    assert slower[0].speed == pytest.approx((100 + 10) / 2)
    after = slower[1]
    assert after.speed == pytest.approx(10.0) and after.events_per_s == pytest.approx(50.0)
    assert after.eta_s == pytest.approx((lag3 - 9 * 2) / 9)


def test_a_lag_that_does_not_shrink_has_no_estimate():
    est = Estimator(window=4)
    # Half as fast as the events were made: the lag grows.
    for t in range(4):
        p = est.add(catch_up(7200.0, 0.5, 100.0, t))
    assert (p.phase, p.eta_s, p.behind) == (Phase.BEHIND, None, True)
    assert p.speed == pytest.approx(0.5) and p.lag_s == pytest.approx(7200.0 + 0.5 * 3)
    # Stuck: events wait, nothing gets done (a sink that is down).
    stuck = Estimator(window=4)
    for t in range(3):
        p = stuck.add(Sample(T0 + t, 10, T0 - 7200.0, waiting=2000))
    assert (p.phase, p.eta_s, p.events_per_s) == (Phase.BEHIND, None, 0.0)


def test_live_within_caught_up_s_and_idle_when_nothing_is_read():
    est = Estimator(window=4, caught_up_s=5.0)
    p = est.add(Sample(T0, 10, T0 - 0.2))
    assert (p.phase, p.eta_s, p.behind) == (Phase.LIVE, 0.0, False)
    # A quiet stream: its newest event gets older, nothing waits, nothing is done.
    p = est.add(Sample(T0 + 60.0, 10, T0 - 0.2))
    assert (p.phase, p.eta_s) == (Phase.IDLE, 0.0) and p.lag_s == pytest.approx(60.2)
    # No event done yet and none waiting (a stream just started, or an empty backlog).
    assert Estimator().add(Sample(T0, 0, None)).phase is Phase.IDLE
    assert Estimator().add(Sample(T0, 0, None, waiting=5)).phase is Phase.BEHIND


def test_a_restarted_daemon_starts_the_window_over():
    est = Estimator(window=4)
    for t in range(3):
        est.add(catch_up(86400.0, 50.0, 1000.0, t))
    p = est.add(Sample(T0 + 3, 5, T0 - 80000.0, 100))  # the counter went back
    assert (p.events_per_s, p.speed, p.eta_s) == (None, None, None)
    p = est.add(Sample(T0 + 4, 1005, T0 - 80000.0 + 50.0, 100))
    assert p.events_per_s == pytest.approx(1000.0) and p.speed == pytest.approx(50.0)


def test_samples_without_an_event_time_do_not_count_for_speed():
    est = Estimator(window=4)
    est.add(Sample(T0, 0, None, 500))
    p = est.add(Sample(T0 + 1, 100, T0 - 3600.0, 400))
    assert p.speed is None and p.events_per_s == pytest.approx(100.0) and p.eta_s is None
    p = est.add(Sample(T0 + 2, 200, T0 - 3600.0 + 11.0, 300))
    assert p.speed == pytest.approx(11.0) and p.eta_s == pytest.approx((3600.0 - 9.0) / 10.0)


def test_a_window_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        Estimator(window=1)
