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


_DETAIL, _RESOURCE = COLUMNS.index("detail"), COLUMNS.index("resource")


def json_row(stream: str, ev: Event, now: float) -> list[Any]:
    """The row as JSON values (``detail`` and ``resource`` not yet text): what the PostgreSQL
    sink sends as one document per batch."""
    return [
        ev.unique_event_id,
        stream,
        ev.offset,
        ev.event_name,
        ev.module_name,
        ev.primary_key,
        ev.hotel_id,
        ev.timestamp,
        # As received when the event came as text (a list: protocol checked it).
        orjson.Fragment(ev.detail_text)
        if ev.detail_text is not None
        else ev.raw.get("detail") or [],
        ev.resource,
        now,
    ]


def row(stream: str, ev: Event, now: float) -> tuple[Any, ...]:
    """The row as SQL parameters: ``detail`` and ``resource`` as JSON text."""
    values = json_row(stream, ev, now)
    values[_DETAIL] = orjson.dumps(values[_DETAIL]).decode()
    resource = values[_RESOURCE]
    values[_RESOURCE] = None if resource is None else orjson.dumps(resource).decode()
    return tuple(values)
