"""``opera-consumer status``: per stream, what the state store says (checkpoint, processed,
dead letters) and what the running daemon's listener says (state, events/s, lag)."""

from __future__ import annotations

from typing import Any

from ..config import Settings
from ..errors import ExitCode
from ..runtime.metrics import live_status
from ..state import open_store
from .output import emit, iso, no_store


async def status(settings: Settings, *, as_json: bool) -> int:
    if no_store(settings):
        return ExitCode.RUNTIME
    store = await open_store(settings.state, create=False)
    try:
        checkpoints = {c.stream: c for c in await store.checkpoints()}
        dlq = await store.dead_letter_counts()
    finally:
        await store.close()
    m = settings.metrics
    live = await live_status(m.address, m.port) if m.enabled else None
    rows: list[dict[str, Any]] = []
    for name in sorted(set(settings.streams) | set(checkpoints) | set(dlq)):
        cp = checkpoints.get(name)
        now = live.get(name) if live else None
        rows.append(
            {
                "stream": name,
                "configured": name in settings.streams,
                "offset": cp.offset if cp else None,
                "unique_event_id": cp.unique_event_id if cp else None,
                "last_event_at": iso(cp.last_event_at) if cp else None,
                "checkpoint_at": iso(cp.updated_at) if cp else None,
                "processed": cp.processed_count if cp else 0,
                "dead_letters": dlq.get(name, 0),
                # from the running daemon, when it answers
                "state": now["state"] if now else "not running",
                "events_per_s": now["events_per_s"] if now else None,
                "lag_s": now["lag_s"] if now else None,
            }
        )
    cols = ["stream", "state", "offset", "last_event_at", "processed", "dead_letters"]
    emit(rows, [*cols, "events_per_s", "lag_s"], as_json=as_json)
    return ExitCode.OK
