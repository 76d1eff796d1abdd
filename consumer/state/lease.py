"""The daemon's lease on its state store: one process at a time.

SQLite: an exclusive ``flock`` on ``<state>.lock``. The kernel drops the lock when the process
dies (even by ``kill -9``), so a stale lease is impossible. The file names the holder (pid,
streams) for the CLI, which refuses to change offsets of a stream a running daemon holds, and
takes the lease itself while it changes them. PostgreSQL: a session advisory lock (see
:class:`~consumer.state.postgres.PostgresLease`), which the server drops with the connection.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..config import StateSettings
from ..errors import LeaseHeld, ReplayRefused
from .sqlite import store_error

if TYPE_CHECKING:
    from .fleet import FleetTable


def lock_path(state_path: Path, purpose: str = "") -> Path:
    """``<state>.lock``; with a purpose, ``<state>.<purpose>.lock`` (a lock of its own)."""
    return state_path.with_name(f"{state_path.name}{'.' + purpose if purpose else ''}.lock")


class Lease:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(
        cls, state_path: Path, streams: Iterable[str], *, role: str = "daemon", purpose: str = ""
    ) -> Lease:
        path = lock_path(state_path, purpose)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise store_error(state_path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LeaseHeld(
                f"{state_path} ({path} is locked)", holder(state_path, purpose)
            ) from None
        info = {"pid": os.getpid(), "role": role, "streams": sorted(streams), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Idempotent. The file stays (removing it would race with the next acquirer)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def holder(state_path: Path, purpose: str = "") -> dict[str, Any] | None:
    """Who holds the lease now (pid, role, streams), or None when nobody does."""
    path = lock_path(state_path, purpose)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:  # e.g. a directory this user cannot enter: name it and the fix
        raise store_error(state_path, exc) from None
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


class _FileHeld:
    def __init__(self, lease: Lease) -> None:
        self._lease = lease

    async def release(self) -> None:
        self._lease.release()


class _FleetHeld:
    """An operator command's hold on fleet streams: their lease rows in its own name (a new
    epoch, so a member that had them can commit nothing more), given back at the end."""

    def __init__(self, table: FleetTable, epochs: dict[str, int]) -> None:
        self._table = table
        self._epochs = epochs

    @classmethod
    async def take(cls, settings: StateSettings, streams: Iterable[str]) -> _FleetHeld:
        from .fleet import FleetTable  # noqa: PLC0415  # asyncpg: an extra

        table = FleetTable.for_operator(settings, lease_ttl_s=_OPERATOR_LEASE_S)
        wanted = sorted(set(streams))
        try:
            got = {a.stream: a.epoch for a in await table.acquire(wanted, settings.timeout_s)}
            if set(got) != set(wanted):
                await table.release(got, settings.timeout_s)
                view = await table.view(settings.timeout_s)
                busy = [s for s in wanted if s not in got]
                holders = sorted({str(view.leases[s].holder) for s in busy if s in view.leases})
                raise LeaseHeld(f"(streams {', '.join(busy)})", {"member": ", ".join(holders)})
        except BaseException:
            await table.close()
            raise
        return cls(table, got)

    async def release(self) -> None:
        epochs, self._epochs = self._epochs, {}
        try:
            await self._table.release(epochs, 10.0)
        finally:
            await self._table.close()


_OPERATOR_LEASE_S = 300.0  # an operator command's hold on a fleet stream, at most


async def acquire(
    settings: StateSettings, streams: Iterable[str], *, role: str = "daemon", fleet: bool = False
) -> Held:
    """Hold the state store for this process: the ``flock`` beside an SQLite file, or a
    session advisory lock in PostgreSQL (held by a connection of its own, dropped by the server
    when the process dies). ``fleet``: the leases of ``streams`` instead (the members share
    the store). :class:`LeaseHeld` names the holder."""
    if fleet:
        return await _FleetHeld.take(settings, streams)
    if settings.backend == "postgres":
        from .postgres import PostgresLease  # noqa: PLC0415  # asyncpg: an extra

        return await PostgresLease.acquire(settings, streams, role=role)
    return _FileHeld(Lease.acquire(settings.path, streams, role=role))


async def acquire_replay(settings: StateSettings) -> Held:
    """One ``dlq replay`` at a time per state store, whether a daemon runs or not: two would
    each read the same dead letters and deliver them before either resolved them. A lock of
    its own (a file beside the store's, or another advisory lock), not the store's lease."""
    try:
        if settings.backend == "postgres":
            from .postgres import PostgresLease  # noqa: PLC0415  # asyncpg: an extra

            return await PostgresLease.acquire(settings, (), role=_REPLAY, purpose=_REPLAY)
        return _FileHeld(Lease.acquire(settings.path, (), role=_REPLAY, purpose=_REPLAY))
    except LeaseHeld as exc:
        pid = (exc.holder or {}).get("pid")
        raise ReplayRefused(
            f"another dlq replay{f' (pid {pid})' if pid else ''} is running on this state "
            "store: wait for it to finish, then replay what it left"
        ) from None


_REPLAY = "dlq-replay"


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
        held = {
            s: lv.holder
            for s, lv in view.leases.items()
            if lv.holder is not None and lv.expires_at > view.now
        }
        names = {str(h) for h in held.values()} | {m.member for m in view.live()}
        if not names:
            return None
        return {"member": ", ".join(sorted(names)), "streams": sorted(held)}
    if settings.backend == "postgres":
        from .postgres import PostgresLease  # noqa: PLC0415  # asyncpg: an extra

        return await PostgresLease.holder(settings)
    return holder(settings.path)
