"""The upgrade budget: never more than `limit` attempts in any window."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.core.upgrade_budget import UpgradeBudget


def test_under_the_limit_attempts_go_at_once():
    b = UpgradeBudget(limit=3, window_s=10)
    assert [b.reserve(0.0), b.reserve(1.0), b.reserve(2.0)] == [0.0, 0.0, 0.0]
    assert b.reserve(3.0) == pytest.approx(7.0)  # waits for the first to leave the window
    assert b.reserve(20.0) == 0.0


@given(st.lists(st.floats(min_value=0, max_value=500), min_size=1, max_size=400))
def test_no_window_ever_holds_more_than_the_limit(calls: list[float]):
    b = UpgradeBudget(limit=150, window_s=120)
    booked = []
    for now in sorted(calls):
        booked.append(now + b.reserve(now))
    booked.sort()
    for i in range(len(booked) - 150):
        assert booked[i + 150] - booked[i] >= 120 - 1e-9


def test_everything_failing_at_once():
    b = UpgradeBudget(limit=150, window_s=120)
    waits = [b.reserve(0.0) for _ in range(450)]
    assert waits[:150] == [0.0] * 150
    assert waits[150] == pytest.approx(120.0) and waits[300] == pytest.approx(240.0)


def test_invalid_settings():
    with pytest.raises(ValueError):
        UpgradeBudget(limit=0)
