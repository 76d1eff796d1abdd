"""The fleet's coordination tables in the PostgreSQL state store (schema version 2).

``fleet_members``: one row per member (host, pid, weight, heartbeat and expiry on the
database's clock, ``draining`` set by ``opera-consumer fleet drain``). ``stream_leases``: one
row per stream (holder, epoch, expiry). A member takes a free or expired lease by bumping its
epoch (a row starts at the database's clock in microseconds: :data:`FIRST_EPOCH`); every commit
checks the epoch in its own transaction
(:meth:`~consumer.state.postgres.PostgresStore.commit`), so a member that lost a lease cannot
make anything durable for that stream.

The member talks to these tables over a connection of its own, outside the store's pool, and
bounds every call: a renewal stuck behind a commit, or a connection stuck on a dead network,
would let the leases run out unnoticed. :meth:`FleetTable.tick` is one statement per tick
whatever the number of streams: heartbeat and renewal of every lease held.

A member's row is its process's alone: the heartbeat writes it only where the row carries the
same ``instance`` (a random id per process) or has expired. A second live process under the
same name finds the row held and is told so (:attr:`Renewal.owned` false), instead of both
renewing and taking the streams in one name.

A member's connection holds the schema's fleet lock shared (see
:func:`~consumer.state.postgres.take_fleet_lock`), taken before anything else each time the
connection is made: beside a daemon outside the fleet, which holds it exclusively, every call
raises :class:`~consumer.errors.LeaseHeld` naming that daemon.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..config import StateSettings
from ..config.settings import MAX_FLEET_WEIGHT
from ..core.assignment import (
    MAX_EXPIRY_AHEAD_S,
    TOP_EPOCH,
    LeaseView,
    Member,
    expiry_ok,
    live_until,
)
from ..core.printable import printable
from ..errors import LeaseHeld, OperatorRefused
from ..pg_target import Target
from .postgres import DRIVER_ERRORS, FLEET_MEMBER_APP, quote_ident, store_error, take_fleet_lock

NOW = "EXTRACT(EPOCH FROM clock_timestamp())::float8"
# A lease row's first epoch, whenever it is made (again, after an operator deleted it): the
# database's clock in microseconds. Each takeover adds 1, so an earlier row of the stream
# reached far less than this (it would take a takeover every microsecond since it was made):
# a process still holding the old row, frozen, never meets its (holder, epoch) again at the
# commit fence (from the column's default, 0, the new row's first takeover was epoch 1 again).
# Far below TOP_EPOCH (2**63 microseconds: some 292,000 years).
FIRST_EPOCH = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1e6)::bigint"
# Of a member row's ``avoiding`` (anyone's to fill), this many streams are read.
AVOIDING_READ = 100
# The lease rows a member holds at these epochs, locked in stream order (as an operator's hold
# and a commit's fence check lock theirs: no deadlock). FOR NO KEY UPDATE, which the UPDATE
# takes anyway: a commit's fence check (FOR KEY SHARE) holds up neither a renewal nor a release.
_LOCKED = (
    "locked AS (SELECT l.stream FROM {s}.stream_leases l "
    "JOIN unnest({streams}::text[], {epochs}::bigint[]) AS h(stream, epoch) "
    "ON l.stream = h.stream AND l.epoch = h.epoch WHERE l.holder = {holder} "
    "ORDER BY l.stream FOR NO KEY UPDATE OF l)"
)
# A member row's or lease's expiry further ahead than MAX_EXPIRY_AHEAD_S (the core's: twice
# the largest lease_ttl_s) is no live member's: it counts as expired (MemberRow.live_at,
# LeaseView.live_at). The same in SQL, where NaN sorts above every number: true for a row that
# counts as expired.
_EXPIRED = "({e} <= {now} OR {e} > {now} + " + f"{MAX_EXPIRY_AHEAD_S:.1f})"


@dataclass(frozen=True, slots=True)
class MemberRow:
    member: str
    host: str
    pid: int
    weight: float
    started_at: float
    heartbeat_at: float
    expires_at: float
    draining: bool
    connected_at: float | None = None  # a stream of its own last connected (NULL: never)
    avoiding: tuple[str, ...] = ()  # handed over as not connected, not taken back for now

    @property
    def weight_ok(self) -> bool:
        """Within what a member's config allows: the row may be anyone's (another version,
        a manual edit), and an Infinity or NaN would make every member's share NaN."""
        return 0.0 <= self.weight <= MAX_FLEET_WEIGHT

    def as_member(self) -> Member:
        """For the shares: a weight out of range counts as 0, a start time not finite as 0
        (a NaN would never equal itself: a new process at every tick)."""
        weight = self.weight if self.weight_ok else 0.0
        started_at = self.started_at if math.isfinite(self.started_at) else 0.0
        return Member(self.member, weight, self.draining, started_at)

    def expiry_ok(self, now: float) -> bool:
        """Whether the expiry is one a member writes: finite, at most
        :data:`MAX_EXPIRY_AHEAD_S` after ``now`` (the database's clock)."""
        return expiry_ok(self.expires_at, now)

    def live_at(self, now: float) -> bool:
        """Heartbeat not expired at ``now``; an expiry no member writes (see
        :meth:`expiry_ok`) counts as expired (NaN compares false either way)."""
        return live_until(self.expires_at, now)


def _member_row(r: Any) -> MemberRow:
    avoiding = tuple(str(x) for x in r["avoiding"] or () if x is not None)
    return MemberRow(
        str(r["member"]),
        str(r["host"]),
        int(r["pid"]),
        float(r["weight"]),
        float(r["started_at"]),
        float(r["heartbeat_at"]),
        float(r["expires_at"]),
        bool(r["draining"]),
        r["connected_at"],
        avoiding,
    )


@dataclass(frozen=True, slots=True)
class FleetView:
    now: float  # the database's clock
    members: list[MemberRow]  # every row, live or not
    leases: dict[str, LeaseView]

    def live(self) -> list[MemberRow]:
        return [m for m in self.members if m.live_at(self.now)]


@dataclass(frozen=True, slots=True)
class RowHolder:
    """Who holds a member's row, as the heartbeat found it (another process, or ours)."""

    instance: str | None  # None: a member of the version before, or no row
    host: str
    pid: int
    heartbeat_at: float


@dataclass(frozen=True, slots=True)
class Renewal:
    renewed: frozenset[str]
    draining: bool
    now: float
    owned: bool = True  # False: another live process holds this member name's row
    holder: RowHolder | None = None  # the row as it was before this heartbeat


@dataclass(frozen=True, slots=True)
class Acquired:
    stream: str
    epoch: int
    previous: str | None  # the holder before us (None: free)


class FleetTable:
    """One member's view of the coordination tables, over one dedicated connection."""

    def __init__(
        self,
        settings: StateSettings,
        member: str,
        *,
        host: str,
        pid: int,
        weight: float,
        started_at: float,
        lease_ttl_s: float,
        instance: str | None = None,
        fleet_lock: bool = True,
    ) -> None:
        """``fleet_lock``: hold the fleet lock (a member's); an operator's table holds none."""
        assert settings.dsn is not None, "checked by StateSettings"
        self._target = Target(settings.dsn.get_secret_value())
        self._schema = settings.schema_
        self._s = quote_ident(settings.schema_)
        self._connect_timeout = settings.timeout_s
        self.member = member
        self._host = host
        self._pid = pid
        self._weight = weight
        self._started_at = started_at
        self._ttl = lease_ttl_s
        self.instance = instance or uuid.uuid4().hex
        self._fleet_lock = fleet_lock
        self._conn: Any = None
        self._lock = asyncio.Lock()  # one statement at a time on the one connection

    def __repr__(self) -> str:
        return f"FleetTable(member={self.member!r}, server={self._target.where!r})"

    async def _call(self, doing: str, timeout_s: float, fn: str, sql: str, *args: Any) -> Any:
        """Run one statement within ``timeout_s`` (connecting first if need be). A failure
        drops the connection (the next call makes a new one) and raises StoreError;
        :class:`LeaseHeld`: a daemon outside the fleet holds the fleet lock."""
        try:
            async with asyncio.timeout(timeout_s), self._lock:
                conn = await self._connection(timeout_s)
                return await getattr(conn, fn)(sql, *args)
        except (*DRIVER_ERRORS, ValueError) as exc:
            self._drop()
            raise store_error(self._target, self._schema, exc, doing) from None

    async def _connection(self, timeout_s: float) -> Any:
        if self._conn is None or self._conn.is_closed():
            conn = await asyncpg.connect(
                self._target.dsn(),
                ssl=self._target.tls(),
                timeout=min(timeout_s, self._connect_timeout),
                server_settings={"application_name": f"{FLEET_MEMBER_APP}{self.member}"[:63]},
            )
            try:
                single = await take_fleet_lock(conn, self._schema) if self._fleet_lock else None
            except BaseException:
                conn.terminate()
                raise
            if single is not None:
                conn.terminate()
                where = (
                    f"schema {self._schema} at {self._target.where} (a daemon outside the fleet)"
                )
                raise LeaseHeld(where, single)
            self._conn = conn
        return self._conn

    async def connect(self, timeout_s: float) -> None:
        """Connect now, holding the fleet lock (the daemon's start):
        :class:`LeaseHeld` beside a daemon outside the fleet."""
        await self._call("connecting", timeout_s, "fetchval", "SELECT 1")

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()  # never waits on a dead network

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except (*DRIVER_ERRORS, asyncio.CancelledError):
                conn.terminate()

    # --- the member's own calls -----------------------------------------------------------

    async def join(self, streams: Iterable[str], timeout_s: float) -> None:
        """A lease row for each of these streams that has none: every configured stream at
        the start, and one whose row an operator removed, later (members agree on the
        streams; rows of streams no longer configured stay, unheld, until an operator
        removes them)."""
        await self._call(
            "joining the fleet",
            timeout_s,
            "execute",
            f"INSERT INTO {self._s}.stream_leases (stream, epoch) "
            f"SELECT unnest($1::text[]), {FIRST_EPOCH} ON CONFLICT (stream) DO NOTHING",
            sorted(streams),
        )

    async def tick(
        self,
        held: Mapping[str, int],
        timeout_s: float,
        *,
        connected: bool = False,
        avoiding: Iterable[str] = (),
    ) -> Renewal:
        """Heartbeat, and renew every lease held at its epoch: one statement. A stream missing
        from ``renewed`` is lost (another member took it after it expired). When another live
        process holds this member name's row, nothing is written (``owned`` false) and
        ``holder`` says who. ``connected``: a stream of this member's is connected now (the
        row's ``connected_at`` becomes now; else it keeps its time). ``avoiding``: streams
        handed over for not connecting here, not taken back for now (said for `fleet status`)."""
        s = self._s
        streams = sorted(held)
        row = await self._call(
            "renewing leases",
            timeout_s,
            "fetchrow",
            f"WITH t AS (SELECT {NOW} AS now), "
            f"prev AS (SELECT instance, host, pid, heartbeat_at FROM {s}.fleet_members "
            "WHERE member = $1), "
            f"hb AS (INSERT INTO {s}.fleet_members AS m (member, host, pid, weight, started_at, "
            "heartbeat_at, expires_at, instance, connected_at, avoiding) "
            "SELECT $1, $2, $3, $4, $5, t.now, t.now + $6, $9, CASE WHEN $10 THEN t.now END, "
            "$11::text[] FROM t ON CONFLICT (member) DO UPDATE SET host = EXCLUDED.host, "
            "pid = EXCLUDED.pid, weight = EXCLUDED.weight, heartbeat_at = EXCLUDED.heartbeat_at, "
            "expires_at = EXCLUDED.expires_at, started_at = EXCLUDED.started_at, "
            "instance = EXCLUDED.instance, "
            "connected_at = COALESCE(EXCLUDED.connected_at, m.connected_at), "
            "avoiding = EXCLUDED.avoiding "
            "WHERE m.instance IS NOT DISTINCT FROM EXCLUDED.instance OR "
            f"{_EXPIRED.format(e='m.expires_at', now='EXCLUDED.heartbeat_at')} "
            "RETURNING m.draining), "
            f"{_LOCKED.format(s=s, streams='$7', epochs='$8', holder='$1')}, "
            f"renewed AS (UPDATE {s}.stream_leases l SET expires_at = t.now + $6 "
            "FROM t, locked WHERE l.stream = locked.stream AND EXISTS (SELECT 1 FROM hb) "
            "RETURNING l.stream) "
            "SELECT EXISTS (SELECT 1 FROM hb) AS owned, (SELECT draining FROM hb) AS draining, "
            "ARRAY(SELECT stream FROM renewed) AS renewed, (SELECT now FROM t) AS now, "
            "p.instance, p.host, p.pid, p.heartbeat_at FROM (SELECT 1) AS one "
            "LEFT JOIN prev p ON TRUE",
            self.member,
            self._host,
            self._pid,
            self._weight,
            self._started_at,
            self._ttl,
            streams,
            [held[x] for x in streams],
            self.instance,
            connected,
            sorted(avoiding),
        )
        holder = None
        if row["heartbeat_at"] is not None:
            holder = RowHolder(
                row["instance"], str(row["host"]), int(row["pid"]), float(row["heartbeat_at"])
            )
        return Renewal(
            frozenset(row["renewed"]),
            bool(row["draining"]),
            float(row["now"]),
            owned=bool(row["owned"]),
            holder=holder,
        )

    async def acquire(self, streams: Iterable[str], timeout_s: float) -> list[Acquired]:
        """Take these streams' leases where they are free, released, expired (or expiring
        when no renewal sets: :data:`MAX_EXPIRY_AHEAD_S`) or already in our name (a new
        epoch each time): one statement; the database settles races. A row
        at :data:`TOP_EPOCH` is passed by (its epoch cannot grow): the statement would fail,
        and no other stream be taken either. A stream without a row is not taken: see
        :meth:`join`."""
        s = self._s
        rows = await self._call(
            "taking leases",
            timeout_s,
            "fetch",
            f"WITH t AS (SELECT {NOW} AS now), "
            f"old AS (SELECT stream, holder FROM {s}.stream_leases, t "
            "WHERE stream = ANY($1::text[]) AND (holder IS NULL OR holder = $2 OR "
            f"{_EXPIRED.format(e='expires_at', now='t.now')}) AND epoch < $4 "
            "FOR UPDATE SKIP LOCKED) "
            f"UPDATE {s}.stream_leases l SET holder = $2, epoch = l.epoch + 1, "
            "acquired_at = t.now, expires_at = t.now + $3 FROM old, t "
            "WHERE l.stream = old.stream RETURNING l.stream, l.epoch, old.holder",
            sorted(streams),
            self.member,
            self._ttl,
            TOP_EPOCH,
        )
        return [Acquired(str(r[0]), int(r[1]), r[2]) for r in rows]

    async def release(self, held: Mapping[str, int], timeout_s: float) -> None:
        """Give these leases up at once (graceful: the stream's work is committed), so the
        next member takes them at its next tick instead of waiting for expiry."""
        if not held:
            return
        streams = sorted(held)
        await self._call(
            "releasing leases",
            timeout_s,
            "execute",
            f"WITH {_LOCKED.format(s=self._s, streams='$1', epochs='$2', holder='$3')} "
            f"UPDATE {self._s}.stream_leases l SET holder = NULL, expires_at = 0 "
            "FROM locked WHERE l.stream = locked.stream",
            streams,
            [held[x] for x in streams],
            self.member,
        )

    async def leave(self, timeout_s: float) -> None:
        """Remove this process's row (never the row of another process of the same name).
        A draining member's row stays, expired at once: ``fleet drain`` outlives a clean stop
        as it outlives a crash, so the name's next process starts drained (until ``fleet
        drain --undo``), and joins without waiting."""
        s = self._s
        await self._call(
            "leaving the fleet",
            timeout_s,
            "execute",
            f"WITH gone AS (DELETE FROM {s}.fleet_members WHERE member = $1 AND instance = $2 "
            f"AND NOT draining) UPDATE {s}.fleet_members SET expires_at = LEAST(expires_at, "
            f"{NOW}) WHERE member = $1 AND instance = $2 AND draining",
            self.member,
            self.instance,
        )

    async def view(self, timeout_s: float) -> FleetView:
        """Members and leases as the database has them now (two statements, whatever the
        number of streams, within ``timeout_s`` together)."""
        call, s = self._call, self._s
        end = time.monotonic() + timeout_s
        members = await call(
            "reading the fleet",
            timeout_s,
            "fetch",
            f"SELECT member, host, pid, weight, started_at, heartbeat_at, expires_at, draining, "
            f"connected_at, avoiding[1:{AVOIDING_READ}] AS avoiding, {NOW} AS now "
            f"FROM {s}.fleet_members ORDER BY member",
        )
        leases = await call(
            "reading the leases",
            max(0.0, end - time.monotonic()),
            "fetch",
            f"SELECT stream, holder, epoch, expires_at, {NOW} AS now FROM {s}.stream_leases "
            "ORDER BY stream",
        )
        rows = members or leases
        return FleetView(
            float(rows[0]["now"]) if rows else 0.0,
            [_member_row(r) for r in members],
            {str(r[0]): LeaseView(str(r[0]), r[1], int(r[2]), float(r[3])) for r in leases},
        )

    # --- operators (opera-consumer fleet ...) ---------------------------------------------

    async def has_tables(self, timeout_s: float) -> bool:
        """Whether the schema has the fleet's tables (a store of schema version 2 or later)."""
        found = await self._call(
            "reading the fleet",
            timeout_s,
            "fetchval",
            "SELECT to_regclass($1) IS NOT NULL",
            f"{self._s}.stream_leases",
        )
        return bool(found)

    @classmethod
    def for_operator(cls, settings: StateSettings, *, lease_ttl_s: float = 0.0) -> FleetTable:
        """For a CLI command: a name of its own, never a member (it never ticks)."""
        host = socket.gethostname()
        return cls(
            settings,
            f"cli:{host}:{os.getpid()}",
            host=host,
            pid=os.getpid(),
            weight=0.0,
            started_at=0.0,
            lease_ttl_s=lease_ttl_s,
            fleet_lock=False,
        )

    async def hold_for_change(self, streams: Iterable[str], timeout_s: float) -> dict[str, str]:
        """Hold these streams' lease rows while an operator changes the streams' state
        (``offset set/reset``), on a connection of its own, until :meth:`close`. First
        whoever held a row is fenced (a new epoch, the row left free; committed, so a member
        frozen past its expiry commits nothing more), then the rows stay locked by an open
        transaction: a member's takeover (``FOR UPDATE SKIP LOCKED``) passes them by. No
        lease in the command's name: if it dies, the server ends the transaction and the
        rows are free at once. A missing row is made (a stream no member joined yet).
        Returns the rows' live holders instead (stream: member), holding nothing.
        :class:`OperatorRefused`: a row at :data:`TOP_EPOCH`, whose holder no new epoch
        can fence (epoch + 1 overflows), holding nothing."""
        s, wanted = self._s, sorted(set(streams))
        rows = (
            f"WITH t AS (SELECT {NOW} AS now) SELECT stream, holder, epoch, "
            f"NOT {_EXPIRED.format(e='expires_at', now='t.now')} AS live "
            f"FROM {s}.stream_leases, t WHERE stream = ANY($1::text[]) "
            "ORDER BY stream FOR UPDATE OF stream_leases"
        )
        try:
            async with asyncio.timeout(timeout_s), self._lock:
                self._drop()  # a connection of its own: the transaction is ours to the end
                conn = await self._connection(timeout_s)
                await conn.execute(
                    f"INSERT INTO {s}.stream_leases (stream, epoch) "
                    f"SELECT unnest($1::text[]), {FIRST_EPOCH} ON CONFLICT (stream) DO NOTHING",
                    wanted,
                )
                for fence in (True, False):
                    tx = conn.transaction()
                    await tx.start()
                    found = await conn.fetch(rows, wanted)
                    live = {
                        str(r["stream"]): str(r["holder"])
                        for r in found
                        if r["live"] and r["holder"] is not None
                    }
                    if live:
                        await tx.rollback()
                        return live
                    stuck = [str(r["stream"]) for r in found if r["epoch"] >= TOP_EPOCH]
                    if stuck:
                        await tx.rollback()
                        raise OperatorRefused(self._stuck(stuck))
                    if fence:
                        await conn.execute(
                            f"UPDATE {s}.stream_leases SET holder = NULL, "
                            "epoch = epoch + 1, expires_at = 0 WHERE stream = ANY($1::text[])",
                            wanted,
                        )
                        await tx.commit()
                return {}  # the second transaction stays open: the rows stay locked
        except BaseException as exc:
            self._drop()
            if isinstance(exc, (*DRIVER_ERRORS, ValueError)):
                raise store_error(self._target, self._schema, exc, "holding leases") from None
            raise

    def _stuck(self, streams: list[str]) -> str:
        """The refusal for lease rows at the top epoch: bounded, whatever their number."""
        named = ", ".join(printable(x, 200) for x in streams[:5])
        if len(streams) > 5:
            named += f" and {len(streams) - 5} more"
        one = len(streams) == 1
        return (
            f"{'stream' if one else 'streams'} {named}: "
            f"{'its lease row is' if one else 'their lease rows are'} at the largest epoch, "
            "where no new epoch can fence whoever held it (nor can any member take it): "
            f"delete {'its row' if one else 'their rows'} from "
            f"{printable(self._schema, 200)}.stream_leases (a fleet member makes "
            f"{'it' if one else 'them'} again at its next tick, at a new epoch), then try again"
        )

    async def forget(self, member: str, timeout_s: float) -> bool:
        """Remove a gone member's row (its heartbeat expired, on the database's clock, or an
        expiry no member writes: see :data:`MAX_EXPIRY_AHEAD_S`), with its draining flag;
        False when there is no such row or it is live. A member that comes back under the
        name later joins as a new one."""
        status = await self._call(
            "forgetting a member",
            timeout_s,
            "execute",
            f"WITH t AS (SELECT {NOW} AS now) DELETE FROM {self._s}.fleet_members USING t "
            f"WHERE member = $1 AND {_EXPIRED.format(e='expires_at', now='t.now')}",
            member,
        )
        return str(status).rsplit(" ", 1)[-1] != "0"

    async def set_draining(self, member: str, draining: bool, timeout_s: float) -> bool:
        """Mark a member draining (its share becomes 0: it hands its streams over
        gracefully), or not; False when there is no such member."""
        status = await self._call(
            "draining a member",
            timeout_s,
            "execute",
            f"UPDATE {self._s}.fleet_members SET draining = $2 WHERE member = $1",
            member,
            draining,
        )
        return str(status).rsplit(" ", 1)[-1] != "0"
