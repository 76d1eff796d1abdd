"""The row an SQL sink stores per event, shared by the SQLite and PostgreSQL sinks.

``unique_event_id`` is the primary key, so writing an event again (a replay after a crash,
a DLQ replay) is an upsert of the same row, never a second one.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..core.events import Event

# Column order of :func:`row`. "offset" is quoted in SQL (a keyword in PostgreSQL).
COLUMNS: tuple[str, ...] = (
    "unique_event_id",
    "stream",
    "offset",
    "event_name",
    "module_name",
    "primary_key",
    "hotel_id",
    "event_timestamp",  # Oracle's text, as received (its zone is undocumented)
    "detail",  # JSON array of the changed elements
    "resource",  # JSON of the fetched resource (orchestration), or NULL
    "written_at",  # epoch seconds of the write
)


def _values(stream: str, ev: Event, now: float, detail: Any, resource: Any) -> list[Any]:
    """The one place of :data:`COLUMNS`' order."""
    return [
        ev.unique_event_id,
        stream,
        ev.offset,
        ev.event_name,
        ev.module_name,
        ev.primary_key,
        ev.hotel_id,
        ev.timestamp,
        detail,
        resource,
        now,
    ]


def json_row(stream: str, ev: Event, now: float) -> list[Any]:
    """The row as JSON values (``detail`` and ``resource`` not yet text): what the PostgreSQL
    sink sends as one document per batch."""
    # As received when the event came as text (a list: protocol checked it).
    detail = (
        orjson.Fragment(ev.detail_text)
        if ev.detail_text is not None
        else ev.raw.get("detail") or []
    )
    return _values(stream, ev, now, detail, ev.resource)


def row(stream: str, ev: Event, now: float) -> tuple[Any, ...]:
    """The row as SQL parameters: ``detail`` and ``resource`` as JSON text."""
    # The text as received, decoded (protocol checked it is UTF-8): no list, no Fragment, no
    # dumps per event on the event loop's thread.
    detail = (
        ev.detail_text.decode()
        if ev.detail_text is not None
        else orjson.dumps(ev.raw.get("detail") or []).decode()
    )
    resource = None if ev.resource is None else orjson.dumps(ev.resource).decode()
    return tuple(_values(stream, ev, now, detail, resource))
