"""Python callable sink: ``target = "package.module:function"``.

The function is ``async def handle(stream: str, events: list[Event]) -> None``. Returning
means the batch is delivered (an awaitable it returns, e.g. a coroutine it forgot to await, is
awaited first: at most :data:`AWAITS` in a row; an object that awaits to itself, such as a
``redis.asyncio.Redis`` client or an asyncpg pool, often without suspending, is the handler's
error for its events, permanent). Raising is classified:

* transient (the batch is retried with backoff): ``TransientSinkError``, ``ConnectionError``,
  ``TimeoutError``, the configured ``transient_exceptions``, or any exception whose
  ``transient`` attribute is True (its ``retry_after``, in seconds, is honoured); an exception
  group (``asyncio.TaskGroup``) whose every leaf is transient; a ``CancelledError`` the handler
  raised of its own (the daemon is not stopping); no return within ``timeout_s``;
* permanent (dead-lettered): everything else, or ``transient = False``, ``SystemExit``
  (``sys.exit()``) and any other ``BaseException`` too: a handler's exception never ends the
  daemon. A batch failing permanently is re-delivered one event at a time, so only the
  culprit is dead-lettered; an exception may name it with a ``unique_event_id`` attribute.

A handler's ``GeneratorExit`` is its event's permanent failure too; only the one that closes
the worker's coroutine (``coro.close()``, never while the worker's task runs it) goes through.

``KeyboardInterrupt`` goes through unchanged (under ``dlq replay`` a second ^C arrives as one,
and must stop it); the daemon, which takes SIGINT as a signal, dead-letters the event a handler
raised it for, as for any error no sink names.

Events that the function saw before a crash of the daemon may be handed to it again: use
``ev.unique_event_id`` as an idempotency key.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..config import PythonSinkSettings, is_async_callable, resolve
from ..core.events import Event
from ..core.evidence import describe, prefix
from ..core.printable import printable
from ..core.retry_after import clamp_retry_after
from ..errors import ConfigError, PermanentSinkError, SinkError, TransientSinkError
from ..logs import REDACTOR
from .base import PlainSink

Handler = Callable[[str, list[Event]], Awaitable[object]]

# Leaves of an exception group named in the error, at most.
_LEAVES_SHOWN = 3
# Awaitables returned in a row (`return other(...)`, its await forgotten, returning another),
# at most, awaited: an object awaiting to itself without suspending looped for ever (the event
# loop frozen: timeout_s could not fire, nor SIGTERM be handled).
AWAITS = 4


class PythonSink(PlainSink):
    name = "python"

    def __init__(self, settings: PythonSinkSettings) -> None:
        try:
            fn = resolve(settings.target)
        except ValueError as exc:  # the module's import failed (settings built in code)
            raise ConfigError(f"sink.target: {exc}") from None
        if not is_async_callable(fn):
            raise ConfigError(
                f"sink.target: {settings.target} must be an async function "
                "(async def handle(stream, events))"
            )
        self._fn: Handler = fn
        self._timeout = settings.timeout_s
        transient: list[type[BaseException]] = [ConnectionError, TimeoutError]
        for name in settings.transient_exceptions:
            mod, _, attr = name.rpartition(".")
            try:
                transient.append(resolve(f"{mod or 'builtins'}:{attr}"))
            except ValueError as exc:  # as for the target
                raise ConfigError(f"sink.transient_exceptions: {exc}") from None
        self._transient = tuple(transient)

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        owner = asyncio.current_task()
        timeout = asyncio.timeout(self._timeout)
        try:
            async with timeout:
                result: object = await self._fn(stream, list(events))
                for _ in range(AWAITS):  # `return other(...)`, its await forgotten
                    if not inspect.isawaitable(result):
                        break
                    awaited, result = result, await result
                    if result is awaited:  # awaits to itself: awaiting again would loop
                        raise _returned(result, events, itself=True)
                if inspect.isawaitable(result):
                    raise _returned(result, events, itself=False)
        except KeyboardInterrupt:
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # we are being stopped (the pipeline's cancel, not the handler's)
            # Its own (a future its client cancelled): not a stop, and not the events' fault.
            raise TransientSinkError(
                "the handler raised CancelledError while the daemon is not stopping"
            ) from None
        except BaseException as exc:
            if isinstance(exc, GeneratorExit) and _closing(owner):
                raise  # the worker's coroutine is being closed, not the handler's raise
            if timeout.expired():  # whatever the handler made of the cancellation
                raise TransientSinkError(
                    f"the handler did not return within {self._timeout:g} s (sink.timeout_s)"
                ) from None
            if isinstance(exc, SinkError):
                raise
            raise self._classify(exc, events) from exc

    def _transient_one(self, exc: BaseException) -> bool:
        flag: Any = getattr(exc, "transient", None)
        if flag is not None:
            return flag is True
        if isinstance(exc, BaseExceptionGroup):  # a TaskGroup's: transient if all its leaves are
            return all(self._transient_one(e) for e in exc.exceptions)
        if isinstance(exc, SinkError):
            return isinstance(exc, TransientSinkError)
        return isinstance(exc, self._transient)

    def _classify(self, exc: BaseException, events: Sequence[Event]) -> SinkError:
        scrub = REDACTOR.scrub
        what = describe(exc, scrub)  # masked before it is cut
        waits = [clamp_retry_after(getattr(exc, "retry_after", None))]
        if isinstance(exc, BaseExceptionGroup):
            leaves = _leaves(exc)
            shown = "; ".join(describe(e, scrub) for e in leaves[:_LEAVES_SHOWN])
            more = len(leaves) - _LEAVES_SHOWN
            what = prefix(f"{what}: {shown}" + (f"; … and {more} more" if more > 0 else ""), 1000)
            waits += [clamp_retry_after(getattr(e, "retry_after", None)) for e in leaves]
        if self._transient_one(exc):
            # A group's: the longest wait any of its exceptions asks for.
            retry_after = max((w for w in waits if w is not None), default=None)
            return TransientSinkError(what, retry_after=retry_after)
        culprit = getattr(exc, "unique_event_id", None)
        if not isinstance(culprit, str):
            culprit = events[0].unique_event_id if len(events) == 1 else None
        return PermanentSinkError(what, unique_event_id=culprit)


def _closing(owner: asyncio.Task[Any] | None) -> bool:
    """Whether a GeneratorExit caught in a coroutine that ``owner`` runs is that coroutine
    being closed (``coro.close()``: its task garbage-collected, the loop going away), which must
    go through: close() throws it in while the coroutine is suspended, so never while ``owner``
    is the running task. Raised while ``owner`` runs, it is an exception like any other (a
    handler's, a library's), and going through it would end the worker."""
    try:
        return owner is None or asyncio.current_task() is not owner
    except RuntimeError:  # no running loop: a finalizer's close()
        return True


def _returned(result: object, events: Sequence[Event], *, itself: bool) -> PermanentSinkError:
    kind = printable(type(result).__qualname__, 200)
    how = "itself" if itself else f"yet another awaitable ({AWAITS} in a row)"
    return PermanentSinkError(
        f"the handler returned an object of type {kind}, an awaitable that awaits to {how}: "
        "return None (await what you call; do not return a client or a pool)",
        unique_event_id=events[0].unique_event_id if len(events) == 1 else None,
    )


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
