"""Unit tests for consumer.core.watermark.Watermark."""

from __future__ import annotations

import weakref
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.core.watermark import Position, Watermark


def pos(i: int) -> Position:
    return Position(f"{i:04d}", f"uid-{i}")


def test_empty_watermark() -> None:
    wm = Watermark()
    assert wm.position is None
    assert wm.advance() is None
    assert wm.in_flight == 0


def test_add_returns_consecutive_sequence_numbers_across_completions() -> None:
    wm = Watermark()
    assert [wm.add(pos(i)) for i in range(3)] == [0, 1, 2]
    wm.done(0)
    wm.done(1)
    assert wm.add(pos(3)) == 3
    assert wm.in_flight == 2


def test_position_waits_for_the_oldest_unfinished_frame() -> None:
    wm = Watermark()
    seqs = [wm.add(pos(i)) for i in range(4)]
    wm.done(seqs[2])
    wm.done(seqs[1])
    assert wm.position is None  # frame 0 is not done
    assert wm.in_flight == 4
    wm.done(seqs[0])
    assert wm.position == pos(2)
    assert wm.in_flight == 1
    wm.done(seqs[3])
    assert wm.position == pos(3)
    assert wm.in_flight == 0


def test_frames_without_position_take_a_slot() -> None:
    wm = Watermark()
    a = wm.add(pos(1))
    b = wm.add(None)
    c = wm.add(pos(3))
    wm.done(c)
    wm.done(a)
    assert wm.position == pos(1)  # b (malformed) holds the line
    wm.done(b)
    assert wm.position == pos(3)


def test_a_done_prefix_of_only_none_frames_has_no_position() -> None:
    wm = Watermark()
    wm.done(wm.add(None))
    assert wm.position is None
    assert wm.advance() is None
    wm.done(wm.add(pos(5)))
    assert wm.position == pos(5)
    wm.done(wm.add(None))
    assert wm.position == pos(5)  # a trailing None frame keeps the last real position


def test_advance_reports_only_moves() -> None:
    wm = Watermark()
    s0, s1 = wm.add(pos(0)), wm.add(pos(1))
    assert wm.advance() is None
    wm.done(s1)
    assert wm.advance() is None  # s0 still pending: nothing moved
    wm.done(s0)
    assert wm.advance() == pos(1)
    assert wm.advance() is None
    wm.done(wm.add(None))
    assert wm.advance() is None  # a None frame does not move the position
    wm.done(wm.add(pos(2)))
    assert wm.advance() == pos(2)
    assert wm.advance() is None


def test_rewind_offers_the_position_again() -> None:
    wm = Watermark()
    wm.done(wm.add(pos(0)))
    assert wm.advance() == pos(0)
    assert wm.advance() is None
    wm.rewind()
    assert wm.advance() == pos(0)
    assert wm.advance() is None


def test_rewind_before_any_position_offers_nothing() -> None:
    wm = Watermark()
    wm.rewind()
    assert wm.advance() is None


@pytest.mark.parametrize("bad", [-1, 3, 100])
def test_done_of_an_unknown_sequence_raises(bad: int) -> None:
    wm = Watermark()
    for i in range(3):
        wm.add(pos(i))
    with pytest.raises(ValueError, match="not pending"):
        wm.done(bad)


def test_done_of_an_already_retired_sequence_raises() -> None:
    wm = Watermark()
    s = wm.add(pos(0))
    wm.add(pos(1))
    wm.done(s)
    with pytest.raises(ValueError):
        wm.done(s)


def test_done_on_empty_watermark_raises() -> None:
    with pytest.raises(ValueError):
        Watermark().done(0)


@st.composite
def frames_and_order(draw: st.DrawFn) -> tuple[list[bool], list[int]]:
    has_pos = draw(st.lists(st.booleans(), min_size=0, max_size=40))
    order = draw(st.permutations(range(len(has_pos))))
    return has_pos, list(order)


@given(frames_and_order())
def test_any_completion_order_never_passes_an_unfinished_frame(
    case: tuple[list[bool], list[int]],
) -> None:
    has_pos, order = case
    wm = Watermark()
    positions = [pos(i) if p else None for i, p in enumerate(has_pos)]
    seqs = [wm.add(p) for p in positions]
    assert seqs == list(range(len(positions)))
    assert wm.in_flight == len(positions)

    done: set[int] = set()
    last_advanced: Position | None = None
    for seq in order:
        wm.done(seq)
        done.add(seq)
        prefix = 0
        while prefix in done:
            prefix += 1
        expected = next((p for p in reversed(positions[:prefix]) if p is not None), None)
        assert wm.position == expected
        assert wm.in_flight == len(positions) - prefix
        adv = wm.advance()
        if expected is not None and expected != last_advanced:
            assert adv == expected
            last_advanced = adv
        else:
            assert adv is None
        if wm.position is not None:
            # never beyond an unfinished frame
            idx = positions.index(wm.position)
            assert all(i in done for i in range(idx + 1))
    assert wm.in_flight == 0
    assert wm.position == next((p for p in reversed(positions) if p is not None), None)


@st.composite
def batched_completions(draw: st.DrawFn) -> tuple[list[int], list[list[int]]]:
    """Chunks of frames registered together, and completions in batches of any order."""
    sizes = draw(st.lists(st.integers(1, 400), min_size=1, max_size=8))
    order = draw(st.permutations(range(sum(sizes))))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=20)))
    batches = [list(order[a:b]) for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]
    return sizes, [b for b in batches if b]


@given(batched_completions())
def test_chunks_and_batched_completions_match_one_at_a_time(
    case: tuple[list[int], list[list[int]]],
) -> None:
    """add_all/done_all (the pipeline's path) give the same positions as add/done, across
    the compaction of the done prefix (more than 1,024 frames)."""
    sizes, batches = case
    positions = [pos(i) if i % 7 else None for i in range(sum(sizes))]
    batched, single = Watermark(), Watermark()
    at = 0
    for n in sizes:
        assert batched.add_all(positions[at : at + n]) == at
        at += n
    assert [single.add(p) for p in positions] == list(range(len(positions)))
    for batch in batches:
        batched.done_all(batch)
        for seq in batch:
            single.done(seq)
        assert batched.position == single.position
        assert batched.in_flight == single.in_flight
        assert all(batched.is_pending(s) == single.is_pending(s) for s in batch[:5])
    assert batched.in_flight == 0
    with pytest.raises(ValueError):
        batched.done_all([0])  # done already: not pending


def test_an_event_is_its_own_position_read_as_a_position() -> None:
    """The pipeline registers events themselves; the position read back is a Position."""

    class Ev(NamedTuple):
        offset: str
        unique_event_id: str
        timestamp: str | None
        raw: dict[str, str]

    wm = Watermark()
    seq = wm.add_all([Ev("12", "u12", "2026-11-30 10:00:00.000", {"big": "payload"})])
    wm.done_all([seq])
    assert wm.position == Position("12", "u12", "2026-11-30 10:00:00.000")
    assert type(wm.position) is Position and type(wm.advance()) is Position


class _Event:
    """An event as the watermark sees one (weakly referable, to tell when it is let go)."""

    def __init__(self, i: int) -> None:
        self.offset, self.unique_event_id, self.timestamp = f"{i:04d}", f"uid-{i}", None
        self.text = b"x" * 1024  # what the watermark must not keep: the event's payload


def test_a_done_event_is_let_go_and_its_position_kept() -> None:
    """Once its prefix is done, the watermark keeps the newest event's position, never the
    event: an idle stream held its last event (up to max_frame_bytes, twice: its text and its
    detail's) for as long as it stayed idle, after it was written and committed."""
    wm = Watermark()
    events = [_Event(1), _Event(2), _Event(3)]
    seqs = [wm.add_all(events[:2]), wm.add(events[2])]
    refs = [weakref.ref(e) for e in events]
    del events
    assert all(r() is not None for r in refs)  # in flight: held until done
    wm.done_all([seqs[0], seqs[0] + 1])
    assert wm.position == pos(2)
    assert refs[0]() is None and refs[1]() is None
    assert refs[2]() is not None  # still in flight
    assert wm.advance() == pos(2)
    wm.done(seqs[1])
    assert [r() for r in refs] == [None, None, None]
    assert type(wm.position) is Position and wm.position == pos(3)
    assert wm.advance() == pos(3)  # handed out once
    assert wm.advance() is None
    wm.rewind()
    assert wm.advance() == pos(3)
    assert [r() for r in refs] == [None, None, None]  # nor kept as the last one handed out


def test_done_events_behind_an_unfinished_one_keep_only_their_positions() -> None:
    """Frame 0 is not done (a worker retrying it); frames done after it wait, each holding its
    position only, not its event: one stuck event held the text of everything done behind it.
    Done in batches that move the prefix part of the way too."""
    wm = Watermark()
    events = [_Event(i) for i in range(6)]
    first = wm.add_all(events)
    refs = [weakref.ref(e) for e in events]
    del events
    wm.done_all([first + 2, first + 3])  # behind frame 0
    assert refs[2]() is None and refs[3]() is None
    assert refs[0]() is not None and refs[1]() is not None  # not done: held
    wm.done_all([first, first + 1, first + 5])  # the prefix moves to 3; 5 waits behind 4
    assert wm.position == pos(3)
    assert refs[5]() is None and refs[4]() is not None
    wm.done(first + 4)
    assert wm.position == pos(5) and wm.in_flight == 0
    assert type(wm.position) is Position
