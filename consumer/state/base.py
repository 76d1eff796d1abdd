"""The state store's interface: what the daemon, the committer and the operator commands need
of whatever keeps checkpoints, processed ids, dead letters and sink state.

Async throughout, so that a network database (PostgreSQL, for a fleet) fits behind it; the
SQLite store answers the hot lookups (``seen``, ``parked_among``, ``has_dead_letters``) without
leaving the event loop's thread. Failures are :class:`~consumer.errors.StoreError`
(``retriable`` when they may clear by themselves); the backends translate their drivers'
errors where they enter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..core.records import Checkpoint, CommitBatch, DeadLetterRow, Fence
from ..core.watermark import Position

PRUNE_CHUNK = 10_000  # rows per DELETE statement (and transaction) of prune_processed


class StateStore(Protocol):
    # --- the daemon's reads --------------------------------------------------------------------

    async def checkpoint(self, stream: str) -> Checkpoint | None: ...

    async def start_override(self, stream: str) -> str | None:
        """ "highest" when an operator asked the stream to skip its backlog, else None."""
        ...

    async def completed_closed_at(self, stream: str) -> float | None:
        """When (wall clock) the stream's last subscription that we completed was closed by
        the server (or we stopped waiting for that); None if never recorded."""
        ...

    async def completed_close(self, stream: str) -> tuple[float | None, float]:
        """:meth:`completed_closed_at`, and the time now, on one clock: the store's. The
        PostgreSQL store's is the database's, which every fleet member shares (the member
        taking a stream over must not hold its own clock against the closing host's); the
        SQLite store's is this host's (one host)."""
        ...

    async def sink_state(self, sink: str) -> str | None: ...

    async def seen(self, stream: str, event_ids: Sequence[str]) -> set[str]:
        """Which of these ids were already processed (committed) for this stream."""
        ...

    async def parked_among(
        self, stream: str, primary_keys: Sequence[str]
    ) -> tuple[dict[str, str], bool]:
        """park-key, per batch: those of these resources that have dead letters -> the
        uniqueEventId (or dedup key) of the oldest; and whether the stream has any dead letter
        of a resource at all (False: no batch needs asking until one is made). One lookup on
        the (stream, primary_key) index, never the stream's whole queue."""
        ...

    async def has_dead_letters(self, stream: str, primary_key: str) -> bool: ...

    # --- the committer's writes ----------------------------------------------------------------

    async def commit(self, batch: CommitBatch, now: float | None = None) -> bool:
        """Everything in ``batch`` becomes durable together, or not at all. False: the
        batch's :attr:`~CommitBatch.mark` says it was applied before; nothing was done."""
        ...

    async def anchor(self, stream: str, position: Position, fence: Fence | None = None) -> None:
        """Create the stream's checkpoint if it has none (never moves an existing one).
        ``fence`` (and :attr:`CommitBatch.fence`): a store with fleet leases refuses the
        write with :class:`~consumer.errors.Fenced` unless the member holds them; a store
        without (SQLite: no fleet) ignores it."""
        ...

    async def set_completed_closed_at(self, stream: str, at: float | None = None) -> None:
        """Record :meth:`completed_closed_at`: ``at``, or else now on the store's clock (see
        :meth:`completed_close`). Not fenced: it only lengthens a bounded wait."""
        ...

    async def prune_processed(
        self, older_than: float, *, streams: Sequence[str] | None = None, once: bool = False
    ) -> int:
        """Delete processed ids older than ``older_than``, of ``streams`` when given, in
        bounded statements (``once``: just one of them); how many went."""
        ...

    async def newest_processed_at(self) -> float | None:
        """The newest stamp of a processed id (wall-clock seconds), None when there is none:
        how far a restart's first prune may go (see :mod:`consumer.core.retention`)."""
        ...

    # --- operators (status, dlq, offset, sink adopt) -------------------------------------------

    async def checkpoints(self) -> list[Checkpoint]: ...

    async def dead_letter_counts(self) -> dict[str, int]: ...

    async def dead_letters(
        self,
        stream: str | None = None,
        *,
        reason: str | None = None,
        since: float | None = None,
        before: float | None = None,
        ids: Sequence[int] | None = None,
        payloads: bool = True,
        limit: int | None = None,
        after: int | None = None,
    ) -> list[DeadLetterRow]:
        """Dead letters in arrival order, filtered by every argument given, the first ``limit``
        of them. ``payloads`` False: each row's ``payload`` is empty (a listing, or the
        replay's ordering check over the whole queue). ``after``: only ids above it, so that
        ``limit`` pages through the queue by id (a page's last id is the next one's ``after``)
        and a command holds a page, not the queue."""
        ...

    async def payload_lengths(self, ids: Sequence[int]) -> dict[int, int]:
        """The length of each of these dead letters' payloads, in characters (about: bytes in
        PostgreSQL), those gone meanwhile absent: what a replay reads payloads in parts by."""
        ...

    async def oldest_outside(
        self,
        keys: Sequence[tuple[str, str]],
        *,
        below: int,
        reason: str | None = None,
        since: float | None = None,
        before: float | None = None,
        ids: Sequence[int] | None = None,
    ) -> dict[tuple[str, str], int]:
        """Of each resource (stream, primaryKey) of ``keys``, the id of its oldest dead letter
        below id ``below`` that the filters given do not select (as :meth:`dead_letters`
        would), for those that have one: the dead letters a replay of a page of a selection
        holds that page's later events back for, asked per page instead of remembered for
        every key of the queue. No filter given: every one is selected, so none."""
        ...

    async def purge_dead_letters(self, ids: Sequence[int]) -> int: ...

    async def newest_dead_letter_id(self) -> int | None:
        """The highest dead letter id (ids only grow), None when the queue is empty."""
        ...

    async def set_offset(self, stream: str, offset: str) -> None: ...

    async def reset_to_highest(self, stream: str) -> None: ...

    async def set_sink_state(self, sink: str, state: str) -> None: ...

    async def close(self) -> None: ...
