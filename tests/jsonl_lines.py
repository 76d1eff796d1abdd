"""Events whose jsonl lines all have one length (i < 10000), for tests that cut, shorten or
restore a sink's file at known byte counts."""

from __future__ import annotations

import orjson

from consumer.core.events import Event

T0 = 1_704_067_200.0  # 2024-01-01T00:00:00Z: a rotation clock's start


def event(i: int) -> Event:
    raw = {
        "metadata": {"offset": f"{i:04d}", "uniqueEventId": f"u{i:04d}"},
        "eventName": "UPDATE RESERVATION",
        "primaryKey": f"pk{i % 3}",
    }
    return Event(
        f"{i:04d}", f"u{i:04d}", "UPDATE RESERVATION", "Reservation", f"pk{i % 3}", None, None, raw
    )


LINE = len(orjson.dumps(event(0).raw)) + 1


def lines(*numbers: int) -> bytes:
    return b"".join(orjson.dumps(event(i).raw) + b"\n" for i in numbers)
