"""Which streams a fleet member hands over because it cannot connect them, sans I/O.

A member that reaches PostgreSQL but not the gateway (its own network, proxy, DNS or
credentials broken) renews its leases as any member does, so without this its streams would
be consumed by nobody until an operator drains it. So a member watches, tick by tick on the
database's clock, since when each stream it runs has not been *ready* (:attr:`StreamState.ready
<consumer.runtime.stream.StreamState.ready>`: streaming, completing, or in a wait the protocol
asks for), and hands a stream over gracefully once that lasts ``after`` seconds
(``[fleet] release_unreachable_after_s``):

* only on evidence that another member can do better: a live member that is not draining and
  has a weight (it may take streams) reported, in its heartbeat, a stream of its own connected
  after this one went down and within ``fresh`` (a lease's TTL) of now. No such member (a
  fleet-wide outage of the gateway, a fleet of one, every member failing, other members
  holding no stream) and nothing moves: a stream bounced around during an Oracle outage only
  waits longer. ``after`` is at least twice ``fresh`` (the settings check it), so another
  member's last connection before such an outage has aged out before any stream is due.
* a 4409 lockout is not "down": it is the gateway's answer (another consumer holds the stream
  at Oracle, and would hold it against any member); neither are a 429 or the resubscribe gap,
  nor a status query answered ``Active`` again and again (the runtime counts a stream the
  gateway so answered since the last tick as ready).
* a stream handed over is *avoided* for ``after`` seconds (:meth:`Failover.avoided`, given to
  :func:`consumer.core.assignment.plan`): neither taken back as fair share nor as a starved
  extra, so a member at its share takes it (or, after a lease's TTL unheld, one beyond it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .assignment import Member


@dataclass(frozen=True, slots=True)
class Failover:
    """What a member carries from one tick to the next; times on the database's clock."""

    down_since: Mapping[str, float] = field(default_factory=dict)  # running, not ready
    avoid_until: Mapping[str, float] = field(default_factory=dict)  # handed over as down

    def observe(self, *, running: Iterable[str], ready: Iterable[str], now: float) -> Failover:
        """This tick's streams: ``running`` those this member runs (not being stopped),
        ``ready`` those of them ready now. A stream not running forgets its clock."""
        up = set(ready)
        down = {s: self.down_since.get(s, now) for s in running if s not in up}
        avoid = {s: t for s, t in self.avoid_until.items() if now < t}
        return Failover(down, avoid)

    def avoided(self) -> frozenset[str]:
        return frozenset(self.avoid_until)

    def overdue(self, now: float, after: float) -> tuple[str, ...]:
        """Streams down for ``after`` (0: never), evidence or not."""
        if after <= 0:
            return ()
        return tuple(sorted(s for s, t in self.down_since.items() if now - t >= after))

    def due(
        self,
        me: str,
        members: Iterable[Member],
        connected_at: Mapping[str, float | None],
        now: float,
        *,
        after: float,
        fresh: float,
    ) -> tuple[str, ...]:
        """Streams to hand over: down for ``after`` (0: never), and another member
        (``members``: the live ones) had one of its own connected since (``connected_at``:
        by member, from their rows)."""
        overdue = self.overdue(now, after)
        seen = reached_at(me, members, connected_at, now, fresh) if overdue else None
        if seen is None:
            return ()
        return tuple(s for s in overdue if seen > self.down_since[s])

    def handed_over(self, streams: Iterable[str], now: float, cooldown: float) -> Failover:
        """These streams are being handed over: avoided until ``now + cooldown``."""
        gone = set(streams)
        down = {s: t for s, t in self.down_since.items() if s not in gone}
        return Failover(down, {**self.avoid_until, **dict.fromkeys(gone, now + cooldown)})


def reached_at(
    me: str,
    members: Iterable[Member],
    connected_at: Mapping[str, float | None],
    now: float,
    fresh: float,
) -> float | None:
    """The latest time another member that may take streams (live, not draining, a weight)
    had a stream connected, within ``fresh`` of ``now``; None: no such member. A row's value
    is anyone's (another version leaves it NULL, a manual edit may say NaN or a year ahead):
    only a time within ``fresh`` either side of ``now`` counts."""
    times = [
        t
        for m in members
        if m.id != me and not m.draining and m.weight > 0
        for t in (connected_at.get(m.id),)
        if t is not None and math.isfinite(t) and abs(now - t) <= fresh
    ]
    return max(times, default=None)
