"""Which streams a fleet member should hold, sans I/O: the fleet's view in, a plan out.

Every member runs the same rule on the same view (read from the lease table each tick), so
the fleet converges without talking:

* A member's fair share is ``ceil(streams x weight / total weight)`` over the live members
  that are not draining (a draining member's share is 0). Shares add up to at least the
  number of streams, so whoever is over its share can always hand streams to someone under.
* A member under its share takes free streams: never held, released, or with an expired
  lease (or one expiring when no member's renewal sets: :data:`MAX_EXPIRY_AHEAD_S`; a live
  lease is never taken, whoever holds it: its holder may be paused, and the
  epoch only fences what it commits, not what its sink already did).
* A member over its share releases the surplus (gracefully, by the caller), and nothing else:
  one that is at its share stays, so a join moves only the streams it needs.
* Each member prefers streams by a hash of (member, stream) (rendezvous hashing): members
  reaching for free streams at once mostly reach for different ones, and a released stream
  goes to whoever ranks it highest among those with room.

Members are meant to share one list of streams, but each computes its share over its own
(the fleet's tables do not say who is configured for what): during a rolling deploy that adds
streams, or with an override on one host, a stream only some members know may find all of
them at their share while the others' shares go unused. So a member remembers, from tick to
tick (:class:`Memory`), since when each of its streams has been unheld:

* A stream unheld for ``patience`` (the runtime: a lease's TTL, far longer than a handover
  takes), while the fleet took no other (else members with room may still be racing for
  them), is *starved*: a member configured for it takes it even beyond its share (an
  *extra*), unless it is draining or of weight 0.
* Extras do not count against the share, so they are not handed back at the next tick (which
  would leave them unheld again, and flap). They count again when a member joins the active
  fleet (a new process, or one no longer draining): maybe one that knows them, a rolling
  deploy's next host; a member over its share then hands the surplus over as usual, and
  should nobody take it, it is starved again after ``patience``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

# The store's epochs are bigint: a lease at the largest cannot be taken again (its epoch + 1
# overflows), so it counts as neither free nor starved (the runtime warns about it).
TOP_EPOCH = 2**63 - 1
# A member writes expires_at = now + lease_ttl_s on the database's clock, lease_ttl_s at most
# 3600 s (the config's MAX_LEASE_TTL_S), in its member row and in each lease it holds. Another
# process's row, or a manual edit, can say anything: an expiry further ahead than this
# (Infinity, NaN, a year) is no live member's and counts as expired, or it would be held for
# ever (a lease: its stream consumed by nobody; a member row: its weight in every share).
MAX_EXPIRY_AHEAD_S = 7200.0


def expiry_ok(expires_at: float, now: float) -> bool:
    """An expiry a member writes: finite, at most :data:`MAX_EXPIRY_AHEAD_S` after ``now``."""
    return math.isfinite(expires_at) and expires_at <= now + MAX_EXPIRY_AHEAD_S


def live_until(expires_at: float, now: float) -> bool:
    """Not expired at ``now``; an expiry no member writes (see :func:`expiry_ok`) counts as
    expired (NaN compares false either way)."""
    return now < expires_at <= now + MAX_EXPIRY_AHEAD_S


@dataclass(frozen=True, slots=True)
class Member:
    id: str
    weight: float
    draining: bool = False
    started_at: float = 0.0  # with ``id``, one process: a restart under the same name is new


@dataclass(frozen=True, slots=True)
class LeaseView:
    stream: str
    holder: str | None
    epoch: int
    expires_at: float  # the database's clock

    def live_at(self, now: float) -> bool:
        """Held at ``now``: a holder and an expiry ahead, one a member writes (a lease row
        expiring at Infinity, held by a name no live member uses, is free to take)."""
        return self.holder is not None and live_until(self.expires_at, now)


@dataclass(frozen=True, slots=True)
class Plan:
    acquire: tuple[str, ...]  # in preference order; the database decides who wins a race
    release: tuple[str, ...]
    share: int
    extra: tuple[str, ...] = ()  # of ``acquire``: starved ones, taken beyond the share


@dataclass(frozen=True, slots=True)
class Memory:
    """What a member carries from one tick to the next (see the module's docstring)."""

    unheld_since: Mapping[str, float] = field(default_factory=dict)  # the database's clock
    extra: frozenset[str] = frozenset()  # held beyond the share: nobody else took them
    active: frozenset[tuple[str, float]] = frozenset()  # (id, started_at) at the last tick
    held_most: int = 0  # the most of this member's streams seen held at once
    rose_at: float = -math.inf  # when that last rose: the fleet still taking streams

    def starved(self, now: float, patience: float) -> frozenset[str]:
        """Streams unheld for ``patience``, during which the fleet took none more: not just
        slow to share them out (members with room racing for the same ones)."""
        if now - self.rose_at < patience:
            return frozenset()
        return frozenset(s for s, t in self.unheld_since.items() if now - t >= patience)

    def took(self, streams: Iterable[str]) -> Memory:
        """These extras were acquired."""
        return replace(self, extra=self.extra | frozenset(streams))


def observe(
    memory: Memory,
    members: Iterable[Member],
    leases: Mapping[str, LeaseView],
    streams: Iterable[str],
    *,
    held: Iterable[str],
    now: float,
) -> Memory:
    """This tick's view, remembered: ``members`` the live ones (``me`` among them or not),
    ``held`` what this member runs now."""
    mine, wanted = set(held), set(streams)
    unheld = {
        s: memory.unheld_since.get(s, now)
        for s in wanted - mine
        if _unheld(leases.get(s), now) and not stuck(leases.get(s))
    }
    active = frozenset((m.id, m.started_at) for m in members if not m.draining and m.weight > 0)
    joined = bool(active - memory.active)
    extra = frozenset() if joined else memory.extra & mine
    # A stream that fails to start (released, taken again) sets no new high: not progress.
    count = len(wanted) - len(unheld)
    most, rose = (count, now) if count > memory.held_most else (memory.held_most, memory.rose_at)
    return Memory(unheld, extra, active, most, rose)


def strangers(leases: Mapping[str, LeaseView], streams: Iterable[str], now: float) -> list[str]:
    """Streams held by a live lease that are not in ``streams``: some member is configured
    for streams this one is not (a member only ever takes its own)."""
    known = set(streams)
    return sorted(s for s, x in leases.items() if s not in known and not _unheld(x, now))


def rank(member: str, stream: str) -> bytes:
    """This member's preference for this stream (lower first)."""
    return hashlib.blake2b(f"{member}\0{stream}".encode(), digest_size=8).digest()


def fair_share(me: Member, members: Iterable[Member], streams: int) -> int:
    if me.draining or me.weight <= 0:
        return 0
    active = {m.id: m for m in members if not m.draining and m.weight > 0}
    active[me.id] = me
    # Relative to the heaviest: a sum of huge weights (a row of another version's member)
    # must not overflow to infinity and make every share 0.
    top = max(m.weight for m in active.values())
    total = sum(m.weight / top for m in active.values())
    return min(streams, math.ceil(streams * (me.weight / top) / total - 1e-9))


def plan(
    me: Member,
    members: Iterable[Member],
    leases: Mapping[str, LeaseView],
    streams: Iterable[str],
    *,
    held: Iterable[str],
    now: float,
    starved: Iterable[str] = (),
    extra: Iterable[str] = (),
    avoid: Iterable[str] = (),
) -> Plan:
    """``members``: the live ones (``me`` may be missing: just joined). ``leases``: by
    stream, as the database has them (a stream without a row is free). ``held``: what this
    member runs now. ``starved``: streams unheld for long (:meth:`Memory.starved`);
    ``extra``: held ones taken beyond the share (:attr:`Memory.extra`); ``avoid``: streams
    not to take, neither as share nor as extras (:mod:`consumer.core.failover`: handed over
    for want of the gateway), the share otherwise the same."""
    wanted = sorted(set(streams))
    share = fair_share(me, members, len(wanted))
    kept = set(extra) if share > 0 else set()  # a draining member keeps nothing
    mine = sorted(set(held) & set(wanted), key=lambda s: rank(me.id, s))
    counted = [s for s in mine if s not in kept]
    if len(counted) > share:
        # Keep the ones this member ranks highest: the same ones tick after tick.
        return Plan((), tuple(counted[share:]), share)
    room = share - len(counted)
    shunned = set(avoid)
    free = [
        s for s in wanted if s not in mine and s not in shunned and _free(leases.get(s), me.id, now)
    ]
    free.sort(key=lambda s: rank(me.id, s))
    fair = free[:room]
    hungry = set(starved) if share > 0 else set()
    beyond = tuple(s for s in free[room:] if s in hungry)
    return Plan((*fair, *beyond), (), share, beyond)


def stuck(lease: LeaseView | None) -> bool:
    """At the top epoch: nobody can take this lease (an operator removes the row)."""
    return lease is not None and lease.epoch >= TOP_EPOCH


def _free(lease: LeaseView | None, me: str, now: float) -> bool:
    """Takeable by ``me``: a lease in its own name it does not run (a restart under the same
    member name) is too."""
    if stuck(lease):
        return False
    return lease is None or lease.holder == me or not lease.live_at(now)


def _unheld(lease: LeaseView | None, now: float) -> bool:
    """No live lease (a stream without a row has none)."""
    return lease is None or not lease.live_at(now)
