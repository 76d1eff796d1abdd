"""SRTT-based liveness: burst-aware, RFC 6298 smoothing."""

from __future__ import annotations

import pytest

from consumer.core.liveness import Liveness


def test_rfc6298_smoothing():
    lv = Liveness(0.0, floor_s=1.0)
    lv.ping_sent(0.0)
    lv.pong(0.4)
    assert lv.srtt == pytest.approx(0.4) and lv.rttvar == pytest.approx(0.2)
    lv.ping_sent(10.0)
    lv.pong(10.8)
    assert lv.rttvar == pytest.approx(0.75 * 0.2 + 0.25 * abs(0.4 - 0.8))
    assert lv.srtt == pytest.approx(0.875 * 0.4 + 0.125 * 0.8)


def test_timeout_is_the_floor_until_rtt_says_more():
    lv = Liveness(0.0, floor_s=180.0, multiplier=4.0)
    assert lv.timeout == 180.0
    lv.ping_sent(0.0)
    lv.pong(0.05)
    assert lv.timeout == 180.0
    lv.ping_sent(1.0)
    lv.pong(201.0)  # a pong deferred by a long burst
    assert lv.timeout == pytest.approx(4 * lv.srtt + 4 * lv.rttvar)  # type: ignore[operator]
    assert lv.timeout > 180.0


def test_events_keep_the_connection_alive_while_pongs_are_deferred():
    lv = Liveness(0.0, floor_s=10.0)
    for t in range(0, 100):
        lv.ping_sent(float(t))  # pings every second, no pong during the burst
        lv.activity(t + 0.5)  # but events keep arriving
        assert not lv.is_dead(t + 0.9)
    assert lv.is_dead(100.5 + 10.0)


def test_silence_past_the_deadline_is_death():
    lv = Liveness(0.0, floor_s=5.0)
    lv.ping_sent(1.0)
    lv.pong(1.1)
    assert not lv.is_dead(6.0)
    assert lv.is_dead(6.1 + 0.01)


def test_time_the_loop_could_not_read_is_not_counted():
    lv = Liveness(0.0, floor_s=5.0)
    lv.unobserved(3.0)
    assert not lv.is_dead(7.0)
    assert lv.is_dead(8.0)


def test_a_pong_without_a_ping_is_still_proof_of_life():
    lv = Liveness(0.0, floor_s=5.0)
    lv.pong(4.0)
    assert lv.srtt is None and not lv.is_dead(8.0)
