"""The sink interface.

A sink receives batches of events in arrival order per ``primaryKey``. Its contract with the
committer that makes delivery exactly-once in effect:

* ``write`` returning means the batch is handed over. A sink that can make its writes part of
  the checkpoint (jsonl, sqlite) must not suspend inside ``write`` and reports, through
  ``position()``, a token covering exactly the writes that returned; ``sync(token)`` makes them
  durable and the token is committed with the checkpoint. On start, ``open(token)`` restores
  the sink to the committed token, undoing any write the checkpoint does not cover;
  ``committed(token)`` hears of each token the store committed (after a crash, ``open`` gets
  that one or a later one), e.g. to delete files the checkpoint has gone past.
* A sink that cannot do that gets each event's ``uniqueEventId`` to use as an idempotency key;
  after a crash it may see an event again.
* A sink whose rows live in the state store's own database returns them from ``staged()``:
  the committer writes them in the checkpoint's transaction (nothing to ``sync``). With their
  events and its own write of them (``Staged.aside``): when that transaction refuses a row for
  its data (a trigger failing on it), the committer writes them through it instead, and the
  sink writes through its own path from then on (a row refused there is that event's).
* ``waits``: whether ``write`` may suspend on I/O (the network, another thread). Several
  workers overlap those waits; for a sink whose write does not suspend (every one part of
  the checkpoint: jsonl only when the disk is behind its write-outs) a second worker only
  splits the batches, so the pipeline runs one unless told.
* ``counters()``: figures of its own for the metrics (e.g. the orchestration's GETs).
* Errors: raise :class:`~consumer.errors.TransientSinkError` to have the batch retried with
  backoff (intake pauses meanwhile), or :class:`~consumer.errors.PermanentSinkError` when an
  event can never be delivered (it is dead-lettered; give ``unique_event_id`` when known).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..core.events import Event
from ..core.evidence import prefix
from ..core.records import Staged
from ..errors import PermanentSinkError


class Sink(Protocol):
    name: str

    @property
    def waits(self) -> bool: ...

    async def open(self, committed: str | None) -> None: ...

    async def write(self, stream: str, events: Sequence[Event]) -> None: ...

    def position(self) -> str | None: ...

    async def sync(self, position: str | None) -> None: ...

    def committed(self, position: str) -> None: ...

    def staged(self) -> Staged | None: ...

    def counters(self) -> dict[str, float]: ...

    async def close(self) -> None: ...


class PlainSink:
    """Defaults for a sink that is not part of the checkpoint (idempotent on uniqueEventId):
    no position to record, nothing to sync, nothing to open or close unless overridden."""

    @property
    def waits(self) -> bool:
        return True

    async def open(self, committed: str | None) -> None:
        return None

    def position(self) -> str | None:
        return None

    async def sync(self, position: str | None) -> None:
        return None

    def committed(self, position: str) -> None:
        return None

    def staged(self) -> Staged | None:
        return None

    def counters(self) -> dict[str, float]:
        return {}

    async def close(self) -> None:
        return None


def serialized(ev: Event, sink: str = "") -> bytes:
    """The event's document as JSON (the text as received when nothing was added). One that
    no JSON writer takes (nested deeper than orjson writes, an integer beyond 64 bits, a
    number beyond a double's range to parse) is that event's fault: a dead letter, the rest
    go on."""
    try:
        return ev.document_json()
    except (TypeError, ValueError) as exc:
        raise PermanentSinkError(
            f"{sink + ' sink: ' if sink else ''}event cannot be serialized as JSON: "
            f"{prefix(str(exc))}",
            unique_event_id=ev.unique_event_id,
        ) from None
