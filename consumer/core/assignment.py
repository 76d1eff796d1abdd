"""Which streams a fleet member should hold, sans I/O: the fleet's view in, a plan out.

Every member runs the same rule on the same view (read from the lease table each tick), so
the fleet converges without talking:

* A member's fair share is ``ceil(streams x weight / total weight)`` over the live members
  that are not draining (a draining member's share is 0). Shares add up to at least the
  number of streams, so whoever is over its share can always hand streams to someone under.
* A member under its share takes free streams: never held, released, or with an expired
  lease (a live lease is never taken, whoever holds it: its holder may be paused, and the
  epoch only fences what it commits, not what its sink already did).
* A member over its share releases the surplus (gracefully, by the caller), and nothing else:
  one that is at its share stays, so a join moves only the streams it needs.
* Each member prefers streams by a hash of (member, stream) (rendezvous hashing): members
  reaching for free streams at once mostly reach for different ones, and a released stream
  goes to whoever ranks it highest among those with room.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Member:
    id: str
    weight: float
    draining: bool = False


@dataclass(frozen=True, slots=True)
class LeaseView:
    stream: str
    holder: str | None
    epoch: int
    expires_at: float  # the database's clock


@dataclass(frozen=True, slots=True)
class Plan:
    acquire: tuple[str, ...]  # in preference order; the database decides who wins a race
    release: tuple[str, ...]
    share: int


def rank(member: str, stream: str) -> bytes:
    """This member's preference for this stream (lower first)."""
    return hashlib.blake2b(f"{member}\0{stream}".encode(), digest_size=8).digest()


def fair_share(me: Member, members: Iterable[Member], streams: int) -> int:
    if me.draining or me.weight <= 0:
        return 0
    active = {m.id: m for m in members if not m.draining and m.weight > 0}
    active[me.id] = me
    total = sum(m.weight for m in active.values())
    return min(streams, math.ceil(streams * me.weight / total - 1e-9))


def plan(
    me: Member,
    members: Iterable[Member],
    leases: Mapping[str, LeaseView],
    streams: Iterable[str],
    *,
    held: Iterable[str],
    now: float,
) -> Plan:
    """``members``: the live ones (``me`` may be missing: just joined). ``leases``: by
    stream, as the database has them (a stream without a row is free). ``held``: what this
    member runs now."""
    wanted = sorted(set(streams))
    mine = sorted(set(held) & set(wanted), key=lambda s: rank(me.id, s))
    share = fair_share(me, members, len(wanted))
    if len(mine) > share:
        # Keep the ones this member ranks highest: the same ones tick after tick.
        return Plan((), tuple(mine[share:]), share)
    room = share - len(mine)
    if room <= 0:
        return Plan((), (), share)
    free = [s for s in wanted if s not in mine and _free(leases.get(s), me.id, now)]
    free.sort(key=lambda s: rank(me.id, s))
    return Plan(tuple(free[:room]), (), share)


def _free(lease: LeaseView | None, me: str, now: float) -> bool:
    """Takeable by ``me``: a lease in its own name it does not run (a restart under the same
    member name) is too."""
    return lease is None or lease.holder in (None, me) or lease.expires_at <= now
