"""Fleet mode: this member's side of sharing the streams with identical daemons.

Once per ``renew_interval_s`` the member ticks: one statement heartbeats and renews every
lease it holds (:meth:`FleetTable.tick`); a stream missing from the answer was taken by
another member after its lease ran out, so it stops at once (its late commits are refused by
the epoch anyway). Then it reads the fleet (members, leases) and follows
:func:`consumer.core.assignment.plan`: takes free streams up to its fair share, hands its
surplus over gracefully (``complete``, drain, commit, release) when others need them.

Self-fencing: a lease lasts ``lease_ttl_s`` from the renewal that set it. A member that has
not renewed for ``self_fence_after_s``, ``lease_ttl_s - max(2 x renew_interval_s,
renew_interval_s + CANCEL_GRACE_S)`` (measured on its own monotonic clock from the *start* of
its last successful renewal), stops every stream before anyone may take them over, with time
left for a worker stuck in a sink write to end within the stop's grace: two members never
consume one stream. A timer of its own checks this, so nothing the tick waits for (a slow
database) can hold it up; streams start in tasks of their own for the same reason (a start
reads the store), and the tick goes on renewing meanwhile.

A stream handed over keeps its lease renewed until it is released (stopping it gracefully may
outlast the lease); only a lost one is left out. The settings bound such a stop to fit in
``lease_ttl_s - renew_interval_s``, and a handover starts at most ``renew_interval_s`` after a
renewal, so it ends before the lease could expire even if no renewal succeeds meanwhile.

A member that cannot connect a stream it runs (its own network, proxy, DNS or credentials
broken) hands it over once it has not been ready for ``release_unreachable_after_s``, if
another member shows it reaches the gateway, and does not take it back for as long again
(:mod:`consumer.core.failover`); the heartbeat says when a stream of this member's was last
connected, the evidence the others look for.

Members should share one list of streams; when theirs differ (a rolling deploy that adds
streams), a stream unheld for ``lease_ttl_s`` is taken by a member configured for it even
beyond its share (:mod:`consumer.core.assignment`), and the member warns (once in a while).

A member name is one process's: a member whose heartbeat finds its row held by another live
process (:class:`DuplicateMember`) stops its streams and ends the fleet task with an error
(the daemon exits 78). A row left by a process that died (a restart under the same name) is
waited out: it stops heartbeating, and expires within ``lease_ttl_s``.

A fleet never runs beside a daemon outside it: the member's connection holds the schema's
fleet lock shared, taken again on every new connection before anything else, and that
daemon holds it exclusively for its whole run. A member refused it (:class:`LeaseHeld`, at a
reconnect: after an outage, say) stops its streams and ends the fleet task with the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from ..config import Settings
from ..config.settings import MAX_FLEET_WEIGHT
from ..core.assignment import Member, Memory, expiry_ok, observe, plan, strangers, stuck
from ..core.evidence import describe
from ..core.failover import Failover
from ..core.printable import printable
from ..core.records import Fence
from ..errors import LeaseHeld, StoreError
from .stream import StreamState

if TYPE_CHECKING:
    from ..state.fleet import FleetTable, FleetView, Renewal, RowHolder

log = structlog.get_logger(__name__)

StartStream = Callable[[str], Awaitable[None]]
# (stream, lost); lost while the stream is being handed over: that stop goes on as lost.
StopStream = Callable[[str, bool], Awaitable[None]]
_CONNECTED = frozenset({StreamState.STREAMING, StreamState.COMPLETING})


@dataclass(frozen=True, slots=True)
class StreamProbe:
    """A running stream as its runner has it, for the failover (the daemon's)."""

    state: StreamState
    # Times the gateway said another consumer holds the stream (a 4409, a status query
    # answered Active): the gateway was reached, whatever the state says after many of them.
    answered: int = 0


ProbeOf = Callable[[str], StreamProbe | None]  # None: not built yet


def member_name(configured: str) -> str:
    return configured or f"{socket.gethostname()}:{os.getpid()}"


# A fleet whose members' stream lists differ is warned about at most this often.
MISMATCH_WARN_EVERY_S = 600.0
# Rows the fleet cannot use as they are (a weight out of range, a lease at the top epoch) are
# warned about once each, for at most this many rows (the tables are anyone's to fill).
ODD_ROWS_WARNED = 100


class DuplicateMember(StoreError):
    """Another live process runs under this fleet member's name. A :class:`StoreError`
    (not retriable), so the daemon stops with exit status 78: a restart cannot fix it."""

    def __init__(self, member: str, other: RowHolder | None) -> None:
        # The host as the other process's row has it: escaped and cut, as any shared input.
        who = (
            "another process"
            if other is None
            else f"pid {other.pid} on {printable(other.host, 200)}"
        )
        super().__init__(
            f"fleet member name {member!r} is in use by another live opera-consumer ({who}): "
            "the two would take each other's streams. Give every member a name of its own: "
            "set [fleet] member (OPERA_CONSUMER_FLEET__MEMBER) differently on each, or leave "
            "it empty for <hostname>:<pid> where those differ (containers often share pid 1)"
        )
        self.member = member


@dataclass(slots=True)
class FleetCounters:
    takeovers: int = 0  # leases taken from another member (expired, or handed over)
    lost: int = 0  # found taken by another member at a renewal
    self_fenced: int = 0  # times every stream was stopped for want of a renewal
    released_unreachable: int = 0  # streams handed over: not connected here for long


def member_table(settings: Settings) -> FleetTable:
    """This process's member of the fleet tables (it connects at its first call)."""
    from ..state.fleet import FleetTable  # noqa: PLC0415  # asyncpg: an extra

    f = settings.fleet
    return FleetTable(
        settings.state,
        member_name(f.member),
        host=socket.gethostname(),
        pid=os.getpid(),
        weight=f.weight,
        started_at=time.time(),
        lease_ttl_s=f.lease_ttl_s,
    )


class Fleet:
    def __init__(
        self,
        settings: Settings,
        *,
        start_stream: StartStream,
        stop_stream: StopStream,
        spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
        table: FleetTable | None = None,
        probe: ProbeOf | None = None,
    ) -> None:
        """``table``: :func:`member_table`'s for these settings, connected already.
        ``probe``: each running stream's state (the daemon's runners); without it no stream
        is ever handed over for want of the gateway, and the heartbeat reports none
        connected."""
        f = settings.fleet
        self.settings = f
        self.table = table or member_table(settings)
        self.member = self.table.member
        self.streams = sorted(settings.streams)
        self.epochs: dict[str, int] = {}  # streams held (running or starting) -> epoch
        self._moving: dict[str, bool] = {}  # being stopped -> lost (else handed over)
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._other: RowHolder | None = None  # another process's row of our name, waited out
        self._start, self._stop_stream, self._spawn = start_stream, stop_stream, spawn
        self.counters = FleetCounters()
        self.members_live = 0
        self._renewed_at: float | None = None  # monotonic start of the last good renewal
        self._fence_after = f.self_fence_after_s  # for past_fence, asked per sink write
        self._joined_at: float | None = None
        self._closing = False
        self._memory = Memory()
        self._probe = probe
        self._failover = Failover()
        self._answered: dict[str, int] = {}  # StreamProbe.answered at the last tick
        self._stranded: set[str] = set()  # overdue, no evidence: warned once while so
        self.ticks = 0  # ticks whose renewal succeeded
        self._mismatch: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # last warned
        self._mismatch_at = -MISMATCH_WARN_EVERY_S  # monotonic, when last warned
        self._odd_warned: set[tuple[str, str]] = set()  # (what, member or stream)

    def fence(self) -> Fence:
        return Fence(self.member, dict(self.epochs))

    @property
    def leases_held(self) -> int:
        return len(self.epochs)

    def past_fence(self, stream: str) -> bool:
        """Whether ``stream``'s lease may be another member's: found lost (a renewal that left
        it out, a refused commit; its stop is under way), or this member past its self-fence
        deadline (no renewal for ``self_fence_after_s`` since the start of its last good one,
        monotonic clock). The stop or the timer ends the stream's workers, but not at once: a
        process paused past the deadline (SIGSTOP, a VM freeze) may run them first, and the
        renewal that finds the stream lost also moves the deadline (a worker held for it would
        write in between). Each asks this before a sink write (cheap: once per batch)."""
        if self._moving.get(stream, False):
            return True
        since = self._renewed_at
        return since is not None and time.monotonic() - since >= self._fence_after

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Tick until cancelled (by the daemon's shutdown, after the drain: renewing till
        then); raises :class:`DuplicateMember`, and :class:`LeaseHeld` beside a daemon
        outside the fleet. The self-fence timer runs as long as this."""
        f = self.settings
        fence = asyncio.create_task(self._fence_on_time(), name=f"fleet-fence-{self.member}")
        try:
            while True:
                started = time.monotonic()
                try:
                    await self._tick(started)
                except DuplicateMember:
                    raise
                except LeaseHeld as exc:
                    self._outside_daemon(exc)
                    raise
                except StoreError as exc:
                    log.warning("fleet tick failed; retrying", error=describe(exc))
                except Exception:  # a bug: the leases must keep being renewed or fenced
                    log.exception("fleet tick failed unexpectedly; retrying")
                await asyncio.sleep(max(0.0, f.renew_interval_s - (time.monotonic() - started)))
        finally:
            fence.cancel()
            await asyncio.gather(fence, return_exceptions=True)

    async def _fence_on_time(self) -> None:
        """Sleep until the self-fence is due (it moves with every renewal), then fence."""
        f = self.settings
        while True:
            now, since = time.monotonic(), self._renewed_at
            if since is not None and now - since >= f.self_fence_after_s:
                try:
                    self._self_fence_if_due(now)
                except Exception:  # a bug: never let the timer die
                    log.exception("self-fencing failed unexpectedly")
                wait = f.renew_interval_s  # overdue: again in a while, for what starts later
            elif since is None:
                wait = f.renew_interval_s
            else:
                wait = since + f.self_fence_after_s - now
            await asyncio.sleep(wait)

    async def _tick(self, started: float) -> None:
        f = self.settings
        timeout = f.renew_interval_s
        if self._joined_at is None:
            await self.table.join(self.streams, timeout)
        # Streams being handed over stay renewed till released; lost ones are not ours.
        held = {s: e for s, e in self.epochs.items() if not self._moving.get(s, False)}
        connected = any(self._state(s) in _CONNECTED for s in held if s not in self._moving)
        renewal = await self.table.tick(
            held, timeout, connected=connected, avoiding=self._failover.avoided()
        )
        if not renewal.owned:
            self._name_taken(renewal)
            return
        self._renewed_at = started
        self.ticks += 1
        if self._joined_at is None:
            self._joined_at = started
            log.info(
                "joined the fleet",
                member=self.member,
                streams=len(self.streams),
                draining=renewal.draining,  # `fleet drain` outlives a restart
            )
        for stream in sorted(set(held) - renewal.renewed):
            if self.epochs.get(stream) == held[stream]:  # else gone meanwhile
                self._lose(stream, "lease lost: another member took this stream")
        if self._closing:
            return  # draining for shutdown: keep the leases, take and move nothing

        def left() -> float:
            """What is left of this tick: what reads after the renewal may take. The next
            renewal is due then, and the self-fence counts from this tick's start: a slow
            database (each statement within its own timeout) must not push it back."""
            return started + f.renew_interval_s - time.monotonic()

        if left() <= 0:
            log.warning("renewing took the whole tick; not reading the fleet this time")
            return
        view = await self.table.view(left())
        self._warn_of_odd_rows(view)
        live = [m.as_member() for m in view.live()]
        self.members_live = len(live)
        running = [s for s in self.epochs if s not in self._moving]
        memory = observe(self._memory, live, view.leases, self.streams, held=running, now=view.now)
        self._memory = memory
        # A handover must end before the lease could expire with no renewal after this
        # tick's (the settings bound a stop to lease_ttl_s - renew_interval_s): not when
        # reading the fleet took longer than that.
        late = time.monotonic() - started > f.renew_interval_s
        unreachable = () if late else self._failover_due(view, live, running)
        running = [s for s in running if s not in unreachable]
        if time.monotonic() - self._joined_at < f.renew_interval_s and not self.epochs:
            return  # one tick to see who else is starting with us, then take a share
        me = Member(self.member, f.weight, renewal.draining)
        avoided = self._failover.avoided()
        starved = memory.starved(view.now, f.lease_ttl_s) - avoided
        # Starved because a member avoids them (it said so: `fleet status`), not a mismatch.
        shunned = {s for m in view.live() for s in m.avoiding}
        self._warn_of_a_mismatch(strangers(view.leases, self.streams, view.now), starved - shunned)
        decision = plan(
            me,
            [m for m in live if m.id != self.member],
            view.leases,
            self.streams,
            held=running,
            now=view.now,
            starved=starved,
            extra=memory.extra,
            avoid=avoided,
        )
        for stream in () if late else decision.release:
            log.info("handing a stream over", stream=stream, share=decision.share)
            self._move(stream, lost=False)
        missing = [s for s in self.streams if s not in view.leases]
        if missing and left() > 0:  # removed by an operator: else nobody could take them
            log.info("making lease rows again", streams=[printable(x, 200) for x in missing[:20]])
            await self.table.join(missing, left())
        wanted = [s for s in decision.acquire if s not in self._moving]  # not until stopped
        if wanted and left() > 0:
            got = await self.table.acquire(wanted, left())
            self._memory = self._memory.took(a.stream for a in got if a.stream in decision.extra)
            for a in got:
                self.epochs[a.stream] = a.epoch
                if a.previous is not None and a.previous != self.member:
                    self.counters.takeovers += 1
                log.info(
                    "lease taken",
                    stream=a.stream,
                    epoch=a.epoch,
                    previous=a.previous or "-",
                    **({"beyond_share": True} if a.stream in decision.extra else {}),
                )
                # Started aside: a start reads the store, and must not hold up renewals.
                self._starting[a.stream] = self._spawn(
                    self._started(a.stream, a.epoch), f"fleet-start-{a.stream}"
                )

    def _state(self, stream: str) -> StreamState | None:
        probe = None if self._probe is None else self._probe(stream)
        return None if probe is None else probe.state

    def _ready(self, running: list[str]) -> list[str]:
        """The running streams that are ready (:attr:`StreamState.ready`: streaming, or in a
        deliberate wait), or whose gateway said another consumer holds them since the last
        tick: moving those would not help (another member would be told the same)."""
        ready, answered = [], {}
        for stream in running:
            probe = None if self._probe is None else self._probe(stream)
            if probe is None:
                continue
            answered[stream] = probe.answered
            before = self._answered.get(stream, probe.answered)
            if probe.state.ready or probe.answered > before:
                ready.append(stream)
        self._answered = answered
        return ready

    def _failover_due(
        self, view: FleetView, live: list[Member], running: list[str]
    ) -> tuple[str, ...]:
        """Hand over the running streams not ready for ``release_unreachable_after_s``
        when another member shows it reaches the gateway (:mod:`consumer.core.failover`);
        returns them."""
        f = self.settings
        if self._probe is None:
            return ()
        failover = self._failover.observe(running=running, ready=self._ready(running), now=view.now)
        connected_at = {m.member: m.connected_at for m in view.members}
        due = failover.due(
            self.member,
            live,
            connected_at,
            view.now,
            after=f.release_after_s,
            fresh=f.lease_ttl_s,
        )
        overdue = set(failover.overdue(view.now, f.release_after_s))
        self._stranded &= overdue
        for stream in sorted(overdue - set(due) - self._stranded):
            self._stranded.add(stream)
            log.warning(
                "a stream is not connected here for release_unreachable_after_s, and no other "
                "member shows it reaches the gateway (a gateway outage, or no other member "
                "with a stream connected): it stays here",
                member=self.member,
                stream=stream,
                down_s=round(view.now - failover.down_since[stream], 1),
            )
        for stream in due:
            state = self._state(stream)
            self.counters.released_unreachable += 1
            log.warning(
                "handing a stream over: not connected here for release_unreachable_after_s, "
                "while another member reaches the gateway (check this host's network, proxy, "
                "DNS and credentials)",
                member=self.member,
                stream=stream,
                down_s=round(view.now - failover.down_since[stream], 1),
                state=None if state is None else state.value,
                avoided_s=f.release_after_s,
            )
            self._move(stream, lost=False)
        self._failover = failover.handed_over(due, view.now, f.release_after_s)
        return due

    def _warn_of_a_mismatch(self, unknown: list[str], starved: frozenset[str]) -> None:
        """Members configured with different streams: some hold streams this one does not
        know, or some of its own went unheld for a lease's TTL (with one list, the shares
        cover every stream). Said once, then again only if what differs changed, and not
        more often than every :data:`MISMATCH_WARN_EVERY_S`."""
        seen = (tuple(unknown), tuple(sorted(starved)))
        now = time.monotonic()
        if not unknown and not starved:
            self._mismatch = seen  # agreed again: the next difference is news
            return
        if seen == self._mismatch or now - self._mismatch_at < MISMATCH_WARN_EVERY_S:
            return
        self._mismatch, self._mismatch_at = seen, now
        log.warning(
            "the fleet's members are configured with different streams: give every member the "
            "same [streams] (a rolling deploy converges once every member runs the new config); "
            "meanwhile a stream unheld for lease_ttl_s is taken beyond its share by a member "
            "configured for it",
            member=self.member,
            held_elsewhere_not_configured_here=[printable(x, 200) for x in unknown[:20]],
            unheld_for_a_lease=sorted(starved)[:20],
        )

    def _warn_of_odd_rows(self, view: FleetView) -> None:
        """Rows of the shared tables this member cannot use as they are (another version's,
        a manual edit): each said once (see :data:`ODD_ROWS_WARNED`)."""
        odd: list[tuple[str, str, str, dict[str, Any]]] = [
            (
                "weight",
                m.member,
                f"a fleet member's row has a weight that is not a number from 0 to "
                f"{MAX_FLEET_WEIGHT:g}: it counts as 0 in this member's shares; fix the row, or "
                "`fleet forget` it once gone",
                {"member": printable(m.member, 200), "weight": printable(m.weight, 40)},
            )
            for m in view.members
            if not m.weight_ok
        ]
        odd += [
            (
                "expiry",
                m.member,
                "a fleet member's row expires at a time no member's heartbeat sets (not a "
                "finite number, or more than twice the largest lease_ttl_s ahead): it counts "
                "as gone, in no member's shares; `fleet forget` removes it",
                {"member": printable(m.member, 200), "expires_at": printable(m.expires_at, 40)},
            )
            for m in view.members
            if not m.expiry_ok(view.now)
        ]
        odd += [
            (
                "epoch",
                lease.stream,
                "a stream's lease row is at the largest epoch: no member can take it; delete "
                "the row (stream_leases in the state's schema) and a member makes it again",
                {"stream": printable(lease.stream, 200)},
            )
            for lease in view.leases.values()
            if stuck(lease)
        ]
        odd += [
            (
                "lease expiry",
                lease.stream,
                "a stream's lease row expires at a time no member's renewal sets (not a finite "
                "number, or more than twice the largest lease_ttl_s ahead): it counts as free, "
                "taken at a new epoch",
                {"stream": printable(lease.stream, 200), "holder": printable(lease.holder, 200)},
            )
            for lease in view.leases.values()
            if lease.holder is not None and not expiry_ok(lease.expires_at, view.now)
        ]
        for what, key, message, fields in odd:
            if len(self._odd_warned) >= ODD_ROWS_WARNED or (what, key) in self._odd_warned:
                continue
            self._odd_warned.add((what, key))
            log.warning(message, **fields)

    async def _started(self, stream: str, epoch: int) -> None:
        try:
            if not self._closing:
                await self._start(stream)
        except Exception as exc:  # e.g. the store failed: give the lease back
            log.warning("starting a stream failed", stream=stream, error=describe(exc))
            if self.epochs.get(stream) == epoch and stream not in self._moving:
                self.epochs.pop(stream, None)
                with contextlib.suppress(StoreError, LeaseHeld):  # the tick says LeaseHeld
                    await self.table.release({stream: epoch}, self.settings.renew_interval_s)
        finally:
            self._starting.pop(stream, None)

    def _name_taken(self, renewal: Renewal) -> None:
        """Another process holds our member row. One that stopped heartbeating (our name's
        previous process, dead) is waited out till it expires; one that heartbeats, or a row
        taken from us, is a second live process under our name: stop, and say so."""
        other = renewal.holder
        if self._joined_at is None and (self._other is None or self._other == other):
            if self._other is None:
                log.warning(
                    "this member's name has a live row of another process: waiting for it to "
                    "expire (a previous run that died), or to heartbeat (a duplicate name)",
                    member=self.member,
                    host=None if other is None else printable(other.host, 200),
                    pid=None if other is None else other.pid,
                )
            self._other = other
            return
        error = DuplicateMember(self.member, other)
        log.error(str(error), member=self.member)
        for stream in list(self.epochs):
            self._move(stream, lost=True)
        raise error

    def _outside_daemon(self, exc: LeaseHeld) -> None:
        """A daemon outside the fleet holds the fleet lock (taken while our connection was
        down): it runs every stream, so ours stop at once, as lost."""
        log.error(str(exc), member=self.member)
        for stream in list(self.epochs):
            self._stop_lost(stream)

    def _self_fence_if_due(self, now: float) -> None:
        f = self.settings
        since = self._renewed_at
        if since is None or not self.epochs or now - since < f.self_fence_after_s:
            return
        running = [s for s in self.epochs if s not in self._moving]
        if not running:
            return
        self.counters.self_fenced += 1
        log.error(
            "cannot renew leases: stopping every stream before the leases can expire",
            streams=len(running),
            since_s=round(now - since, 1),
        )
        for stream in running:
            self._move(stream, lost=True)

    def lost(self, streams: frozenset[str]) -> None:
        """The store refused a commit for these streams (their epoch is old): stop them."""
        for stream in sorted(streams):
            if stream in self.epochs:
                self._lose(stream, None)  # the committer said so already

    def _lose(self, stream: str, why: str | None) -> None:
        """Another member holds this stream now: stop it here, once (a refused commit and a
        renewal may both find it lost)."""
        if self._moving.get(stream, False):
            return  # known lost already
        self.counters.lost += 1
        if why is not None:
            log.error(f"{why}; stopping it here", stream=stream, epoch=self.epochs.get(stream))
        self._stop_lost(stream)

    def _stop_lost(self, stream: str) -> None:
        """Stop a stream we may no longer run at once: nothing more of it reaches the sink."""
        if self._moving.get(stream, False):
            return
        if stream in self._moving:
            # Being handed over: its graceful stop (complete, drain) would go on delivering
            # beside the new holder. Stopped as lost now (the daemon cuts the stop under way
            # short); nothing to release.
            self._moving[stream] = True
            self._spawn(self._cut_short(stream), f"fleet-lose-{stream}")
        else:
            self._move(stream, lost=True)

    async def _cut_short(self, stream: str) -> None:
        """A stop as lost while the stream's handover runs: the daemon cuts that stop short."""
        await self._stop_stream(stream, True)

    def _move(self, stream: str, *, lost: bool) -> None:
        if stream in self._moving:
            return  # one stop per stream
        self._moving[stream] = lost
        self._spawn(self._moved(stream, lost), f"fleet-{'lose' if lost else 'release'}-{stream}")

    async def _moved(self, stream: str, lost: bool) -> None:
        try:
            starting = self._starting.get(stream)
            if starting is not None:  # not started yet: the start is cancelled, then stopped
                starting.cancel()
                await asyncio.wait([starting])
            await self._stop_stream(stream, lost)
            epoch = self.epochs.get(stream)
            if not self._moving.get(stream, lost) and epoch is not None:
                try:
                    await self.table.release({stream: epoch}, self.settings.renew_interval_s)
                except (StoreError, LeaseHeld) as exc:  # it expires by itself
                    log.warning("releasing a lease failed", stream=stream, error=describe(exc))
        finally:
            self.epochs.pop(stream, None)
            self._moving.pop(stream, None)

    # --- shutdown -----------------------------------------------------------------------------

    def stop_acquiring(self) -> None:
        """Shutdown: keep renewing what is held (the drain may take a while), move nothing,
        start nothing more (the leases of streams not started are released at the end)."""
        self._closing = True
        for task in list(self._starting.values()):
            task.cancel()

    async def hand_over(self) -> None:
        """After the daemon stopped and committed every stream: release what is still ours
        (the next members take it at their next tick) and leave the fleet."""
        timeout = self.settings.renew_interval_s
        with contextlib.suppress(StoreError, LeaseHeld):
            await self.table.release(dict(self.epochs), timeout)
            self.epochs.clear()
        with contextlib.suppress(StoreError, LeaseHeld):
            await self.table.leave(timeout)
        await self.table.close()
