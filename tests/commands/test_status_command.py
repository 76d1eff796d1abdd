"""``opera-consumer status`` and the progress lines on a live catch-up (issue #13): the daemon
as a process against the sandbox (live timestamps: its backlog ends at its start, so the lag
is true), a webhook sink on a real HTTP receiver that answers slowly while the test looks
(a catch-up that lasts as long as the test needs), then at once; ``status`` and ``status
--watch`` as processes.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from receiver import Receiver, Reply
from support import (
    committed,
    log_records,
    newest_offset,
    spawn_daemon,
    tail,
    toml_config,
    wait_exit,
    wait_until,
)

from consumer.commands.status import COLUMNS, _commit_fields, commits_failing, duration, eta_text
from consumer.core.events import event_time
from consumer.runtime.metrics import LIVE_BODY_BYTES, live_status
from consumer.sandbox import launcher
from consumer.state import SqliteStore

BACKLOG = 8000  # 1.5 s apart in event time: 3 h 20 min of backlog
SLOW = Reply(delay_s=0.1)  # per POST of 20 events, 2 workers: at most 400 events/s


def status(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consumer", "status", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def status_json(config: Path) -> dict[str, Any]:
    proc = await asyncio.to_thread(status, config, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["stream"] for r in rows] == ["main"]
    return dict(rows[0])


def catching_up(log: Path) -> list[dict[str, Any]]:
    return [r for r in log_records(log, "progress") if r["phase"] == "catching up"]


def tables(text: str) -> list[list[str]]:
    """A non-terminal watch's output: tables separated by a blank line."""
    return [block.splitlines() for block in text.split("\n\n") if block.strip()]


def iso_seconds(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def receiver() -> Any:
    with Receiver(lambda request: SLOW) as rx:
        yield rx


async def test_status_and_progress_lines_on_a_live_catch_up(
    sandbox_factory: Any, receiver: Receiver, tmp_path: Path
) -> None:
    started = time.time()
    gw = await sandbox_factory(backlog=BACKLOG)  # live timestamps: the default
    newest = newest_offset(gw)
    port = launcher.free_port()
    config = toml_config(
        tmp_path,
        gw.url,
        # in [log]: a line every 0.3 s while more than 10 min behind
        "progress_interval_s = 0.3\nprogress_caught_up_s = 600\n"
        "[pipeline]\nworkers = 2\nbatch_max = 20\n",
        sink=f'[sink]\ntype = "webhook"\nurl = "{receiver.url}"\nbatch_size = 20',
    )
    config.write_text(
        config.read_text().replace("[metrics]\nport = 0", f"[metrics]\nport = {port}")
    )
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(config, log)
    try:
        # --- while catching up (the receiver slow): progress lines...
        await wait_until(lambda: len(catching_up(log)) >= 2 or proc.poll() is not None)
        assert proc.poll() is None, tail(log)
        line = catching_up(log)[-1]
        assert line["stream"] == "main" and line["events_per_s"] > 0 and line["waiting"] >= 0
        assert line["lag_s"] > 600 and line["speed"] > 1
        # the estimate: the lag over the rate at which it shrinks (rounded figures)
        assert line["eta_s"] == pytest.approx(line["lag_s"] / (line["speed"] - 1), rel=0.02)

        # ...`status` with both times under their own names, the event-time lag and an ETA,
        # and `status --watch` (run at once: each `status` of a running daemon takes a second
        # between its two scrapes, and the receiver holds the catch-up for 20 s)...
        row, watch = await asyncio.gather(
            status_json(config),
            asyncio.to_thread(status, config, "--watch", "--interval", "0.2", "--count", "3"),
        )
        assert (row["state"], row["progress"]) == ("streaming", "catching up"), row
        assert row["events_per_s"] > 0 and row["lag_s"] > 600 and row["eta_s"] > 0
        assert row["eta_s"] < row["lag_s"]  # the lag shrinks faster than the clock runs
        # event time: a backlog event's, older than the commit that wrote it
        assert iso_seconds(started - BACKLOG * 1.5) <= row["event_at"] < row["checkpoint_at"]
        assert row["checkpoint_at"] >= iso_seconds(started)

        # ...and `status --watch` (not a terminal): one table a refresh, a blank line between
        assert watch.returncode == 0, watch.stderr
        shown = tables(watch.stdout)
        assert len(shown) == 3, watch.stdout
        for table in shown:
            assert table[0].split() == list(COLUMNS)
            assert len(table) == 2 and table[1].split()[:2] == ["main", "streaming"]

        # --- the receiver at full speed: the backlog goes, and a "caught up" line says so
        receiver.responder = None
        await wait_until(lambda: committed(tmp_path / "state.db", newest), timeout=120)
        await wait_until(lambda: bool(log_records(log, "caught up")))
        done = log_records(log, "caught up")[0]
        assert done["stream"] == "main" and done["lag_s"] <= 600
        # only while behind: more than 600 s (or no event done yet, with events waiting)
        for r in log_records(log, "progress"):
            assert r["lag_s"] > 600 if r["lag_s"] is not None else r["waiting"] > 0, r
        row = await status_json(config)
        assert (row["offset"], row["processed"]) == (newest, BACKLOG)
        assert row["progress"] in ("live", "idle") and row["eta_s"] == 0.0
        # the checkpoint's event time is the newest event's own timestamp (the backlog's end)
        stamp = event_time(gw.events("DEMO")[-1]["timestamp"], ZoneInfo("UTC"))
        assert stamp is not None and row["event_at"] == iso_seconds(stamp)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0, tail(log)
    finally:
        proc.kill()

    # --- not running: the checkpoint's times and its event-time lag; no rate, no ETA
    before = time.time()
    row, table_run = await asyncio.gather(status_json(config), asyncio.to_thread(status, config))
    assert (row["state"], row["events_per_s"], row["eta_s"], row["progress"]) == (
        "not running",
        None,
        None,
        None,
    )
    assert before - stamp - 0.1 <= row["lag_s"] <= time.time() - stamp + 0.1  # now - event
    table = table_run.stdout.splitlines()
    assert table[0].split() == list(COLUMNS)
    assert table[1].split()[-1] == "-"  # no ETA


async def test_a_watch_ends_on_ctrl_c_with_status_0(tmp_path: Path) -> None:
    """Without --count, until SIGINT (Ctrl-C); here with no daemon running."""
    config = toml_config(tmp_path, "http://127.0.0.1:9")
    await (await SqliteStore.open(tmp_path / "state.db")).close()  # as a daemon left it
    out = tmp_path / "watch.out"
    watch = launcher.spawn(["status", "--config", str(config), "--watch", "--interval", "0.1"], out)
    try:
        await wait_until(lambda: len(tables(out.read_text())) >= 2 or watch.poll() is not None)
        assert watch.poll() is None, out.read_text()
        watch.send_signal(signal.SIGINT)
        assert await wait_exit(watch) == 0, out.read_text()
    finally:
        watch.kill()
    assert "Traceback" not in out.read_text()
    assert re.match(r"main +not.running +", tables(out.read_text())[0][1])


def test_watch_arguments_are_checked(tmp_path: Path) -> None:
    for bad in (["--interval", "0"], ["--interval", "nan"], ["--count", "0"]):
        proc = status(tmp_path / "none.toml", "--watch", *bad)
        assert proc.returncode == 2 and "status" in proc.stderr, bad


def test_lag_and_eta_in_words() -> None:
    assert [duration(s) for s in (0.42, 12.4, 185.0, 7620.0, 675 * 86400.0 + 3 * 3600.0)] == [
        "0.4s",
        "12s",
        "3m05s",
        "2h07m",
        "675d03h",
    ]
    assert duration(None) is None
    row = {"progress": "catching up", "eta_s": 65.0}
    assert eta_text(row) == "1m05s"
    assert eta_text({**row, "progress": "behind", "eta_s": None}) == "unknown"
    assert eta_text({**row, "progress": "live", "eta_s": 0.0}) == "caught up"
    assert eta_text({**row, "progress": "idle", "eta_s": 0.0}) == "idle"
    assert eta_text({**row, "progress": None, "eta_s": None}) is None


@pytest.mark.parametrize(
    ("readyz", "metrics"),
    [
        (b"not json", b""),
        (b"[1, 2]", b""),
        (b'{"streams": [1]}', b""),
        (b'{"streams": {"main": "streaming"}}', b""),
        (b'{"streams": {"main": {"state": "streaming"}}}', b"opera_consumer_lag_seconds{"),
        # nested beyond any parser's depth (json's recursion used to escape the except)
        (b'{"streams": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""),
        (b'{"streams": {"main": {"state": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}}", b""),
        # well formed, but longer than any daemon's answer: not read to its end
        (b'{"streams": {}}' + b" " * LIVE_BODY_BYTES, b""),
        (b'{"streams": {}}', b"#" * (LIVE_BODY_BYTES + 1)),
    ],
)
async def test_a_listener_that_answers_garbage_is_not_a_running_daemon(
    readyz: bytes, metrics: bytes
) -> None:
    """What answers on the metrics port is a peer like any other: no traceback, no figures."""

    def answer(request: Any) -> Reply:
        return Reply(body=readyz if request.path == "/readyz" else metrics)

    with Receiver(answer) as rx:
        assert await live_status("127.0.0.1", rx.port) is None


async def test_a_listener_figure_that_is_not_finite_is_left_out() -> None:
    text = (
        b'opera_consumer_events_processed_total{stream="main"} 12\n'
        b'opera_consumer_lag_seconds{stream="main"} NaN\n'
        b'opera_consumer_queue_depth{stream="main"} +Inf\n'
    )

    def answer(request: Any) -> Reply:
        if request.path == "/readyz":
            return Reply(body=b'{"streams": {"main": {"state": "streaming"}}}')
        return Reply(body=text)

    with Receiver(answer) as rx:
        look = await live_status("127.0.0.1", rx.port)
    assert look is not None
    main = look["main"]
    assert (main["state"], main["processed"], main["lag_s"], main["waiting"]) == (
        "streaming",
        12,
        None,
        0,
    )


async def test_the_listeners_commit_error_reaches_the_terminal_escaped() -> None:
    """`status` prints the daemon's last commit error in a banner of its own, not a table
    cell: whatever answers on the metrics port (a port squatter while the daemon restarts)
    drove the operator's terminal with it (retitled, cleared)."""
    hostile = "\x1b]0;pwned\x07\x1b[2J\x1b[31mdisk full"
    readyz = {
        "ready": False,
        "streams": {"main": {"state": "streaming"}},
        "commits": {"ok": False, "failures": 3, "failing_for_s": 5.0, "last_error": hostile},
    }

    def answer(request: Any) -> Reply:
        return Reply(body=json.dumps(readyz).encode() if request.path == "/readyz" else b"")

    with Receiver(answer) as rx:
        look = await live_status("127.0.0.1", rx.port)
    assert look is not None
    error = look["main"]["commits"]["last_error"]
    assert "disk full" in error and not any(c in error for c in "\x1b\x07")
    banner = commits_failing(
        [{**dict.fromkeys(COLUMNS), **_commit_fields(look["main"]["commits"])}]
    )
    assert banner is not None and "disk full" in banner and "\x1b" not in banner


async def test_status_says_commits_fail(sandbox_factory: Any, tmp_path: Path, monkeypatch) -> None:
    """A disk that fills while the daemon streams: `status` said "streaming ... lag 0.1s ...
    caught up" (only /readyz knew, commits.ok false). It says the commits fail, since when,
    how many, and the last error (secrets masked), before the table and in the state."""
    import sqlite3

    from support import count_lines, make_settings, running

    from consumer.runtime.assembly import register_secrets

    gw = await sandbox_factory(backlog=20)
    settings = make_settings(tmp_path, gw.url)
    register_secrets(settings)  # as `run` does before it starts the daemon
    app_key = settings.streams["main"].app_key.get_secret_value()
    real_commit = SqliteStore._commit
    full = {"on": False}

    async def commit(self: SqliteStore, batch: Any, now: float) -> None:
        if full["on"]:  # as SQLite says it, with a registered secret to be masked
            raise sqlite3.OperationalError(f"database or disk is full (near {app_key})")
        await real_commit(self, batch, now)

    monkeypatch.setattr(SqliteStore, "_commit", commit)
    async with running(settings) as daemon:
        assert daemon.metrics_server is not None
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 20)
        config = toml_config(tmp_path, gw.url)  # the same state store, the daemon's port
        text = config.read_text().replace(
            "[metrics]\nport = 0", f"[metrics]\nport = {daemon.metrics_server.port}"
        )
        config.write_text(text)
        healthy = await status_json(config)
        assert healthy["commits_ok"] is True and healthy["commit_error"] is None
        full["on"] = True
        gw.append("DEMO", 5)
        await wait_until(lambda: daemon.committer.failures >= 1)
        # Both at once: each `status` of a running daemon takes a second between its scrapes.
        row, people = await asyncio.gather(status_json(config), asyncio.to_thread(status, config))
    assert row["commits_ok"] is False and row["commit_failures"] >= 1
    assert row["commits_failing_since"] is not None
    assert "database or disk is full" in row["commit_error"]
    assert app_key not in row["commit_error"] and "***" in row["commit_error"]
    first, header, line = people.stdout.splitlines()[:3]
    assert first.startswith("COMMITS FAILING since "), people.stdout
    assert "in a row" in first and "last error: state store " in first
    assert "database or disk is full (near ***)" in first
    assert app_key not in people.stdout
    assert header.split() == list(COLUMNS)
    assert "(COMMITS FAILING)" in line and "caught up" not in line, people.stdout
