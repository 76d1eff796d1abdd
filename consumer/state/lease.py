"""The daemon's lease on its state store: one process at a time.

SQLite: an exclusive ``flock`` on ``<state>.lock``. The kernel drops the lock when the process
dies (even by ``kill -9``), so a stale lease is impossible. The file names the holder (pid,
streams) for the CLI, which refuses to change offsets of a stream a running daemon holds, and
takes the lease itself while it changes them. PostgreSQL: a session advisory lock (see
:class:`~consumer.state.postgres.PostgresLease`), which the server drops with the connection
(a server restart too: the daemon checks it every ``lease_check_interval_s`` and takes it again,
or stops every stream when another process took it meanwhile); a fleet's members take a lease
row per stream instead (:mod:`consumer.state.fleet`) and hold the schema's fleet lock shared,
which that daemon holds exclusively, so the two never run side by side. An operator's change
looks at and holds the daemon's lease and the streams' rows, whatever its own ``[fleet]`` says
(:func:`in_the_way`, :func:`hold_streams`).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..config import StateSettings
from ..errors import LeaseHeld, ReplayRefused, StoreError
from ..files import make_dirs
from .sqlite import beside, not_a_file, store_error

if TYPE_CHECKING:
    from .fleet import FleetTable, FleetView


def lock_path(state_path: Path, purpose: str = "") -> Path:
    """``<state>.lock``; with a purpose, ``<state>.<purpose>.lock`` (a lock of its own). Beside
    the file ``state_path`` resolves to (links followed, a file not made yet too: its
    directory's): two daemons given the store through a link and by its own path, or by two
    spellings, would each lock a file of their own and both write to it."""
    return beside(state_path, f"{'.' + purpose if purpose else ''}.lock")


class Lease:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(
        cls, state_path: Path, streams: Iterable[str], *, role: str = "daemon", purpose: str = ""
    ) -> Lease:
        """Blocking: a probe in the way is waited out with ``time.sleep`` (for a thread; on the
        event loop, :meth:`acquire_async`). :class:`LeaseHeld` names the holder."""
        with _Taking(state_path, purpose) as taking:
            while not taking.locked():
                time.sleep(_PROBE_POLL_S)
            return taking.lease(streams, role)

    @classmethod
    async def acquire_async(
        cls, state_path: Path, streams: Iterable[str], *, role: str = "daemon", purpose: str = ""
    ) -> Lease:
        """:meth:`acquire` on the event loop, which runs on while a probe is waited out (up to
        :data:`_PROBE_WAIT_S`): a starting daemon's signal handlers, its /readyz, a command's
        other tasks. Cancelled meanwhile, the lock file is closed."""
        with _Taking(state_path, purpose) as taking:
            while not taking.locked():  # noqa: ASYNC110  # a flock has no event to await
                await asyncio.sleep(_PROBE_POLL_S)
            return taking.lease(streams, role)

    def release(self) -> None:
        """Idempotent. The file stays (removing it would race with the next acquirer)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


# A lease refused while nobody holds it: an operator's command asking who does (`status`,
# `offset show`, a dlq command: :func:`holder`'s shared probe, held for an instant), or a holder
# between its lock and its record. Tried again meanwhile, every _PROBE_POLL_S, for so long.
_PROBE_WAIT_S = 1.0
_PROBE_POLL_S = 0.01


class _Taking:
    """One taking of the lease, its waits the caller's (a thread's sleep or the loop's): the
    lock file opened (made), exclusive tries (:meth:`locked`), the holder's record written
    (:meth:`lease`). The file is closed on the way out unless a :class:`Lease` holds it."""

    def __init__(self, state_path: Path, purpose: str) -> None:
        # Refused as the store's open refuses it, before anything is made beside it: a state
        # path of /dev/null made /dev/null.lock (as root, in /dev), then the open said no.
        if (fault := not_a_file(state_path, "[state] path")) is not None:
            raise StoreError(f"state store {state_path}: {fault}")
        self._state_path, self._purpose = state_path, purpose
        self.path = lock_path(state_path, purpose)
        try:
            make_dirs(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise store_error(state_path, exc, file=self.path) from None
        self._fd = fd
        self._kept = False  # by a Lease: not closed on the way out
        self._deadline = time.monotonic() + _PROBE_WAIT_S

    def __enter__(self) -> _Taking:
        return self

    def __exit__(self, *_: object) -> None:
        if not self._kept:
            os.close(self._fd)

    def locked(self) -> bool:
        """Whether the exclusive lock is ours now; False while nobody says they hold it, for
        up to :data:`_PROBE_WAIT_S`; :class:`LeaseHeld` (with the holder's record) when a
        holder that says who it is has it, or anyone still after that."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = holder(self._state_path, self._purpose)
            if (who and who.get("pid")) or time.monotonic() >= self._deadline:
                where = f"{self._state_path} ({self.path} is locked)"
                raise LeaseHeld(where, who) from None
            return False
        return True

    def lease(self, streams: Iterable[str], role: str) -> Lease:
        """The lock, ours, as a :class:`Lease`, its holder's record written."""
        info = {"pid": os.getpid(), "role": role, "streams": sorted(streams), "since": time.time()}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)
        self._kept = True
        return Lease(self.path, self._fd)


def holder(state_path: Path, purpose: str = "") -> dict[str, Any] | None:
    """Who holds the lease now (pid, role, streams), or None when nobody does."""
    path = lock_path(state_path, purpose)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:  # e.g. a directory this user cannot enter: name it and the fix
        raise store_error(state_path, exc, file=path) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info: dict[str, Any] = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                info = {}
            return info
        return None  # we got it: nobody holds it
    finally:
        os.close(fd)


# --- the lease of either backend -----------------------------------------------------------------


class Held(Protocol):
    async def release(self) -> None: ...

    async def confirm(self) -> None:
        """Still ours, or :class:`LeaseHeld` (another process took it meanwhile) or
        :class:`StoreError` (the server cannot say now): a PostgreSQL session lock the server
        dropped with its session is taken again. For a command that writes for long under
        it (``dlq replay``), before each write."""


class _FileHeld:
    def __init__(self, lease: Lease) -> None:
        self._lease = lease

    async def release(self) -> None:
        self._lease.release()

    async def confirm(self) -> None:
        """An open file's lock is never dropped while the process runs."""


class _StreamsHeld:
    """An operator's hold on PostgreSQL streams: the schema's advisory lease, and their
    lease rows locked by a transaction of the fleet table's connection."""

    def __init__(self, single: Held, table: FleetTable) -> None:
        self._single = single
        self._table = table

    async def release(self) -> None:
        try:
            await self._table.close()  # the server ends the transaction: the rows are free
        finally:
            await self._single.release()

    async def confirm(self) -> None:
        await self._single.confirm()


async def acquire(
    settings: StateSettings,
    streams: Iterable[str],
    *,
    role: str = "daemon",
    outside_fleet: bool = False,
) -> Held:
    """Hold the state store for this process: the ``flock`` beside an SQLite file, or a
    session advisory lock in PostgreSQL (held by a connection of its own, dropped by the server
    when the process dies). ``outside_fleet`` (the daemon without ``[fleet]``): in PostgreSQL
    the schema's fleet lock too, which every fleet member holds shared: refused beside one,
    and no member runs beside us. A fleet's streams: :func:`hold_streams`.
    :class:`LeaseHeld` names the holder."""
    if settings.backend == "postgres":
        from .postgres import PostgresLease  # noqa: PLC0415  # asyncpg: an extra

        return await PostgresLease.acquire(
            settings, streams, role=role, outside_fleet=outside_fleet
        )
    return _FileHeld(await Lease.acquire_async(settings.path, streams, role=role))


async def acquire_replay(settings: StateSettings) -> Held:
    """One ``dlq replay`` at a time per state store, whether a daemon runs or not: two would
    each read the same dead letters and deliver them before either resolved them. A lock of
    its own (a file beside the store's, or another advisory lock), not the store's lease."""
    try:
        if settings.backend == "postgres":
            from .postgres import PostgresLease  # noqa: PLC0415  # asyncpg: an extra

            return await PostgresLease.acquire(settings, (), role=_REPLAY, purpose=_REPLAY)
        return _FileHeld(
            await Lease.acquire_async(settings.path, (), role=_REPLAY, purpose=_REPLAY)
        )
    except LeaseHeld as exc:
        pid = (exc.holder or {}).get("pid")
        raise ReplayRefused(
            f"another dlq replay{f' (pid {pid})' if pid else ''} is running on this state "
            "store: wait for it to finish, then replay what it left"
        ) from None


_REPLAY = REPLAY = "dlq-replay"  # the purpose of the replay's lock: <state>.dlq-replay.lock
OFFSET = "offset"  # the role of `offset set/reset` holding the lease
ADOPT = "sink-adopt"  # the role of `sink adopt`
# The roles of operators' commands that hold the store's lease for their run, then let go:
# `dlq replay` (no daemon running), `offset set/reset`, `sink adopt`.
OPERATOR_ROLES = frozenset({REPLAY, OFFSET, ADOPT})


async def current_holder(settings: StateSettings, *, fleet: bool = False) -> dict[str, Any] | None:
    """Who holds the state store now (pid, role, host or streams), or None. ``fleet``: the
    live members (holding leases or not yet: a member just joined, or drained, takes streams
    at any tick) and holders of live leases, and the streams leased."""
    if fleet:
        from .fleet import FleetTable  # noqa: PLC0415  # asyncpg: an extra

        table = FleetTable.for_operator(settings, lease_ttl_s=0.0)
        try:
            view = await table.view(settings.timeout_s)
        finally:
            await table.close()
        held = {s: lv.holder for s, lv in view.leases.items() if lv.live_at(view.now)}
        names = {str(h) for h in held.values()} | {m.member for m in view.live()}
        if not names:
            return None
        return {"member": ", ".join(sorted(names)), "streams": sorted(held)}
    if settings.backend == "postgres":
        from .postgres import PostgresLease  # noqa: PLC0415  # asyncpg: an extra

        return await PostgresLease.holder(settings)
    return holder(settings.path)


# --- an operator's change to streams (offset set / reset) ---------------------------------------


def _fleet_in_the_way(
    view: FleetView, streams: Iterable[str], *, fleet: bool
) -> dict[str, Any] | None:
    """The live holders of these streams' lease rows; ``fleet`` off (a single daemon's
    config on a fleet's schema, which the daemon refuses too), any live member or holder."""
    held = {s: str(lv.holder) for s, lv in view.leases.items() if lv.live_at(view.now)}
    busy = sorted(set(streams) & set(held))
    if busy:
        return {"member": ", ".join(sorted({held[s] for s in busy})), "streams": busy}
    names = set(held.values()) | {m.member for m in view.live()}
    if fleet or not names:
        return None
    return {"member": ", ".join(sorted(names)), "streams": sorted(held), "fleet_off": True}


async def in_the_way(
    settings: StateSettings, streams: Iterable[str], *, fleet: bool
) -> dict[str, Any] | None:
    """Who would write over a change to ``streams`` made now, or None. SQLite: the file
    lease's holder, when it holds one of them. PostgreSQL, whatever ``fleet`` says: the
    holder of the schema's advisory lease (a single daemon), then :func:`_fleet_in_the_way`.
    A schema without the fleet's tables (none yet, or older) has no fleet."""
    wanted = set(streams)
    if settings.backend != "postgres":
        who = holder(settings.path)
        if who is not None and wanted & set(who.get("streams", wanted)):
            return who
        return None
    from .fleet import FleetTable  # noqa: PLC0415  # asyncpg: an extra
    from .postgres import PostgresLease  # noqa: PLC0415

    single = await PostgresLease.holder(settings)
    if single is not None:
        return single
    table = FleetTable.for_operator(settings)
    try:
        if not await table.has_tables(settings.timeout_s):
            return None
        view = await table.view(settings.timeout_s)
    finally:
        await table.close()
    return _fleet_in_the_way(view, wanted, fleet=fleet)


async def hold_streams(
    settings: StateSettings, streams: Iterable[str], *, role: str, fleet: bool
) -> Held:
    """Hold ``streams`` against every writer while an operator changes their state.
    SQLite: the file lease. PostgreSQL, whatever ``fleet`` says: the schema's advisory lease
    (no single daemon starts meanwhile), then the streams' lease rows
    (:meth:`~consumer.state.fleet.FleetTable.hold_for_change`: whoever had one is fenced,
    and no member takes one meanwhile); ``fleet`` off, refused beside live members, as the
    daemon refuses. :class:`LeaseHeld` names the holder."""
    wanted = sorted(set(streams))
    if settings.backend != "postgres":
        return _FileHeld(await Lease.acquire_async(settings.path, wanted, role=role))
    from .fleet import FleetTable  # noqa: PLC0415  # asyncpg: an extra
    from .postgres import PostgresLease  # noqa: PLC0415

    single = await PostgresLease.acquire(settings, wanted, role=role)
    table = FleetTable.for_operator(settings)
    try:
        if not fleet:
            members = _fleet_in_the_way(await table.view(settings.timeout_s), (), fleet=False)
            await table.close()  # the hold makes a connection of its own
            if members is not None:
                where = f"schema {settings.schema_} (fleet members; set [fleet] enabled)"
                raise LeaseHeld(where, members)
        live = await table.hold_for_change(wanted, settings.timeout_s)
        if live:
            busy = sorted(live)
            who = {"member": ", ".join(sorted(set(live.values()))), "streams": busy}
            raise LeaseHeld(f"schema {settings.schema_} (streams {', '.join(busy)})", who)
    except BaseException:
        try:
            await table.close()
        finally:
            await single.release()
        raise
    return _StreamsHeld(single, table)
