"""A NUL from the wire on the PostgreSQL state store (whose text cannot hold one): it was refused
(CharacterNotInRepertoireError), a non-retriable StoreError, and the daemon stopped with exit 78
at every start. Now such text is stored escaped (consumer/pg_text.py) and read back as it came:
the frame is dead-lettered, the event delivered once, and the stream goes on.

The mapping itself (lossless, injective), the store against the throwaway server of tests/pg.py,
and the daemon end to end with the sandbox gateway and the operator commands."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from operator_support import cli, settled, write_config
from store_backends import PostgresBackend
from support import count_lines, running, sink_ids, truth_ids, wait_until

from consumer.config import load_settings
from consumer.core.records import CommitBatch, DeadLetter
from consumer.core.watermark import Position
from consumer.pg_text import MARKER, from_text, to_text, unstorable_char
from consumer.state import PostgresStore

pytestmark = pytest.mark.usefixtures("contained_logging")

# Ids with a NUL, and what an escape of one could be confused with: a backslash, the marker.
WIRE_IDS = ["a\x00b", "a\\0b", "\x01a\\0b", "\x01a\x00b", "a\\\x00b", "\x00", "\x01", "\\"]
# Text with what PostgreSQL text cannot hold (NUL, a lone surrogate) and what the escape uses.
wire_text = st.text(st.sampled_from("a\\0u\x00\x01\ud800\udfff\u00e9"), max_size=12) | st.text()


@given(wire_text)
def test_the_mapping_is_lossless_and_storable(value: str) -> None:
    stored = to_text(value)
    assert from_text(stored) == value
    assert unstorable_char(stored) is None
    assert stored == value or stored.startswith(MARKER)


@given(wire_text, wire_text)
def test_the_mapping_keeps_two_values_two(a: str, b: str) -> None:
    assert (to_text(a) == to_text(b)) == (a == b)


def test_text_postgres_can_hold_is_stored_as_it_is() -> None:
    for value in ("", "u-1", "a\\0b", "C:\\u0000", "é\u2028\U0001f600", "\x7f\x1b"):
        assert to_text(value) == value
    assert to_text("a\x00b") == "\x01a\\0b"


async def test_the_store_keeps_text_from_the_wire_as_it_came(pg_backend: PostgresBackend) -> None:
    """Every text column fed from the wire takes a NUL; an id with one and an id that looks
    like its escape stay two ids (dedup stays exact)."""
    nul = DeadLetter(
        stream="s",
        reason="malformed",
        error="invalid frame: \x00 \\0",
        payload='{"type":"next","payload":"\x00"}',
        offset="9\x00",
        unique_event_id="n\x00",
        event_name="E\x00",
        primary_key="k\x00",
    )
    twin = DeadLetter(
        stream="s",
        reason="sink_rejected",
        error="e",
        payload="{}",
        unique_event_id="n\\0",
        primary_key="k\\0",
    )
    store = await pg_backend.open()
    try:
        await store.commit(
            CommitBatch(
                processed={"s": WIRE_IDS[:4]},
                checkpoints={"s": Position("7\x00", "a\x00b")},
                dead_letters=[nul, twin],
            )
        )
        assert await store.seen("s", WIRE_IDS) == set(WIRE_IDS[:4])
        await store.commit(CommitBatch(processed={"s": WIRE_IDS[4:]}))
        assert await store.seen("s", WIRE_IDS) == set(WIRE_IDS)
        assert await store.seen("s", ["a", "ab", "a\\x00b", "\x01\\0"]) == set()
        cp = await store.checkpoint("s")
        assert cp is not None and (cp.offset, cp.unique_event_id) == ("7\x00", "a\x00b")
        assert [(c.offset, c.unique_event_id) for c in await store.checkpoints()] == [
            ("7\x00", "a\x00b")
        ]
        got = [
            (r.offset, r.unique_event_id, r.event_name, r.primary_key, r.reason, r.error, r.payload)
            for r in await store.dead_letters("s")
        ]
        assert got == [
            ("9\x00", "n\x00", "E\x00", "k\x00", "malformed", nul.error, nul.payload),
            (None, "n\\0", None, "k\\0", "sink_rejected", "e", "{}"),
        ]
        assert len(await store.dead_letters("s", reason="malformed")) == 1
        assert await store.has_dead_letters("s", "k\x00")
        assert not await store.has_dead_letters("s", "k")
        assert await store.parked_among("s", ["k\x00", "k\\0", "k"]) == (
            {"k\x00": "n\x00", "k\\0": "n\\0"},
            True,
        )
        await store.commit(CommitBatch(dead_letters=[nul]))  # the same letter again: one row
        assert [r.attempts for r in await store.dead_letters("s")] == [2, 1]
        await store.anchor("t", Position("1\x00", "\x01"))
        await store.set_offset("u", "5\x00")
        t, u = await store.checkpoint("t"), await store.checkpoint("u")
        assert t is not None and (t.offset, t.unique_event_id) == ("1\x00", "\x01")
        assert u is not None and u.offset == "5\x00"
    finally:
        await store.close()
    # As stored: escaped, so PostgreSQL took it; nothing else changed.
    rows = await pg_backend.fetch(
        f"SELECT event_id FROM {pg_backend.q}.processed_events ORDER BY event_id"
    )
    assert "\x01a\\0b" in [r[0] for r in rows] and "a\\0b" in [r[0] for r in rows]


def raw_event(offset: str, uid: str, **fields: Any) -> str:
    """A newEvent as JSON text (a NUL written ``\\u0000``, as JSON must)."""
    return json.dumps({"metadata": {"offset": offset, "uniqueEventId": uid}, **fields})


async def test_a_nul_from_the_wire_is_dead_lettered_or_delivered_and_the_stream_goes_on(
    pg_backend: PostgresBackend,
    sandbox_factory: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The reviewer's frame (a raw NUL: not JSON) and events with a NUL in their id, name and
    key: each event is delivered once or dead-lettered with its reason, the checkpoint reaches
    the last offset, the daemon keeps running; ``dlq list/show`` read the NULs back; and a
    restart that re-reads the backlog skips every event, the NUL-id one too, as a duplicate."""
    gw = await sandbox_factory(backlog=20)
    at = gw.events("DEMO")[-1]["metadata"]["offset"]
    frame = '{"type":"next","id":"x","payload":"\x00"}'
    gw.inject_malformed("DEMO", frame)
    nul_ids = ["a\x00b", "a\\0b", "\x01a\\0b"]  # the NUL's escape and its look-alikes
    gw.inject_event("DEMO", raw_event(at, nul_ids[0], eventName="N\x00ame", primaryKey="k\x00"))
    gw.inject_event("DEMO", raw_event(at, nul_ids[1], eventName="Name", primaryKey="k\\0"))
    gw.inject_event("DEMO", raw_event(at, nul_ids[2], eventName="Name"))
    # No sink can write a detail nested 300 deep: a dead letter with a NUL in its id and key.
    deep = raw_event(at, "d\x00eep", eventName="D\x00", primaryKey="pk\x00deep")
    gw.inject_event("DEMO", deep[:-1] + ',"detail":' + "[" * 300 + "]" * 300 + "}")
    gw.append("DEMO", 20)
    events = gw.events("DEMO")
    last = events[-1]["metadata"]
    sink = tmp_path / "events.jsonl"
    state = {"backend": "postgres", "dsn": pg_backend.dsn, "schema": pg_backend.schema}
    config = write_config(tmp_path, gw.url, sink={"type": "jsonl", "path": sink}, state=state)
    entries = len(events) + len(nul_ids) + 2  # + the frame and the deep event

    async def at_last() -> bool:
        store = await PostgresStore.open(pg_backend.dsn, schema=pg_backend.schema, create=False)
        try:
            cp = await store.checkpoint("main")
        finally:
            await store.close()
        return cp is not None and (cp.offset, cp.unique_event_id) == (
            last["offset"],
            last["uniqueEventId"],
        )

    async def until_at_last() -> None:
        async with asyncio.timeout(30):
            while not await at_last():
                await asyncio.sleep(0.05)

    async with running(load_settings(config)) as daemon:
        await wait_until(settled(daemon, "main", entries))
        await until_at_last()
        assert not daemon._stop.is_set()
    assert daemon.exit_code == 0
    delivered = Counter(sink_ids(sink))
    assert delivered == Counter(truth_ids(events) + nul_ids)
    code, out, err = await cli(capsys, "dlq", "list", "--json", "--config", str(config))
    assert code == 0, err
    letters = sorted(json.loads(out), key=lambda r: r["id"])
    assert [(r["reason"], r["unique_event_id"], r["primary_key"]) for r in letters] == [
        ("malformed", None, None),
        ("sink_rejected", "d\x00eep", "pk\x00deep"),
    ]
    assert letters[1]["event_name"] == "D\x00"
    code, out, err = await cli(
        capsys, "dlq", "show", str(letters[0]["id"]), "--json", "--config", str(config)
    )
    assert code == 0, err
    assert json.loads(out)["payload"] == frame  # the frame as received, its NUL too
    code, out, err = await cli(
        capsys, "dlq", "show", str(letters[1]["id"]), "--config", str(config)
    )
    assert code == 0, err
    assert "d\\x00eep" in out and "\x00" not in out  # shown escaped, as any control

    # Re-read the whole backlog: every event was processed, the NUL-id one too.
    first = events[0]["metadata"]["offset"]
    code, _, err = await cli(
        capsys, "offset", "set", "main", first, "--execute", "--config", str(config)
    )
    assert code == 0, err
    lines = count_lines(sink)
    async with running(load_settings(config)) as daemon:
        await wait_until(settled(daemon, "main", entries))
        await until_at_last()
        assert not daemon._stop.is_set()
        assert daemon.pipelines["main"].delivered == 0
    assert daemon.exit_code == 0
    assert count_lines(sink) == lines
