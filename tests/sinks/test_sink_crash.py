"""kill -9 between the sink write and the checkpoint, for the SQL sinks; the webhook under
503s and 429s; a DLQ replay round trip through a fixed sink.

The daemon runs as a process (`python -m consumer run`) with a commit interval of a minute:
the sink has rows (PostgreSQL) or a pending transaction (SQLite) while no checkpoint exists.
SIGKILL lands exactly in that gap; the next run must leave every event once, none lost.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families
from receiver import Received, Receiver, Reply
from support import (
    checkpoint,
    spawn_daemon,
    tail,
    toml_config,
    truth_ids,
    wait_exit,
    wait_until,
)

from consumer.sandbox import launcher

BACKLOG = 400


async def stop(proc: subprocess.Popen[bytes], sig: int) -> int:
    proc.send_signal(sig)
    return await wait_exit(proc)


async def events_processed(http: httpx.AsyncClient, stream: str = "main") -> float:
    """The daemon's count of the stream's events written to the sink, from its /metrics;
    0 while the listener is not up yet."""
    try:
        text = (await http.get("/metrics")).text
    except httpx.TransportError:
        return 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "opera_consumer_events_processed_total" and sample.labels == {
                "stream": stream
            }:
                return sample.value
    return 0


async def test_postgres_kill_between_write_and_checkpoint(
    sandbox_factory, tmp_path: Path, postgres_dsn: str
) -> None:
    gw = await sandbox_factory(backlog=BACKLOG)
    truth = truth_ids(gw.events("DEMO"))
    table = "crash_events"
    sink = f'[sink]\ntype = "postgres"\ndsn = "{postgres_dsn}"\ntable = "{table}"\n'
    db = await asyncpg.connect(postgres_dsn)
    try:

        async def rows() -> list[str]:
            try:
                found = await db.fetch(f"SELECT unique_event_id FROM {table}")
            except asyncpg.UndefinedTableError:
                return []
            return [r[0] for r in found]

        # First run: a commit interval of a minute, so rows land in PostgreSQL while the
        # checkpoint does not move; then SIGKILL.
        cfg = toml_config(tmp_path, gw.url, sink=sink, commit_interval_ms=60_000)
        proc = spawn_daemon(cfg, tmp_path / "daemon.log")
        async with asyncio.timeout(60):
            while len(await rows()) < BACKLOG // 2:
                assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
                await asyncio.sleep(0.05)
        assert await stop(proc, signal.SIGKILL) == -signal.SIGKILL
        written = await rows()
        cp = checkpoint(tmp_path / "state.db")
        # The gap is real: rows exist that no checkpoint covers (only the anchor exists).
        assert cp is not None and cp[1] == truth[0]
        assert len(written) >= BACKLOG // 2

        # Restart with normal commits: the stream replays from the anchor; upserts make the
        # replayed rows no second row, and nothing is missing.
        cfg = toml_config(tmp_path, gw.url, sink=sink, commit_interval_ms=20)
        proc = spawn_daemon(cfg, tmp_path / "daemon.log")
        try:
            async with asyncio.timeout(60):
                while len(await rows()) < BACKLOG or checkpoint(tmp_path / "state.db") != (
                    gw.events("DEMO")[-1]["metadata"]["offset"],
                    truth[-1],
                ):
                    assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
                    await asyncio.sleep(0.05)
        finally:
            assert await stop(proc, signal.SIGTERM) == 0
        final = await rows()
        assert sorted(final) == sorted(truth)  # no row lost, none twice (the key is unique)
        # Rows written before the kill were rewritten by the replay, not duplicated.
        count = await db.fetchval(f"SELECT count(*) FROM {table}")
        assert count == len(truth)
    finally:
        await db.close()


async def test_sqlite_kill_before_the_commit_leaves_rows_and_checkpoint_together(
    sandbox_factory, tmp_path: Path
) -> None:
    """Issue #9 item 12: the kill waits for the daemon's own count of events written to the
    sink (its /metrics) to reach the backlog, not a sleep: the test cannot pass for writes
    that had not happened yet."""
    gw = await sandbox_factory(backlog=BACKLOG)
    truth = truth_ids(gw.events("DEMO"))
    sink = '[sink]\ntype = "sqlite"\n'
    state = tmp_path / "state.db"

    def table() -> tuple[set[str], set[str]]:
        with sqlite3.connect(state) as db:
            try:
                rows = {r[0] for r in db.execute("SELECT unique_event_id FROM opera_events")}
            except sqlite3.OperationalError:
                rows = set()
            done = {r[0] for r in db.execute("SELECT event_id FROM processed_events")}
        return rows, done

    cfg = toml_config(tmp_path, gw.url, sink=sink, commit_interval_ms=60_000)
    port = launcher.free_port()
    cfg.write_text(cfg.read_text().replace("[metrics]\nport = 0", f"[metrics]\nport = {port}"))
    proc = spawn_daemon(cfg, tmp_path / "daemon.log")
    # Every event is handed to the sink (the sandbox sent the whole backlog), none committed.
    await wait_until(lambda: gw.stats.events_sent >= BACKLOG, timeout=60)
    # ... and written: the workers wrote the last batches.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        async with asyncio.timeout(60):
            while await events_processed(http) < BACKLOG:
                assert proc.poll() is None, tail(tmp_path / "daemon.log")
                await asyncio.sleep(0.05)
    assert await stop(proc, signal.SIGKILL) == -signal.SIGKILL
    rows, done = table()
    assert rows == done == set()  # written, not committed: nothing of it survives, together

    cfg = toml_config(tmp_path, gw.url, sink=sink, commit_interval_ms=20)
    proc = spawn_daemon(cfg, tmp_path / "daemon.log")
    try:
        await wait_until(lambda: len(table()[0]) >= BACKLOG, timeout=60)
    finally:
        assert await stop(proc, signal.SIGTERM) == 0
    rows, done = table()
    assert rows == done == set(truth)
    with sqlite3.connect(state) as db:
        assert db.execute("SELECT count(*) FROM opera_events").fetchone()[0] == len(truth)


def webhook_config(tmp_path: Path, url: str, rx: Receiver) -> Path:
    sink = f'[sink]\ntype = "webhook"\nurl = "{rx.url}/events"\n'
    return toml_config(tmp_path, url, sink=sink, commit_interval_ms=20)


def delivered(rx: Receiver) -> list[str]:
    return [r.header("Idempotency-Key") or "" for r, reply in rx.exchanges if reply.status == 200]


async def test_webhook_503s_then_success_and_429_retry_after_are_honoured(
    sandbox_factory, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=50)
    truth = truth_ids(gw.events("DEMO"))
    with Receiver() as rx:
        rx.script(
            Reply(503), Reply(503), Reply(503, headers={"Retry-After": "0"}),
            Reply(429, headers={"Retry-After": "1"}),
        )  # fmt: skip
        proc = spawn_daemon(webhook_config(tmp_path, gw.url, rx), tmp_path / "daemon.log")
        try:
            await wait_until(lambda: set(truth) <= set(delivered(rx)), timeout=60)
        finally:
            assert await stop(proc, signal.SIGTERM) == 0
        ex = rx.exchanges
        statuses = [reply.status for _, reply in ex]
        assert statuses[:4] == [503, 503, 503, 429]
        # The throttled event came back only after its Retry-After (a lower bound: not flaky).
        throttled = ex[3][0]
        key = throttled.header("Idempotency-Key")
        again = next(r for r, _ in ex[4:] if r.header("Idempotency-Key") == key)
        assert again.received_at - throttled.received_at >= 0.95
        assert sorted(set(delivered(rx))) == sorted(truth)
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0


async def test_dlq_replay_round_trip_through_a_fixed_webhook(
    sandbox_factory, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=40)
    truth = truth_ids(gw.events("DEMO"))
    culprit = truth[17]
    broken = True

    def respond(r: Received) -> Reply:
        if broken and r.json()["metadata"]["uniqueEventId"] == culprit:
            return Reply(400, body=b'{"error": "field too long"}')
        return Reply(200)

    with Receiver(respond) as rx:
        cfg = webhook_config(tmp_path, gw.url, rx)
        proc = spawn_daemon(cfg, tmp_path / "daemon.log")
        try:
            await wait_until(lambda: set(delivered(rx)) == set(truth) - {culprit}, timeout=60)
            await wait_until(lambda: _dead_letters(tmp_path) == [culprit], timeout=60)
        finally:
            assert await stop(proc, signal.SIGTERM) == 0

        async def opera(*args: str) -> subprocess.CompletedProcess[str]:
            return await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "consumer", *args, "--config", str(cfg)],
                capture_output=True,
                text=True,
                timeout=60,
            )

        listed = await opera("dlq", "list", "--json")
        assert listed.returncode == 0
        assert '"reason": "sink_rejected"' in listed.stdout
        assert "HTTP 400" in listed.stdout

        def sent_since(n: int) -> list[tuple[str, int]]:
            """(Idempotency-Key, status) of the requests after the first ``n``."""
            return [(r.header("Idempotency-Key") or "", a.status) for r, a in rx.exchanges[n:]]

        before = len(rx.exchanges)
        still_broken = await opera("dlq", "replay", "--all")
        assert still_broken.returncode == 1
        assert "failed" in still_broken.stdout
        assert _dead_letters(tmp_path) == [culprit]
        assert sent_since(before) == [(culprit, 400)]  # one attempt, refused again

        broken = False  # the receiver is fixed
        before = len(rx.exchanges)
        dry = await opera("dlq", "replay", "--all", "--dry-run")
        assert dry.returncode == 0
        assert "would deliver" in dry.stdout.replace("would_deliver", "would deliver")
        assert _dead_letters(tmp_path) == [culprit]
        assert sent_since(before) == []  # a dry run sends nothing

        done = await opera("dlq", "replay", "--all")
        assert done.returncode == 0, done.stderr
        assert "delivered" in done.stdout
        assert _dead_letters(tmp_path) == []
        # The replay sent the culprit alone, once (its own Idempotency-Key), and it went
        # through: the only time the receiver accepted it.
        assert sent_since(before) == [(culprit, 200)]
        assert delivered(rx).count(culprit) == 1


def _dead_letters(tmp_path: Path) -> list[str]:
    with sqlite3.connect(tmp_path / "state.db") as db:
        return [r[0] for r in db.execute("SELECT unique_event_id FROM dead_letters ORDER BY id")]
