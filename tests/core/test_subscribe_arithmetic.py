"""The arithmetic of OHIP's timing rules around subscribe (consumer/core/subscribe_timing.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from consumer.config.settings import ConnectionSettings
from consumer.core.subscribe_timing import SUBSCRIBE_MARGIN_S, SubscribeDeadline, gap_left


def test_the_gap_left_since_a_recorded_close() -> None:
    assert gap_left(None, 1000.0, 10.0) == 0.0  # nothing recorded: subscribe now
    assert gap_left(996.0, 1000.0, 10.0) == 6.0
    assert gap_left(980.0, 1000.0, 10.0) == 0.0  # long past
    assert gap_left(999.0, 1000.0, 0.0) == 0.0  # no gap configured
    # The clock jumped back since the close was recorded: never more than the gap itself.
    assert gap_left(5000.0, 1000.0, 10.0) == 10.0


def test_the_deadline_bounds_each_wait_and_the_subscribe() -> None:
    d = SubscribeDeadline.after_init(100.0, 10.0)
    assert d.left(100.0) == 10.0 - SUBSCRIBE_MARGIN_S
    assert d.bound(5.0, 100.0) == (5.0, False)  # the ack timeout is the shorter: its own error
    assert d.bound(5.0, 106.0) == (10.0 - SUBSCRIBE_MARGIN_S - 6.0, True)
    assert d.left(109.8) == 0.0  # a jitter here would be cut to nothing
    assert not d.passed(109.8)  # but the subscribe may still go
    assert d.passed(110.01)


@pytest.mark.parametrize("value", [0.0, SUBSCRIBE_MARGIN_S, -1.0])
def test_a_deadline_that_leaves_no_room_is_refused(value: float) -> None:
    with pytest.raises(ValidationError, match="subscribe_deadline_s"):
        ConnectionSettings(subscribe_deadline_s=value)
