"""``opera-consumer sink adopt``: take an existing jsonl file as committed.

The jsonl sink never cuts bytes it cannot prove uncommitted, so a non-empty file beside a new
or replaced state store stops the start. Adopting records the file's current length as the
committed one: the operator vouches that every byte in it is wanted (events in it that the
stream sends again are written twice, unless the store already knows them as processed).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..config import JsonlSinkSettings, Settings
from ..errors import ExitCode, LeaseHeld, OperatorRefused
from ..sinks.jsonl import adopt_position, committed_file
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
        refusal = _refusal(await _committed(settings), settings.sink.path, path)
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
            refusal = _refusal(await store.sink_state("jsonl"), settings.sink.path, path)
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


def _refusal(committed: str | None, configured: Path, adopted: Path) -> str | None:
    """A recorded position of the very file to adopt: the store knows its committed length,
    and the daemon cuts what is past it on start. Adopting would vouch for that tail (a kill
    -9's: its events come again from the checkpoint, written twice) or move the length back
    (the next start would cut committed lines). A position of another file (rotation since
    switched off or renamed) or one this sink cannot read is what adopt is for."""
    named = None if committed is None else committed_file(committed, configured)
    if named is None or named[0] != adopted:
        return None
    return (
        f"the state store already records {adopted}'s committed length ({named[1]} bytes): "
        "on start the daemon cuts what is past it itself. Adopt is for a file the store has "
        "no position for (a new or replaced state store, or rotation switched off)"
    )
