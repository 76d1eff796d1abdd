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
from ..core.printable import printable
from ..errors import ExitCode, LeaseHeld, OperatorRefused, SinkUnusable
from ..sinks.jsonl import JsonlSink, adopt_position
from ..state import acquire, open_store


async def adopt(settings: Settings, *, execute: bool) -> int:
    if not isinstance(settings.sink, JsonlSinkSettings):
        print("opera-consumer sink adopt: only the jsonl sink has a file to adopt", file=sys.stderr)
        return ExitCode.USAGE
    state = settings.state.path
    # With rotation: the newest rotated file (the older ones are vouched for with it).
    path, size, _ = adopt_position(settings.sink.path, settings.sink.rotation(), time.time())
    print(f"{path}: {size} bytes to record as committed in {state}")
    if not execute:
        refusal = await _refusal(settings.sink, await _committed(settings))
        if refusal is not None:
            raise OperatorRefused(refusal)
        print("plan only: nothing changed (add --execute to apply it)", file=sys.stderr)
        return ExitCode.OK
    try:
        held = await acquire(settings.state, (), role="sink-adopt")
    except LeaseHeld as exc:
        raise OperatorRefused(str(exc)) from None
    try:
        # Under the lease, so no daemon commits meanwhile: the file as it is now, and
        # what the store says now (a daemon may have committed since the plan was shown).
        store = await open_store(settings.state)
        try:
            path, size, position = adopt_position(
                settings.sink.path, settings.sink.rotation(), time.time()
            )
            refusal = await _refusal(settings.sink, await store.sink_state("jsonl"))
            if refusal is not None:
                raise OperatorRefused(refusal)
            await store.set_sink_state("jsonl", position)
        finally:
            await store.close()
    finally:
        await held.release()
    print(f"done: the daemon resumes appending to {path} at byte {size}", file=sys.stderr)
    return ExitCode.OK


async def _committed(settings: Settings) -> str | None:
    """The committed position the store records now (a plan creates no store)."""
    if settings.state.backend == "sqlite" and not settings.state.path.exists():
        return None
    store = await open_store(settings.state, create=False)
    try:
        return await store.sink_state("jsonl")
    finally:
        await store.close()


async def _refusal(settings: JsonlSinkSettings, committed: str | None) -> str | None:
    """Refused when the start would take the recorded position as it is (and cut what is
    past it itself, or delete rotated files numbered after it): adopting would vouch for that
    tail (a kill -9's: its events come again from the checkpoint, written twice) or move the
    committed length back (the next start would cut committed lines). What the start refuses
    (no position, one of a file this configuration does not name) is what adopt is for."""
    if committed is None:
        return None
    try:
        await JsonlSink(settings.path, rotation=settings.rotation()).check(committed)
    except SinkUnusable:
        return None
    return (
        f"the state store already records the jsonl sink's committed position "
        f"({printable(committed, 300)}), and the daemon starts from it as it is, cutting "
        "what is past it. Adopt is for a position the start refuses (none: a new or "
        "replaced state store; or a file rotation no longer names)"
    )
