"""``opera-consumer status [--watch]``: per stream, what the state store says (checkpoint offset,
the checkpoint's event time and the time it was committed, processed, dead letters) and what
the running daemon's listener says (state, events/s, event-time lag, the time to catch up).

Lag is event time: now minus the own timestamp of the newest event the daemon delivered (how
fresh the sink is), or, when no daemon answers, of the checkpoint's event (``event_at``: where
a restart resumes, behind the newest delivered by what is not committed yet). The time to
catch up (``eta``) is :mod:`consumer.core.progress`'s estimate over the listener's scrapes:
"caught up" within ``[log] progress_caught_up_s``, "idle" when nothing arrives, "unknown"
when the lag does not shrink.

``--watch`` refreshes every ``--interval`` seconds: in place on a terminal (like ``top``),
otherwise one table after another with a blank line between them (``--json``: one JSON array a
line); Ctrl-C ends it with exit status 0, as does ``--count N`` after N refreshes; a reader
that goes away (``| head -1``) with 141, as for every command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from datetime import datetime
from typing import Any

from ..config import Settings
from ..core.progress import Estimator, Phase, Progress, Sample, rounded
from ..errors import ExitCode
from ..runtime.metrics import live_status
from ..state import open_store
from ..state.base import StateStore
from .output import emit, iso, no_store

COLUMNS = (
    "stream",
    "state",
    "offset",
    "event_at",
    "checkpoint_at",
    "processed",
    "dead_letters",
    "events_per_s",
    "lag",
    "eta",
)
_WINDOW = 10  # scrapes the rates of a watch are taken over
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen


class LiveView:
    """The running daemon's figures, one scrape a :meth:`poll`, and an estimator per stream
    kept from one poll to the next (a watch's figures steady as the scrapes add up)."""

    def __init__(self, settings: Settings) -> None:
        self._host, self._port = settings.metrics.address, settings.metrics.port
        self._caught_up_s = settings.log.progress_caught_up_s
        self._estimators: dict[str, Estimator] = {}

    async def poll(self, first_interval_s: float) -> dict[str, dict[str, Any]] | None:
        """Per stream: state, events_per_s, lag_s, eta_s, progress (the phase); None when no
        daemon answers. The first poll scrapes twice, ``first_interval_s`` apart: a rate
        needs two."""
        look = await live_status(self._host, self._port)
        if look is not None and not self._estimators:
            self._add(look)
            await asyncio.sleep(first_interval_s)
            look = await live_status(self._host, self._port)
        if look is None:
            self._estimators.clear()  # a daemon that comes back starts its counters over
            return None
        out: dict[str, dict[str, Any]] = {}
        for name, progress in self._add(look).items():
            out[name] = {
                "state": look[name]["state"],
                "waiting_for": look[name]["waiting_for"],
                "events_per_s": rounded(progress.events_per_s),
                "lag_s": rounded(progress.lag_s),
                "eta_s": rounded(progress.eta_s),
                "progress": progress.phase.value,
                "commits": look[name].get("commits"),
            }
        return out

    def _add(self, look: dict[str, dict[str, Any]]) -> dict[str, Progress]:
        for gone in set(self._estimators) - set(look):
            del self._estimators[gone]
        out: dict[str, Progress] = {}
        for name, f in look.items():
            estimator = self._estimators.get(name)
            if estimator is None:
                estimator = Estimator(window=_WINDOW, caught_up_s=self._caught_up_s)
                self._estimators[name] = estimator
            lag = f["lag_s"]
            event_at = None if lag is None else f["at"] - lag
            out[name] = estimator.add(Sample(f["at"], f["processed"], event_at, f["waiting"]))
        return out


async def status(
    settings: Settings,
    *,
    as_json: bool,
    watch: bool = False,
    interval_s: float = 2.0,
    count: int | None = None,
) -> int:
    if no_store(settings):
        return ExitCode.RUNTIME
    store = await open_store(settings.state, create=False)
    try:
        live = LiveView(settings) if settings.metrics.enabled else None
        if not watch:
            rows = await snapshot(settings, store, live, 1.0)
            if as_json:
                emit(rows, COLUMNS, as_json=True)
            else:
                show(rows)
            return ExitCode.OK
        return await _watch(
            settings, store, live, as_json=as_json, interval_s=interval_s, count=count
        )
    finally:
        await store.close()


async def snapshot(
    settings: Settings, store: StateStore, live: LiveView | None, first_interval_s: float
) -> list[dict[str, Any]]:
    """One row per stream (configured, checkpointed or with dead letters)."""
    # The daemon first: its first look takes a while, and the store's figures are then fresher.
    running = await live.poll(first_interval_s) if live is not None else None
    checkpoints = {c.stream: c for c in await store.checkpoints()}
    dlq = await store.dead_letter_counts()
    now = time.time()
    rows: list[dict[str, Any]] = []
    for name in sorted(set(settings.streams) | set(checkpoints) | set(dlq)):
        cp = checkpoints.get(name)
        figures = running.get(name) if running else None
        # What the sink has is as fresh as the newest delivered event (the daemon's figure);
        # without one, the checkpoint's event (a commit or so behind it) says it.
        lag = figures["lag_s"] if figures else None
        if lag is None and cp is not None and cp.event_at is not None:
            lag = round(max(0.0, now - cp.event_at), 1)
        row = {
            "stream": name,
            "configured": name in settings.streams,
            "offset": cp.offset if cp else None,
            "unique_event_id": cp.unique_event_id if cp else None,
            "event_at": iso(cp.event_at) if cp else None,  # the checkpoint's event's own time
            "checkpoint_at": iso(cp.updated_at) if cp else None,  # when it was committed
            "processed": cp.processed_count if cp else 0,
            "dead_letters": dlq.get(name, 0),
            # from the running daemon, when it answers
            "state": figures["state"] if figures else "not running",
            "waiting_for": figures["waiting_for"] if figures else None,
            "events_per_s": figures["events_per_s"] if figures else None,
            "lag_s": lag,
            "eta_s": figures["eta_s"] if figures else None,
            "progress": figures["progress"] if figures else None,
            # the daemon's commits (one for every stream): failing, nothing becomes durable
            **_commit_fields(figures.get("commits") if figures else None),
        }
        rows.append(row)
    return rows


def _commit_fields(commits: dict[str, Any] | None) -> dict[str, Any]:
    if commits is None:
        keys = ("commits_ok", "commits_failing_since", "commit_failures", "commit_error")
        return dict.fromkeys(keys)
    return {
        "commits_ok": commits["ok"],
        "commits_failing_since": iso(commits["failing_since"]),
        "commit_failures": commits["failures"] or None,
        "commit_error": commits["last_error"],
    }


def commits_failing(rows: list[dict[str, Any]], now: float | None = None) -> str | None:
    """One line for people above the table when the daemon's commits fail: since when, how
    many, the last error (masked, bounded). The rest of the table (lag, "caught up") is what
    was delivered, not what is durable."""
    row = next((r for r in rows if r.get("commits_ok") is False), None)
    if row is None:
        return None
    since = row["commits_failing_since"]
    count = row["commit_failures"]
    error = row.get("commit_error")
    when = ""
    if since is not None:
        started = datetime.fromisoformat(since.replace("Z", "+00:00")).timestamp()
        when = f" since {since} ({duration(max(0.0, (now or time.time()) - started))})"
    return (
        f"COMMITS FAILING{when}{f', {count} in a row' if count else ''}: nothing delivered "
        "since is checkpointed (a restart replays it)" + (f"; last error: {error}" if error else "")
    )


def for_people(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with ``lag`` and ``eta`` in words, and what a stream waits for beside its
    state, for the table; failing commits in the state, and no "caught up" while they fail."""
    out = []
    for r in rows:
        state = f"{r['state']}: {r['waiting_for']}" if r["waiting_for"] else r["state"]
        failing = r.get("commits_ok") is False
        out.append(
            {
                **r,
                "state": f"{state} (COMMITS FAILING)" if failing else state,
                "lag": duration(r["lag_s"]),
                "eta": "commits failing" if failing else eta_text(r),
            }
        )
    return out


def show(rows: list[dict[str, Any]]) -> None:
    """The table for people, the failing commits said first."""
    if (banner := commits_failing(rows)) is not None:
        print(banner)
    emit(for_people(rows), COLUMNS, as_json=False)


def eta_text(row: dict[str, Any]) -> str | None:
    phase = row["progress"]
    if phase is None:
        return None
    if phase == Phase.CATCHING_UP:
        return duration(row["eta_s"])
    return {Phase.LIVE: "caught up", Phase.IDLE: "idle"}.get(phase, "unknown")


def duration(seconds: float | None) -> str | None:
    """``4.2s``, ``12s``, ``3m05s``, ``2h07m``, ``675d03h``."""
    if seconds is None:
        return None
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


async def _watch(
    settings: Settings,
    store: StateStore,
    live: LiveView | None,
    *,
    as_json: bool,
    interval_s: float,
    count: int | None,
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(sig, stop.set)  # not in a thread other than the main one
            handled.append(sig)
    tty = sys.stdout.isatty()
    shown = 0
    try:
        while not stop.is_set():
            next_at = loop.time() + interval_s  # a refresh every interval, however long it takes
            rows = await snapshot(settings, store, live, min(1.0, interval_s))
            if loop.time() >= next_at:  # it took the interval (a first look at the daemon
                next_at = loop.time() + interval_s  # scrapes twice): the next rate spans one
            if as_json:
                print(json.dumps(rows), flush=True)  # one document a line
            else:
                if tty:
                    sys.stdout.write(_CLEAR)
                    print(f"opera-consumer status  {iso(time.time())}  every {interval_s:g}s")
                elif shown:
                    print()
                show(rows)
                sys.stdout.flush()
            shown += 1
            if count is not None and shown >= count:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(max(next_at, loop.time())):
                    await stop.wait()
    finally:  # `status --watch | head`: a BrokenPipeError is the command line's (141)
        for sig in handled:
            loop.remove_signal_handler(sig)
    return ExitCode.OK
