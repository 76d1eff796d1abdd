"""A Python sink target for the tests: ``[sink] type = "python"``, ``target = "pysink:handle"``.

Module-level state, reset by :func:`reset` (the tests' fixture does it before and after each
test). The sink runs in whatever process imports it: the in-process daemon, and the CLI called
in-process (``consumer.cli.main``), both append to the same :data:`DELIVERED`.

* ``REJECT_IDS``: events rejected for good with :class:`Rejected` (it names the culprit, so the
  pipeline dead-letters it and delivers the rest of the batch);
* ``REJECT_KEYS``: every event of these primaryKeys rejected with a plain ``ValueError`` that
  names no culprit (the pipeline must find it by re-delivering one event at a time);
* ``TRANSIENT``: the next ``TRANSIENT[0]`` calls fail with :class:`Busy` (retried).
* ``STUCK_STREAMS``: writes for these streams never return (a downstream that hangs).
* ``GATES``: writes for a stream wait until its event is set.
* ``ON_EVENT``: a batch holding one of these uniqueEventIds first awaits its function, which
  may raise anything (``SystemExit``, ``CancelledError``, a TaskGroup's exception group...).
* :func:`forgetful`: a handler that returns :func:`handle`'s coroutine without awaiting it.
* :func:`returning`: :func:`handle`, then returns ``RETURNS[0]`` (a client, a pool...).

A batch is all or nothing: nothing of it is recorded when an event of it is rejected, so the
re-delivery of the events before the culprit is not counted twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from consumer.core.events import Event

DELIVERED: list[tuple[str, str, str]] = []  # (stream, uniqueEventId, primaryKey), call order
REJECT_IDS: set[str] = set()
REJECT_KEYS: set[str] = set()
TRANSIENT: list[int] = [0]  # failures still to raise
CALLS: list[int] = [0]
STUCK_STREAMS: set[str] = set()
GATES: dict[str, asyncio.Event] = {}
ON_EVENT: dict[str, Callable[[], Awaitable[None]]] = {}
RETURNS: list[object] = [None]


class Rejected(Exception):
    """A permanent rejection naming the event at fault."""

    transient = False

    def __init__(self, unique_event_id: str) -> None:
        super().__init__(f"rejected by the test sink: {unique_event_id}")
        self.unique_event_id = unique_event_id


class Busy(Exception):
    """A transient failure: the batch is retried after ``retry_after`` seconds."""

    transient = True
    retry_after = 0.01


def reset() -> None:
    DELIVERED.clear()
    REJECT_IDS.clear()
    REJECT_KEYS.clear()
    TRANSIENT[0] = 0
    CALLS[0] = 0
    STUCK_STREAMS.clear()
    GATES.clear()
    ON_EVENT.clear()
    RETURNS[0] = None


def delivered_ids(stream: str | None = None) -> list[str]:
    return [uid for s, uid, _ in DELIVERED if stream is None or s == stream]


async def handle(stream: str, events: Sequence[Event]) -> None:
    CALLS[0] += 1
    if stream in STUCK_STREAMS:
        await asyncio.Event().wait()  # until cancelled
    gate = GATES.get(stream)
    if gate is not None:
        await gate.wait()
    if TRANSIENT[0] > 0:
        TRANSIENT[0] -= 1
        raise Busy("test sink busy")
    for ev in events:
        if (then := ON_EVENT.get(ev.unique_event_id)) is not None:
            await then()
    for ev in events:
        if ev.unique_event_id in REJECT_IDS:
            raise Rejected(ev.unique_event_id)
        if ev.primary_key in REJECT_KEYS:
            raise ValueError(f"primaryKey {ev.primary_key} refused by the test sink")
    DELIVERED.extend((stream, ev.unique_event_id, ev.primary_key) for ev in events)


async def forgetful(stream: str, events: Sequence[Event]) -> Awaitable[None]:
    """``return handle(...)``: its await forgotten (the sink must await what it returns)."""
    return handle(stream, events)


async def returning(stream: str, events: Sequence[Event]) -> object:
    """:func:`handle`, then an odd return value: ``RETURNS[0]``."""
    await handle(stream, events)
    return RETURNS[0]
