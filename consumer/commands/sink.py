"""``opera-consumer sink adopt``: take an existing jsonl file as committed.

The jsonl sink never cuts bytes it cannot prove uncommitted, so a non-empty file beside a new
or replaced state store stops the start. Adopting records the file's current length as the
committed one: the operator vouches that every byte in it is wanted (events in it that the
stream sends again are written twice, unless the store already knows them as processed).
"""

from __future__ import annotations

import sys
import time

from ..config import JsonlSinkSettings, Settings
from ..errors import ExitCode, LeaseHeld, OperatorRefused
from ..sinks.jsonl import adopt_position
from ..state import acquire, open_store


async def adopt(settings: Settings, *, execute: bool) -> int:
    if not isinstance(settings.sink, JsonlSinkSettings):
        print("opera-consumer sink adopt: only the jsonl sink has a file to adopt", file=sys.stderr)
        return ExitCode.USAGE
    state = settings.state.path
    # With rotation: the newest rotated file (the older ones are vouched for with it).
    path, size, position = adopt_position(settings.sink.path, settings.sink.rotation(), time.time())
    print(f"{path}: {size} bytes to record as committed in {state}")
    if not execute:
        print("plan only: nothing changed (add --execute to apply it)", file=sys.stderr)
        return ExitCode.OK
    try:
        held = await acquire(settings.state, (), role="sink-adopt")
    except LeaseHeld as exc:
        raise OperatorRefused(str(exc)) from None
    try:
        store = await open_store(settings.state)
        try:
            await store.set_sink_state("jsonl", position)
        finally:
            await store.close()
    finally:
        await held.release()
    print(f"done: the daemon resumes appending to {path} at byte {size}", file=sys.stderr)
    return ExitCode.OK
