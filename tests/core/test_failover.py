"""Unit tests for consumer.core.failover: when a fleet member hands over a stream it cannot
connect, and when it must not (no other member shows it reaches the gateway). No I/O: the
database's clock is a float."""

from __future__ import annotations

import math

from consumer.core.assignment import Member
from consumer.core.failover import Failover, reached_at

T0 = 1000.0
AFTER = 15.0  # release_unreachable_after_s
FRESH = 5.0  # lease_ttl_s

A, B, C = Member("a", 1.0), Member("b", 1.0), Member("c", 1.0)


def down(stream: str, since: float) -> Failover:
    """A member running ``stream``, not ready since ``since``."""
    return Failover().observe(running=[stream], ready=[], now=since)


def due(f: Failover, members: list[Member], connected: dict[str, float | None], now: float):
    return f.due("a", members, connected, now, after=AFTER, fresh=FRESH)


def test_a_stream_down_long_enough_is_due_when_another_member_is_connected() -> None:
    f = down("s1", T0).observe(running=["s1"], ready=[], now=T0 + AFTER)
    assert due(f, [A, B], {"b": T0 + AFTER - 1}, T0 + AFTER) == ("s1",)


def test_not_before_after() -> None:
    f = down("s1", T0)
    assert due(f, [A, B], {"b": T0 + AFTER - 2}, T0 + AFTER - 1) == ()


def test_a_ready_tick_resets_the_clock() -> None:
    """Streaming (or a lockout, a gap: anything ready) even once starts the wait over."""
    f = down("s1", T0).observe(running=["s1"], ready=["s1"], now=T0 + 10)
    f = f.observe(running=["s1"], ready=[], now=T0 + 11)
    assert f.down_since == {"s1": T0 + 11}
    assert due(f, [A, B], {"b": T0 + AFTER}, T0 + AFTER) == ()
    assert due(f, [A, B], {"b": T0 + 11 + AFTER}, T0 + 11 + AFTER) == ("s1",)


def test_a_stream_no_longer_run_forgets_its_clock() -> None:
    f = down("s1", T0).observe(running=[], ready=[], now=T0 + 1)
    assert f.down_since == {}


def test_no_evidence_no_release() -> None:
    """A fleet of one, other members that never connected (NULL: another version, or nothing
    held), or whose last connection is older than ``fresh``: a gateway outage for all."""
    f = down("s1", T0)
    now = T0 + 3 * AFTER
    assert due(f, [A], {}, now) == ()
    assert due(f, [A, B], {"b": None}, now) == ()
    assert due(f, [A, B], {"b": now - FRESH - 0.1}, now) == ()
    assert due(f, [A, B], {"a": now}, now) == ()  # its own connections prove nothing


def test_evidence_from_before_the_stream_went_down_does_not_count() -> None:
    """Another member's last connection predates this stream's trouble: nothing shows it
    reaches the gateway now that this member cannot."""
    f = down("s1", T0)
    assert due(f, [A, B], {"b": T0 - 0.5}, T0 + 2) == ()
    f = f.observe(running=["s1"], ready=[], now=T0 + AFTER)
    assert due(f, [A, B], {"b": T0}, T0 + FRESH - 1) == ()


def test_draining_or_weightless_members_are_no_evidence() -> None:
    f = down("s1", T0)
    now = T0 + AFTER
    drained, light = Member("b", 1.0, draining=True), Member("c", 0.0)
    assert due(f, [A, drained, light], {"b": now, "c": now}, now) == ()
    assert due(f, [A, drained, light, Member("d", 2.0)], {"b": now, "d": now}, now) == ("s1",)


def test_hostile_times_are_no_evidence() -> None:
    now = T0 + AFTER
    for t in (math.nan, math.inf, -math.inf, now + 365 * 86400.0):
        assert reached_at("a", [A, B], {"b": t}, now, FRESH) is None
    assert reached_at("a", [A, B, C], {"b": now - 1, "c": now - 2}, now, FRESH) == now - 1


def test_zero_disables() -> None:
    f = down("s1", T0)
    assert f.due("a", [A, B], {"b": T0 + 99}, T0 + 100, after=0.0, fresh=FRESH) == ()


def test_handed_over_streams_are_avoided_for_the_cooldown() -> None:
    f = down("s1", T0).handed_over(["s1"], T0 + AFTER, AFTER)
    assert f.down_since == {} and f.avoided() == {"s1"}
    f = f.observe(running=[], ready=[], now=T0 + 2 * AFTER - 0.1)
    assert f.avoided() == {"s1"}
    f = f.observe(running=[], ready=[], now=T0 + 2 * AFTER)
    assert f.avoided() == frozenset()


def test_only_the_streams_down_are_due() -> None:
    f = Failover().observe(running=["s1", "s2", "s3"], ready=["s2"], now=T0)
    f = f.observe(running=["s1", "s2", "s3"], ready=["s2", "s3"], now=T0 + 1)
    assert due(f, [A, B], {"b": T0 + AFTER}, T0 + AFTER) == ("s1",)
