"""`dlq replay` when something goes wrong part-way: a letter the sink cannot write, a letter
of a stream no longer configured, a replay interrupted. Each is that row's outcome, the rows
after it go on, and what was delivered is recorded (left in the DLQ and not recorded, the next
replay would deliver it again)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import orjson
import pysink
import pytest
from operator_support import PYSINK, cli, write_config
from support import dead_letter, replayed, wait_until

from consumer.commands import dlq
from consumer.config import load_settings
from consumer.core.records import CommitBatch, DeadLetter
from consumer.errors import ReplayRefused, StoreError
from consumer.state import open_store
from consumer.state.sqlite import SqliteStore

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging", "hermetic_config")


async def seed(config: Path, letters: list[DeadLetter]) -> None:
    store = await open_store(load_settings(config).state)
    try:
        await store.commit(CommitBatch(dead_letters=letters))
    finally:
        await store.close()


async def left_and_seen(config: Path, stream: str, ids: list[str]) -> tuple[list[str], set[str]]:
    store = await open_store(load_settings(config).state)
    try:
        left = [str(r.unique_event_id) for r in await store.dead_letters()]
        return left, await store.seen(stream, ids)
    finally:
        await store.close()


@pytest.mark.parametrize("own_file", [False, True], ids=["state-file", "own-file"])
async def test_a_letter_with_a_number_no_sink_can_store_is_skipped_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], own_file: bool
) -> None:
    """An integer past 64 bits is valid JSON, but no row can hold it (it ended the whole
    replay with exit 70 once, then failed in the sink): the replay reads a letter as the
    daemon reads a frame, which refuses it, so it is skipped with the reason, and the next is
    delivered."""
    sink: dict[str, Any] = {"type": "sqlite"}
    if own_file:
        sink["path"] = str(tmp_path / "events.db")
    config = write_config(tmp_path, "http://127.0.0.1:9", sink=sink)
    await seed(config, [dead_letter(1, detail=[{"newValue": 2**100}]), dead_letter(2)])
    code, out, err = await cli(capsys, "dlq", "replay", "--all", "--json", "--config", str(config))
    assert code == 1, err
    results = [(o["unique_event_id"], o["result"]) for o in json.loads(out)]
    assert results == [("uid-1", "skipped"), ("uid-2", "delivered")]
    assert "no double holds it" in json.loads(out)[0]["detail"]
    assert await left_and_seen(config, "main", ["uid-2"]) == (["uid-1"], {"uid-2"})


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1e-400", "123456789012345678901"])
async def test_a_replay_never_rewrites_a_number_into_another_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], number: str
) -> None:
    """Python's json read 1e400 as inf and 1e-400 as 0.0, and the jsonl sink wrote them as
    null and 0.0: a value the event never had, delivered. Now the letter stays, with why."""
    config = write_config(tmp_path, "http://127.0.0.1:9", sink={"type": "jsonl"})
    good = dead_letter(1)
    payload = good.payload.replace('"detail": []', f'"detail": [{{"newValue": {number}}}]')
    assert payload != good.payload
    await seed(config, [dataclasses.replace(good, payload=payload), dead_letter(2)])
    code, out, err = await cli(capsys, "dlq", "replay", "--all", "--json", "--config", str(config))
    assert code == 1, err
    results = [(o["unique_event_id"], o["result"]) for o in json.loads(out)]
    assert results == [("uid-1", "skipped"), ("uid-2", "delivered")]
    lines = [orjson.loads(x) for x in (tmp_path / "events.jsonl").read_bytes().splitlines()]
    assert [x["metadata"]["uniqueEventId"] for x in lines] == ["uid-2"]


async def test_a_replayed_event_is_written_as_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The jsonl line of a replayed letter is its payload as the daemon received it (as the
    daemon writes a line), not a rewrite of it: escapes, key order and spacing kept."""
    config = write_config(tmp_path, "http://127.0.0.1:9", sink={"type": "jsonl"})
    payload = (
        '{"metadata":{"offset":"101","uniqueEventId":"uid-1"},"eventName":"E",'
        '"primaryKey":"pk-1","detail":[{"newValue":"\\u00d6 and \\u00e9","oldValue":null}]}'
    )
    await seed(config, [dataclasses.replace(dead_letter(1), payload=payload)])
    code, _, err = await cli(capsys, "dlq", "replay", "--all", "--json", "--config", str(config))
    assert code == 0, err
    assert (tmp_path / "events.jsonl").read_text().splitlines() == [payload]


async def test_a_letter_of_a_stream_no_longer_configured_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With orchestration, the sink looks the stream's settings up: a KeyError escaped the
    replay (exit 70), and the row it had delivered stayed in the DLQ, unrecorded."""
    config = write_config(tmp_path, "http://127.0.0.1:9", sink=PYSINK)
    with config.open("a") as f:
        f.write(
            "[orchestration]\nenabled = true\n[orchestration.resources]\n"
            '"CHECK IN" = "https://127.0.0.1:9/rsv/{primaryKey}"\n'
        )
    await seed(
        config, [dead_letter(1), dead_letter(2, stream="gone", name="CHECK IN"), dead_letter(3)]
    )
    code, out, err = await cli(capsys, "dlq", "replay", "--all", "--json", "--config", str(config))
    assert code == 1, err
    outcomes = json.loads(out)
    assert [(o["unique_event_id"], o["result"]) for o in outcomes] == [
        ("uid-1", "delivered"),
        ("uid-2", "skipped"),
        ("uid-3", "delivered"),
    ]
    assert "not in the configuration" in outcomes[1]["detail"]
    assert pysink.delivered_ids() == ["uid-1", "uid-3"]
    assert await left_and_seen(config, "main", ["uid-1", "uid-3"]) == (
        ["uid-2"],
        {"uid-1", "uid-3"},
    )


async def test_the_plan_of_a_letter_of_a_stream_no_longer_configured_is_the_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run said "would deliver" (exit 0) of a letter of a stream no longer configured,
    and of its key's later letters, where the replay skips them and exits 1 (found by a
    review)."""
    config = write_config(tmp_path, "http://127.0.0.1:9", sink=PYSINK)
    await seed(config, [dead_letter(1, stream="gone"), dead_letter(2, stream="gone")])
    args = ["dlq", "replay", "--all", "--json", "--config", str(config)]
    plan_code, plan, _ = await cli(capsys, *args, "--dry-run")
    run_code, run, _ = await cli(capsys, *args)
    outcomes = [(o["unique_event_id"], o["result"]) for o in json.loads(plan)]
    assert outcomes == [("uid-1", "skipped"), ("uid-2", "skipped")]
    assert outcomes == [(o["unique_event_id"], o["result"]) for o in json.loads(run)]
    assert plan_code == run_code == 1
    assert pysink.delivered_ids() == []


async def test_an_interrupted_replay_records_what_it_delivered(tmp_path: Path) -> None:
    """^C (the task cancelled) while a row's write hangs: the rows before it are recorded."""
    config = write_config(
        tmp_path, "http://127.0.0.1:9", sink=PYSINK, streams={"main": "DEMO", "b": "B"}
    )
    await seed(config, [dead_letter(1), dead_letter(2, stream="b")])
    settings = load_settings(config)
    pysink.GATES["b"] = asyncio.Event()  # never set: the second row's write hangs
    task = asyncio.create_task(replayed(settings))
    await wait_until(lambda: pysink.CALLS[0] >= 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pysink.delivered_ids() == ["uid-1"]
    assert await left_and_seen(config, "main", ["uid-1"]) == (["uid-2"], {"uid-1"})


@pytest.mark.parametrize("text", ['{"offset":1e400}', '{"x":NaN}', "[Infinity]"])
async def test_show_json_of_a_frame_no_parser_should_read_is_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    """The daemon's parser refused these (malformed); Python's json reads them, and wrote
    Infinity or NaN back out: not JSON. Shown as the text received."""
    config = write_config(tmp_path, "http://127.0.0.1:9", sink=PYSINK)
    await seed(config, [DeadLetter(stream="main", reason="malformed", error="no", payload=text)])
    code, out, err = await cli(capsys, "dlq", "show", "1", "--json", "--config", str(config))
    assert code == 0, err
    assert orjson.loads(out)["payload"] == text


async def test_a_replay_stops_once_the_sink_looks_down(tmp_path: Path) -> None:
    """Every attempt fails transiently (the sink is down): after three rows in a row, each
    tried its three times, the replay stops, saying so, and the rest stays in the DLQ. Before,
    it tried every row of the queue (with a Retry-After of 300 s, ten minutes a resource)."""
    config = write_config(tmp_path, "http://127.0.0.1:9", sink=PYSINK)
    await seed(config, [dead_letter(i) for i in range(1, 7)])
    pysink.TRANSIENT[0] = 1000
    outcomes: list[Any] = []
    with pytest.raises(ReplayRefused, match="failed transiently for 3 rows in a row") as info:
        await dlq.replay(
            load_settings(config), dlq.Selection(), dry_run=False, on_outcome=outcomes.append
        )
    assert "it looks down" in str(info.value) and "test sink busy" in str(info.value)
    assert [o.result for o in outcomes] == ["failed"] * 3
    assert pysink.CALLS[0] == 9  # three rows, three attempts each; no fourth row tried
    left, _ = await left_and_seen(config, "main", [])
    assert left == [f"uid-{i}" for i in range(1, 7)]


async def test_a_failed_commit_sent_again_at_the_end_is_reported_as_it_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sink whose rows the commit delivers (sqlite in the state file): the commit after 100
    rows fails (a locked database, once); the replay stops, and its last commit sends that
    batch again, which goes through: the 100 rows are reported delivered, and are gone from
    the DLQ. Before, they were reported as staying in it."""
    config = write_config(tmp_path, "http://127.0.0.1:9", sink={"type": "sqlite"})
    await seed(config, [dead_letter(i) for i in range(1, 103)])
    real_commit = SqliteStore.commit
    failures = [StoreError("database is locked", retriable=True)]

    async def flaky(self: SqliteStore, batch: CommitBatch, now: float | None = None) -> None:
        if failures:
            raise failures.pop()
        await real_commit(self, batch, now)

    monkeypatch.setattr(SqliteStore, "commit", flaky)
    outcomes: list[Any] = []
    with pytest.raises(StoreError, match="database is locked"):
        await dlq.replay(
            load_settings(config), dlq.Selection(), dry_run=False, on_outcome=outcomes.append
        )
    assert [(o.result, o.detail) for o in outcomes] == [("delivered", "")] * 100
    left, _ = await left_and_seen(config, "main", [])
    assert left == ["uid-101", "uid-102"]
