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


def row(stream: str, ev: Event, now: float) -> tuple[Any, ...]:
    return (
        ev.unique_event_id,
        stream,
        ev.offset,
        ev.event_name,
        ev.module_name,
        ev.primary_key,
        ev.hotel_id,
        ev.timestamp,
        orjson.dumps(ev.raw.get("detail") or []).decode(),
        None if ev.resource is None else orjson.dumps(ev.resource).decode(),
        now,
    )


def json_row(stream: str, ev: Event, now: float) -> list[Any]:
    """:func:`row` for a JSON document of rows: ``detail`` and ``resource`` as JSON values."""
    return [
        ev.unique_event_id,
        stream,
        ev.offset,
        ev.event_name,
        ev.module_name,
        ev.primary_key,
        ev.hotel_id,
        ev.timestamp,
        ev.raw.get("detail") or [],
        ev.resource,
        now,
    ]
