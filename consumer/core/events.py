"""Typed events of the OHIP stream, following the schema's ``EventHeader``/``EventDetail``.

An :class:`Event` keeps the ``newEvent`` object as received, so sinks can write it verbatim;
the typed attributes are the few fields the pipeline itself needs.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, tzinfo
from typing import Any, NamedTuple, NotRequired, TypedDict

import orjson


class Metadata(TypedDict):
    offset: str
    uniqueEventId: str


class EventDetail(TypedDict, total=False):
    elementName: str
    elementType: str | None
    elementSequence: str | None
    elementRole: str | None
    newValue: str | None
    oldValue: str | None
    scopeFrom: str | None
    scopeTo: str | None


class EventHeader(TypedDict):
    metadata: Metadata
    moduleName: NotRequired[str]
    eventName: NotRequired[str]
    primaryKey: NotRequired[str]
    timestamp: NotRequired[str]
    hotelId: NotRequired[str | None]
    publisherId: NotRequired[str | None]
    actionInstanceId: NotRequired[str | None]
    detail: NotRequired[list[EventDetail | None]]


class Event(NamedTuple):
    """One business event. ``offset`` is opaque: compare it for equality, never for order.

    A NamedTuple rather than a frozen dataclass: one is built per event on the hot path.
    The decoder keeps the ``newEvent`` object as JSON text (``text``): a tree of parsed
    objects holds some 20 times the bytes of its text, and the pipeline bounds its memory by
    what it holds (:meth:`held_bytes`: the text and the detail's copy). Only an event too deep
    to be written back out is kept as the frame it came in. ``parsed`` is for events built from
    an object (``dlq replay``, tests).
    :attr:`raw` gives the object either way.
    """

    offset: str
    unique_event_id: str
    event_name: str
    module_name: str
    primary_key: str
    hotel_id: str | None
    timestamp: str | None
    parsed: dict[str, Any] | None
    # The frame it arrived in, as received, for an event nested deeper than a JSON writer
    # goes (no text can be written): what its dead letter keeps. Empty with ``text``.
    frame: bytes | str = b""
    # Set by the orchestration stage: the REST API's JSON (None: not found, when attached).
    resource: Any = None
    fetched: bool = False
    # The newEvent object's JSON text (UTF-8, one line): as the gateway sent it, or written
    # anew from a frame with line breaks; and its ``detail`` array's ("[]" when absent or
    # null; None when ``detail`` is anything but an array).
    text: bytes | None = None
    detail_text: bytes | None = None

    def held_bytes(self) -> int:
        """Its size as counted against the byte bounds: its text as received (or the frame it
        came in when it was kept as that) and its ``detail`` array's text, a second copy."""
        return len(self.text or self.frame) + len(self.detail_text or b"")

    @property
    def raw(self) -> dict[str, Any]:
        """The ``newEvent`` object (parsed from ``text``, or ``frame``, on each call)."""
        if self.parsed is not None:
            return self.parsed
        if self.text is not None:
            raw: dict[str, Any] = orjson.loads(self.text)
            return raw
        assert self.frame, "an event has its object, its text or its frame"
        deep: dict[str, Any] = orjson.loads(self.frame)["payload"]["data"]["newEvent"]
        return deep

    def document(self) -> dict[str, Any]:
        """What a sink stores: the ``newEvent`` as received, plus ``resource`` when fetched."""
        if not self.fetched:
            return self.raw
        return {**self.raw, "resource": self.resource}

    def document_json(self) -> bytes:
        """:meth:`document` as JSON: the text as received when there is one and nothing was
        added. Raises TypeError or ValueError for an object no JSON writer takes."""
        if self.text is not None and not self.fetched:
            return self.text
        return orjson.dumps(self.document())


# Every EventHeader and EventDetail field of Oracle's published schema: asking for all of them
# costs nothing and keeps the sink's copy complete.
SELECTION = (
    "metadata { offset uniqueEventId } moduleName eventName primaryKey timestamp hotelId "
    "publisherId actionInstanceId detail { elementName elementType elementSequence elementRole "
    "newValue oldValue scopeFrom scopeTo }"
)


ORACLE_TIMESTAMP = "%d-%b-%y %I.%M.%S.%f %p"  # "28-APR-24 06.18.59.028027 AM"
# That format as Oracle writes it (two-digit fields, six-digit fraction, English month): read
# directly, as strptime takes ~20 µs (its regex, its lock, a locale check) per call, on the
# event loop's thread once per batch. Anything else is left to strptime.
_ORACLE_SHAPE = re.compile(
    r"(\d\d)-([A-Za-z]{3})-(\d\d) (0[1-9]|1[0-2])\.([0-5]\d)\.([0-5]\d)\.(\d{6}) ([AaPp][Mm])"
)
_MONTHS = {
    m: i
    for i, m in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1
    )
}


def event_time(timestamp: str | None, zone: tzinfo) -> float | None:
    """Epoch seconds of an event's ``timestamp`` (Oracle's format, in ``zone``: Oracle does not
    document it), or None when it is missing or not in that format. Call it per batch or per
    sample, not per event."""
    if not timestamp:
        return None
    try:
        shape = _ORACLE_SHAPE.fullmatch(timestamp)
        month = _MONTHS.get(shape[2].upper()) if shape else None
        if shape is None or month is None:
            when = datetime.strptime(timestamp, ORACLE_TIMESTAMP)
        else:
            day, year, hour, minute, second, micro, half = shape.group(1, 3, 4, 5, 6, 7, 8)
            year2 = int(year)
            when = datetime(
                year2 + (2000 if year2 < 69 else 1900),  # as strptime's %y
                month,
                int(day),
                int(hour) % 12 + (12 if half.upper() == "PM" else 0),
                int(minute),
                int(second),
                int(micro),
            )
        return when.replace(tzinfo=zone).timestamp()
    except ValueError:
        return None


def header_id(unique_event_id: str) -> str:
    """An event's id as an HTTP or NATS header can carry it (an idempotency key, a message
    id): the uniqueEventId when it is visible ASCII without spaces (every OHIP id), else
    ``sha256:`` and the hex digest of its UTF-8 (the same at every replay)."""
    uid = unique_event_id
    if uid.isascii() and uid.isprintable() and " " not in uid:
        return uid
    return "sha256:" + hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()
