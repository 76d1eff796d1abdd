"""Unit tests for consumer.core.assignment: fair shares, plans, and a whole fleet converging.

No I/O: the fleet simulation keeps the lease table in a dict, its clock in a float, and
applies each member's plan the way the database would (an acquire wins only if the lease is
takeable at that moment; a release frees the lease at once).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.core.assignment import (
    MAX_EXPIRY_AHEAD_S,
    TOP_EPOCH,
    LeaseView,
    Member,
    Memory,
    fair_share,
    observe,
    plan,
    rank,
    strangers,
)

NOW = 1000.0


def streams_named(n: int) -> list[str]:
    return [f"s{i:03d}" for i in range(n)]


def by_rank(member: str, streams: list[str] | set[str]) -> list[str]:
    return sorted(streams, key=lambda s: rank(member, s))


weights = st.sampled_from([0.5, 1.0, 1.0, 1.5, 2.0, 3.0, 10.0])


# --- fair_share --------------------------------------------------------------------------------


def test_rank_is_deterministic_and_depends_on_member_and_stream() -> None:
    assert rank("m1", "s1") == rank("m1", "s1")
    assert rank("m1", "s1") != rank("m2", "s1")
    assert rank("m1", "s1") != rank("m1", "s2")
    # the separator keeps ("ab", "c") and ("a", "bc") apart
    assert rank("ab", "c") != rank("a", "bc")


def test_equal_weights_split_evenly_rounding_up() -> None:
    members = [Member(f"m{i}", 1.0) for i in range(3)]
    assert [fair_share(m, members, 12) for m in members] == [4, 4, 4]
    assert [fair_share(m, members, 10) for m in members] == [4, 4, 4]
    assert [fair_share(m, members, 2) for m in members] == [1, 1, 1]
    assert [fair_share(m, members, 0) for m in members] == [0, 0, 0]


def test_unequal_weights_split_in_proportion() -> None:
    big, small = Member("big", 3.0), Member("small", 1.0)
    assert fair_share(big, [big, small], 8) == 6
    assert fair_share(small, [big, small], 8) == 2
    assert fair_share(big, [big, small], 9) == 7  # ceil(6.75)
    assert fair_share(small, [big, small], 9) == 3  # ceil(2.25)


def test_a_share_never_exceeds_the_number_of_streams() -> None:
    alone = Member("alone", 5.0)
    assert fair_share(alone, [alone], 3) == 3
    assert fair_share(alone, [], 3) == 3  # not in the view yet (just joined)


def test_a_member_missing_from_the_view_counts_itself() -> None:
    me = Member("new", 1.0)
    others = [Member("a", 1.0), Member("b", 1.0)]
    assert fair_share(me, others, 9) == 3
    assert fair_share(others[0], [*others, me], 9) == 3


def test_a_draining_member_gets_nothing_and_others_share_its_part() -> None:
    draining = Member("d", 1.0, draining=True)
    a, b = Member("a", 1.0), Member("b", 1.0)
    members = [draining, a, b]
    assert fair_share(draining, members, 10) == 0
    assert fair_share(a, members, 10) == 5
    assert fair_share(b, members, 10) == 5


def test_a_zero_weight_member_gets_nothing() -> None:
    zero, a = Member("z", 0.0), Member("a", 1.0)
    assert fair_share(zero, [zero, a], 10) == 0
    assert fair_share(a, [zero, a], 10) == 10


def test_float_noise_does_not_round_a_share_up() -> None:
    """10 x (1/3 + 1/3 + 1/3)/total: 0.1 + 0.2 style noise must not make 4 of an exact 3."""
    members = [Member(f"m{i}", 0.1) for i in range(10)]
    assert [fair_share(m, members, 10) for m in members] == [1] * 10
    members = [Member("a", 0.1), Member("b", 0.2)]
    assert fair_share(members[0], members, 3) == 1
    assert fair_share(members[1], members, 3) == 2


def test_huge_weights_neither_overflow_nor_zero_every_share() -> None:
    """The config bounds a weight, but a row may come from a member of another version: one
    of 1e308 made ceil(inf) raise in every tick, two of them made every share 0."""
    huge = Member("m1", 1e308)
    assert fair_share(huge, [], 2) == 2
    two = [huge, Member("m2", 1e308)]
    assert [fair_share(m, two, 4) for m in two] == [2, 2]
    three = [*two, Member("small", 1.0)]
    assert [fair_share(m, three, 4) for m in three] == [2, 2, 0]  # still covering the 4


@given(
    ws=st.lists(weights, min_size=1, max_size=8),
    draining=st.lists(st.booleans(), min_size=8, max_size=8),
    n=st.integers(0, 200),
)
def test_shares_cover_every_stream(ws: list[float], draining: list[bool], n: int) -> None:
    members = [Member(f"m{i}", w, draining[i]) for i, w in enumerate(ws)]
    if all(m.draining for m in members):
        members[0] = Member("m0", ws[0])
    shares = {m.id: fair_share(m, members, n) for m in members}
    active = [m for m in members if not m.draining]
    assert sum(shares.values()) >= n
    # rounding up adds less than one stream per active member
    assert sum(shares.values()) < n + len(active) or n == 0
    for m in members:
        assert 0 <= shares[m.id] <= n
        if m.draining:
            assert shares[m.id] == 0
    # more weight never means a smaller share
    for x in active:
        for y in active:
            if x.weight >= y.weight:
                assert shares[x.id] >= shares[y.id]


# --- plan: over the share ----------------------------------------------------------------------


def held_by(member: str, streams: list[str], epoch: int = 1) -> dict[str, LeaseView]:
    return {s: LeaseView(s, member, epoch, NOW + 30) for s in streams}


def test_a_member_over_its_share_releases_exactly_the_surplus_lowest_ranked_first() -> None:
    streams = streams_named(12)
    me = Member("a", 1.0)
    members = [me, Member("b", 1.0), Member("c", 1.0)]  # share 4
    p = plan(me, members, held_by("a", streams), streams, held=streams, now=NOW)
    assert p.share == 4
    assert p.acquire == ()
    assert len(p.release) == 8
    assert list(p.release) == by_rank("a", streams)[4:]
    # what it keeps is what it ranks highest
    assert set(streams) - set(p.release) == set(by_rank("a", streams)[:4])


def test_the_same_streams_are_released_tick_after_tick() -> None:
    """Whatever the leases look like or the time is: the plan depends only on what is held."""
    streams = streams_named(20)
    me = Member("a", 1.0)
    members = [me, Member("b", 1.0)]
    held = streams[:15]
    first = plan(me, members, held_by("a", held), streams, held=held, now=NOW)
    assert len(first.release) == 5
    for now, leases in [
        (NOW + 5, held_by("a", held, epoch=7)),
        (NOW + 100, {}),
        (NOW, {**held_by("a", held), **held_by("b", streams[15:])}),
    ]:
        again = plan(
            me, list(reversed(members)), leases, streams, held=list(reversed(held)), now=now
        )
        assert again.release == first.release
    # having released them, it is at its share: nothing more to do
    kept = [s for s in held if s not in first.release]
    assert plan(me, members, held_by("a", kept), streams, held=kept, now=NOW).release == ()


def test_a_member_at_its_share_neither_takes_nor_releases() -> None:
    streams = streams_named(6)
    me = Member("a", 1.0)
    members = [me, Member("b", 1.0)]
    mine = by_rank("a", streams)[3:]  # even its least preferred ones: it does not trade
    p = plan(me, members, {}, streams, held=mine, now=NOW)
    assert (p.acquire, p.release, p.share) == ((), (), 3)


def test_a_draining_member_releases_everything() -> None:
    streams = streams_named(5)
    me = Member("a", 1.0, draining=True)
    p = plan(me, [me, Member("b", 1.0)], held_by("a", streams), streams, held=streams, now=NOW)
    assert p.share == 0
    assert sorted(p.release) == streams
    assert p.acquire == ()


def test_held_streams_no_longer_configured_are_not_counted_or_released() -> None:
    """``held`` outside ``streams`` is not this plan's business (the caller stops them)."""
    streams = streams_named(4)
    me = Member("a", 1.0)
    p = plan(me, [me], {}, streams, held=["gone1", "gone2"], now=NOW)
    assert p.release == ()
    assert sorted(p.acquire) == streams


# --- plan: under the share ---------------------------------------------------------------------


def test_a_member_under_its_share_takes_only_takeable_leases() -> None:
    me = Member("a", 1.0)
    leases = {
        "free": LeaseView("free", None, 3, 0.0),
        "released": LeaseView("released", None, 5, 0.0),
        "expired": LeaseView("expired", "b", 2, NOW - 1),
        "expires-now": LeaseView("expires-now", "b", 2, NOW),  # expires_at <= now: expired
        "mine-not-run": LeaseView("mine-not-run", "a", 4, NOW + 30),  # a restart, same name
        "live-b": LeaseView("live-b", "b", 1, NOW + 0.001),
        "live-c": LeaseView("live-c", "c", 9, NOW + 30),
        # "no-row" has no lease row at all: free
    }
    streams = [*leases, "no-row"]
    p = plan(me, [me], leases, streams, held=[], now=NOW)  # alone: share = every stream
    assert p.share == len(streams)
    assert p.release == ()
    assert set(p.acquire) == {
        "free",
        "released",
        "expired",
        "expires-now",
        "mine-not-run",
        "no-row",
    }
    assert "live-b" not in p.acquire and "live-c" not in p.acquire
    assert list(p.acquire) == by_rank("a", list(p.acquire))  # in preference order


def test_a_member_takes_no_more_than_its_room_and_prefers_by_rank() -> None:
    streams = streams_named(30)
    me = Member("a", 1.0)
    members = [me, Member("b", 1.0), Member("c", 1.0)]  # share 10
    held = by_rank("a", streams)[-4:]  # 4 held: room for 6
    p = plan(me, members, {}, streams, held=held, now=NOW)
    assert p.share == 10
    assert p.release == ()
    assert len(p.acquire) == 6
    assert not set(p.acquire) & set(held)
    assert list(p.acquire) == by_rank("a", [s for s in streams if s not in held])[:6]


def test_a_lease_at_the_top_epoch_is_neither_free_nor_starved() -> None:
    """Its epoch cannot grow (bigint): taking it fails, so the share's room goes to others,
    and it is no stream the fleet starves of (no warning about differing stream lists)."""
    me = Member("a", 1.0)
    leases = {"top": LeaseView("top", None, TOP_EPOCH, 0.0), "ok": LeaseView("ok", None, 1, 0.0)}
    p = plan(me, [me], leases, ["top", "ok"], held=[], now=NOW)
    assert p.acquire == ("ok",)
    memory = observe(Memory(), [me], leases, ["top", "ok"], held=["ok"], now=NOW)
    assert memory.unheld_since == {}


def test_a_lease_expiring_when_no_renewal_sets_is_free_unheld_and_no_stranger() -> None:
    """A renewal sets now + lease_ttl_s (at most 3600 s): a lease row expiring at Infinity,
    NaN or a year ahead (another process's row, a manual edit), held by a name no live
    member uses, was held for ever: its stream consumed by nobody. A lease at the largest
    lease_ttl_s ahead is a live one."""
    me = Member("a", 1.0)
    odd = {
        f"odd{i}": LeaseView(f"odd{i}", "ghost", 7, expires)
        for i, expires in enumerate([math.inf, math.nan, NOW + 1e9, NOW + MAX_EXPIRY_AHEAD_S + 1])
    }
    leases = {**odd, "real": LeaseView("real", "b", 3, NOW + 3600.0)}
    streams = sorted(leases)
    p = plan(me, [me], leases, streams, held=[], now=NOW)
    assert sorted(p.acquire) == sorted(odd)
    memory = observe(Memory(), [me], leases, streams, held=[], now=NOW)
    assert sorted(memory.unheld_since) == sorted(odd)
    assert strangers(leases, [], NOW) == ["real"]
    assert [x.live_at(NOW) for x in leases.values()] == [False] * 4 + [True]
    assert LeaseView("edge", "b", 3, NOW + MAX_EXPIRY_AHEAD_S).live_at(NOW)


def test_a_member_under_its_share_with_nothing_free_takes_nothing() -> None:
    streams = streams_named(6)
    me = Member("a", 1.0)
    members = [me, Member("b", 1.0)]
    leases = held_by("b", streams)  # b is over its share, but its leases are live
    p = plan(me, members, leases, streams, held=[], now=NOW)
    assert (p.acquire, p.release, p.share) == ((), (), 3)


def test_a_just_joined_member_missing_from_the_view_plans_with_itself() -> None:
    streams = streams_named(8)
    me = Member("new", 1.0)
    p = plan(me, [Member("a", 1.0)], {}, streams, held=[], now=NOW)
    assert p.share == 4
    assert len(p.acquire) == 4


# --- plan: streams nobody else takes (members' stream lists differ) ---------------------------


def test_a_starved_stream_is_taken_beyond_the_share() -> None:
    """A stream unheld for long (no member with room is configured for it) is taken by one
    at its share that is; marked extra, after what its share allows."""
    streams = streams_named(4)
    me = Member("a", 1.0)
    members = [me, Member("b", 1.0)]  # share 2
    held = streams[:2]
    leases = held_by("a", held)
    p = plan(me, members, leases, streams, held=held, now=NOW)
    assert (p.acquire, p.release, p.extra) == ((), (), ())  # at its share: nothing
    p = plan(me, members, leases, streams, held=held, now=NOW, starved=["s003"])
    assert (p.acquire, p.release, p.extra, p.share) == (("s003",), (), ("s003",), 2)
    # under its share, a starved stream is taken within it first: not an extra
    p = plan(me, members, {}, streams, held=streams[:1], now=NOW, starved=["s003"])
    first = by_rank("a", streams[1:])[0]
    assert p.acquire == ((first,) if first == "s003" else (first, "s003"))
    assert p.extra == p.acquire[1:]
    # a starved stream held by someone live (taken meanwhile) is not taken
    taken = {**leases, "s003": LeaseView("s003", "c", 1, NOW + 30)}
    assert plan(me, members, taken, streams, held=held, now=NOW, starved=["s003"]).acquire == ()


def test_a_draining_or_weightless_member_takes_no_starved_stream_and_keeps_no_extra() -> None:
    streams = streams_named(3)
    for me in (Member("a", 1.0, draining=True), Member("a", 0.0)):
        members = [me, Member("b", 1.0)]
        p = plan(me, members, {}, streams, held=[], now=NOW, starved=streams)
        assert p.acquire == () and p.share == 0
        p = plan(me, members, held_by("a", streams), streams, held=streams, now=NOW, extra=streams)
        assert sorted(p.release) == streams


def test_extras_do_not_count_against_the_share() -> None:
    """Handed back at the next tick, an extra would be unheld again, taken again: a flap."""
    streams = streams_named(4)
    me = Member("a", 1.0)
    members = [me, Member("b", 1.0)]  # share 2
    held = streams[1:]  # 3: one over
    leases = held_by("a", held)
    assert len(plan(me, members, leases, streams, held=held, now=NOW).release) == 1
    p = plan(me, members, leases, streams, held=held, now=NOW, extra=["s003"])
    assert (p.acquire, p.release) == ((), ())
    # its share of the others stays its share: with room, it takes more
    p = plan(me, members, {}, streams, held=["s003"], now=NOW, extra=["s003"])
    assert len(p.acquire) == 2 and p.extra == ()


def test_memory_tracks_since_when_each_stream_is_unheld() -> None:
    streams = ["a", "b", "c", "d"]
    leases = {
        "a": LeaseView("a", "m1", 1, NOW + 30),  # held
        "b": LeaseView("b", "m2", 1, NOW - 1),  # expired
        "c": LeaseView("c", None, 1, 0.0),  # released
        # d: no row
    }
    m = observe(Memory(), [], leases, streams, held=[], now=NOW)
    assert m.unheld_since == {"b": NOW, "c": NOW, "d": NOW}
    assert m.starved(NOW + 4.9, 5.0) == frozenset()
    assert m.starved(NOW + 5, 5.0) == frozenset({"b", "c", "d"})
    # c is taken: its count starts over, and the others' waits with it (the fleet is still
    # taking streams: those with room may yet take the rest)
    taken = {**leases, "c": LeaseView("c", "m2", 2, NOW + 33)}
    m = observe(m, [], taken, streams, held=[], now=NOW + 3)
    assert m.unheld_since == {"b": NOW, "d": NOW}
    assert m.starved(NOW + 7.9, 5.0) == frozenset()
    assert m.starved(NOW + 8, 5.0) == frozenset({"b", "d"})
    # a stream released and taken again (one that fails to start) is no such progress
    m = observe(m, [], {**taken, "a": LeaseView("a", None, 1, 0.0)}, streams, held=[], now=NOW + 4)
    m = observe(
        m, [], {**taken, "a": LeaseView("a", "m1", 2, NOW + 35)}, streams, held=[], now=NOW + 5
    )
    assert m.starved(NOW + 8, 5.0) == frozenset({"b", "d"})
    # what this member runs is not unheld, whatever the table says (a lease in its own name)
    assert "d" not in observe(m, [], leases, streams, held=["d"], now=NOW + 6).unheld_since


def test_extras_count_again_when_a_member_joins() -> None:
    """A newcomer (a new process, or one no longer draining or of weight 0) may be the
    rolling deploy's next host, configured for the streams the others were not."""
    a, b = Member("a", 1.0, started_at=1.0), Member("b", 1.0, started_at=2.0)
    m = observe(Memory(), [a, b], {}, ["x"], held=["x"], now=NOW).took(["x"])
    assert observe(m, [a, b], {}, ["x"], held=["x"], now=NOW).extra == {"x"}
    assert observe(m, [a], {}, ["x"], held=["x"], now=NOW).extra == {"x"}  # one left
    assert observe(m, [a, b], {}, ["x"], held=[], now=NOW).extra == frozenset()  # not held
    for joined in (
        [a, b, Member("c", 1.0, started_at=3.0)],  # a new member
        [a, Member("b", 1.0, started_at=9.0)],  # b restarted (maybe with a new config)
    ):
        assert observe(m, joined, {}, ["x"], held=["x"], now=NOW).extra == frozenset()
    drained = observe(m, [a, Member("b", 1.0, True, 2.0)], {}, ["x"], held=["x"], now=NOW)
    assert drained.extra == {"x"}
    assert observe(drained, [a, b], {}, ["x"], held=["x"], now=NOW).extra == frozenset()


def test_strangers_are_live_leases_on_streams_not_configured_here() -> None:
    leases = {
        "a": LeaseView("a", "m1", 1, NOW + 30),
        "new": LeaseView("new", "m2", 1, NOW + 30),
        "gone": LeaseView("gone", None, 4, 0.0),  # a row left by an old config: unheld
        "dead": LeaseView("dead", "m3", 1, NOW - 1),
    }
    assert strangers(leases, ["a", "b"], NOW) == ["new"]


# --- the fleet, simulated ----------------------------------------------------------------------

LEASE_TTL = 3.0
MEMBER_TTL = 3.0
ROUND = 1.0
# After any change the fleet settles within this many rounds: a dead member's leases take
# LEASE_TTL to expire, then a hand-over or two (6 at worst over thousands of random fleets).
MAX_ROUNDS = int(LEASE_TTL / ROUND) + 8
# The runtime's is the lease's TTL: at least 4 ticks (the settings refuse less).
PATIENCE = 4 * ROUND


@dataclass
class Lease:
    holder: str | None = None
    epoch: int = 0
    expires_at: float = 0.0


@dataclass
class SimMember:
    id: str
    weight: float
    draining: bool = False
    alive: bool = True
    held: dict[str, int] = field(default_factory=dict)  # stream -> epoch
    streams: list[str] | None = None  # its config's, when not the fleet's
    started_at: float = 0.0  # set when it joins
    memory: Memory = field(default_factory=Memory)
    avoid: set[str] = field(default_factory=set)  # handed over as unreachable (failover)


@dataclass
class Fleet:
    """The lease and member tables in memory; members tick in rounds."""

    streams: list[str]
    rng: random.Random
    stale_views: bool = False  # every member plans on the view read at the round's start
    now: float = NOW
    leases: dict[str, Lease] = field(default_factory=dict)
    members: dict[str, SimMember] = field(default_factory=dict)
    member_expiry: dict[str, float] = field(default_factory=dict)
    acquired: int = 0
    released: int = 0
    extras: int = 0  # acquired beyond a share

    def __post_init__(self) -> None:
        self.leases = {s: Lease() for s in self.streams}  # join

    def join(self, member: SimMember) -> None:
        member.started_at = self.now
        self.members[member.id] = member

    def configured(self, m: SimMember) -> list[str]:
        return self.streams if m.streams is None else m.streams

    def kill(self, member_id: str) -> None:
        """It stops heartbeating: no release, its leases run out."""
        self.members[member_id].alive = False

    def stop(self, member_id: str) -> None:
        """A graceful stop: its leases released, its row gone."""
        m = self.members[member_id]
        for stream, epoch in m.held.items():
            x = self.leases[stream]
            if x.holder == m.id and x.epoch == epoch:
                x.holder, x.expires_at = None, 0.0
        m.held.clear()
        m.alive = False
        self.member_expiry.pop(member_id, None)

    def hand_over(self, member_id: str, streams: set[str]) -> None:
        """It cannot connect these (consumer.core.failover): released, and avoided."""
        m = self.members[member_id]
        for stream in streams & set(m.held):
            x = self.leases[stream]
            if x.holder == m.id and x.epoch == m.held[stream]:
                x.holder, x.expires_at = None, 0.0
            del m.held[stream]
            self.released += 1
        m.avoid |= streams

    def live(self) -> list[Member]:
        return [
            Member(m.id, m.weight, m.draining, m.started_at)
            for m in self.members.values()
            if self.member_expiry.get(m.id, 0.0) > self.now
        ]

    def view(self) -> tuple[list[Member], dict[str, LeaseView]]:
        return self.live(), {
            s: LeaseView(s, x.holder, x.epoch, x.expires_at) for s, x in self.leases.items()
        }

    def _takeable(self, stream: str, me: str) -> bool:
        x = self.leases[stream]
        return x.holder is None or x.holder == me or x.expires_at <= self.now

    def _tick(self, m: SimMember) -> None:
        self.member_expiry[m.id] = self.now + MEMBER_TTL
        for stream, epoch in list(m.held.items()):
            x = self.leases[stream]
            if x.holder == m.id and x.epoch == epoch:
                x.expires_at = self.now + LEASE_TTL
            else:
                del m.held[stream]  # lost

    def _act(self, m: SimMember, view: tuple[list[Member], dict[str, LeaseView]]) -> None:
        members, leases = view
        mine = self.configured(m)
        m.memory = observe(m.memory, members, leases, mine, held=list(m.held), now=self.now)
        p = plan(
            Member(m.id, m.weight, m.draining, m.started_at),
            members,
            leases,
            mine,
            held=list(m.held),
            now=self.now,
            starved=m.memory.starved(self.now, PATIENCE),
            extra=m.memory.extra,
            avoid=m.avoid,
        )
        for stream in p.release:
            x = self.leases[stream]
            if x.holder == m.id and x.epoch == m.held[stream]:
                x.holder, x.expires_at = None, 0.0
            del m.held[stream]
            self.released += 1
        for stream in p.acquire:
            if self._takeable(stream, m.id):
                x = self.leases[stream]
                x.holder, x.epoch, x.expires_at = m.id, x.epoch + 1, self.now + LEASE_TTL
                m.held[stream] = x.epoch
                self.acquired += 1
                if stream in p.extra:
                    m.memory = m.memory.took([stream])
                    self.extras += 1

    def round(self) -> None:
        self.now += ROUND
        order = [m for m in self.members.values() if m.alive]
        self.rng.shuffle(order)
        if self.stale_views:
            for m in order:
                self._tick(m)
            view = self.view()
            for m in order:
                self._act(m, view)
        else:
            for m in order:
                self._tick(m)
                self._act(m, self.view())

    def converged(self) -> bool:
        """Judged on the truth, not on the table: the members that run (a newcomer that
        has not ticked yet counts; a dead one whose row has not expired does not)."""
        alive = {m.id: m for m in self.members.values() if m.alive}
        members = [Member(m.id, m.weight, m.draining) for m in alive.values()]
        holders: dict[str, list[str]] = {s: [] for s in self.streams}
        for m in alive.values():
            for stream in m.held:
                holders[stream].append(m.id)
        for stream, lease in self.leases.items():
            if holders[stream] != [lease.holder] or lease.expires_at <= self.now:
                return False
        for m in alive.values():
            me = Member(m.id, m.weight, m.draining)
            if len(m.held) > fair_share(me, members, len(self.streams)):
                return False
        return True

    def settle(self) -> int:
        """Rounds until converged (fails past MAX_ROUNDS); then checks it stays put."""
        rounds = 0
        while not self.converged():
            if rounds == MAX_ROUNDS:
                pytest.fail(f"not converged after {MAX_ROUNDS} rounds: {self.describe()}")
            self.round()
            rounds += 1
        self.assert_stable()
        return rounds

    def assert_stable(self, rounds: int = 3) -> None:
        """No flapping: more rounds take and release nothing, and every lease keeps its
        holder and epoch."""
        before = {s: (x.holder, x.epoch) for s, x in self.leases.items()}
        moves = (self.acquired, self.released)
        for _ in range(rounds):
            self.round()
            assert self.converged(), self.describe()
        assert (self.acquired, self.released) == moves
        assert {s: (x.holder, x.epoch) for s, x in self.leases.items()} == before

    def covered(self) -> bool:
        """Every stream some running member (not draining, of weight) is configured for is
        run by exactly one member configured for it, under a live lease in its name."""
        alive = [m for m in self.members.values() if m.alive]
        holders: dict[str, list[SimMember]] = {s: [] for s in self.streams}
        for m in alive:
            for stream in m.held:
                holders[stream].append(m)
        for stream, who in holders.items():
            lease = self.leases[stream]
            if len(who) > 1 or (who and stream not in self.configured(who[0])):
                return False
            if who and (lease.holder != who[0].id or lease.expires_at <= self.now):
                return False
            wanted = any(
                stream in self.configured(m) and not m.draining and m.weight > 0 for m in alive
            )
            if wanted and not who:
                return False
        return True

    def settle_covered(self, quiet: int = int(PATIENCE / ROUND) + 3) -> int:
        """Rounds until covered and ``quiet`` rounds in a row without a move (fails past a
        bound: a dead member's leases expire, a stream only some know starves, handovers)."""
        bound = int((LEASE_TTL + PATIENCE) / ROUND) + 12 + quiet
        rounds = calm = 0
        while calm < quiet:
            if rounds == bound:
                pytest.fail(f"not covered and quiet after {bound} rounds: {self.describe()}")
            moves = (self.acquired, self.released)
            self.round()
            rounds += 1
            calm = calm + 1 if self.covered() and (self.acquired, self.released) == moves else 0
        return rounds

    def holding(self) -> dict[str, str | None]:
        return {s: x.holder for s, x in self.leases.items()}

    def describe(self) -> str:
        counts = {m.id: len(m.held) for m in self.members.values() if m.alive}
        return f"now={self.now} held={counts} leases={self.holding()}"


def test_three_members_then_a_fourth_then_one_dies() -> None:
    fleet = Fleet(streams_named(12), random.Random(1))
    for i in range(3):
        fleet.join(SimMember(f"m{i}", 1.0))
    fleet.settle()
    assert sorted(len(m.held) for m in fleet.members.values()) == [4, 4, 4]

    # a join moves only the streams the newcomer needs: one from each
    before = fleet.holding()
    fleet.join(SimMember("m3", 1.0))
    fleet.settle()
    assert sorted(len(m.held) for m in fleet.members.values()) == [3, 3, 3, 3]
    moved = {s for s, h in fleet.holding().items() if h != before[s]}
    assert len(moved) == 3
    assert all(fleet.holding()[s] == "m3" for s in moved)

    # a dead member's streams go to the others once its leases expire, and only those move
    before = fleet.holding()
    fleet.kill("m1")
    fleet.settle()
    alive = [m for m in fleet.members.values() if m.alive]
    assert sorted(len(m.held) for m in alive) == [4, 4, 4]
    moved = {s for s, h in fleet.holding().items() if h != before[s]}
    assert moved == {s for s, h in before.items() if h == "m1"}


def test_a_dead_members_leases_are_not_taken_before_they_expire() -> None:
    fleet = Fleet(streams_named(6), random.Random(2))
    fleet.join(SimMember("a", 1.0))
    fleet.join(SimMember("b", 1.0))
    fleet.settle()
    owned = {s for s, h in fleet.holding().items() if h == "b"}
    died_at = fleet.now
    fleet.kill("b")
    while fleet.now < died_at + LEASE_TTL - ROUND:
        fleet.round()
        assert {s for s, h in fleet.holding().items() if h == "b"} == owned
    fleet.settle()
    assert all(h == "a" for h in fleet.holding().values())


def test_a_draining_member_hands_everything_over() -> None:
    fleet = Fleet(streams_named(10), random.Random(3))
    for name in "abc":
        fleet.join(SimMember(name, 1.0))
    fleet.settle()
    fleet.members["b"].draining = True
    fleet.settle()
    assert fleet.members["b"].held == {}
    assert "b" not in fleet.holding().values()
    assert sorted(len(fleet.members[x].held) for x in "ac") == [5, 5]


@settings(max_examples=60)
@given(
    initial=st.lists(weights, min_size=1, max_size=5),
    newcomer=weights,
    n=st.integers(0, 40),
    seed=st.integers(0, 2**32 - 1),
    stale_views=st.booleans(),
)
def test_any_fleet_converges_and_stays_put(
    initial: list[float],
    newcomer: float,
    n: int,
    seed: int,
    stale_views: bool,
) -> None:
    fleet = Fleet(streams_named(n), random.Random(seed), stale_views=stale_views)
    for i, w in enumerate(initial):
        fleet.join(SimMember(f"m{i}", w))
    fleet.settle()
    fleet.join(SimMember("late", newcomer))
    fleet.settle()
    names = [m for m in fleet.members if fleet.members[m].alive]
    if len(names) > 1:
        fleet.kill(random.Random(seed).choice(names))
        fleet.settle()
    # every stream has exactly one live holder, within its share
    alive = [m for m in fleet.members.values() if m.alive]
    assert sum(len(m.held) for m in alive) == n
    assert set(fleet.holding().values()) <= {m.id for m in alive}
    assert fleet.extras == 0  # with one list of streams, never anything beyond a share


# --- the fleet, simulated, its members' stream lists differing ---------------------------------


def test_a_rolling_deploy_that_adds_streams() -> None:
    """Three members on six streams restart one by one on a config of eight: the two new
    streams are held from the first restart on (beyond a share while only some members know
    them), nothing flaps meanwhile, and once all run the new config the shares are fair."""
    old, new = streams_named(6), streams_named(8)
    fleet = Fleet(new, random.Random(7))
    for i in range(3):
        fleet.join(SimMember(f"m{i}", 1.0, streams=old))
    fleet.settle_covered()
    assert {s for s, h in fleet.holding().items() if h} == set(old)
    for i in range(3):
        fleet.stop(f"m{i}")
        fleet.round()
        fleet.join(SimMember(f"m{i}", 1.0, streams=new))
        fleet.settle_covered()
        assert all(fleet.holding().values())  # every stream, the new ones too
    fleet.settle()  # one list again: every member within its fair share
    assert sorted(len(m.held) for m in fleet.members.values()) == [2, 3, 3]


def test_a_stream_only_a_member_at_its_share_knows_is_taken_beyond_it() -> None:
    """The reviewer's case: m2 knows a only and holds it; m1 knows a..d, its share is 2."""
    fleet = Fleet(["a", "b", "c", "d"], random.Random(1))
    fleet.join(SimMember("m2", 1.0, streams=["a"]))
    fleet.settle_covered()
    fleet.join(SimMember("m1", 1.0))
    fleet.settle_covered()
    assert fleet.holding() == {"a": "m2", "b": "m1", "c": "m1", "d": "m1"}
    assert fleet.extras == 1


@settings(max_examples=60)
@given(
    configs=st.lists(
        st.tuples(weights, st.one_of(st.none(), st.sets(st.integers(0, 11))), st.booleans()),
        min_size=1,
        max_size=5,
    ),
    newcomer=st.tuples(weights, st.one_of(st.none(), st.sets(st.integers(0, 11)))),
    seed=st.integers(0, 2**32 - 1),
    stale_views=st.booleans(),
)
def test_any_fleet_of_differing_stream_lists_covers_every_stream_and_stays_put(
    configs: list[tuple[float, set[int] | None, bool]],
    newcomer: tuple[float, set[int] | None],
    seed: int,
    stale_views: bool,
) -> None:
    """Whatever each member is configured for, draining or not: every stream a running
    member knows ends up held by one that knows it, and then nothing moves (settle_covered).
    The same after a member joins, and after one dies."""
    streams = streams_named(12)

    def named(picked: set[int] | None) -> list[str] | None:
        return None if picked is None else [streams[i] for i in sorted(picked)]

    fleet = Fleet(streams, random.Random(seed), stale_views=stale_views)
    for i, (w, picked, draining) in enumerate(configs):
        fleet.join(SimMember(f"m{i}", w, draining=draining, streams=named(picked)))
    fleet.settle_covered()
    fleet.join(SimMember("late", newcomer[0], streams=named(newcomer[1])))
    fleet.settle_covered()
    names = [m for m in fleet.members if fleet.members[m].alive]
    if len(names) > 1:
        fleet.kill(random.Random(seed).choice(names))
        fleet.settle_covered()


# --- avoid: streams handed over for want of the gateway (consumer.core.failover) -----------------


def test_an_avoided_stream_is_not_taken_as_share() -> None:
    """A member with room takes every free stream but the one it avoids: its share is the
    same, the avoided one is left for the others."""
    me, other = Member("m1", 1.0), Member("m2", 1.0)
    streams = streams_named(4)
    p = plan(me, [other], {}, streams, held=[], now=NOW, avoid=[streams[0]])
    assert p.share == 2
    assert streams[0] not in p.acquire and len(p.acquire) == 2
    assert set(p.acquire) <= set(streams[1:])


def test_an_avoided_stream_is_not_taken_as_a_starved_extra() -> None:
    me = Member("m1", 1.0)
    streams = streams_named(2)
    p = plan(
        me,
        [Member("m2", 1.0)],
        {},
        streams,
        held=[streams[1]],
        now=NOW,
        starved=[streams[0]],
        avoid=[streams[0]],
    )
    assert p.acquire == () and p.extra == () and p.release == ()
    # without the avoidance, the starved stream is taken beyond the share
    p = plan(me, [Member("m2", 1.0)], {}, streams, held=[streams[1]], now=NOW, starved=[streams[0]])
    assert p.acquire == (streams[0],) and p.extra == (streams[0],)


def test_the_only_free_stream_avoided_leaves_the_room_unused() -> None:
    """Nothing else is free: the member takes nothing (not the avoided stream instead)."""
    streams = streams_named(1)
    p = plan(Member("m1", 1.0), [], {}, streams, held=[], now=NOW, avoid=streams)
    assert p.acquire == () and p.share == 1


def test_streams_a_member_avoids_end_up_with_the_others_and_stay_put() -> None:
    """A member hands over every stream it holds (it cannot reach the gateway) and avoids
    them: the others, at their shares, take them beyond (starved after PATIENCE), and
    nothing moves after; the avoiding member holds none of them."""
    fleet = Fleet(streams_named(12), random.Random(7))
    for i in range(3):
        fleet.join(SimMember(f"m{i}", 1.0))
    fleet.settle()
    mine = set(fleet.members["m0"].held)
    assert mine
    fleet.hand_over("m0", mine)
    fleet.settle_covered()
    assert not set(fleet.members["m0"].held) & mine
    assert all(fleet.holding()[s] in ("m1", "m2") for s in mine)
    moves = (fleet.acquired, fleet.released)
    for _ in range(int(PATIENCE / ROUND) + 3):
        fleet.round()
    assert (fleet.acquired, fleet.released) == moves


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=20),
    k=st.integers(min_value=2, max_value=5),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_any_fleet_covers_the_streams_one_member_avoids(n: int, k: int, seed: int) -> None:
    rng = random.Random(seed)
    fleet = Fleet(streams_named(n), rng)
    for i in range(k):
        fleet.join(SimMember(f"m{i}", rng.choice([0.5, 1.0, 2.0])))
    fleet.settle()
    avoided = set(rng.sample(fleet.streams, rng.randint(1, n)))
    fleet.hand_over("m0", avoided)
    fleet.settle_covered()
    assert all(fleet.holding()[s] not in (None, "m0") for s in avoided)
