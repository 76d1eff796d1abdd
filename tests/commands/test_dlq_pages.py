"""The dlq commands read a page of dead letters at a time: a webhook misdeployed for a day
left ~800,000 of them, and `dlq replay --all` read every one with its payload (tens of KB
each) before delivering the first, and printed nothing until the end. On SQLite and on
PostgreSQL (tests/pg.py): the store pages by id, a replay of more rows than a page delivers
each once in order and keeps a resource's order across pages, and no call to the store
returns more than a page. A filtered replay asks the store per page for the dead letters left
out that hold its resources back: it kept one for every resource of the queue."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import pysink
import pytest
from operator_support import PYSINK, cli, write_config
from support import wait_until

from consumer.commands import dlq
from consumer.config import load_settings
from consumer.core.records import CommitBatch, DeadLetter, DeadLetterRow
from consumer.state import StateStore, open_store

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging", "hermetic_config")


def letter(
    i: int, key: str | None = None, *, stream: str = "main", reason: str = "x"
) -> DeadLetter:
    """Dead letter of event ``uid-<i>``, of resource ``key`` (pk-<i> if none)."""
    key = key or f"pk-{i}"
    uid = f"uid-{i}"
    event = {
        "metadata": {"offset": str(100 + i), "uniqueEventId": uid},
        "eventName": "E",
        "primaryKey": key,
        "detail": [],
    }
    return DeadLetter(
        stream=stream,
        reason=reason,
        error="no",
        payload=json.dumps(event),
        offset=str(100 + i),
        unique_event_id=uid,
        event_name="E",
        primary_key=key,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    state: dict[str, Any] = {}
    if request.param == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")  # skips when no server is installed
        state = {"backend": "postgres", "dsn": dsn, "schema": f"t_{uuid.uuid4().hex[:16]}"}
    return write_config(
        tmp_path, "http://127.0.0.1:9", sink=PYSINK, streams={"main": "A", "b": "B"}, state=state
    )


async def seed(config: Path, letters: list[DeadLetter], *, now: float | None = None) -> None:
    store = await open_store(load_settings(config).state)
    try:
        await store.commit(CommitBatch(dead_letters=letters), now=now)
    finally:
        await store.close()


async def left(config: Path) -> list[str]:
    store = await open_store(load_settings(config).state)
    try:
        return [str(r.unique_event_id) for r in await store.dead_letters()]
    finally:
        await store.close()


async def test_the_store_pages_every_row_once_in_order_with_filters(config: Path) -> None:
    for i in range(1, 24):  # three commits: last_at 10, 20, 30
        await seed(
            config,
            [letter(i, stream="b" if i % 3 == 0 else "main", reason="r" if i % 2 else "s")],
            now=10.0 * (1 + i % 3),
        )
    store = await open_store(load_settings(config).state)
    try:
        every = await store.dead_letters()
        ids = [r.id for r in every]
        for filters in (
            {},
            {"stream": "main"},
            {"reason": "r"},
            {"since": 20.0},
            {"before": 30.0, "stream": "main"},
            {"ids": ids[::2]},
            {"ids": ids[::3], "reason": "s"},
        ):
            for payloads in (True, False):
                whole = await store.dead_letters(**filters, payloads=payloads)  # type: ignore[arg-type]
                assert whole, filters
                for size in (1, 4, len(whole), len(whole) + 3):
                    paged: list[DeadLetterRow] = []
                    after: int | None = None
                    for _ in range(len(whole) + 2):  # bounded: a page at least each turn
                        page = await store.dead_letters(
                            **filters,  # type: ignore[arg-type]
                            payloads=payloads,
                            after=after,
                            limit=size,
                        )
                        assert len(page) <= size
                        paged += page
                        if len(page) < size:
                            break
                        after = page[-1].id
                    assert paged == whole, (filters, size)
        assert await store.dead_letters(after=ids[-1]) == []
        assert [r.id for r in await store.dead_letters(after=ids[4])] == ids[5:]
    finally:
        await store.close()


class Counted:
    """The store a command opens, counting the rows each read returns (and those with their
    payloads): what a command holds at once."""

    calls: list[tuple[int, int]]

    def __init__(self, store: StateStore, calls: list[tuple[int, int]]) -> None:
        self._store = store
        self.calls = calls

    async def dead_letters(self, *args: Any, **kwargs: Any) -> list[DeadLetterRow]:
        rows: list[DeadLetterRow] = await self._store.dead_letters(*args, **kwargs)
        self.calls.append((len(rows), sum(1 for r in rows if r.payload)))
        return rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    opened = dlq.open_store

    async def counting(*args: Any, **kwargs: Any) -> Any:
        return Counted(await opened(*args, **kwargs), calls)

    monkeypatch.setattr(dlq, "open_store", counting)
    monkeypatch.setattr(dlq, "PAGE", 4, raising=False)  # the old code had no pages
    return calls


async def test_the_commands_read_no_more_than_a_page_at_once(
    config: Path, capsys: pytest.CaptureFixture[str], counted: list[tuple[int, int]]
) -> None:
    await seed(config, [letter(i) for i in range(1, 24)])
    cfg = str(config)
    uids = [f"uid-{i}" for i in range(1, 24)]

    code, out, err = await cli(capsys, "dlq", "list", "--json", "--limit", "0", "--config", cfg)
    assert code == 0, err
    assert [d["unique_event_id"] for d in json.loads(out)] == uids
    code, out, err = await cli(capsys, "dlq", "list", "--limit", "0", "--config", cfg)
    assert code == 0, err
    assert len(out.splitlines()) == 1 + 23
    code, out, err = await cli(
        capsys, "dlq", "purge", "--all", "--dry-run", "--json", "--config", cfg
    )
    assert code == 0, err
    assert [d["unique_event_id"] for d in json.loads(out)] == uids
    assert "would purge 23" in err
    code, out, err = await cli(
        capsys, "dlq", "replay", "--all", "--dry-run", "--json", "--config", cfg
    )
    assert code == 0, err
    assert [(o["unique_event_id"], o["result"]) for o in json.loads(out)] == [
        (u, "would deliver") for u in uids
    ]
    assert await left(config) == uids
    code, out, err = await cli(capsys, "dlq", "replay", "--all", "--json", "--config", cfg)
    assert code == 0, err
    assert [(o["unique_event_id"], o["result"]) for o in json.loads(out)] == [
        (u, "delivered") for u in uids
    ]
    assert pysink.delivered_ids() == uids  # each once, in order
    assert await left(config) == []

    await seed(config, [letter(i) for i in range(30, 41)])
    code, out, err = await cli(capsys, "dlq", "purge", "--all", "--config", cfg)
    assert code == 0, err
    assert "purged 11" in err
    assert await left(config) == []

    assert counted, "the commands read through the store they open"
    assert max(n for n, _ in counted) <= 4  # a page: 23 dead letters, and none read at once
    assert max(p for _, p in counted) <= 4


async def test_a_replay_holds_a_bounded_size_of_payloads_whatever_a_page_holds(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Big dead letters (here 100,000 characters each, the bound 250,000): a page's payloads
    are read in parts within the bound, whatever the page's row count. Before, a page of 200
    rows held its 200 payloads at once (gigabytes for events near max_frame_bytes)."""
    big = json.dumps([{"newValue": "x" * 100_000}])
    letters = [
        dataclasses.replace(d, payload=d.payload.replace('"detail": []', f'"detail": {big}'))
        for d in (letter(i) for i in range(1, 8))
    ]
    assert all(len(d.payload) > 100_000 for d in letters)
    await seed(config, letters)
    held: list[int] = []
    opened = dlq.open_store

    class Measured(Counted):
        async def dead_letters(self, *args: Any, **kwargs: Any) -> list[DeadLetterRow]:
            rows: list[DeadLetterRow] = await self._store.dead_letters(*args, **kwargs)
            held.append(sum(len(r.payload) for r in rows))
            return rows

    async def measuring(*args: Any, **kwargs: Any) -> Any:
        return Measured(await opened(*args, **kwargs), [])

    monkeypatch.setattr(dlq, "open_store", measuring)
    monkeypatch.setattr(dlq, "PAGE_CHARS", 250_000, raising=False)
    code, out, err = await cli(capsys, "dlq", "replay", "--all", "--json", "--config", str(config))
    assert code == 0, err
    assert [o["result"] for o in json.loads(out)] == ["delivered"] * 7
    assert pysink.delivered_ids() == [f"uid-{i}" for i in range(1, 8)]
    assert 100_000 < max(held) <= 250_000, held


@pytest.mark.parametrize("dry_run", [False, True])
async def test_a_replay_keeps_each_resource_in_order_across_page_boundaries(
    config: Path, dry_run: bool
) -> None:
    """`--reason x`: the "y" letters are outside the replay, and the later letters of their
    resource wait for them, whichever page each is on; a resource held back holds back its
    later letters. Pages of 3 rows; ids 1..20 in arrival order."""
    plan = {  # id: (resource, reason); the others are "x", each its own resource
        1: ("A", "y"),  # outside: A's later letters wait for it
        3: ("C", "x"),  # delivered: C's letter outside comes after it
        8: ("A", "x"),  # pages after 1: skipped
        9: ("A", "x"),  # skipped: an earlier one of A was not delivered
        10: ("B", "x"),  # delivered
        12: ("C", "y"),  # outside
        14: ("B", "y"),  # outside, a page after 10
        15: ("B", "x"),  # skipped
        17: ("C", "x"),  # skipped: 12 before it
    }
    resource = {i: r for i, (r, _) in plan.items()}
    reason = {i: why for i, (_, why) in plan.items()}
    await seed(
        config, [letter(i, resource.get(i), reason=reason.get(i, "x")) for i in range(1, 21)]
    )
    settings = load_settings(config)
    outcomes: list[dlq.Outcome] = []
    await dlq.replay(
        settings,
        dlq.Selection(reason="x"),
        dry_run=dry_run,
        on_outcome=outcomes.append,
        page=3,
    )
    chosen = [i for i in range(1, 21) if reason.get(i, "x") == "x"]
    assert [o.id for o in outcomes] == chosen  # each once, in order
    skipped = {
        8: "dead letter 1 ",
        9: "earlier event",
        15: "dead letter 14 ",
        17: "dead letter 12 ",
    }
    for o in outcomes:
        if o.id in skipped:
            assert o.result == "skipped" and skipped[o.id] in o.detail, o
        else:
            assert o.result == ("would deliver" if dry_run else "delivered"), o
    if dry_run:
        assert pysink.delivered_ids() == []
        return
    delivered = [f"uid-{i}" for i in chosen if i not in skipped]
    assert pysink.delivered_ids() == delivered
    assert await left(config) == [f"uid-{i}" for i in (1, 8, 9, 12, 14, 15, 17)]


async def test_a_replay_by_id_pages_and_says_which_ids_are_missing(
    config: Path, capsys: pytest.CaptureFixture[str], counted: list[tuple[int, int]]
) -> None:
    await seed(config, [letter(i, "K" if i in (2, 11) else None) for i in range(1, 16)])
    code, out, err = await cli(
        capsys, "dlq", "replay", "11", "5", "999", "--json", "--config", str(config)
    )
    assert code == 1  # 999 is no dead letter; 11 waits for 2, outside the replay
    assert [(o["id"], o["result"]) for o in json.loads(out)] == [(5, "delivered"), (11, "skipped")]
    assert "dead letter 2 " in json.loads(out)[1]["detail"]
    assert "no dead letter with id 999" in err
    assert pysink.delivered_ids() == ["uid-5"]
    assert max(n for n, _ in counted) <= 4


async def test_a_replay_prints_each_outcome_as_it_is_known(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first outcomes are on stdout while a later row's write still waits: the old
    command printed them all at the end, after the last delivery."""
    await seed(config, [letter(1), letter(2), letter(3, stream="b"), letter(4)])
    pysink.GATES["b"] = gate = asyncio.Event()  # the third row's write waits
    settings = load_settings(config)
    args = argparse.Namespace(
        dlq_command="replay",
        ids=[],
        all=True,
        stream=None,
        reason=None,
        since=None,
        before=None,
        dry_run=False,
        json=True,
    )
    capsys.readouterr()
    task = asyncio.create_task(dlq.command(settings, args))
    try:
        await wait_until(lambda: pysink.CALLS[0] >= 3)
        printed = capsys.readouterr().out
        assert '"unique_event_id": "uid-2"' in printed and "uid-3" not in printed
    finally:
        gate.set()
    assert await task == 0
    rest = capsys.readouterr().out
    outcomes = json.loads(printed + rest)  # one JSON array, streamed
    assert [o["unique_event_id"] for o in outcomes] == ["uid-1", "uid-2", "uid-3", "uid-4"]
    assert {o["result"] for o in outcomes} == {"delivered"}


async def test_a_purge_leaves_the_dead_letters_written_while_it_runs(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon dead-letters an event while `dlq purge --all` goes through a large queue: the
    purge read it on a later page and deleted it, never listed to anyone. It purges what was
    in the queue when it began; and says nothing on stdout (only a dry run lists)."""
    await seed(config, [letter(i) for i in range(1, 11)])
    opened = dlq.open_store
    arrived = False

    async def opening(*args: Any, **kwargs: Any) -> Any:
        store = await opened(*args, **kwargs)
        purge = store.purge_dead_letters

        async def purge_then_a_dead_letter_arrives(ids: Any) -> int:
            nonlocal arrived
            n = await purge(ids)
            if not arrived:  # the running daemon's store, in the command's loop
                arrived = True
                await seed(config, [letter(99)])
            return n

        store.purge_dead_letters = purge_then_a_dead_letter_arrives
        return store

    monkeypatch.setattr(dlq, "open_store", opening)
    monkeypatch.setattr(dlq, "PAGE", 4)
    code, out, err = await cli(capsys, "dlq", "purge", "--all", "--config", str(config))
    assert code == 0, err
    assert "purged 10" in err
    assert out == ""
    assert await left(config) == ["uid-99"]


async def test_the_store_finds_the_oldest_dead_letter_outside_a_selection_per_resource(
    config: Path,
) -> None:
    """``oldest_outside``: of each resource asked, its oldest dead letter below an id that the
    filters do not select, as a reading of the whole queue finds it (a resource with a NUL
    and a marker-like text in its key too: PostgreSQL keeps those escaped)."""
    odd = "K\x00\U0001f600"
    resources = ["K0", "K1", "K2", odd]
    store = await open_store(load_settings(config).state)
    try:
        for i in range(1, 41):
            key = resources[i % 4]
            stream = "b" if i % 7 == 0 else "main"
            why = "r" if i % 3 else "s"
            await store.commit(
                CommitBatch(dead_letters=[letter(i, key, stream=stream, reason=why)]),
                now=10.0 * (1 + i % 5),
            )
        every = await store.dead_letters(payloads=False)
        ids = [r.id for r in every]
        keys = [*sorted({(r.stream, str(r.primary_key)) for r in every}), ("main", "none")]
        for filters in (
            {"reason": "r"},
            {"since": 30.0},
            {"before": 30.0, "reason": "s"},
            {"ids": ids[::2]},
            {"ids": ids[1::3], "since": 20.0, "before": 50.0},
        ):
            for below in (ids[0], ids[9], ids[-1], ids[-1] + 1):

                def chosen(r: DeadLetterRow, f: dict[str, Any] = filters) -> bool:
                    return (
                        f.get("reason") in (None, r.reason)
                        and r.last_at >= f.get("since", r.last_at)
                        and (f.get("before") is None or r.last_at < f["before"])
                        and ("ids" not in f or r.id in f["ids"])
                    )

                want: dict[tuple[str, str], int] = {}
                for r in every:
                    if r.id < below and not chosen(r):
                        want.setdefault((r.stream, str(r.primary_key)), r.id)
                got = await store.oldest_outside(keys, below=below, **filters)  # type: ignore[arg-type]
                assert got == want, (filters, below)
                assert any(want.values()) or below == ids[0]
        assert await store.oldest_outside(keys, below=ids[-1] + 1) == {}  # all selected
        assert await store.oldest_outside([], below=ids[-1] + 1, reason="r") == {}
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("how", "dry_run"),
    [("reason", False), ("reason", True), ("since", False), ("before", False), ("ids", False)],
)
async def test_a_filtered_replay_holds_a_page_of_resources_not_every_one_outside(
    config: Path, monkeypatch: pytest.MonkeyPatch, how: str, dry_run: bool
) -> None:
    """A replay of a selection over a queue of many resources outside it: the replay kept the
    oldest dead letter of every resource outside the selection it had read past, to the end
    (millions of them over a large queue). It holds those of a page, and a resource still
    waits for a dead letter outside many pages before its event. Pages of 4 rows; ids 1..N
    in arrival order; the selection by reason, by time (last_at) or by id."""
    outside_keys = 60
    plan: list[tuple[str, bool]] = [("A", False), ("B", True), ("C", True)]  # key, selected
    for i in range(outside_keys):
        plan += [(f"out-{i}", False), (f"in-{i}", True)]
    plan += [("B", False), ("C", True), ("B", True), ("A", True)]
    n = len(plan)
    # (reason, last_at) of each letter: only the filter under test tells them apart
    selected_at, outside_at = (20.0, 10.0) if how == "since" else (20.0, 30.0)
    store = await open_store(load_settings(config).state)
    try:
        for i, (key, selected) in enumerate(plan, 1):
            why = "x" if selected or how != "reason" else "y"
            at = selected_at if selected or how not in ("since", "before") else outside_at
            await store.commit(CommitBatch(dead_letters=[letter(i, key, reason=why)]), now=at)
        assert [r.id for r in await store.dead_letters()] == list(range(1, n + 1))
    finally:
        await store.close()
    chosen = [i for i, (_, selected) in enumerate(plan, 1) if selected]
    selection = {
        "reason": dlq.Selection(reason="x"),
        "since": dlq.Selection(since=15.0),
        "before": dlq.Selection(before=25.0),
        "ids": dlq.Selection(ids=tuple(chosen)),
    }[how]

    sizes: list[int] = []
    held = dlq._held

    def counting(row: DeadLetterRow, held_back: dict[tuple[str, str], int], *rest: Any) -> Any:
        sizes.append(len(held_back))
        return held(row, held_back, *rest)

    monkeypatch.setattr(dlq, "_held", counting)
    outcomes: list[dlq.Outcome] = []
    await dlq.replay(
        load_settings(config), selection, dry_run=dry_run, on_outcome=outcomes.append, page=4
    )
    assert len(sizes) == len(chosen)
    assert max(sizes) <= 4  # the keys of a page at most (the old replay: 62)

    last_b, last_a = n - 1, n  # B waits for its letter outside at n - 3; A for 1
    skipped = {last_b: f"dead letter {n - 3} ", last_a: "dead letter 1 "}
    assert [o.id for o in outcomes] == chosen  # each once, in order
    for o in outcomes:
        if o.id in skipped:
            assert o.result == "skipped" and skipped[o.id] in o.detail, o
        else:
            assert o.result == ("would deliver" if dry_run else "delivered"), o
    if dry_run:
        assert pysink.delivered_ids() == []
        return
    assert pysink.delivered_ids() == [f"uid-{i}" for i in chosen if i not in skipped]
    assert await left(config) == [
        f"uid-{i}" for i, (_, selected) in enumerate(plan, 1) if not selected or i in skipped
    ]
