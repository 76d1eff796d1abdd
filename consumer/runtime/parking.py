"""park-key: a resource (``primaryKey``) with a dead letter holds its later events back.

With ``on_permanent_failure = "park-key"`` a reservation is never applied out of order: once
one of its events is dead-lettered, the later ones go to the DLQ too (reason ``parked``) until
an operator has replayed or purged every dead letter of that resource. Parked keys survive
restarts (they are the DLQ rows).

The DLQ may hold a million resources: they are not kept in memory (a dict of them was ~1 KB
a resource), the store is asked per batch about the batch's resources
(:meth:`StateStore.parked_among`, one lookup on its index: ~60 µs for a batch of 100 on
SQLite, a DLQ of 100,000), so that a resource is released at its first batch after ``dlq
replay`` or ``dlq purge`` (run by another process) removed its last dead letter. Kept in
memory, bounded but for the first:

* the resources dead-lettered here whose letter the store has not shown yet (*pinned*): parked
  whatever the store says until it shows the letter (durable) or the committer says the
  resource has none (its letters not durable yet are the committer's to know: it is asked);
  past a hundred or so, all of them are checked in one lookup after each commit (a letter is
  durable at the next commit; those that are not yet, the committer bounds);
* the resources known free (LRU): none of them had a dead letter in the store, and none can
  get one but through this process (the stream's one runner), which pins it then (a batch
  of only them asks the store nothing);
* the last answers for resources found parked (LRU), which :meth:`behind` names;
* whether the store has a dead letter of a resource of the stream at all: when it has none
  and nothing is pinned, a batch costs nothing (no lookup), as without park-key.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import TypeVar

import structlog

from ..core.events import Event
from ..core.evidence import prefix
from ..errors import StoreError
from ..state.base import StateStore
from .committer import Committer

log = structlog.get_logger(__name__)

T = TypeVar("T")

FREE_KEPT = 1024  # resources known free, most recent first (keys are at most 1 KiB)
PARKED_KEPT = 64  # resources last found parked (beyond those of the batch being decided)
PINNED_CHECKED = 128  # pinned resources past which all are checked after each commit


class ParkedKeys:
    def __init__(
        self,
        stream: str,
        committer: Committer,
        *,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
    ) -> None:
        """``retry_*``: the backoff of a lookup the store fails (retriable), the batch waiting
        meanwhile."""
        self._stream = stream
        self._committer = committer
        # The committer's store: the per-batch lookup (the committer answers one key at a time).
        self._store: StateStore = committer.store
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        # primaryKey -> (the uniqueEventId it is parked behind, the park's number): see
        # _forget_pins. Only this process's own dead letters, until the store shows them.
        self._pinned: dict[str, tuple[str, int]] = {}
        self._parks = 0  # parks so far: a pin made after a lookup began outlives its answer
        # The committer's commit count when all pins were last checked: no commit since, no
        # letter became durable since (none to check again).
        self._checked_at = -1
        self._free: OrderedDict[str, None] = OrderedDict()
        self._parked: OrderedDict[str, str] = OrderedDict()
        # Does the store hold a dead letter of a resource of the stream? Unknown at the start:
        # the first batch asks.
        self._any_in_store = True
        # One lookup at a time: a pin is dropped only by the lookup that saw it durable or
        # resolved, never under another's feet (a batch's lookup, the bulk check of pins).
        self._lock = asyncio.Lock()

    def __bool__(self) -> bool:
        """Whether a batch must be split (asked about): False once the store has said it
        holds no dead letter of a resource of the stream, while none was made here since."""
        return self._any_in_store or bool(self._pinned)

    def behind(self, key: str) -> str | None:
        """The event a parked resource waits behind, or None when it is free; for the
        resources of the batch :meth:`split` decided last, as it decided them."""
        behind = self._parked.get(key)
        if behind is None:
            pin = self._pinned.get(key)
            behind = None if pin is None else pin[0]
        return behind

    def park(self, key: str, unique_event_id: str) -> None:
        """A dead letter of ``key`` was made here (not durable yet): its later events wait."""
        self._parks += 1
        pin = self._pinned.get(key)
        self._pinned[key] = (unique_event_id if pin is None else pin[0], self._parks)
        self._free.pop(key, None)

    async def split(self, items: Sequence[tuple[T, Event]]) -> list[tuple[T, Event]]:
        """The items whose resource is free; the caller dead-letters the others (see
        :meth:`behind`). A key is released once its dead letters are gone."""
        if not self:
            return list(items)
        async with self._lock:
            if not self:  # another worker's batch just found out
                return list(items)
            if len(self._pinned) > PINNED_CHECKED and self._checked_at != self._committer.commits:
                await self._check_pins()
            keys = {ev.primary_key for _, ev in items}
            ask = [k for k in keys if k not in self._free]
            if not ask:  # every one known free: no lookup
                return list(items)
            held = await self._decide(ask)
        # And those parked while it asked (a commit's set-aside), known free before.
        pinned = self._pinned
        return [
            (x, ev)
            for x, ev in items
            if ev.primary_key not in held and ev.primary_key not in pinned
        ]

    async def _decide(self, ask: list[str]) -> set[str]:
        """Ask the store about these resources (not known free); record and return which of
        them are parked."""
        began, commits = self._parks, self._committer.commits
        found, self._any_in_store = await self._lookup(ask)
        pins = [k for k in ask if k in self._pinned]
        if not self._any_in_store:  # no dead letter of a resource in the store
            self._parked.clear()
            self._free.clear()
            if self._pinned and self._checked_at != commits:  # the answer holds for every pin
                pins, self._checked_at = list(self._pinned), commits
        gone = await self._forget_pins(pins, found, began)
        # Decided now, after the last await: a resource parked meanwhile (a dead letter of a
        # commit's set-aside) is held too.
        held: set[str] = set()
        for key in ask:
            behind = found.get(key)
            pin = self._pinned.get(key)
            if behind is None and pin is not None:
                behind = pin[0]
            if behind is not None:
                held.add(key)
                self._free.pop(key, None)
                self._parked[key] = behind
                self._parked.move_to_end(key)
                continue
            if self._parked.pop(key, None) is not None or key in gone:
                log.info("resource unparked", stream=self._stream, primary_key=prefix(key))
            self._free[key] = None
            self._free.move_to_end(key)
        _trim(self._free, FREE_KEPT, ())
        _trim(self._parked, PARKED_KEPT, held)  # those of the batch stay: behind() names them
        return held

    async def _check_pins(self) -> None:
        """Drop the pins the store shows (durable: it answers for them now) or the committer
        says are resolved; the others' letters are not durable yet. One lookup, and the
        committer asked about those the store does not show."""
        began, self._checked_at = self._parks, self._committer.commits
        keys = list(self._pinned)
        try:
            found, _ = await self._store.parked_among(self._stream, keys)
        except StoreError as exc:
            if not exc.retriable:
                raise
            return  # kept, checked again after the next commit
        if found:  # the store holds letters again (it was asked before one was durable)
            self._any_in_store = True
        await self._forget_pins(keys, found, began)

    async def _forget_pins(self, keys: list[str], found: Collection[str], began: int) -> set[str]:
        """Drop the pins of ``keys`` that a lookup begun after them (at park number
        ``began``) answered for: those the store showed (``found``: durable, the store answers
        for them from now on), and those it did not show whose letters the committer does not
        know either (replayed or purged once durable). A pin made or renewed since the lookup
        began stays: the store may not show its letter yet. The resolved keys."""
        resolved: set[str] = set()
        for key in keys:
            pin = self._pinned.get(key)
            if pin is None or pin[1] > began:
                continue
            if key not in found:
                try:
                    if await self._committer.has_dead_letters(self._stream, key):
                        continue  # not durable yet
                except StoreError:
                    continue  # unknown: stays parked (order first); asked again later
                pin = self._pinned.get(key)
                if pin is None or pin[1] > began:
                    continue  # parked again meanwhile
                resolved.add(key)
            del self._pinned[key]
        return resolved

    async def _lookup(self, keys: list[str]) -> tuple[dict[str, str], bool]:
        """The store's answer for a batch; a store failing for a while (locked, a connection
        lost) is asked again with backoff, the batch waiting: a resource never guessed free."""
        delay = self._retry_initial
        while True:
            try:
                return await self._store.parked_among(self._stream, keys)
            except StoreError as exc:
                if not exc.retriable:
                    raise
                log.warning(
                    "parked resources lookup failed; retrying",
                    stream=self._stream,
                    error=str(exc),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)


def _trim(cache: OrderedDict[str, T], size: int, keep: Collection[str]) -> None:
    """Forget the least recently used entries past ``size``, never one of ``keep`` (those
    are the most recent: the trim stops at the first)."""
    while len(cache) > size:
        oldest = next(iter(cache))
        if oldest in keep:
            return
        del cache[oldest]
