"""``opera-consumer fleet status | drain | forget``: the fleet's members and stream leases, as the
coordination tables in the PostgreSQL state store have them (:mod:`consumer.state.fleet`).

* ``status``: every member row (live, draining, or gone: its heartbeat expired) with its fair
  share and the leases it holds; every stream with its lease, checkpoint and lag.
* ``forget MEMBER``: remove a gone member's row (a host retired, a name changed), and its
  draining flag with it; a live member is refused.
* ``drain MEMBER``: mark a member draining: its fair share becomes 0, so at its next tick it
  hands its streams over gracefully (``complete``, drain, commit, release) and the other
  members take them at theirs. ``--undo`` gives it a share again. The member keeps running;
  the flag belongs to the member's name: a restart under it (after a clean stop or a crash)
  starts drained, until ``--undo``.

Every time shown is measured against the database's clock (the members' clocks never
matter); the command never joins the fleet (it reads and flips one flag, nothing else).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..core.assignment import LeaseView, fair_share
from ..core.printable import printable
from ..core.records import Checkpoint
from ..errors import ConfigError, ExitCode, OperatorRefused
from ..state import open_store
from .output import emit, iso

if TYPE_CHECKING:
    from ..state.fleet import FleetView, MemberRow

MEMBER_COLUMNS = (
    "member",
    "host",
    "pid",
    "weight",
    "state",
    "share",
    "streams_held",
    "heartbeat_age_s",
    "started_at",
    "connected_age_s",
    "avoiding",
)
STREAM_COLUMNS = ("stream", "lease", "holder", "epoch", "expires_in_s", "offset", "lag_s")


def require_fleet(settings: Settings) -> None:
    """The fleet commands read the members' rows in PostgreSQL: refuse a config without
    them (exit 78, naming the key and the fix)."""
    if settings.state.backend != "postgres":
        raise ConfigError(
            "state.backend: the fleet's members and leases live in the PostgreSQL state store, "
            'and backend is "sqlite" -> run the command with the fleet members\' config '
            '([state] backend = "postgres" and dsn)'
        )
    if not settings.fleet.enabled:
        raise ConfigError(
            "fleet.enabled: fleet mode is off in this configuration -> run the command with the "
            "fleet members' config ([fleet] enabled = true, on the PostgreSQL state store)"
        )


@dataclass(frozen=True, slots=True)
class _Read:
    view: FleetView
    now: float  # the database's clock (this host's when the tables are empty)
    checkpoints: dict[str, Checkpoint]


async def _read(settings: Settings) -> _Read:
    """The checkpoints and the fleet's tables. Opening the store first refuses a database
    the daemon never ran on, with the fix (exit 78), before the fleet's tables are read."""
    store = await open_store(settings.state, create=False)
    try:
        checkpoints = {c.stream: c for c in await store.checkpoints()}
    finally:
        await store.close()
    from ..state.fleet import FleetTable  # noqa: PLC0415  # asyncpg: an extra

    table = FleetTable.for_operator(settings.state)
    try:
        view = await table.view(settings.state.timeout_s)
    finally:
        await table.close()
    now = view.now if (view.members or view.leases) else time.time()
    return _Read(view, now, checkpoints)


def _held(lease: LeaseView | None, now: float) -> bool:
    return lease is not None and lease.live_at(now)


def _member_state(m: MemberRow, now: float) -> str:
    if not m.live_at(now):
        return "gone"
    return "draining" if m.draining else "live"


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(now - then, 1)


def member_rows(settings: Settings, view: FleetView, now: float) -> list[dict[str, Any]]:
    live = [m.as_member() for m in view.members if m.live_at(now)]
    streams = len(settings.streams)
    rows: list[dict[str, Any]] = []
    for m in view.members:
        state = _member_state(m, now)
        held = sum(
            1 for lease in view.leases.values() if lease.holder == m.member and _held(lease, now)
        )
        rows.append(
            {
                "member": m.member,
                "host": m.host,
                "pid": m.pid,
                "weight": m.weight,
                "state": state,
                "draining": m.draining,
                # What the member aims at (consumer.core.assignment): None when gone.
                "share": None if state == "gone" else fair_share(m.as_member(), live, streams),
                "streams_held": held,
                "heartbeat_age_s": _age(now, m.heartbeat_at),
                "started_at": iso(m.started_at),
                # Since a stream of its own was last connected (None: never, or a version
                # before): what another member needs to see before handing it a stream it
                # cannot connect itself (README "Running a fleet").
                "connected_age_s": _age(now, m.connected_at),
                # Streams it handed over for not connecting them, not taken back for now.
                "avoiding": list(m.avoiding),
            }
        )
    return rows


def stream_rows(
    settings: Settings, view: FleetView, now: float, checkpoints: dict[str, Checkpoint]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in sorted(set(settings.streams) | set(view.leases)):
        lease = view.leases.get(name)
        cp = checkpoints.get(name)
        if lease is None or lease.holder is None:
            state = "free"
        else:
            state = "held" if _held(lease, now) else "expired"
        rows.append(
            {
                "stream": name,
                "configured": name in settings.streams,
                "lease": state,
                "holder": lease.holder if lease else None,
                "epoch": lease.epoch if lease else None,
                # negative: expired that long ago (a free lease has no expiry)
                "expires_in_s": (
                    round(lease.expires_at - now, 1) if lease and lease.holder else None
                ),
                "offset": cp.offset if cp else None,
                "lag_s": _age(now, cp.event_at) if cp else None,
            }
        )
    return rows


def summary(
    settings: Settings, members: list[dict[str, Any]], streams: list[dict[str, Any]]
) -> str:
    live = [m for m in members if m["state"] != "gone"]
    draining = sum(1 for m in live if m["state"] == "draining")
    configured = [s for s in streams if s["configured"]]
    held = [s for s in configured if s["lease"] == "held"]
    unheld = [s["stream"] for s in configured if s["lease"] != "held"]
    line = f"{len(live)} member{'' if len(live) == 1 else 's'} live"
    if draining:
        line += f" ({draining} draining)"
    line += f", {len(held)}/{len(configured)} streams held"
    if unheld:
        line += f"; unheld: {', '.join(unheld)}"
    f = settings.fleet
    return f"{line} (leases last {f.lease_ttl_s:g} s, renewed every {f.renew_interval_s:g} s)"


async def status(settings: Settings, *, as_json: bool) -> int:
    require_fleet(settings)
    read = await _read(settings)
    members = member_rows(settings, read.view, read.now)
    streams = stream_rows(settings, read.view, read.now, read.checkpoints)
    if as_json:
        print(json.dumps({"members": members, "streams": streams}, indent=2))
        return ExitCode.OK
    if members:
        table = [{**m, "avoiding": ",".join(m["avoiding"]) or None} for m in members]
        emit(table, MEMBER_COLUMNS, as_json=False)
    else:
        print("no fleet members: no daemon has joined the fleet (or every one has left)")
    print()
    emit(streams, STREAM_COLUMNS, as_json=False)
    print()
    print(summary(settings, members, streams))
    return ExitCode.OK


async def drain(settings: Settings, member: str, *, undo: bool) -> int:
    """Set (or, ``undo``, clear) a member's draining flag and say what follows."""
    require_fleet(settings)
    read = await _read(settings)  # also refuses a database the fleet never ran on
    view, now = read.view, read.now
    from ..state.fleet import FleetTable  # noqa: PLC0415  # asyncpg: an extra

    table = FleetTable.for_operator(settings.state)
    try:
        found = await table.set_draining(member, not undo, settings.state.timeout_s)
    finally:
        await table.close()
    if not found:
        # Names as the table has them (other members' configs, hostnames): escaped.
        known = ", ".join(printable(m.member, 200) for m in view.members) or "none"
        raise OperatorRefused(
            f"no fleet member {member!r} (members: {known}): `opera-consumer fleet status` "
            "lists them"
        )
    row = next((m for m in view.members if m.member == member), None)
    for line in _drain_story(settings, view, now, member, row, undo=undo):
        print(line)
    return ExitCode.OK


async def forget(settings: Settings, member: str) -> int:
    """Remove a gone member's row; refuse a live one or an unknown name."""
    require_fleet(settings)
    read = await _read(settings)
    row = next((m for m in read.view.members if m.member == member), None)
    if row is not None and row.live_at(read.now):
        raise OperatorRefused(
            f"fleet member {member!r} is live (heartbeat "
            f"{_age(read.now, row.heartbeat_at)} s ago): stop it first, or `fleet drain` it"
        )
    from ..state.fleet import FleetTable  # noqa: PLC0415  # asyncpg: an extra

    table = FleetTable.for_operator(settings.state)
    try:
        # The database decides again (its clock, now): a member that came back meanwhile
        # keeps its row.
        removed = await table.forget(member, settings.state.timeout_s)
    finally:
        await table.close()
    if not removed:
        known = ", ".join(printable(m.member, 200) for m in read.view.members) or "none"
        raise OperatorRefused(
            f"no gone fleet member {member!r} (members: {known}): `opera-consumer fleet "
            "status` lists them; a live one is stopped first"
        )
    was = " (it was draining)" if row is not None and row.draining else ""
    print(f"forgot fleet member {member!r}{was}")
    return ExitCode.OK


def _drain_story(
    settings: Settings,
    view: FleetView,
    now: float,
    member: str,
    row: MemberRow | None,
    *,
    undo: bool,
) -> list[str]:
    tick = f"{settings.fleet.renew_interval_s:g} s"
    held = sorted(
        printable(s, 200)
        for s, lease in view.leases.items()
        if lease.holder == member and _held(lease, now)
    )
    others = [
        m for m in view.live() if m.member != member and not m.draining and m.as_member().weight > 0
    ]
    # Names as the table has them (other members' configs, hostnames): escaped, as cells are.
    names = ", ".join(printable(m.member, 200) for m in others)
    member = printable(member, 200)
    lines: list[str] = []
    if undo:
        was = row is not None and row.draining
        lines.append(
            f"member {member} is no longer draining: its fair share is back"
            + ("" if was else " (it was not draining: nothing changes)")
        )
        if was:
            lines.append(
                "members over their share hand streams over to it at their next ticks "
                f"(every {tick}); it takes free ones at its own"
            )
    else:
        was = row is not None and row.draining
        lines.append(
            f"member {member} is draining: its fair share is 0"
            + (" (it already was)" if was else "")
        )
        if held:
            lines.append(
                f"at its next tick (every {tick}) it hands its {len(held)} stream"
                f"{'' if len(held) == 1 else 's'} over gracefully (complete, drain, commit, "
                f"release): {', '.join(held)}"
            )
            if others:
                lines.append(f"the other live members take them at their next ticks: {names}")
            else:
                lines.append(
                    "WARNING: no other live member that is not draining: the streams stay "
                    "unheld until one joins (or until `fleet drain "
                    f"{member} --undo`)"
                )
        else:
            lines.append("it holds no stream: nothing moves")
        lines.append(
            "it keeps running and heartbeating, and stays drained if restarted under this "
            f"name; `opera-consumer fleet drain {member} --undo` gives it a share again"
        )
    if row is not None and not row.live_at(now):
        lines.append(
            f"note: member {member} has no live heartbeat (last {now - row.heartbeat_at:.0f} s "
            "ago): the flag applies if it comes back under this name"
        )
    return lines
