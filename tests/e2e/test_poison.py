"""Issue #9, items 1-11: inputs and operator actions that used to stop a stream for good or
destroy data, each end to end against the sandbox, a real SQLite file and a real jsonl file.

Each test names its item. Every one of them failed on the code before the fix (the daemon
exited 70, cut the file, checkpointed an offset no subscription accepts, or hung).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import (
    checkpoint,
    count_lines,
    dead_letter_rows,
    make_settings,
    running,
    sink_ids,
    sink_length,
    spawn_daemon,
    toml_config,
    truth_ids,
    wait_exit,
    wait_until,
)

from consumer.core.evidence import PAYLOAD_LIMIT
from consumer.errors import StoreError
from consumer.runtime.daemon import Daemon
from consumer.state import SqliteStore as Store


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def raw_event(offset: str, uid: str, **fields: Any) -> str:
    ev = {"metadata": {"offset": offset, "uniqueEventId": uid}, "eventName": "X", **fields}
    return json.dumps(ev)


def run_cli(*args: str) -> tuple[int, str]:
    """The CLI as a process: its exit status and what it printed on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "consumer", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stderr


async def test_item1_a_jsonl_file_unknown_to_the_store_is_never_cut(sandbox_factory, tmp_path):
    """Item 1: a fresh state store beside an existing events.jsonl used to truncate it to zero.
    Now the start is refused (78) naming both paths; `sink adopt` records the file as committed
    and the daemon appends after it."""
    gw = await sandbox_factory(backlog=50)
    sink = tmp_path / "events.jsonl"
    old = b'{"kept": 1}\n{"kept": 2}\n'
    sink.write_bytes(old)
    config = toml_config(tmp_path, gw.url)
    code, err = await asyncio.to_thread(run_cli, "run", "--config", str(config))
    assert code == 78, err
    assert str(sink) in err and str(tmp_path / "state.db") in err and "sink adopt" in err
    assert "Traceback" not in err
    assert sink.read_bytes() == old
    # The plan changes nothing; --execute adopts.
    code, _ = await asyncio.to_thread(run_cli, "sink", "adopt", "--config", str(config))
    assert code == 0 and sink.read_bytes() == old
    code, err = await asyncio.to_thread(
        run_cli, "sink", "adopt", "--config", str(config), "--execute"
    )
    assert code == 0, err
    settings = make_settings(tmp_path, gw.url)
    async with running(settings):
        await wait_until(lambda: count_lines(sink) >= 52)
    data = sink.read_bytes()
    assert data.startswith(old)
    assert Counter(sink_ids_after(sink, 2)) == Counter(truth_ids(gw.events("DEMO")))


def sink_ids_after(path: Path, skip: int) -> list[str]:
    lines = path.read_text().splitlines()[skip:]
    return [json.loads(line)["metadata"]["uniqueEventId"] for line in lines]


async def test_item1_the_starting_length_is_committed_before_the_first_write(
    sandbox_factory, tmp_path
):
    """Item 1 (found by the deflaking work): a kill between the very first sync and the first
    commit left a file the store had no length for, which the next start then refused. The
    store now records where the sink starts before anything is written."""
    gw = await sandbox_factory(backlog=5)
    daemon = await Daemon.create(make_settings(tmp_path, gw.url))
    try:
        with sqlite3.connect(tmp_path / "state.db") as db:
            row = db.execute("SELECT state FROM sink_state WHERE sink = 'jsonl'").fetchone()
        assert row is not None and sink_length(row[0]) == 0
    finally:
        await daemon.close()


async def test_item1_deleting_the_file_while_running_stops_instead_of_writing_into_it(
    sandbox_factory, tmp_path
):
    """Item 1: a jsonl file removed while the daemon runs used to swallow every later line
    (written into the deleted inode). Now the daemon stops (78) saying so, and a restart
    replays what was not committed into the new file."""
    gw = await sandbox_factory(backlog=100)
    sink = tmp_path / "events.jsonl"
    async with running(make_settings(tmp_path, gw.url)) as daemon:
        await wait_until(lambda: count_lines(sink) >= 100)
        sink.unlink()
        gw.append("DEMO", 20)
        await wait_until(daemon._stop.is_set, timeout=30)
    assert daemon.exit_code == 78
    # The store refuses nothing now: the file is gone, so nothing is cut; the rest is replayed.
    async with running(make_settings(tmp_path, gw.url)):
        await wait_until(lambda: count_lines(sink) >= 20)
    assert set(sink_ids(sink)) == set(truth_ids(gw.events("DEMO")[100:]))


@pytest.mark.parametrize("sink_type", ["jsonl", "sqlite"])
async def test_item2_an_event_no_sink_can_serialize_is_dead_lettered(
    sandbox_factory, tmp_path, sink_type
):
    """Item 2: `detail` nested 300 deep parses (orjson reads 1024 levels) but cannot be written
    (it writes 254): the worker died and the daemon exited 70 at every start. Now the event is
    dead-lettered with its id and the stream goes on."""
    gw = await sandbox_factory(backlog=30)
    deep = raw_event("7", "deep-1", primaryKey="pk-deep")[:-1] + ',"detail":' + nested(300) + "}"
    gw.inject_event("DEMO", deep)
    gw.append("DEMO", 30)
    sink_cfg = None if sink_type == "jsonl" else {"type": "sqlite"}
    settings = make_settings(tmp_path, gw.url, sink=sink_cfg)
    state = tmp_path / "state.db"

    def delivered() -> int:
        if sink_type == "jsonl":
            return count_lines(tmp_path / "events.jsonl")
        with sqlite3.connect(state, timeout=10) as db:
            return int(db.execute("SELECT COUNT(*) FROM opera_events").fetchone()[0])

    async with running(settings) as daemon:
        await wait_until(lambda: delivered() >= 60 and len(dead_letter_rows(state)) == 1)
        assert not daemon._stop.is_set()
    assert daemon.exit_code == 0
    (letter,) = dead_letter_rows(state)
    assert letter["unique_event_id"] == "deep-1"
    # The sink refused it (as the webhook does), whichever sink: a row that cannot be built
    assert letter["reason"] == "sink_rejected"
    assert "Recursion" in letter["error"] or "recursion" in letter["error"]
    assert letter["payload"].count("[") >= 300  # the frame as received: nothing lost


async def test_item3_a_deeply_nested_error_frame_does_not_kill_the_daemon(
    sandbox_factory, tmp_path
):
    """Item 3: `str(detail)` of an `error` payload 1,000 levels deep raised RecursionError in
    the reader. Errors for another subscription are now ignored (counted) and never shown
    whole."""
    gw = await sandbox_factory(backlog=20)
    gw.inject_malformed("DEMO", '{"type":"error","id":"another","payload":' + nested(1000) + "}")
    gw.append("DEMO", 20)
    async with running(make_settings(tmp_path, gw.url)) as daemon:
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 40)
        runner = daemon.runners["main"]
        assert runner.stats.ignored == 1 and runner.stats.connections == 1
    assert daemon.exit_code == 0


async def test_item4_a_bad_offset_is_dead_lettered_never_checkpointed(sandbox_factory, tmp_path):
    """Item 4: an event with offset "abc" or 21 digits was delivered and checkpointed, then
    every subscribe raised InvalidInput (exit 70). Now it is a malformed dead letter, the
    checkpoint stays on valid offsets, and a restart resumes."""
    gw = await sandbox_factory(backlog=10)
    gw.inject_event("DEMO", raw_event("abc", "bad-offset-1"))
    gw.inject_event("DEMO", raw_event("1" * 21, "bad-offset-2"))
    gw.inject_event("DEMO", raw_event("١٢٣", "bad-offset-3"))  # Unicode digits
    state = tmp_path / "state.db"
    settings = make_settings(tmp_path, gw.url)
    async with running(settings):
        await wait_until(lambda: len(dead_letter_rows(state)) == 3)
        await wait_until(lambda: checkpoint(state) is not None and checkpoint(state)[0].isdigit())
    reasons = {(d["reason"], "1-20 digits" in d["error"]) for d in dead_letter_rows(state)}
    assert reasons == {("malformed", True)}
    cp = checkpoint(state)
    assert cp is not None and cp[0] == gw.events("DEMO")[-1]["metadata"]["offset"]
    gw.append("DEMO", 10)
    async with running(settings) as daemon:
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 20)
    assert daemon.exit_code == 0
    assert Counter(sink_ids(tmp_path / "events.jsonl")) == Counter(truth_ids(gw.events("DEMO")))


async def test_item4_an_invalid_stored_checkpoint_exits_78_naming_offset_set(
    sandbox_factory, tmp_path
):
    """Item 4: a checkpoint no subscription accepts is refused before connecting."""
    gw = await sandbox_factory(backlog=5)
    config = toml_config(tmp_path, gw.url)
    store = await Store.open(tmp_path / "state.db")
    await store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute(
            "INSERT INTO checkpoints (stream, offset, unique_event_id, updated_at) "
            "VALUES ('main', 'abc', 'u', 0)"
        )
    code, err = await asyncio.to_thread(run_cli, "run", "--config", str(config))
    assert code == 78, err
    assert "offset set main" in err and "Traceback" not in err
    assert gw.stats.connections == 0  # refused before connecting


async def test_item6_an_oversized_malformed_frame_is_stored_bounded(sandbox_factory, tmp_path):
    """Item 6: the DLQ kept whole frames (450 of 4 MiB: a 1.9 GB database). It now keeps a
    bounded prefix, with the size and SHA-256 of the whole frame."""
    gw = await sandbox_factory(backlog=5)
    frame = '{"type":"nope","pad":"' + "x" * (1024 * 1024) + '"}'
    gw.inject_malformed("DEMO", frame)
    gw.append("DEMO", 5)
    state = tmp_path / "state.db"
    settings = make_settings(tmp_path, gw.url, connection={"max_frame_bytes": 4 * 1024 * 1024})
    async with running(settings):
        await wait_until(lambda: len(dead_letter_rows(state)) == 1)
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 10)
    (letter,) = dead_letter_rows(state)
    assert len(letter["payload"]) == PAYLOAD_LIMIT
    assert letter["payload_size"] == len(frame.encode())
    assert letter["payload_sha256"] == hashlib.sha256(frame.encode()).hexdigest()


async def test_item9_storage_failures_are_one_line_with_the_path_and_the_fix(
    sandbox_factory, tmp_path
):
    """Item 9: a corrupt store, a path that is a directory, a schema newer than the code and an
    unwritable directory were tracebacks with exit 1. Each is now one line naming the path and
    the fix, with exit 78, for `run` and for `status`."""
    gw = await sandbox_factory(backlog=1)
    cases: dict[str, Path] = {}
    corrupt = tmp_path / "corrupt" / "state.db"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"this is not a database" * 100)
    cases["corrupt"] = corrupt
    directory = tmp_path / "dir" / "state.db"
    directory.mkdir(parents=True)
    cases["directory"] = directory
    newer = tmp_path / "newer" / "state.db"
    newer.parent.mkdir()
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    cases["newer"] = newer
    for name, path in cases.items():
        config = toml_config(tmp_path / "corrupt", gw.url).read_text()
        config = config.replace(str(tmp_path / "corrupt" / "state.db"), str(path))
        cfg = path.parent / f"{name}.toml"
        cfg.write_text(config)
        for command in ("run", "status"):
            code, err = await asyncio.to_thread(run_cli, command, "--config", str(cfg))
            assert code == 78, (name, command, err)
            assert "Traceback" not in err
            if name == "directory":  # refused with the configuration now, key and fix named
                assert "state.path: names an existing directory" in err, (command, err)
                continue
            # One line of ours (the config asks for debug logs: those are JSON lines).
            lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("{")]
            assert len(lines) == 1 and str(path) in lines[0], (name, command, err)
    code, err = await asyncio.to_thread(
        run_cli, "status", "--config", str(newer.parent / "newer.toml")
    )
    assert "newer opera-consumer" in err and "upgrade opera-consumer" in err


async def test_item9_a_read_only_directory_names_the_fix(sandbox_factory, tmp_path):
    """Item 9: a state directory the daemon cannot write (here immutable, which holds for root
    too): one line naming the path and the fix, exit 78."""
    gw = await sandbox_factory(backlog=1)
    locked = tmp_path / "locked"
    locked.mkdir()
    config = toml_config(locked, gw.url)
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    made = await asyncio.to_thread(
        subprocess.run, ["chattr", "+i", str(locked)], check=False, capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot make a directory immutable here: {made.stderr.decode().strip()}")
    try:
        code, err = await asyncio.to_thread(run_cli, "run", "--config", str(config))
    finally:
        await asyncio.to_thread(subprocess.run, ["chattr", "-i", str(locked)], check=False)
    assert code == 78, err
    assert str(locked / "state.db") in err and "writable" in err
    assert "Traceback" not in err


async def test_item9_readyz_is_503_while_commits_fail_and_a_failed_final_commit_exits_1(
    sandbox_factory, tmp_path, monkeypatch
):
    """Item 9: commits failing (a disk that keeps answering I/O errors) left /readyz ready and
    the exit status 0. Now readiness says so, and the exit status is 1 when the last commit
    could not be made."""
    gw = await sandbox_factory(backlog=20)
    settings = make_settings(tmp_path, gw.url)
    real_commit = Store._commit
    broken = {"on": False}

    async def commit(self: Store, batch: Any, now: float) -> None:
        if broken["on"]:  # as SQLite says it when the disk fails under it
            raise sqlite3.OperationalError("disk I/O error")
        await real_commit(self, batch, now)

    monkeypatch.setattr(Store, "_commit", commit)
    async with running(settings) as daemon:
        assert daemon.metrics_server is not None
        url = f"http://127.0.0.1:{daemon.metrics_server.port}/readyz"
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 20)
        async with httpx.AsyncClient() as http:
            await wait_until_async(lambda: ready(http, url), True)
            broken["on"] = True
            gw.append("DEMO", 5)
            await wait_until_async(lambda: ready(http, url), False)
            body = (await http.get(url)).json()
            assert body["commits"]["ok"] is False and body["commits"]["failures"] >= 1
    assert daemon.exit_code == 1


async def ready(http: httpx.AsyncClient, url: str) -> bool:
    return (await http.get(url)).status_code == 200


async def wait_until_async(probe: Any, want: bool, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while await probe() is not want:
            await asyncio.sleep(0.05)


async def test_item10_sessions_that_deliver_do_not_grow_the_backoff(sandbox_factory, tmp_path):
    """Item 10: with a drop every 100 events and a 4500 close every 150, the waits grew to
    the backoff ceiling although every session delivered. Now each productive session resets
    the failure count (the 1006 floor stays)."""
    gw = await sandbox_factory(backlog=1500, chaos_seed=3, drop_every=100, close_every=150)
    settings = make_settings(
        tmp_path,
        gw.url,
        connection={"backoff_initial_s": 0.05, "backoff_max_s": 30.0, "abnormal_min_s": 0.05},
    )
    async with running(settings) as daemon:
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 1500, timeout=90)
        runner = daemon.runners["main"]
        assert runner.stats.connections >= 10
        assert runner.policy.failures <= 2
    assert Counter(sink_ids(tmp_path / "events.jsonl")) == Counter(truth_ids(gw.events("DEMO")))


async def test_item11_a_complete_for_another_id_does_not_end_the_session(sandbox_factory, tmp_path):
    """Item 11: a `complete` for another subscription id ended ours; a `next` for an unknown
    id vanished without a trace. Both are now ignored and counted."""
    gw = await sandbox_factory(backlog=10)
    gw.inject_malformed("DEMO", '{"type":"complete","id":"not-ours"}')
    gw.inject_malformed(
        "DEMO",
        '{"type":"next","id":"not-ours","payload":{"data":{"newEvent":'
        + raw_event("1", "foreign")
        + "}}}",
    )
    gw.append("DEMO", 10)
    async with running(make_settings(tmp_path, gw.url)) as daemon:
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 20)
        runner = daemon.runners["main"]
        assert runner.stats.ignored == 2 and runner.stats.connections == 1
        assert daemon.metrics_server is not None
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{daemon.metrics_server.port}/metrics")).text
        assert 'opera_consumer_frames_ignored_total{stream="main"} 2.0' in text
    assert "foreign" not in sink_ids(tmp_path / "events.jsonl")


async def test_item11_sighup_drains_and_exits_1_so_systemd_restarts(sandbox_factory, tmp_path):
    """Item 11: SIGHUP killed the daemon undrained with 129, which systemd treats as clean."""
    gw = await sandbox_factory(backlog=200)
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(toml_config(tmp_path, gw.url), log)
    try:
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 200, timeout=60)
        proc.send_signal(signal.SIGHUP)
        assert await wait_exit(proc) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "signal received: draining" in text and "SIGHUP" in text
    last = gw.events("DEMO")[-1]["metadata"]
    assert checkpoint(tmp_path / "state.db") == (last["offset"], last["uniqueEventId"])
    assert gw.stats.completes_received == 1


async def test_item11_a_separate_sqlite_sink_file_is_private(sandbox_factory, tmp_path):
    """Item 11: the sqlite sink's own file was created 0644 (event data readable by all)."""
    gw = await sandbox_factory(backlog=5)
    path = tmp_path / "events.db"
    settings = make_settings(tmp_path, gw.url, sink={"type": "sqlite", "path": path})
    async with running(settings):
        await wait_until(path.exists)
    assert path.stat().st_mode & 0o077 == 0


async def test_a_failing_anchor_is_waited_for_not_resubscribed_past(
    sandbox_factory, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    """A new stream's first event is its checkpoint. When the store fails to take it (a full
    disk), the stream used to reconnect without an offset, from the gateway's position: after
    everything already sent, so the backlog was lost. It now waits with the read held."""
    gw = await sandbox_factory(backlog=30)
    failures = [StoreError("database or disk is full", retriable=True)] * 2
    real = Store.anchor

    async def failing(self: Store, *args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        await real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "anchor", failing)
    async with running(make_settings(tmp_path, gw.url)):
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 30)
    assert failures == []
    assert len(gw.stats.subscribes) == 1  # one session: never subscribed again past the backlog
    assert Counter(sink_ids(tmp_path / "events.jsonl")) == Counter(truth_ids(gw.events("DEMO")))
