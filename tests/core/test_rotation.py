"""Unit tests for consumer.core.rotation: names, when a file is due, what retention deletes."""

from __future__ import annotations

from pathlib import PurePath

import pytest

from consumer.core.rotation import (
    PatternError,
    Rotation,
    check_pattern,
    default_pattern,
    distinguishes,
)

T0 = 1_704_067_200  # 2024-01-01T00:00:00Z


def test_default_pattern_follows_the_path() -> None:
    assert default_pattern(PurePath("/x/events.jsonl")) == "events-%Y%m%dT%H%M%SZ.jsonl"
    assert default_pattern(PurePath("ev%nts")) == "ev%%nts-%Y%m%dT%H%M%SZ"
    rot = Rotation(default_pattern(PurePath("events.jsonl")), max_bytes=10)
    assert rot.name(42, T0 + 3661) == "events-20240101T010101Z.000042.jsonl"


@pytest.mark.parametrize(
    ("pattern", "seq", "name"),
    [
        ("events-%Y%m%dT%H%M%SZ.jsonl", 7, "events-20240101T000000Z.000007.jsonl"),
        ("events-%F.jsonl", 1234567, "events-2024-01-01.1234567.jsonl"),
        ("events.%Y.%m", 3, "events.2024.01.000003"),  # the suffix has a field: no suffix
        ("events", 3, "events.000003"),
        ("a.%H.b.jsonl", 12, "a.00.b.000012.jsonl"),
        ("100%%-%Y.log", 1, "100%-2024.000001.log"),
    ],
)
def test_names_carry_the_number_before_the_suffix_and_read_back(
    pattern: str, seq: int, name: str
) -> None:
    rot = Rotation(pattern, max_bytes=1)
    assert rot.name(seq, T0) == name
    assert rot.seq_of(name) == seq


@pytest.mark.parametrize(
    "other",
    [
        "events.jsonl",  # the configured path itself
        "events-20240101T000000Z.jsonl",  # no number
        "events-20240101T000000Z.00001.jsonl",  # too few digits
        "events-20240101T000000Z.000001.jsonl.bak",
        "events-2024010XT000000Z.000001.jsonl",  # a field that is not digits
        "notes-20240101T000000Z.000001.jsonl",
        "events-20240101T000000Z.\u0660\u0660\u0660\u0660\u0660\u0661.jsonl",  # Unicode digits
    ],
)
def test_names_of_other_files_are_not_ours(other: str) -> None:
    rot = Rotation("events-%Y%m%dT%H%M%SZ.jsonl", max_bytes=1)
    assert rot.seq_of(other) is None


def test_due_by_size_before_a_batch_would_pass_the_limit() -> None:
    rot = Rotation("e-%Y.jsonl", max_bytes=100)

    def clock() -> float:
        return T0 + 5.5

    assert rot.due(0, 500, T0, clock) is None  # an empty file takes any batch
    assert rot.due(60, 40, T0, clock) is None  # exactly at the limit
    assert rot.due(60, 41, T0, clock) == T0 + 5  # past it: a new file, started now
    assert rot.due(150, 1, T0, clock) == T0 + 5  # already past it (a file from before)


def test_due_by_time_at_the_first_write_after_the_interval() -> None:
    rot = Rotation("e-%Y%m%dT%H.jsonl", interval_s=3600)
    now = [T0 + 3599.9]
    assert rot.due(10, 10, T0, lambda: now[0]) is None
    now[0] = T0 + 3600
    assert rot.due(10, 10, T0, lambda: now[0]) == T0 + 3600  # named by its interval's start
    now[0] = T0 + 3 * 3600 + 17  # hours later (an idle stream): the current interval
    assert rot.due(0, 10, T0, lambda: now[0]) == T0 + 3 * 3600
    now[0] = T0 - 10  # the clock went back: no new file
    assert rot.due(10, 10, T0, lambda: now[0]) is None
    assert rot.started_at(T0 + 5000) == T0 + 3600


def test_due_by_size_and_time() -> None:
    rot = Rotation("e-%Y%m%dT%H%M.jsonl", max_bytes=100, interval_s=60)
    assert rot.due(90, 20, T0, lambda: T0 + 10) == T0  # size: within the same minute
    assert rot.due(10, 20, T0, lambda: T0 + 70) == T0 + 60  # time


def test_retention_keeps_the_newest_and_only_deletes_committed_files() -> None:
    rot = Rotation("e-%Y.jsonl", max_bytes=1, keep_files=2)
    finished = [(seq, f"f{seq}", float(T0)) for seq in range(1, 8)]  # current is 8
    assert rot.expired(finished, committed_seq=8, now=T0) == ["f5", "f4", "f3", "f2", "f1"]
    # The checkpoint is still in file 4: files 4 and later are not fully committed.
    assert rot.expired(finished, committed_seq=4, now=T0) == ["f3", "f2", "f1"]
    assert rot.expired(finished, committed_seq=1, now=T0) == []


def test_retention_by_age() -> None:
    rot = Rotation("e-%Y.jsonl", max_bytes=1, keep_days=2)
    day = 86400.0
    finished = [(1, "old", T0 - 3 * day), (2, "edge", T0 - 2 * day), (3, "new", T0 - day)]
    assert rot.expired(finished, committed_seq=4, now=T0) == ["old"]
    both = Rotation("e-%Y.jsonl", max_bytes=1, keep_days=2, keep_files=1)
    assert both.expired(finished, committed_seq=4, now=T0) == ["edge", "old"]


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("", "empty"),
        ("logs/events-%Y.jsonl", "no '/'"),
        ("events\n-%Y.jsonl", "control characters"),
        ("events-%b.jsonl", "uses %b"),
        ("events-%s.jsonl", "uses %s"),
        ("events-%", "a lone %"),
    ],
)
def test_bad_patterns_say_what_and_how(pattern: str, says: str) -> None:
    with pytest.raises(PatternError) as raised:
        check_pattern(pattern)
    assert says in raised.value.what
    assert raised.value.fix


@pytest.mark.parametrize(
    ("pattern", "interval", "ok"),
    [
        ("e-%Y%m%dT%H%M%SZ.jsonl", 1, True),
        ("e-%Y%m%d.jsonl", 86400, True),
        ("e-%Y%m%d.jsonl", 3600, False),  # hours of one day: the same name
        ("e-%Y%m%dT%H.jsonl", 3600, True),
        ("e-%H.jsonl", 5400, True),  # 1.5 h: each interval starts in another hour
        ("e-%M.jsonl", 30, False),
        ("e-%S.jsonl", 60, False),  # every minute starts at second 00
        ("e-%m%d.jsonl", 86400 * 7, True),
        ("e-%Y%m.jsonl", 86400 * 30, False),  # 30 days is not a month
        ("events.jsonl", 60, False),  # no field at all
    ],
)
def test_a_pattern_must_tell_successive_intervals_apart(
    pattern: str, interval: int, ok: bool
) -> None:
    assert distinguishes(pattern, interval) is ok
