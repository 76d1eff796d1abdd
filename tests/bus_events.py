"""What the bus sinks' in-process tests (tests/sinks/test_nats_sink.py,
tests/sinks/test_redis_sink.py) share: the events they write, and writing them as the
pipeline does, and the sinks a test opens."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from consumer.core.events import Event
from consumer.errors import TransientSinkError


class Writable(Protocol):
    async def write(self, stream: str, events: Sequence[Event], /) -> Any: ...


class Openable(Protocol):
    async def open(self, store: Any, /) -> Any: ...

    async def close(self) -> Any: ...


SinkT = TypeVar("SinkT", bound=Openable)


def event(
    i: int,
    *,
    key: str | None = None,
    hotel: str | None = "HOTEL1",
    name: str = "UPDATE RESERVATION",
    uid: str | None = None,
    detail: Any = None,
    timestamp: str | None = None,
) -> Event:
    """The ``i``-th event: offset ``i``, uniqueEventId ``u0000i``, primaryKey ``pk{i % 7}``
    unless given; a ``timestamp`` only when given."""
    uid = uid or f"u{i:05d}"
    key = key or f"pk{i % 7}"
    raw: dict[str, Any] = {
        "metadata": {"offset": f"{i}", "uniqueEventId": uid},
        "eventName": name,
        "moduleName": "Reservation",
        "primaryKey": key,
        "hotelId": hotel,
    }
    if timestamp is not None:
        raw["timestamp"] = timestamp
    raw["detail"] = detail if detail is not None else [{"elementName": "Name", "newValue": "Zoë"}]
    return Event(f"{i}", uid, name, "Reservation", key, hotel, timestamp, raw)


async def write_until_through(
    sink: Writable, events: list[Event], seconds: float = 30, pause: float = 0.1
) -> int:
    """Write as the pipeline does (retrying transient failures, ``pause`` apart); the
    failures met."""
    failures = 0
    async with asyncio.timeout(seconds):
        while True:
            try:
                await sink.write("main", events)
                return failures
            except TransientSinkError:
                failures += 1
                await asyncio.sleep(pause)


@contextlib.asynccontextmanager
async def opening(make: Callable[..., SinkT]) -> AsyncIterator[Callable[..., Awaitable[SinkT]]]:
    """The body of an ``opened`` fixture (``async with opening(make) as open_sink: yield
    open_sink``): ``await open_sink(*args, **options)`` is ``make(*args, **options)``,
    opened (without a state store); every one is closed at the end."""
    sinks: list[SinkT] = []

    async def open_sink(*args: Any, **options: Any) -> SinkT:
        sink = make(*args, **options)
        await sink.open(None)
        sinks.append(sink)
        return sink

    yield open_sink
    for sink in sinks:
        await sink.close()
