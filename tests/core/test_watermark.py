"""The offset low watermark: any completion order, never past an unfinished frame."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.core.watermark import Position, Watermark


def pos(i: int) -> Position:
    return Position(f"off-{i}", f"id-{i}")


def test_position_waits_for_the_oldest_frame():
    wm = Watermark()
    seqs = [wm.add(pos(i)) for i in range(3)]
    wm.done(seqs[2])
    wm.done(seqs[1])
    assert wm.position is None and wm.in_flight == 3
    wm.done(seqs[0])
    assert wm.position == pos(2) and wm.in_flight == 0


def test_frames_without_position_hold_the_line_but_carry_no_offset():
    wm = Watermark()
    a = wm.add(pos(1))
    bad = wm.add(None)
    c = wm.add(pos(3))
    wm.done(a)
    wm.done(c)
    assert wm.position == pos(1)
    wm.done(bad)
    assert wm.position == pos(3)


def test_advance_reports_only_moves_and_rewind_offers_again():
    wm = Watermark()
    wm.done(wm.add(pos(1)))
    assert wm.advance() == pos(1)
    assert wm.advance() is None
    wm.rewind()
    assert wm.advance() == pos(1)
    wm.done(wm.add(pos(2)))
    assert wm.advance() == pos(2)


def test_unknown_sequences_are_refused():
    wm = Watermark()
    s = wm.add(pos(1))
    wm.done(s)
    with pytest.raises(ValueError):
        wm.done(s)  # already retired
    with pytest.raises(ValueError):
        wm.done(s + 5)


def test_only_the_newest_frame_can_be_cancelled():
    wm = Watermark()
    a = wm.add(pos(1))
    b = wm.add(pos(2))
    with pytest.raises(ValueError):
        wm.cancel(a)
    wm.cancel(b)
    assert wm.in_flight == 1
    wm.done(a)
    assert wm.position == pos(1) and wm.in_flight == 0


@given(
    st.lists(st.booleans(), min_size=1, max_size=60).flatmap(
        lambda kinds: st.tuples(st.just(kinds), st.permutations(range(len(kinds))))
    )
)
def test_any_completion_order_never_passes_an_unfinished_frame(case: tuple[list[bool], list[int]]):
    kinds, order = case  # kinds[i]: frame i has a position (else it is a malformed frame)
    wm = Watermark()
    seqs = [wm.add(pos(i) if has else None) for i, has in enumerate(kinds)]
    finished: set[int] = set()
    for i in order:
        wm.done(seqs[i])
        finished.add(i)
        prefix = 0
        while prefix in finished:
            prefix += 1
        # the newest frame with a position inside the finished prefix
        expected = next((pos(j) for j in range(prefix - 1, -1, -1) if kinds[j]), None)
        assert wm.position == expected
        assert wm.in_flight == len(kinds) - prefix
