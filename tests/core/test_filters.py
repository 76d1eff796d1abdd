"""Unit tests for consumer.core.filters: exact names, globs, include/exclude, missing fields."""

from __future__ import annotations

import fnmatch
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.config import FilterSettings
from consumer.core import filters
from consumer.core.filters import REASONS, EventFilter, Matcher


class Ev(NamedTuple):
    event_name: str = "NEW RESERVATION"
    module_name: str = "Reservation"
    hotel_id: str | None = "HOTEL1"


def test_no_filter_passes_everything():
    f = EventFilter()
    assert f.passes_all
    assert f.reason(Ev()) is None
    assert f.reason(Ev("", "", None)) is None
    assert EventFilter.from_settings(FilterSettings()).passes_all


def test_any_list_configured_is_not_passes_all():
    for key in FilterSettings.model_fields:
        f = EventFilter.from_settings(FilterSettings(**{key: ("X",)}))
        assert not f.passes_all, key


def test_exact_names_are_case_sensitive_and_whole():
    f = EventFilter(event_names=["CHECK IN"])
    assert f.reason(Ev("CHECK IN")) is None
    assert f.reason(Ev("check in")) == "event_name_not_included"
    assert f.reason(Ev("CHECK IN ")) == "event_name_not_included"
    assert f.reason(Ev("CHECK")) == "event_name_not_included"


def test_globs():
    f = EventFilter(event_names=["* RESERVATION", "CHECK ?N"], hotel_ids=["HOTEL[12]"])
    assert f.reason(Ev("NEW RESERVATION", hotel_id="HOTEL2")) is None
    assert f.reason(Ev("CHECK IN", hotel_id="HOTEL1")) is None
    assert f.reason(Ev("CHECK OUT")) == "event_name_not_included"
    assert f.reason(Ev("NEW PROFILE")) == "event_name_not_included"
    assert f.reason(Ev(hotel_id="HOTEL3")) == "hotel_id_not_included"
    assert f.reason(Ev(hotel_id="hotel1")) == "hotel_id_not_included"  # case-sensitive globs too


def test_negated_class_and_literal_brackets():
    m = Matcher(["[!H]*", "a[]]b", "["])
    assert m("RESORT4") and not m("HOTEL1")
    assert m("a]b")
    assert m("[")  # an unclosed bracket is literal, as in fnmatch


def test_exclude_wins_over_include():
    f = EventFilter(event_names=["*"], exclude_event_names=["CANCEL *"])
    assert f.reason(Ev("CANCEL RESERVATION")) == "event_name_excluded"
    assert f.reason(Ev("NEW RESERVATION")) is None


def test_fields_are_anded_and_the_first_failing_check_is_the_reason():
    f = EventFilter(
        exclude_event_names=["CANCEL *"],
        module_names=["Reservation"],
        exclude_hotel_ids=["RESORT*"],
    )
    assert f.reason(Ev("CANCEL RESERVATION", "Profile", "RESORT4")) == "event_name_excluded"
    assert f.reason(Ev("NEW PROFILE", "Profile", "RESORT4")) == "module_name_not_included"
    assert f.reason(Ev("NEW RESERVATION", "Reservation", "RESORT4")) == "hotel_id_excluded"
    assert f.reason(Ev("NEW RESERVATION", "Reservation", "HOTEL1")) is None
    g = EventFilter(exclude_module_names=["Fin*"])
    assert g.reason(Ev(module_name="Financial")) == "module_name_excluded"


def test_missing_fields_are_the_empty_string():
    # hotelId null or absent: no include pattern matches it but those matching "" ("*", "").
    assert EventFilter(hotel_ids=["HOTEL*"]).reason(Ev(hotel_id=None)) == "hotel_id_not_included"
    assert EventFilter(hotel_ids=["*"]).reason(Ev(hotel_id=None)) is None
    assert EventFilter(hotel_ids=["HOTEL1", ""]).reason(Ev(hotel_id=None)) is None
    assert EventFilter(hotel_ids=["HOTEL1", ""]).reason(Ev(hotel_id="")) is None
    # ...and an exclude list drops it only through such a pattern.
    assert EventFilter(exclude_hotel_ids=["HOTEL*"]).reason(Ev(hotel_id=None)) is None
    assert EventFilter(exclude_hotel_ids=["*"]).reason(Ev(hotel_id=None)) == "hotel_id_excluded"
    assert EventFilter(exclude_hotel_ids=[""]).reason(Ev(hotel_id=None)) == "hotel_id_excluded"
    # eventName/moduleName absent: the decoder makes them "".
    assert EventFilter(event_names=["?*"]).reason(Ev(event_name="")) == "event_name_not_included"


def test_reasons_are_a_small_fixed_set():
    assert set(REASONS) == {
        f"{field}_{how}"
        for field in ("event_name", "module_name", "hotel_id")
        for how in ("excluded", "not_included")
    }


def test_from_settings_and_repr():
    s = FilterSettings(event_names=("A*",), exclude_hotel_ids=("H9",))
    f = EventFilter.from_settings(s)
    assert f.reason(Ev("AB", hotel_id="H1")) is None
    assert f.reason(Ev("AB", hotel_id="H9")) == "hotel_id_excluded"
    assert "A*" in repr(f) and "H9" in repr(f)
    assert "everything" in repr(EventFilter())


def test_works_on_the_real_event_type():
    from consumer.core.events import Event

    e = Event("1", "u1", "CHECK IN", "Reservation", "pk", None, None, {})
    assert EventFilter(event_names=["CHECK*"]).reason(e) is None
    assert EventFilter(hotel_ids=["H*"]).reason(e) == "hotel_id_not_included"


# --- properties: the compiled matcher is fnmatchcase over the list ---------------------------

_ALPHABET = "ab*?[]!-^\\. "
patterns = st.lists(st.text(alphabet=_ALPHABET, max_size=6), max_size=5)
values = st.text(alphabet="ab[]!-^\\. \n", max_size=8)


@given(patterns, values)
def test_matcher_is_fnmatchcase_of_any_pattern(pats: list[str], value: str):
    assert Matcher(pats)(value) == any(fnmatch.fnmatchcase(value, p) for p in pats)


@given(patterns, patterns, st.one_of(st.none(), values))
def test_filter_is_include_and_not_exclude(inc: list[str], exc: list[str], hotel: str | None):
    f = EventFilter(hotel_ids=inc, exclude_hotel_ids=exc)
    value = hotel or ""
    excluded = any(fnmatch.fnmatchcase(value, p) for p in exc)
    included = not inc or any(fnmatch.fnmatchcase(value, p) for p in inc)
    expected = "hotel_id_excluded" if excluded else None if included else "hotel_id_not_included"
    assert f.reason(Ev(hotel_id=hotel)) == expected
    assert f.passes_all == (not inc and not exc)


@pytest.mark.parametrize("pattern", ["*", "**", "?", "[", "[]", "[!]", "[]]", "[a-]", "\\"])
def test_odd_patterns_compile(pattern: str):
    Matcher([pattern, "x*y"])("anything")


def test_remembered_decisions_stay_right_and_bounded(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(filters, "_REMEMBERED", 3)
    f = EventFilter(hotel_ids=["H?"])
    for _ in range(2):  # the second round answers from memory (the first three)
        assert [f.reason(Ev(hotel_id=f"H{i}")) for i in range(5)] == [None] * 5
        assert f.reason(Ev(hotel_id="HX1")) == "hotel_id_not_included"
        assert f.reason(Ev(hotel_id="H" * 300)) == "hotel_id_not_included"
    assert len(f._known) == 3
    long = EventFilter(exclude_event_names=["A*"])
    assert long.reason(Ev(event_name="A" * 1000)) == "event_name_excluded"
    assert long._known == {}  # too long to be remembered
