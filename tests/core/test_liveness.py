"""Unit tests for consumer.core.liveness.Liveness (RFC 6298 smoothing, burst-aware deadline)."""

from __future__ import annotations

import pytest

from consumer.core.liveness import Liveness, first_ping_due


def feed(lv: Liveness, start: float, rtts: list[float]) -> float:
    """Send one ping per sample and answer it; returns the time of the last pong."""
    t = start
    for r in rtts:
        lv.ping_sent(t)
        t += r
        lv.pong(t)
        t += 1.0
    return t - 1.0


def test_no_sample_means_floor_timeout() -> None:
    lv = Liveness(100.0, floor_s=30.0)
    assert lv.srtt is None
    assert lv.rttvar is None
    assert lv.timeout == 30.0
    assert lv.deadline() == 130.0


def test_first_sample_sets_srtt_and_half_rttvar() -> None:
    lv = Liveness(0.0, floor_s=0.001)
    feed(lv, 0.0, [2.0])
    assert lv.srtt == pytest.approx(2.0)
    assert lv.rttvar == pytest.approx(1.0)


def test_rfc6298_values_for_a_known_sequence() -> None:
    lv = Liveness(0.0, floor_s=0.001)
    samples = [1.0, 2.0, 0.5, 0.5, 4.0]
    srtt = rttvar = None
    for i, r in enumerate(samples):
        feed(lv, 10.0 * i + 100.0, [r])
        if srtt is None or rttvar is None:
            srtt, rttvar = r, r / 2
        else:
            rttvar = 0.75 * rttvar + 0.25 * abs(srtt - r)
            srtt = 0.875 * srtt + 0.125 * r
        assert lv.srtt == pytest.approx(srtt)
        assert lv.rttvar == pytest.approx(rttvar)
    # hand-computed: after 1.0, 2.0, 0.5 -> rttvar 0.625, srtt 1.046875
    lv2 = Liveness(0.0, floor_s=0.001)
    feed(lv2, 0.0, [1.0, 2.0, 0.5])
    assert lv2.rttvar == pytest.approx(0.625)
    assert lv2.srtt == pytest.approx(1.046875)


def test_rttvar_uses_the_srtt_before_the_update() -> None:
    lv = Liveness(0.0, floor_s=0.001)
    feed(lv, 0.0, [1.0, 3.0])
    # rttvar = 3/4 * 0.5 + 1/4 * |1 - 3| = 0.875 (with the new srtt 1.25 it would be 0.8125)
    assert lv.rttvar == pytest.approx(0.875)
    assert lv.srtt == pytest.approx(1.25)


def test_timeout_formula_above_the_floor() -> None:
    lv = Liveness(0.0, floor_s=1.0, multiplier=4.0)
    feed(lv, 0.0, [2.0])
    assert lv.timeout == pytest.approx(4 * 2.0 + 4 * 1.0)
    lv3 = Liveness(0.0, floor_s=1.0, multiplier=3.0)
    feed(lv3, 0.0, [2.0])
    assert lv3.timeout == pytest.approx(3 * 2.0 + 4 * 1.0)


def test_timeout_never_below_the_floor() -> None:
    lv = Liveness(0.0, floor_s=180.0)
    feed(lv, 0.0, [0.05, 0.07, 0.04])
    assert lv.timeout == 180.0


def test_pongs_answer_pings_in_order() -> None:
    lv = Liveness(0.0, floor_s=0.001)
    lv.ping_sent(0.0)
    lv.ping_sent(1.0)
    lv.pong(2.0)  # answers the ping at 0.0: sample 2.0
    assert lv.srtt == pytest.approx(2.0)
    lv.pong(3.0)  # answers the ping at 1.0: sample 2.0
    assert lv.srtt == pytest.approx(2.0)
    assert lv.rttvar == pytest.approx(0.75)


def test_pong_without_ping_is_proof_of_life_but_no_sample() -> None:
    lv = Liveness(0.0, floor_s=10.0)
    lv.pong(8.0)
    assert lv.srtt is None
    assert lv.deadline() == 18.0
    assert not lv.is_dead(17.9)


def test_deadline_boundary() -> None:
    lv = Liveness(100.0, floor_s=10.0)
    assert not lv.is_dead(109.999)
    assert lv.is_dead(110.0)
    assert lv.is_dead(500.0)


def test_activity_resets_the_deadline() -> None:
    lv = Liveness(0.0, floor_s=10.0)
    lv.activity(9.0)
    assert lv.deadline() == 19.0
    assert not lv.is_dead(18.0)
    assert lv.is_dead(19.0)


def test_pong_resets_the_deadline() -> None:
    lv = Liveness(0.0, floor_s=10.0)
    lv.ping_sent(5.0)
    lv.pong(9.0)  # sample 4.0: timeout max(10, 4*4 + 4*2) = 24
    assert lv.timeout == pytest.approx(24.0)
    assert lv.deadline() == pytest.approx(33.0)
    assert not lv.is_dead(32.9)
    assert lv.is_dead(33.0)


def test_deferred_pong_during_a_burst_never_kills() -> None:
    floor = 10.0
    lv = Liveness(0.0, floor_s=floor)
    feed(lv, 0.0, [0.1])  # a healthy sample before the burst
    t = 2.0
    lv.ping_sent(t)  # the server defers this pong until the burst ends
    for _ in range(1000):  # 1000 s of `next` frames, one every 0.9 s... and pings unanswered
        t += 0.9
        lv.activity(t)
        if int(t) % 15 == 0:
            lv.ping_sent(t)
        assert not lv.is_dead(t)
        assert not lv.is_dead(t + 0.89)
    # the burst ends and the deferred pong arrives: still alive, and it measured the burst,
    # not the link, so the round-trip estimate stays as it was
    lv.pong(t + 0.5)
    assert not lv.is_dead(t + 0.5)
    assert lv.srtt == pytest.approx(0.1)


def test_silence_past_the_deadline_is_dead() -> None:
    lv = Liveness(0.0, floor_s=10.0)
    lv.activity(50.0)
    lv.ping_sent(55.0)  # no pong, no data
    assert not lv.is_dead(59.9)
    assert lv.is_dead(60.0)


def test_silence_with_a_large_srtt_uses_the_computed_timeout() -> None:
    lv = Liveness(0.0, floor_s=1.0)
    last = feed(lv, 0.0, [5.0])  # srtt 5, rttvar 2.5 -> timeout 4*5 + 4*2.5 = 30
    assert lv.timeout == pytest.approx(30.0)
    assert not lv.is_dead(last + 29.9)
    assert lv.is_dead(last + 30.0)


def test_unobserved_time_is_not_counted() -> None:
    lv = Liveness(0.0, floor_s=10.0)
    lv.unobserved(5.0)
    assert lv.deadline() == 15.0
    lv.unobserved(-3.0)  # negative durations are ignored
    assert lv.deadline() == 15.0


def test_negative_rtt_is_clamped() -> None:
    lv = Liveness(0.0, floor_s=0.001)
    lv.ping_sent(10.0)
    lv.pong(9.0)  # clock oddity
    assert lv.srtt == 0.0
    assert lv.rttvar == 0.0


def test_a_pong_held_back_by_a_burst_is_no_round_trip_sample() -> None:
    # OHIP defers pongs until a burst ends: a ping sent at the start of a 300 s burst is
    # answered at its end. Counting that as a round trip made the deadline ~800 s for minutes.
    lv = Liveness(0.0, floor_s=180.0)
    feed(lv, 0.0, [0.05, 0.05])
    lv.ping_sent(10.0)
    for t in range(11, 310):
        lv.activity(float(t))  # the burst's events
    lv.pong(310.0)
    assert lv.srtt == pytest.approx(0.05)
    assert lv.timeout == 180.0
    assert lv.is_dead(310.0 + 180.0)


def test_a_quiet_link_still_samples_its_pongs() -> None:
    lv = Liveness(0.0, floor_s=0.001)
    lv.activity(1.0)
    lv.ping_sent(2.0)  # the event came before the ping: this pong measures the link
    lv.pong(5.0)
    assert lv.srtt == pytest.approx(3.0)


def test_the_deadline_never_grows_past_the_ceiling() -> None:
    lv = Liveness(0.0, floor_s=180.0, ceiling_s=600.0)
    feed(lv, 0.0, [400.0])  # a genuinely slow round trip: 4*400 + 4*200
    assert lv.timeout == 600.0
    assert Liveness(0.0, floor_s=180.0, ceiling_s=60.0).timeout == 180.0  # floor wins


def test_the_first_ping_counts_from_connection_init() -> None:
    # init at 100, pings every 10 s: the first is due at 110 whenever subscribe went out...
    assert first_ping_due(100.0, 10.0, now=104.0) == 110.0
    # ...and at once when the waits before subscribing took longer than that
    assert first_ping_due(100.0, 10.0, now=112.5) == 112.5


def test_a_bursts_pings_answered_by_one_pong_leave_no_lag_behind() -> None:
    """A burst's pings answered by one pong at its end (pongs carry no id): the quiet link after
    it is measured as it is, not each pong against a ping sent many intervals before it."""
    lv = Liveness(0.0, floor_s=180.0, ceiling_s=600.0)
    t = 0.0
    for _ in range(30):  # five minutes of events, a ping every 10 s, no pong
        lv.ping_sent(t)
        for _ in range(10):
            t += 1.0
            lv.activity(t)
    lv.pong(t + 0.05)  # one pong when the burst ends
    for _ in range(60):  # then ten quiet minutes, each ping answered after 50 ms
        t += 10.0
        lv.ping_sent(t)
        lv.pong(t + 0.05)
    assert lv.srtt == pytest.approx(0.05)
    assert lv.timeout == 180.0


def test_a_pong_after_a_burst_pairs_with_the_ping_sent_after_it() -> None:
    """Every ping answered, late: the pong of a ping sent during the burst is no sample, and
    the one of a ping sent after the burst's last event pairs with it."""
    lv = Liveness(0.0, floor_s=0.001)
    lv.ping_sent(1.0)
    lv.activity(2.0)  # the burst's last event
    lv.ping_sent(3.0)
    lv.pong(3.5)  # the first ping's pong, or one for both: either way after the burst
    assert lv.srtt == pytest.approx(0.5)
    lv.pong(4.0)  # none left to pair: proof of life only
    assert lv.srtt == pytest.approx(0.5)
    assert lv.deadline() == pytest.approx(4.0 + lv.timeout)
