"""The ``dlq list | show | replay | purge`` commands against a real state store, and a replay
while a daemon holds its lease (Issue #10 item 7: split out of test_operator_tools.py)."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pysink
import pytest
from operator_support import (
    PYSINK,
    cli,
    dead_letters,
    off,
    processed_ids,
    settled,
    uid,
    write_config,
)
from support import count_lines, read_table, running, wait_until

from consumer.commands.dlq import LIST_COLUMNS
from consumer.config import load_settings
from consumer.core.records import CommitBatch, DeadLetter
from consumer.errors import StoreError
from consumer.runtime.daemon import Daemon
from consumer.state import Lease, holder
from consumer.state.sqlite import SqliteStore

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")
MALFORMED = (
    '{"type":"next","id":"x","payload":{"data":{"newEvent":{"moduleName":"R"}}}}',
    "{not json",
)


async def test_dlq_commands(sandbox_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    gw = await sandbox_factory(backlog=100, chains=("DEMO", "OTHER"))
    demo, other = gw.events("DEMO"), gw.events("OTHER")
    for raw in MALFORMED:
        gw.inject_malformed("DEMO", raw)
    r10, r40, o20 = demo[10], demo[40], other[20]
    pysink.REJECT_IDS.update({uid(r10), uid(r40), uid(o20)})
    streams = {"main": "DEMO", "other": "OTHER"}
    py_cfg = write_config(tmp_path, gw.url, sink=PYSINK, streams=streams)
    jsonl = tmp_path / "events.jsonl"
    jsonl_cfg = write_config(
        tmp_path, gw.url, sink={"type": "jsonl", "path": jsonl}, streams=streams, name="j.toml"
    )
    state = tmp_path / "state.db"
    async with running(load_settings(py_cfg)) as daemon:
        await wait_until(settled(daemon, "main", len(demo) + len(MALFORMED)))
        await wait_until(settled(daemon, "other", len(other)))

    rows = await dead_letters(state)
    assert len(rows) == 5
    by_uid = {r.unique_event_id: r for r in rows if r.unique_event_id}
    malformed = {r.payload: r for r in rows if r.reason == "malformed"}
    assert set(by_uid) == {uid(r10), uid(r40), uid(o20)}
    assert set(malformed) == set(MALFORMED)
    m1, m2 = malformed[MALFORMED[0]], malformed[MALFORMED[1]]
    all_ids = {r.id for r in rows}

    async def listed(*args: str) -> list[dict[str, Any]]:
        code, out, err = await cli(capsys, "dlq", "list", "--json", *args, "--config", str(py_cfg))
        assert code == 0, err
        result: list[dict[str, Any]] = json.loads(out)
        return result

    # list: a table for people
    code, out, err = await cli(capsys, "dlq", "list", "--config", str(py_cfg))
    assert code == 0, err
    assert out.splitlines()[0].split() == list(LIST_COLUMNS)
    cells = read_table(out)
    assert {int(c["id"]) for c in cells} == all_ids
    row10 = next(c for c in cells if int(c["id"]) == by_uid[uid(r10)].id)
    assert [row10[k] for k in LIST_COLUMNS[1:]] == [
        "main",
        "sink_rejected",
        r10["eventName"],  # as it is: "CHECK OUT", not "CHECK_OUT"
        r10["primaryKey"],
        off(r10),
        "1",
    ]
    # list --json and the filters
    everything = await listed()
    assert [d["id"] for d in everything] == sorted(all_ids)  # oldest first
    d10 = next(d for d in everything if d["unique_event_id"] == uid(r10))
    assert d10["stream"] == "main" and d10["reason"] == "sink_rejected"
    assert (d10["primary_key"], d10["offset"], d10["attempts"]) == (r10["primaryKey"], off(r10), 1)
    assert d10["first_at"] and d10["last_at"]
    assert [d["unique_event_id"] for d in await listed("--stream", "other")] == [uid(o20)]
    assert {d["id"] for d in await listed("--reason", "malformed")} == {m1.id, m2.id}
    assert {
        d["unique_event_id"] for d in await listed("--stream", "main", "--reason", "sink_rejected")
    } == {uid(r10), uid(r40)}
    assert await listed("--stream", "nope") == []
    # --limit: the oldest N, and a word on stderr that more match
    code, out, err = await cli(
        capsys, "dlq", "list", "--json", "--limit", "2", "--config", str(py_cfg)
    )
    assert code == 0, err
    assert [d["id"] for d in json.loads(out)] == sorted(all_ids)[:2]
    assert "only the oldest 2 shown" in err
    code, out, err = await cli(capsys, "dlq", "list", "--limit", "5", "--config", str(py_cfg))
    assert code == 0 and "oldest" not in err, err  # exactly as many as match: nothing more
    assert {int(c["id"]) for c in read_table(out)} == all_ids
    assert [d["id"] for d in await listed("--limit", "0")] == sorted(all_ids)  # 0: all
    code, _, err = await cli(capsys, "dlq", "list", "--limit", "-1", "--config", str(py_cfg))
    assert code == 2 and "-1" in err

    # show: the whole error and the payload
    code, out, err = await cli(
        capsys, "dlq", "show", str(by_uid[uid(r10)].id), "--json", "--config", str(py_cfg)
    )
    assert code == 0, err
    shown = json.loads(out)
    assert shown["payload"] == r10
    assert shown["error"] == f"Rejected: rejected by the test sink: {uid(r10)}"
    assert (shown["reason"], shown["stream"]) == ("sink_rejected", "main")
    code, out, err = await cli(capsys, "dlq", "show", str(m2.id), "--json", "--config", str(py_cfg))
    assert code == 0, err
    shown = json.loads(out)
    assert shown["payload"] == MALFORMED[1]  # not JSON: its raw text
    assert shown["reason"] == "malformed" and shown["error"]
    # for people: one "key  value" line each, then the payload as received
    code, out, err = await cli(capsys, "dlq", "show", str(m2.id), "--config", str(py_cfg))
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.split() == ["reason", "malformed"] for line in lines)
    assert lines[lines.index("payload:") + 1 :] == MALFORMED[1].splitlines()
    code, _, err = await cli(capsys, "dlq", "show", "999999", "--config", str(py_cfg))
    assert code == 1 and "999999" in err

    # --since, with one dead letter two days old
    old = time.time() - 2 * 86400
    with contextlib.closing(sqlite3.connect(state)) as conn, conn:
        conn.execute(
            "UPDATE dead_letters SET first_at = ?, last_at = ? WHERE id = ?", (old, old, m1.id)
        )
    assert {d["id"] for d in await listed("--since", "1d")} == all_ids - {m1.id}
    assert {d["id"] for d in await listed("--since", "2000-01-01")} == all_ids
    assert await listed("--since", "2099-01-01") == []
    code, _, err = await cli(capsys, "dlq", "list", "--since", "soon", "--config", str(py_cfg))
    assert code == 2 and "soon" in err

    # a malformed frame cannot be replayed (the dry run says so, and fails)
    code, out, err = await cli(
        capsys, "dlq", "replay", str(m2.id), "--dry-run", "--json", "--config", str(py_cfg)
    )
    assert code == 1
    [planned] = json.loads(out)
    assert (planned["id"], planned["result"]) == (m2.id, "skipped")
    assert "malformed" in planned["detail"]

    # replay / purge need IDs or --all
    for action in ("purge", "replay"):
        code, _, err = await cli(capsys, "dlq", action, "--config", str(py_cfg))
        assert code == 2 and "--all" in err
    assert {r.id for r in await dead_letters(state)} == all_ids

    # purge --dry-run, then purge by age, then by ID
    code, out, err = await cli(
        capsys,
        "dlq",
        "purge",
        "--before",
        "1d",
        "--all",
        "--dry-run",
        "--json",
        "--config",
        str(py_cfg),
    )
    assert code == 0, err
    assert [d["id"] for d in json.loads(out)] == [m1.id]
    assert "would purge 1" in err
    assert {r.id for r in await dead_letters(state)} == all_ids
    code, _, err = await cli(
        capsys, "dlq", "purge", "--before", "1d", "--all", "--config", str(py_cfg)
    )
    assert code == 0, err
    assert "purged 1" in err
    assert {r.id for r in await dead_letters(state)} == all_ids - {m1.id}
    code, _, err = await cli(capsys, "dlq", "purge", str(m2.id), "999999", "--config", str(py_cfg))
    assert code == 1  # one of the IDs does not exist; the other is purged
    assert "999999" in err and "purged 1" in err
    left = {by_uid[uid(r10)].id, by_uid[uid(r40)].id, by_uid[uid(o20)].id}
    assert {r.id for r in await dead_letters(state)} == left

    # replay --dry-run: the plan, nothing changes
    snapshot = [(r.id, r.attempts, r.last_at) for r in await dead_letters(state)]
    processed = processed_ids(state) | processed_ids(state, "other")
    code, out, err = await cli(
        capsys, "dlq", "replay", "--all", "--dry-run", "--json", "--config", str(jsonl_cfg)
    )
    assert code == 0, err
    assert {(o["id"], o["result"]) for o in json.loads(out)} == {(i, "would deliver") for i in left}
    assert [(r.id, r.attempts, r.last_at) for r in await dead_letters(state)] == snapshot
    assert processed_ids(state) | processed_ids(state, "other") == processed
    assert not jsonl.exists() or jsonl.stat().st_size == 0

    # While a daemon holds the state store: the jsonl sink (one writer) is refused...
    pysink.REJECT_IDS.clear()
    lease = Lease.acquire(state, ["main"])
    try:
        code, _, err = await cli(
            capsys, "dlq", "replay", "--all", "--stream", "main", "--config", str(jsonl_cfg)
        )
        assert code == 1
        assert f"pid {os.getpid()}" in err and "jsonl" in err
        assert [(r.id, r.attempts, r.last_at) for r in await dead_letters(state)] == snapshot
        assert not jsonl.exists() or jsonl.stat().st_size == 0
        # ... a dry run is not, nor is a sink with many writers (python).
        code, _, err = await cli(
            capsys, "dlq", "replay", "--all", "--dry-run", "--config", str(jsonl_cfg)
        )
        assert code == 0, err
        code, out, err = await cli(
            capsys, "dlq", "replay", str(by_uid[uid(o20)].id), "--json", "--config", str(py_cfg)
        )
        assert code == 0, err
        assert [o["result"] for o in json.loads(out)] == ["delivered"]
        assert pysink.DELIVERED[-1] == ("other", uid(o20), o20["primaryKey"])
    finally:
        lease.release()

    # ... and works once nobody holds it.
    code, out, err = await cli(
        capsys, "dlq", "replay", "--all", "--json", "--config", str(jsonl_cfg)
    )
    assert code == 0, err
    assert {(o["unique_event_id"], o["result"]) for o in json.loads(out)} == {
        (uid(r10), "delivered"),
        (uid(r40), "delivered"),
    }
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sorted(lines, key=off) == [r10, r40]
    assert await dead_letters(state) == []
    assert {uid(r10), uid(r40)} <= processed_ids(state)
    assert uid(o20) in processed_ids(state, "other")
    assert holder(state) is None  # the replay's own lease is gone


async def test_show_escapes_what_came_from_the_wire(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """Every value ``dlq show`` prints came from the wire: a terminal escape in an event name
    or a malformed frame must not reach the operator's terminal, as text or as JSON."""
    hostile = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202e"
    event = {"eventName": f"CHECK{hostile}OUT", "primaryKey": f"k{hostile}", "name": "Müller"}
    frame = f"line one\nline two{hostile}"
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        await store.commit(
            CommitBatch(
                dead_letters=[
                    DeadLetter(
                        stream="main",
                        reason="sink_rejected",
                        error=f"rejected: {hostile}",
                        payload=json.dumps(event),
                        offset=f"7{hostile}",
                        unique_event_id=f"u{hostile}",
                        event_name=event["eventName"],
                        primary_key=event["primaryKey"],
                    ),
                    DeadLetter(stream="main", reason="malformed", error="bad", payload=frame),
                ]
            )
        )
    finally:
        await store.close()
    config = str(write_config(tmp_path, "http://127.0.0.1:9", sink=PYSINK))
    controls = ("\x1b", "\x07", "\x9b", "\u202e")

    code, out, err = await cli(capsys, "dlq", "show", "1", "--config", config)
    assert code == 0, err
    assert not any(c in out for c in controls), out
    lines = out.splitlines()
    assert any(
        line.split() == ["event_name", "CHECK\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202eOUT"]
        for line in lines
    )
    payload = "\n".join(lines[lines.index("payload:") + 1 :])
    # JSON's own escapes stay as they are; printable's \x9b is the one JSON does not know
    assert json.loads(payload.replace("\\x9b", "\\u009b")) == event
    assert "Müller" in payload  # readable: only what a terminal would act on is escaped

    code, out, err = await cli(capsys, "dlq", "show", "2", "--config", config)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[lines.index("payload:") + 1 :] == [
        "line one",
        "line two\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202e",
    ]

    for row_id, whole in (("1", event), ("2", frame)):
        code, out, err = await cli(capsys, "dlq", "show", row_id, "--json", "--config", config)
        assert code == 0, err
        assert out.isascii(), out  # \u escapes
        assert json.loads(out)["payload"] == whole  # and every value exactly as stored


async def test_deep_payloads_are_shown_as_text_and_skipped_by_a_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A payload nested deeper than Python's json goes (RecursionError, not ValueError) is
    shown as its text, and a replay skips it, saying why, and goes on with the others."""

    def event(n: int, detail: Any = ()) -> dict[str, Any]:
        meta = {"offset": str(n), "uniqueEventId": f"deep-{n}"}
        return {"metadata": meta, "eventName": "E", "primaryKey": f"k{n}", "detail": detail}

    # An event whose detail is 5,000 lists deep, as text (no encoder goes that deep).
    nested = json.dumps(event(1, "DEEP")).replace('"DEEP"', "[" * 5000 + "]" * 5000)
    letters = [
        DeadLetter(stream="main", reason="malformed", error="bad", payload="[" * 5000),
        DeadLetter(stream="main", reason="sink_rejected", error="no", payload=nested),
        DeadLetter(stream="main", reason="sink_rejected", error="no", payload=json.dumps(event(2))),
    ]
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        await store.commit(CommitBatch(dead_letters=letters))
    finally:
        await store.close()
    config = str(write_config(tmp_path, "http://127.0.0.1:9", sink=PYSINK))

    for row_id in ("1", "2"):
        for fmt in ((), ("--json",)):
            code, out, err = await cli(capsys, "dlq", "show", row_id, *fmt, "--config", config)
            assert code == 0, err
            assert "[[[[" in out  # the text as stored
    code, out, err = await cli(capsys, "dlq", "replay", "--all", "--json", "--config", config)
    assert code == 1, err  # not everything could be replayed
    results = {o["id"]: (o["result"], o["detail"]) for o in json.loads(out)}
    assert results[1][0] == results[2][0] == "skipped"
    assert "malformed" in results[1][1] and "not a whole event" in results[2][1]
    assert results[3] == ("delivered", "")
    assert pysink.DELIVERED == [("main", "deep-2", "k2")]


async def test_a_replay_into_a_new_jsonl_file_records_where_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    """A jsonl file the store has no position for: the replay records where it starts before
    its first write, as the daemon does. Else a crash between the write and the commit left
    lines no start could prove uncommitted, and the daemon refused to start."""
    event = {"metadata": {"offset": "5", "uniqueEventId": "r-1"}, "eventName": "E"}
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        letter = DeadLetter(
            stream="main",
            reason="sink_rejected",
            error="no",
            payload=json.dumps(event),
            offset="5",
            unique_event_id="r-1",
        )
        await store.commit(CommitBatch(dead_letters=[letter]))
    finally:
        await store.close()
    jsonl = tmp_path / "events.jsonl"
    config = write_config(tmp_path, "http://127.0.0.1:9", sink={"type": "jsonl", "path": jsonl})

    async def crash(self: SqliteStore, batch: CommitBatch, now: float | None = None) -> None:
        if batch.resolved:  # the replay's commit, after the line was written and synced
            raise StoreError("disk I/O error (injected)")
        await committed(self, batch, now)

    committed = SqliteStore.commit
    monkeypatch.setattr(SqliteStore, "commit", crash)
    code, _, err = await cli(capsys, "dlq", "replay", "--all", "--config", str(config))
    assert code != 0 and "injected" in err
    assert count_lines(jsonl) == 1  # written, never committed: what a crash there leaves
    monkeypatch.undo()

    daemon = await Daemon.create(load_settings(config))  # refused the file before
    await daemon.close()
    assert count_lines(jsonl) == 0  # the uncommitted line cut back; the DLQ still has it
    assert [r.unique_event_id for r in await dead_letters(tmp_path / "state.db")] == ["r-1"]
