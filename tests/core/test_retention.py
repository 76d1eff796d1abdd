"""Unit tests for consumer.core.retention.PruneCutoff: clock steps never wipe recent ids."""

from __future__ import annotations

from consumer.core.retention import PruneCutoff

DAY = 86400.0


def test_the_first_cutoff_is_the_retention_behind_the_wall_clock() -> None:
    assert PruneCutoff(8 * DAY).next(100 * DAY, 5.0) == 92 * DAY


def test_it_follows_the_wall_clock_while_both_clocks_agree() -> None:
    cut = PruneCutoff(8 * DAY)
    cut.next(100 * DAY, 0.0)
    assert cut.next(100 * DAY + 3600, 3600.0) == 92 * DAY + 3600


def test_a_wall_clock_stepped_forward_moves_it_no_faster_than_time_passed() -> None:
    # NTP steps the clock 9 days forward an hour into the run: ids stamped minutes ago must
    # not all fall behind the cutoff.
    cut = PruneCutoff(8 * DAY)
    first = cut.next(100 * DAY, 0.0)
    stepped = cut.next(109 * DAY + 3600, 3600.0)
    assert stepped == first + 3600
    assert stepped < 100 * DAY  # the ids of the last day before the step all stay


def test_a_wall_clock_stepped_back_moves_it_back() -> None:
    cut = PruneCutoff(8 * DAY)
    cut.next(100 * DAY, 0.0)
    assert cut.next(99 * DAY, 60.0) == 91 * DAY  # prunes less, never more


def test_the_first_cutoff_of_a_restart_is_held_behind_the_newest_stamp() -> None:
    """Ids stamped by a clock 14 days slow, then a restart once NTP corrected it: to the
    corrected clock they all look old. The first cutoff stays the retention behind the newest
    of them, and moves on only as time passes."""
    cutoffs = PruneCutoff(8 * DAY)
    newest = 86 * DAY  # stamped "now" by the slow clock; the corrected one says day 100
    assert cutoffs.next(100 * DAY, 5.0, newest) == 78 * DAY  # not 92: nothing of theirs goes
    assert cutoffs.next(100 * DAY + 3600, 5.0 + 3600, newest) == 78 * DAY + 3600
    # No stamp in the store: the wall clock's, as before; a newer stamp never lowers it.
    assert PruneCutoff(8 * DAY).next(100 * DAY, 5.0, None) == 92 * DAY
    assert PruneCutoff(8 * DAY).next(100 * DAY, 5.0, 101 * DAY) == 92 * DAY
