"""Unit tests for consumer.core.assignment: fair shares, plans, and a whole fleet converging.

No I/O: the fleet simulation keeps the lease table in a dict, its clock in a float, and
applies each member's plan the way the database would (an acquire wins only if the lease is
takeable at that moment; a release frees the lease at once).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.core.assignment import LeaseView, Member, fair_share, plan, rank

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


# --- the fleet, simulated ----------------------------------------------------------------------

LEASE_TTL = 3.0
MEMBER_TTL = 3.0
ROUND = 1.0
# After any change the fleet settles within this many rounds: a dead member's leases take
# LEASE_TTL to expire, then a hand-over or two (6 at worst over thousands of random fleets).
MAX_ROUNDS = int(LEASE_TTL / ROUND) + 8


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

    def __post_init__(self) -> None:
        self.leases = {s: Lease() for s in self.streams}  # join

    def join(self, member: SimMember) -> None:
        self.members[member.id] = member

    def kill(self, member_id: str) -> None:
        """It stops heartbeating: no release, its leases run out."""
        self.members[member_id].alive = False

    def live(self) -> list[Member]:
        return [
            Member(m.id, m.weight, m.draining)
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
        p = plan(
            Member(m.id, m.weight, m.draining),
            members,
            leases,
            self.streams,
            held=list(m.held),
            now=self.now,
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
