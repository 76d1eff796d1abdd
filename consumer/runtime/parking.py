"""park-key: a resource (``primaryKey``) with a dead letter holds its later events back.

With ``on_permanent_failure = "park-key"`` a reservation is never applied out of order: once
one of its events is dead-lettered, the later ones go to the DLQ too (reason ``parked``) until
an operator has replayed or purged every dead letter of that resource. Parked keys survive
restarts (they are the DLQ rows). A key whose dead letter is not durable yet stays parked
whatever the store says; the committer knows which are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import structlog

from ..core.events import Event
from ..errors import StoreError
from .committer import Committer

log = structlog.get_logger(__name__)

T = TypeVar("T")


class ParkedKeys:
    def __init__(self, stream: str, committer: Committer, parked: dict[str, str]) -> None:
        """``parked``: primaryKey -> the uniqueEventId it is parked behind (from the store)."""
        self._stream = stream
        self._committer = committer
        self._parked = dict(parked)

    def __bool__(self) -> bool:
        return bool(self._parked)

    def behind(self, key: str) -> str | None:
        """The event a parked resource waits behind, or None when it is free."""
        return self._parked.get(key)

    def park(self, key: str, unique_event_id: str) -> None:
        self._parked.setdefault(key, unique_event_id)

    async def split(self, items: Sequence[tuple[T, Event]]) -> list[tuple[T, Event]]:
        """The items whose resource is free; the caller dead-letters the others (see
        :meth:`behind`). A key is released once its dead letters are gone."""
        for key in {ev.primary_key for _, ev in items if ev.primary_key in self._parked}:
            if not await self._still_parked(key):
                del self._parked[key]
                log.info("resource unparked", stream=self._stream, primary_key=key)
        return [(x, ev) for x, ev in items if ev.primary_key not in self._parked]

    async def _still_parked(self, key: str) -> bool:
        try:
            return await self._committer.has_dead_letters(self._stream, key)
        except StoreError:
            return True  # unknown: stay parked (order first); the next batch asks again
