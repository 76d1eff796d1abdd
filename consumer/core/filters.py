"""Event filters: which events reach the sink, by ``eventName``, ``moduleName`` and ``hotelId``.

Pure and sans-I/O. Each list of the ``[filter]`` table (``FilterSettings``) is compiled once:
exact names into a set, glob patterns (``*``, ``?``, ``[...]``, ``[!...]``) into one regex;
the decision for each (eventName, moduleName, hotelId) seen is remembered (bounded).

Semantics, in full:

* **Case-sensitive**, like :func:`fnmatch.fnmatchcase` on every platform: OHIP names are exact
  (``"CHECK IN"`` is not ``"check in"``). A pattern matches the *whole* value.
* **Include lists** (``event_names``, ``module_names``, ``hotel_ids``): empty lets every value
  through; otherwise the value must match at least one entry.
* **Exclude lists** (``exclude_…``): a value matching any entry is dropped. Exclude wins over
  include (``event_names = ["* RESERVATION"]`` with ``exclude_event_names = ["CANCEL *"]``).
* **The three fields are ANDed**: an event passes when it passes all three.
* **A missing field** (``hotelId`` absent or null, ``eventName``/``moduleName`` absent) is
  matched as the empty string: it passes an include list only through a pattern that matches
  ``""`` (``"*"``, or ``""`` itself), and an exclude list drops it only then too. So
  ``hotel_ids = ["HOTEL1"]`` drops the events without a hotel; ``hotel_ids = ["HOTEL1", ""]``
  keeps them.
* **One reason per event**, the first failing check in this fixed order: event name, module
  name, hotel id; exclude before include for each. The reasons (:data:`REASONS`) are a small
  fixed set: they are metric labels.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any, Final, Protocol

# The fields filtered on, in the order they are checked: attributes of Event, the prefix of
# the reason labels, and (with "s", and "exclude_…s") the keys of the [filter] table.
_FIELDS: Final = ("event_name", "module_name", "hotel_id")

REASONS: Final = tuple(
    f"{field}_{how}" for field in _FIELDS for how in ("excluded", "not_included")
)
"""Every reason :meth:`EventFilter.reason` can return (the ``reason`` label of the metric)."""

_GLOB_CHARS = frozenset("*?[")
# The (eventName, moduleName, hotelId) whose answer an EventFilter remembers: they are few, so
# after the first events a decision is one dict lookup. At most this many, of at most
# _REMEMBERED_CHARS characters together (a few MB at worst); the others are worked out anew.
_REMEMBERED = 16_384
_REMEMBERED_CHARS = 256


class FilterConfig(Protocol):
    """What :meth:`EventFilter.from_settings` reads (``consumer.config.FilterSettings``)."""

    @property
    def event_names(self) -> tuple[str, ...]: ...
    @property
    def exclude_event_names(self) -> tuple[str, ...]: ...
    @property
    def module_names(self) -> tuple[str, ...]: ...
    @property
    def exclude_module_names(self) -> tuple[str, ...]: ...
    @property
    def hotel_ids(self) -> tuple[str, ...]: ...
    @property
    def exclude_hotel_ids(self) -> tuple[str, ...]: ...


class Matcher:
    """One list of exact names and glob patterns, compiled: ``matcher(value)`` is True when
    ``value`` equals a name or matches a pattern (whole value, case-sensitive)."""

    __slots__ = ("_exact", "_regex", "patterns")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(dict.fromkeys(patterns))  # in order, without repeats
        self._exact = frozenset(p for p in self.patterns if not _GLOB_CHARS.intersection(p))
        globs = [p for p in self.patterns if p not in self._exact]
        # fnmatch.translate gives "(?s:...)\Z" per pattern; no IGNORECASE: fnmatchcase semantics.
        self._regex = re.compile("|".join(fnmatch.translate(p) for p in globs)) if globs else None

    def __call__(self, value: str) -> bool:
        if value in self._exact:
            return True
        regex = self._regex
        return regex is not None and regex.match(value) is not None

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __repr__(self) -> str:
        return f"Matcher({list(self.patterns)!r})"


# (value of the event, matcher, True for an include list, the reason when the check fails)
_Check = tuple[Callable[[Any], str | None], Matcher, bool, str]


class EventFilter:
    """Decides, per event, whether it goes on to the sink.

    ``reason(event)`` is None when the event passes, else the reason it is filtered out (one of
    :data:`REASONS`). ``passes_all`` is True when nothing is configured: callers skip the filter
    altogether then. ``event`` is anything with ``event_name``, ``module_name`` and ``hotel_id``
    attributes (an :class:`~consumer.core.events.Event`).
    """

    __slots__ = ("_checks", "_known", "passes_all")

    def __init__(
        self,
        *,
        event_names: Iterable[str] = (),
        exclude_event_names: Iterable[str] = (),
        module_names: Iterable[str] = (),
        exclude_module_names: Iterable[str] = (),
        hotel_ids: Iterable[str] = (),
        exclude_hotel_ids: Iterable[str] = (),
    ) -> None:
        lists = {
            "event_name": (event_names, exclude_event_names),
            "module_name": (module_names, exclude_module_names),
            "hotel_id": (hotel_ids, exclude_hotel_ids),
        }
        checks: list[_Check] = []
        for name in _FIELDS:
            include, exclude = (Matcher(x) for x in lists[name])
            get = attrgetter(name)
            if exclude:
                checks.append((get, exclude, False, f"{name}_excluded"))
            if include:
                checks.append((get, include, True, f"{name}_not_included"))
        self._checks: tuple[_Check, ...] = tuple(checks)
        self.passes_all = not checks
        self._known: dict[tuple[Any, Any, Any], str] = {}  # the fields -> reason, "" to pass

    @classmethod
    def from_settings(cls, settings: FilterConfig) -> EventFilter:
        return cls(
            event_names=settings.event_names,
            exclude_event_names=settings.exclude_event_names,
            module_names=settings.module_names,
            exclude_module_names=settings.exclude_module_names,
            hotel_ids=settings.hotel_ids,
            exclude_hotel_ids=settings.exclude_hotel_ids,
        )

    def reason(self, event: Any) -> str | None:
        """None: the event passes. Else why it is filtered out (one of :data:`REASONS`)."""
        fields = (event.event_name, event.module_name, event.hotel_id)
        known = self._known.get(fields)
        if known is not None:
            return known or None  # "": it passes
        why = self._decide(event)
        if len(self._known) < _REMEMBERED and sum(len(f) for f in fields if f) <= _REMEMBERED_CHARS:
            self._known[fields] = why or ""
        return why

    def _decide(self, event: Any) -> str | None:
        for get, matches, include, why in self._checks:
            # an include check fails on no match, an exclude check on a match
            if matches(get(event) or "") is not include:
                return why
        return None

    def passes(self, event: Any) -> bool:
        return self.reason(event) is None

    def __repr__(self) -> str:
        if self.passes_all:
            return "EventFilter(<everything passes>)"
        parts = ", ".join(f"{why}={m.patterns!r}" for _, m, _, why in self._checks)
        return f"EventFilter({parts})"
