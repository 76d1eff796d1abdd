"""``opera-consumer offset show | set | reset``: move a stream's resume position by hand.

Like ``kafka-consumer-groups --reset-offsets``: the command prints the plan (current → new)
and changes nothing without ``--execute``; it is refused while a running daemon holds the
stream, and holds the lease itself while it writes, so no daemon starts half-way. On
PostgreSQL it looks at, and holds, both a single daemon's lease and the fleet's lease rows,
whatever this config's ``[fleet]`` says (:func:`~consumer.state.lease.hold_streams`).

* ``set STREAM OFFSET``: the next session resumes at OFFSET (OHIP's replay is inclusive).
  Events already processed within ``processed_retention_days`` are still skipped by the
  deduplication.
* ``reset STREAM --highest``: the next session subscribes with ``offsetType: highest``: only
  the newest event, then new ones. The backlog in between is skipped for good.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..core.printable import printable
from ..core.protocol import SubscribeInput
from ..errors import ExitCode, InvalidInput, LeaseHeld, OffsetRefused, OperatorRefused
from ..state import open_store
from ..state.lease import OFFSET, hold_streams, in_the_way
from .output import emit, iso, no_store


@dataclass(frozen=True, slots=True)
class Plan:
    stream: str
    current: str | None
    new: str  # an offset, or "highest"
    note: str

    def as_dict(self) -> dict[str, Any]:
        return {"stream": self.stream, "current": self.current, "new": self.new, "note": self.note}


async def show(settings: Settings) -> list[dict[str, Any]]:
    store = await open_store(settings.state, create=False)
    try:
        cps = {c.stream: c for c in await store.checkpoints()}
        rows = []
        for name in sorted(set(settings.streams) | set(cps)):
            cp = cps.get(name)
            override = await store.start_override(name)
            rows.append(
                {
                    "stream": name,
                    "offset": cp.offset if cp else None,
                    "unique_event_id": (cp.unique_event_id or None) if cp else None,
                    "checkpoint_at": iso(cp.updated_at) if cp else None,
                    "next_start": override
                    or (f"offset {cp.offset}" if cp else settings_start(settings, name)),
                }
            )
        return rows
    finally:
        await store.close()


def settings_start(settings: Settings, name: str) -> str:
    s = settings.streams.get(name)
    if s is None:
        return "-"
    sub = s.subscription
    if sub.start == "highest":
        return "highest"
    return f"offset {sub.offset}" if sub.offset is not None else "gateway's position"


def _who(holder: dict[str, Any]) -> str:
    """The holder as a person reads it: its values are another process's rows (bounded,
    escaped)."""
    if holder.get("member"):
        return f"fleet member {printable(holder['member'], 200)}"
    who = f"pid {printable(holder.get('pid'), 20)}"
    if holder.get("host"):
        who += f" on {printable(holder['host'], 200)}"
    role = holder.get("role")
    return who if role in (None, "daemon") else f"{who}, {printable(role, 50)}"


async def plan(settings: Settings, stream: str, new: str) -> Plan:
    """``new``: an offset (digits) or "highest". Raises OffsetRefused saying why not."""
    if stream not in settings.streams:
        raise OffsetRefused(
            f"unknown stream {stream!r}: configured streams are {', '.join(settings.streams)}"
        )
    if new != "highest":
        try:
            SubscribeInput(chain_code="X", offset=new).validate()
        except InvalidInput as exc:
            raise OffsetRefused(f"offset {new!r}: {exc}") from None
    _refuse_beside(
        await in_the_way(settings.state, (stream,), fleet=settings.fleet.enabled), stream
    )
    store = await open_store(settings.state, create=False)
    try:
        cp = await store.checkpoint(stream)
    finally:
        await store.close()
    note = (
        "the backlog up to the newest event is skipped"
        if new == "highest"
        else "resume there (inclusive); events already processed are skipped"
    )
    return Plan(stream, cp.offset if cp else None, new, note)


def _refuse_beside(running: dict[str, Any] | None, stream: str) -> None:
    if running is None:
        return
    if running.get("fleet_off"):
        raise OffsetRefused(
            f"fleet members ({running['member']}) run on this state store, and this config "
            "has [fleet] off: set [fleet] enabled = true, as theirs, and try again"
        )
    if running.get("member"):
        # Draining only the holder hands the stream to the next member at its next tick.
        raise OffsetRefused(
            f"a running opera-consumer ({_who(running)}) holds stream {stream}: its in-memory "
            "position would overwrite the change. `opera-consumer fleet drain` every live "
            "member configured for the stream (the holder alone hands it to the next one), "
            "or stop the fleet; then try again, and `fleet drain MEMBER --undo` each after"
        )
    raise OffsetRefused(
        f"a running opera-consumer ({_who(running)}) holds stream {stream}: "
        "stop it first (its in-memory position would overwrite the change)"
    )


async def execute(settings: Settings, p: Plan) -> None:
    held = await hold_streams(
        settings.state, (p.stream,), role=OFFSET, fleet=settings.fleet.enabled
    )
    try:
        store = await open_store(settings.state, create=False)
        try:
            if p.new == "highest":
                await store.reset_to_highest(p.stream)
            else:
                await store.set_offset(p.stream, p.new)
        finally:
            await store.close()
    finally:
        await held.release()


async def command(settings: Settings, args: argparse.Namespace) -> int:
    """`offset show|set|reset`, with the arguments the CLI parsed."""
    if no_store(settings):
        return ExitCode.RUNTIME
    if args.offset_command == "show":
        emit(
            await show(settings),
            ("stream", "offset", "checkpoint_at", "next_start"),
            as_json=args.json,
        )
        return ExitCode.OK
    new = "highest" if args.offset_command == "reset" else args.offset
    try:
        change = await plan(settings, args.stream, new)
        if args.execute:
            await execute(settings, change)
    except LeaseHeld as exc:  # refused, like any operator command that would do harm now
        raise OperatorRefused(str(exc)) from None
    emit([change.as_dict()], ("stream", "current", "new", "note"), as_json=args.json)
    if not args.execute:
        print("plan only: nothing changed (add --execute to apply it)", file=sys.stderr)
    else:
        when = f"done: {change.stream} resumes at {change.new} when the daemon starts"
        print(when, file=sys.stderr)
    return ExitCode.OK
