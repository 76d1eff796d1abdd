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
* A sink whose ``write`` hands its events on a part at a time, awaiting between the parts
  (the orchestrating sink: each part's resources are fetched first), says after each part how
  many of the write's events are taken so far: :func:`took`. The pipeline records them as
  processed at once, as if a write of them alone had returned: a commit made before the whole
  write returns (another worker's events, or the final commit of a stop) records the sink's
  position with them, and they are never written again. Without it a write's events are
  recorded when it returns (those ``delivered`` when it fails).
* ``counters()``: figures of its own for the metrics (e.g. the orchestration's GETs).
* Errors: raise :class:`~consumer.errors.TransientSinkError` to have the batch retried with
  backoff (intake pauses meanwhile), or :class:`~consumer.errors.PermanentSinkError` when an
  event can never be delivered (it is dead-lettered; give ``unique_event_id`` when known).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
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


# What a sink says it took of a write (see took): the count of the write's events so far.
Report = Callable[[int], None]

# The write under way in this task (a pipeline's worker): who hears what it took.
_TAKING: ContextVar[Report | None] = ContextVar("sink_taking", default=None)


def took(n: int) -> None:
    """Said inside a sink's ``write`` once it handed on a part of its events, before it awaits
    anything more: the first ``n`` events of the write (counted from its start, every part so
    far) are taken, as durable as a write of them alone that returned (for a sink in the
    checkpoint: in its ``position()``). A sink that writes a part of its write through another
    sink does so :func:`within` it, so that what that one says counts in the whole write.
    The pipeline records them as processed by the next commit (or the write's end) at the
    latest. Outside a pipeline's write (``dlq replay``) it does nothing."""
    report = _TAKING.get()
    if report is not None:
        report(n)


@contextmanager
def within(before: int) -> Iterator[None]:
    """Around the write of a part of a write through a wrapped sink: what that sink says it
    took (counted from its own write's start) counts after the ``before`` events already
    taken of the whole write."""
    report = _TAKING.get()
    if report is None:
        yield
        return
    _TAKING.set(lambda n: report(before + n))
    try:
        yield
    finally:
        _TAKING.set(report)


def taking(report: Report | None) -> None:
    """The pipeline's side of :func:`took`: from now on ``report`` hears, in this task, what
    the sink says it took (None: nobody; set, not reset with a token, so that a coroutine
    closed from another context, a finalizer's ``close()``, undoes it without an error)."""
    _TAKING.set(report)


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
