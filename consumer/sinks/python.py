"""Python callable sink: ``target = "package.module:function"``.

The function is ``async def handle(stream: str, events: list[Event]) -> None``. Returning
means the batch is delivered. Raising is classified:

* transient (the batch is retried with backoff): ``TransientSinkError``, ``ConnectionError``,
  ``TimeoutError``, the configured ``transient_exceptions``, or any exception whose
  ``transient`` attribute is True (its ``retry_after``, in seconds, is honoured);
* permanent (dead-lettered): everything else, or ``transient = False``. A batch failing
  permanently is re-delivered one event at a time, so only the culprit is dead-lettered; an
  exception may name it with a ``unique_event_id`` attribute.

Events that the function saw before a crash of the daemon may be handed to it again: use
``ev.unique_event_id`` as an idempotency key.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..config import PythonSinkSettings, is_async_callable, resolve
from ..core.events import Event
from ..core.evidence import describe
from ..core.retry_after import clamp_retry_after
from ..errors import ConfigError, PermanentSinkError, SinkError, TransientSinkError
from ..logs import REDACTOR
from .base import PlainSink

Handler = Callable[[str, list[Event]], Awaitable[None]]


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
        transient: list[type[BaseException]] = [ConnectionError, TimeoutError]
        for name in settings.transient_exceptions:
            mod, _, attr = name.rpartition(".")
            transient.append(getattr(importlib.import_module(mod or "builtins"), attr))
        self._transient = tuple(transient)

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        try:
            await self._fn(stream, list(events))
        except SinkError:
            raise
        except Exception as exc:
            raise self._classify(exc, events) from exc

    def _classify(self, exc: Exception, events: Sequence[Event]) -> SinkError:
        what = describe(exc, REDACTOR.scrub)  # masked before it is cut
        flag: Any = getattr(exc, "transient", None)
        if flag is True or (flag is None and isinstance(exc, self._transient)):
            return TransientSinkError(
                what, retry_after=clamp_retry_after(getattr(exc, "retry_after", None))
            )
        culprit = getattr(exc, "unique_event_id", None)
        if not isinstance(culprit, str):
            culprit = events[0].unique_event_id if len(events) == 1 else None
        return PermanentSinkError(what, unique_event_id=culprit)
