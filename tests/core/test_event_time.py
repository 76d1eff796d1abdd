"""``event_time``: Oracle's timestamps read directly give what ``strptime`` gives, for any text."""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo

from hypothesis import example, given
from hypothesis import strategies as st

from consumer.core.events import ORACLE_TIMESTAMP, event_time

ZONES = st.sampled_from([UTC, ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")])
MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]


def by_strptime(text: str, zone: tzinfo) -> float | None:
    try:
        return datetime.strptime(text, ORACLE_TIMESTAMP).replace(tzinfo=zone).timestamp()
    except ValueError:
        return None


def two(low: int, high: int) -> st.SearchStrategy[str]:
    return st.integers(low, high).map(lambda n: f"{n:02d}")


# Oracle's shape, with fields now and then out of range, oddly cased, short or long.
MONTH = st.one_of(
    st.sampled_from(MONTHS), st.sampled_from(MONTHS).map(str.title), st.text(max_size=4)
)
SHAPED = st.builds(
    lambda d, m, y, h, mi, s, f, p: f"{d}-{m}-{y} {h}.{mi}.{s}.{f} {p}",
    st.one_of(two(0, 32), st.text("0123456789", max_size=3)),
    MONTH,
    two(0, 99),
    st.one_of(two(0, 13), st.text("0123456789", max_size=3)),
    two(0, 61),
    two(0, 61),
    st.one_of(st.integers(0, 999_999).map(lambda n: f"{n:06d}"), st.text("0123456789", max_size=7)),
    st.sampled_from(["AM", "PM", "am", "pm", "Pm", "XM", ""]),
)


# Valid ones over the whole range of %y, months cased as Oracle does or not.
VALID = st.builds(
    lambda d, case: f"{d:%d}-{case(MONTHS[d.month - 1])}-{d:%y} {d:%I}.{d:%M}.{d:%S}.{d:%f} {d:%p}",
    st.datetimes(datetime(1969, 1, 1), datetime(2068, 12, 31, 23, 59, 59, 999_999)),
    st.sampled_from([str.upper, str.title, str.lower]),
)


@given(st.one_of(VALID, SHAPED, st.text(max_size=40)), ZONES)
@example("31-DEC-68 11.59.59.999999 PM", UTC)  # %y's turn of the century
@example("01-JAN-69 12.00.00.000000 AM", UTC)
def test_the_same_as_strptime(text: str, zone: tzinfo):
    assert event_time(text, zone) == by_strptime(text, zone)


def test_oracle_timestamps():
    assert event_time("28-APR-24 06.18.59.028027 AM", UTC) == 1714285139.028027
    assert (
        event_time("28-APR-24 12.00.00.000000 AM", UTC)
        == datetime(2024, 4, 28, tzinfo=UTC).timestamp()
    )
    assert (
        event_time("28-APR-24 12.00.00.000000 PM", UTC)
        == datetime(2024, 4, 28, 12, tzinfo=UTC).timestamp()
    )
    assert (
        event_time("31-DEC-69 11.59.59.999999 PM", UTC)
        == datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC).timestamp()
    )
    assert event_time("30-FEB-24 06.18.59.028027 AM", UTC) is None
    assert event_time("", UTC) is None and event_time(None, UTC) is None
