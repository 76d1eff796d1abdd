"""The committer in fleet mode (consumer.runtime.committer: configure_fence, fence_out,
forget) against a real PostgreSQL state store (tests/pg.py): when another member takes a
stream's lease, the next commit keeps the other streams' work and drops that stream's, says
so once, and commits nothing of that stream until the stream is forgotten."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from pg import PostgresServer, sql
from pydantic import SecretStr

from consumer.config import StateSettings
from consumer.core.events import Event
from consumer.core.records import CommitBatch, DeadLetter, Fence
from consumer.core.watermark import Position
from consumer.errors import Fenced, StoreError
from consumer.runtime.committer import Committer
from consumer.sinks.base import PlainSink
from consumer.state import StateStore, open_store
from consumer.state.fleet import FleetTable

MEMBER = "member-a"
T = 10.0


class NullSink(PlainSink):
    name = "null"

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        return None


@dataclass
class Env:
    store: StateStore
    committer: Committer
    fleet: FleetTable
    dsn: str
    schema: str
    epochs: dict[str, int] = field(default_factory=dict)
    fenced: list[frozenset[str]] = field(default_factory=list)
    seq: int = 0

    @property
    def q(self) -> str:
        return f'"{self.schema}"'

    async def execute(self, statement: str, *args: Any) -> str:
        return str(await sql(self.dsn, "execute", statement, *args))

    async def fetchval(self, statement: str, *args: Any) -> Any:
        return await sql(self.dsn, "fetchval", statement, *args)

    def event(self, stream: str) -> str:
        """One event of the stream arrives and is delivered: its id."""
        self.seq += 1
        uid = f"{stream}-u{self.seq}"
        seq = self.committer.arrived(stream, Position(f"{self.seq:06d}", uid))
        self.committer.processed(stream, [uid], [seq])
        return uid

    def letter(self, stream: str, key: str) -> None:
        """A malformed frame of the stream: a dead letter for ``key``."""
        seq = self.committer.arrived(stream, None)
        self.committer.dead_letter(
            DeadLetter(
                stream=stream, reason="malformed", error="bad", payload="{", primary_key=key
            ),
            seq,
        )

    async def steal(self, stream: str) -> None:
        """Another member takes the lease (as after an expiry): a newer epoch."""
        status = await self.execute(
            f"UPDATE {self.q}.stream_leases SET holder = 'other', epoch = epoch + 1 "
            "WHERE stream = $1",
            stream,
        )
        assert status == "UPDATE 1"

    async def offset(self, stream: str) -> str | None:
        cp = await self.store.checkpoint(stream)
        return None if cp is None else cp.offset

    async def letters(self, stream: str) -> int:
        return int(
            await self.fetchval(
                f"SELECT COUNT(*) FROM {self.q}.dead_letters WHERE stream = $1", stream
            )
        )


@pytest.fixture
async def env(postgres_server: PostgresServer) -> AsyncIterator[Env]:
    dsn = postgres_server.dsn()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    settings = StateSettings(backend="postgres", dsn=SecretStr(dsn), schema=schema)
    store = await open_store(settings)
    sink = NullSink()
    committer = Committer(store, sink, max_events=10_000, interval_s=3600.0)
    fleet = FleetTable(
        settings, MEMBER, host="h", pid=1, weight=1.0, started_at=0.0, lease_ttl_s=60.0
    )
    e = Env(store, committer, fleet, dsn, schema)
    await fleet.join(["a", "b"], T)
    e.epochs.update({x.stream: x.epoch for x in await fleet.acquire(["a", "b"], T)})
    assert sorted(e.epochs) == ["a", "b"]
    committer.configure_fence(lambda: Fence(MEMBER, dict(e.epochs)), e.fenced.append)
    try:
        yield e
    finally:
        await fleet.close()
        await store.close()
        await sql(dsn, "execute", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def test_both_streams_commit_while_the_leases_are_held(env: Env) -> None:
    a1, b1 = env.event("a"), env.event("b")
    assert await env.committer.flush()
    assert await env.offset("a") == "000001"
    assert await env.offset("b") == "000002"
    assert await env.store.seen("a", [a1]) == {a1}
    assert await env.store.seen("b", [b1]) == {b1}
    assert env.committer.fencing_rejections == 0
    assert env.fenced == []


async def test_a_stolen_stream_is_dropped_and_the_rest_committed(env: Env) -> None:
    c = env.committer
    env.event("a")
    env.event("b")
    assert await c.flush()
    commits = c.commits

    await env.steal("b")
    a2, b2 = env.event("a"), env.event("b")
    env.letter("a", "pk-a")
    env.letter("b", "pk-b")
    assert await c.has_dead_letters("b", "pk-b")  # not durable yet: the committer knows
    assert await c.flush()
    assert c.commits == commits + 1

    # a's part is durable
    assert await env.offset("a") == "000003"
    assert await env.store.seen("a", [a2]) == {a2}
    assert await env.letters("a") == 1
    # b's is not, and the committer no longer counts it as on its way
    assert await env.offset("b") == "000002"
    assert await env.store.seen("b", [b2]) == set()
    assert await env.letters("b") == 0
    assert not await c.has_dead_letters("b", "pk-b")
    # neither resource is kept in the count of dead letters on their way: a's is durable,
    # b's dropped (it kept every primaryKey ever dead-lettered, at 0)
    assert not c._ledgers["a"].letters_not_durable
    assert not c._ledgers["b"].letters_not_durable
    # said once
    assert env.fenced == [frozenset({"b"})]
    assert c.fencing_rejections == 1

    # later work on b is never committed (nor even offered to the store) ...
    a3, b3 = env.event("a"), env.event("b")
    assert await c.flush()
    assert await env.offset("a") == "000005"
    assert await env.store.seen("a", [a3]) == {a3}
    assert await env.offset("b") == "000002"
    assert await env.store.seen("b", [b3]) == set()
    assert env.fenced == [frozenset({"b"})]
    assert c.fencing_rejections == 1

    # ... and b alone makes no commit at all
    env.event("b")
    assert not await c.flush()
    assert c.fencing_rejections == 1


async def test_a_commit_failing_after_a_fence_is_sent_again_without_the_fenced_stream(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store refuses b (stolen), then the rest fails (a connection lost): the failed
    commit kept is the whole batch, b included. Sent again, b's part is dropped as a snapshot
    drops it: not refused (and counted) twice, its dead letter not settled twice (a count of
    -1 said the key had dead letters)."""
    c = env.committer
    env.event("a")
    env.event("b")
    assert await c.flush()
    await env.steal("b")
    env.event("a")
    env.event("b")
    env.letter("b", "pk-b")
    real = env.store.commit
    calls: list[set[str]] = []

    async def commit(batch: CommitBatch, now: float | None = None) -> bool:
        calls.append(batch.streams())
        if len(calls) == 2:  # the round after the fence, a's part alone
            raise StoreError("connection lost", retriable=True)
        return await real(batch, now)

    monkeypatch.setattr(env.store, "commit", commit)
    with pytest.raises(StoreError):
        await c.flush()
    assert calls == [{"a", "b"}, {"a"}]
    assert await c.flush()
    assert calls[2:] == [{"a"}]
    assert c.fencing_rejections == 1
    assert not await c.has_dead_letters("b", "pk-b")
    assert await env.offset("a") == "000003"


async def test_forget_lets_a_stream_commit_again_once_its_lease_is_back(env: Env) -> None:
    c = env.committer
    await env.steal("b")
    env.event("a")
    env.event("b")
    assert await c.flush()
    assert env.fenced == [frozenset({"b"})]
    assert c.fencing_rejections == 1
    assert await env.offset("b") is None

    # forgotten while the lease is still the other member's: the store refuses again
    c.forget("b")
    env.event("b")
    await c.flush()  # nothing left to commit once b's part is dropped (see below)
    assert c.fencing_rejections == 2
    assert env.fenced == [frozenset({"b"}), frozenset({"b"})]
    assert await env.offset("b") is None

    # the other member hands it back; this member takes it (a new epoch) and starts over
    await env.execute(
        f"UPDATE {env.q}.stream_leases SET holder = NULL, expires_at = 0 WHERE stream = 'b'"
    )
    [got] = await env.fleet.acquire(["b"], T)
    assert got.epoch == env.epochs["b"] + 2  # ours, the other member's, ours again
    env.epochs["b"] = got.epoch
    c.forget("b")
    b5 = env.event("b")
    assert await c.flush()
    assert await env.offset("b") == f"{env.seq:06d}"
    assert await env.store.seen("b", [b5]) == {b5}
    assert c.fencing_rejections == 2


async def test_a_flush_whose_every_stream_is_fenced_commits_nothing(env: Env) -> None:
    """The store refused the only stream of the batch: nothing was committed, so flush()
    says so ("Returns True when something was committed") and counts no commit."""
    c = env.committer
    await env.steal("b")
    env.event("b")
    commits = c.commits
    assert not await c.flush()
    assert c.commits == commits
    assert c.fencing_rejections == 1
    assert env.fenced == [frozenset({"b"})]


async def test_anchor_with_a_lost_lease_is_refused_and_fences_the_stream(env: Env) -> None:
    c = env.committer
    await env.steal("b")
    with pytest.raises(Fenced):
        await c.anchor("b", Position("000010", "b-anchor"))
    assert await env.offset("b") is None
    assert c.fencing_rejections == 1
    assert env.fenced == [frozenset({"b"})]
    # fenced: b's events are dropped before the store sees them
    env.event("b")
    env.event("a")
    assert await c.flush()
    assert await env.offset("b") is None
    assert c.fencing_rejections == 1

    await c.anchor("a", Position("000099", "a-anchor"))  # never moves an existing checkpoint
    assert await env.offset("a") == f"{env.seq:06d}"


async def test_a_stream_lost_and_taken_again_during_the_sinks_sync_commits_nothing_of_the_old_lease(
    env: Env,
) -> None:
    """The sink's sync (a jsonl fsync behind a busy disk) awaits before the store commits:
    meanwhile this member loses stream b's lease and takes it again (a new epoch; b forgotten
    here). The batch is the old lease's work: committed under the leases it was taken under,
    b's part is refused and dropped (the new lease replays it from the checkpoint), a's
    committed. Was: the fence was read after the sync, with b's new epoch, and the old lease's
    checkpoint and ids committed under it."""
    c = env.committer
    a1, b1 = env.event("a"), env.event("b")
    real = NullSink.sync

    async def lease_lost_and_taken_again(self: NullSink, position: str | None) -> None:
        c.forget("b")
        await env.steal("b")
        await env.execute(
            f"UPDATE {env.q}.stream_leases SET holder = NULL, expires_at = 0 WHERE stream = 'b'"
        )
        [got] = await env.fleet.acquire(["b"], T)
        env.epochs["b"] = got.epoch
        await real(self, position)

    sink = c._sink
    sink.sync = lease_lost_and_taken_again.__get__(sink)  # type: ignore[method-assign]
    await c.flush()
    assert await env.offset("a") == "000001"
    assert await env.store.seen("a", [a1]) == {a1}
    assert await env.offset("b") is None
    assert await env.store.seen("b", [b1]) == set()
    assert c.fencing_rejections == 1
