"""Issue #9: the daemon against a hostile gateway, for every sink, in-process and as a process.

The gateway (``hostile_gateway``) streams a seeded script (``hostile_frames.build_script``):
valid events (some with backwards offsets, 20 digits, leading zeros, strings up to the frame
limit) interleaved with generated bad frames (random JSON, nesting from 100 to 100,000 levels in
every field, binary and non-UTF-8 frames, wrong types, bad offsets, unknown types, frames for
unknown subscription ids, oversized frames), and four frames that end the session (an ``error``
or ``complete`` for the current subscription id, once each). Tokens come from the sandbox.

The contract, checked against the script (the ground truth), with every violation listed at
once so one run shows all that is wrong:

* the daemon never exits by itself, and stops with status 0 when asked;
* every valid event is in the sink exactly once, in order per primaryKey;
* every bad frame is in the DLQ: malformed ones with reason "malformed", the sha256 and size of
  the exact bytes sent, a prefix of at most 65,536 characters; an event no JSON writer can
  serialize (``detail`` nested 300 levels) by its uniqueEventId;
* next/complete/error frames for an unknown subscription id are not dead-lettered, never end the
  session, and are counted in ``opera_consumer_frames_ignored_total``;
* an error/complete for the current id ends the session; the daemon resumes from its checkpoint;
* no log line longer than 20,000 characters; peak RSS and the state file stay bounded while
  about a gigabyte of oversized frames goes by (process test).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pysink
import pytest
from hostile_frames import (
    ENDER,
    EVENT,
    IGNORED,
    MALFORMED,
    PAD,
    UNDELIVERABLE,
    Frame,
    RandomDraw,
    build_script,
    flood,
    new_event,
    next_frame,
    summary,
)
from hostile_gateway import HostileGateway
from receiver import Receiver, Reply
from support import FAST_CONNECTION, make_settings, spawn_daemon, wait_exit

from consumer.runtime.daemon import Daemon
from consumer.sandbox import SandboxGateway, SandboxOptions
from consumer.sandbox.launcher import free_port
from consumer.sinks.postgres import create_table_sql

MAX_FRAME = 65536  # [streams.main.connection] max_frame_bytes of the in-process runs
EVENTS, BAD = 900, 350  # per sink
PAYLOAD_LIMIT = 65536  # characters of a frame a dead letter keeps
LOG_LINE_LIMIT = 20_000
SETTLE_S = 60.0
STALL_S = 8.0
# The gateway here never closes after ending a subscription (an `error` or `complete`): the
# daemon waits this long for that close, then closes itself (2 s by FAST_CONNECTION: 8 s of
# each run's four enders).
COMPLETE_S = 0.3
RUNAWAY = 12  # sessions ended unexpectedly: stop waiting, the daemon is in a reconnect loop
SINKS = ("jsonl", "sqlite", "webhook", "python", "postgres")

# The process run: frames up to 1 MiB processed, ~250 frames of just under 4 MiB dead-lettered.
PROC_MAX_FRAME = 1 << 20
PROC_FLOOD = 250
RSS_LIMIT = 250 * 2**20  # the daemon runs in about 90 MB; an unbounded one holds gigabytes
# Valid events of about 1 MiB, all in one commit's reach: what the pipeline holds is bounded in
# bytes (16 MiB each for the queue, for what awaits the commit and for websockets' read-ahead):
# 144-162 MB measured (220-245 with 64 frames read ahead). A daemon bounded by event counts only
# holds what it reads until the commit interval has passed: here the whole backlog (619 MB).
LARGE_EVENTS = 500
LARGE_RSS_LIMIT = 300 * 2**20
# Frames read ahead by websockets while the reader waits: as many of the largest (4 MiB here)
# as fit in 16 MiB, not 64 of them (256 MiB).
AHEAD_RSS_LIMIT = 200 * 2**20


# --- where the events went ---------------------------------------------------------------------


class Probe:
    """Reads a sink's uniqueEventIds in delivery order."""

    kind = ""
    python_handles_anything = False

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    async def delivered(self) -> list[str]:
        raise NotImplementedError

    def duplicates_note(self) -> str:
        return ""

    async def close(self) -> None:
        pass


class JsonlProbe(Probe):
    kind = "jsonl"

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "events.jsonl"
        self._read = 0  # bytes of the file already parsed (it only grows while we read it)
        self._ids: list[str] = []

    def config(self) -> dict[str, Any]:
        return {"type": "jsonl", "path": self.path}

    async def delivered(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            if f.seek(0, os.SEEK_END) < self._read:  # cut back: start over
                self._read, self._ids = 0, []
            f.seek(self._read)
            data = f.read()
        whole = data[: data.rfind(b"\n") + 1]  # complete lines only
        self._read += len(whole)
        self._ids += [
            orjson.loads(line)["metadata"]["uniqueEventId"] for line in whole.splitlines()
        ]
        return list(self._ids)


class SqliteProbe(Probe):
    kind = "sqlite"

    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path / "state.db"

    def config(self) -> dict[str, Any]:
        return {"type": "sqlite"}  # in the state store: rows commit with the checkpoint

    async def delivered(self) -> list[str]:
        try:
            with contextlib.closing(sqlite3.connect(self.state, timeout=10)) as db:
                rows = db.execute(
                    "SELECT unique_event_id FROM opera_events WHERE stream = 'main' ORDER BY rowid"
                ).fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []
        return [r[0] for r in rows]


class WebhookProbe(Probe):
    kind = "webhook"

    def __init__(self) -> None:
        self.rx = Receiver().start()
        self._seen = 0
        self._ids: list[str] = []
        self.foreign_keys = 0  # POSTs whose Idempotency-Key is not their event's id

    def config(self) -> dict[str, Any]:
        return {"type": "webhook", "url": self.rx.url}  # batch_size 1: one event per POST

    async def delivered(self) -> list[str]:
        exchanges = self.rx.exchanges
        for r, reply in exchanges[self._seen :]:
            if 200 <= reply.status < 300:
                uid = r.json()["metadata"]["uniqueEventId"]
                self._ids.append(uid)
                self.foreign_keys += r.header("Idempotency-Key") != uid
        self._seen = len(exchanges)
        return list(self._ids)

    def duplicates_note(self) -> str:
        keys = "its event's id" if not self.foreign_keys else "not always its event's id"
        return (
            f" (webhook: repeated POSTs, each Idempotency-Key {keys}; no crash or restart "
            "happened, so none was needed)"
        )

    async def close(self) -> None:
        self.rx.stop()


class PythonProbe(Probe):
    kind = "python"
    python_handles_anything = True  # it never serializes: a 300-level detail is no problem

    def __init__(self) -> None:
        pysink.reset()

    def config(self) -> dict[str, Any]:
        return {"type": "python", "target": "pysink:handle"}

    async def delivered(self) -> list[str]:
        return pysink.delivered_ids("main")

    async def close(self) -> None:
        pysink.reset()


class PostgresProbe(Probe):
    kind = "postgres"
    table = "hostile_events"

    def __init__(self, dsn: str, db: Any) -> None:
        self.dsn, self.db = dsn, db

    @classmethod
    async def open(cls, dsn: str) -> PostgresProbe:
        """A fresh table, created as the sink would, plus a sequence column of ours that numbers
        the rows in the order they are inserted (the sink names its columns: it is left alone)."""
        db = await asyncpg.connect(dsn)
        await db.execute(f"DROP TABLE IF EXISTS {cls.table}")
        await db.execute(create_table_sql(cls.table))
        await db.execute(f"ALTER TABLE {cls.table} ADD COLUMN hostile_seq BIGSERIAL")
        return cls(dsn, db)

    def config(self) -> dict[str, Any]:
        return {"type": "postgres", "dsn": self.dsn, "table": self.table}

    async def delivered(self) -> list[str]:
        rows = await self.db.fetch(
            f"SELECT unique_event_id FROM {self.table} WHERE stream = 'main' ORDER BY hostile_seq"
        )
        return [r[0] for r in rows]

    async def close(self) -> None:
        await self.db.close()


async def open_probe(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Probe:
    if kind == "jsonl":
        return JsonlProbe(tmp_path)
    if kind == "sqlite":
        return SqliteProbe(tmp_path)
    if kind == "webhook":
        return WebhookProbe()
    if kind == "python":
        return PythonProbe()
    return await PostgresProbe.open(request.getfixturevalue("postgres_dsn"))  # may skip


# --- the dead-letter queue ----------------------------------------------------------------------


@dataclass
class Dlq:
    rows: list[dict[str, Any]]
    columns: set[str]

    def by(self, column: str) -> dict[Any, dict[str, Any]]:
        return {r[column]: r for r in self.rows if r.get(column) is not None}


def read_dlq(state: Path, *, light: bool = False) -> Dlq:
    """The stream's dead letters (``light``: ids and digests only, for polling)."""
    if not state.exists():
        return Dlq([], set())
    with contextlib.closing(sqlite3.connect(state, timeout=10)) as db:
        db.row_factory = sqlite3.Row
        try:
            columns = {r[1] for r in db.execute("PRAGMA table_info(dead_letters)")}
            wanted = ["unique_event_id", "payload_sha256"] if light else ["*"]
            shown = ", ".join(c if c == "*" or c in columns else f"NULL AS {c}" for c in wanted)
            rows = db.execute(f"SELECT {shown} FROM dead_letters WHERE stream = 'main'").fetchall()
        except sqlite3.OperationalError:  # the store is being created
            return Dlq([], set())
    return Dlq([dict(r) for r in rows], columns)


# --- waiting, metrics, bookkeeping -------------------------------------------------------------


async def settle(
    gw: HostileGateway,
    probe: Probe,
    state: Path,
    script: Sequence[Frame],
    alive: Callable[[], bool],
) -> str:
    """Wait (bounded) until the daemon has read the whole script: the last session streamed it
    to the end, every valid event is in the sink, every undeliverable one in the sink or the
    DLQ, and every malformed frame the daemon certainly read is in the DLQ. Returns "settled",
    or why the wait ended early (the daemon stopped, a reconnect loop, no progress at all for
    STALL_S seconds once the whole script was sent, or SETTLE_S in all)."""
    events = {f.uid for f in script if f.expect == EVENT}
    undeliverable = {f.uid for f in script if f.expect == UNDELIVERABLE}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_S
    progress: tuple[int, ...] = ()
    progressed = loop.time()
    while loop.time() < deadline:
        if not alive():
            return "the daemon stopped by itself"
        if gw.runaway(RUNAWAY):
            return f"{RUNAWAY} sessions ended unexpectedly (a reconnect loop)"
        if gw.script_done:
            ids = set(await probe.delivered())
            dlq = read_dlq(state, light=True)
            want = gw.sent_frames(certain_only=True, expect=MALFORMED)
            have_uids = {r["unique_event_id"] for r in dlq.rows}
            have_shas = {r["payload_sha256"] for r in dlq.rows}
            enough = (
                want.keys() <= have_shas
                if "payload_sha256" in dlq.columns
                else len(dlq.rows) >= len(want)  # the column is missing: reported later
            )
            if events <= ids and enough and undeliverable <= ids | have_uids:
                return "settled"
            now = (len(ids), len(dlq.rows), len(gw.sessions))
            if now != progress:
                progress, progressed = now, loop.time()
            elif loop.time() - progressed > STALL_S:
                return (
                    f"the whole script was sent, and for {STALL_S} s neither the sink "
                    f"({len(events - ids)} valid events missing) nor the DLQ "
                    f"({len(dlq.rows)} rows) changed"
                )
        await asyncio.sleep(0.25)
    return f"not settled after {SETTLE_S} s"


async def ignored_metric(port: int) -> float | None:
    async with httpx.AsyncClient(trust_env=False) as http:
        r = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    m = re.search(
        r'^opera_consumer_frames_ignored_total\{[^}]*stream="main"[^}]*\}\s+(\S+)$',
        r.text,
        re.MULTILINE,
    )
    return float(m.group(1)) if m else None


def peak_rss(pid: int) -> int | None:
    """VmHWM of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:  # a tiny procfs file
        m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


class Failures:
    """Every violated clause of the contract, reported together."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, ok: bool, message: str | Callable[[], str]) -> bool:
        if not ok:
            self.items.append(message() if callable(message) else message)
        return ok

    def report(self, title: str) -> None:
        if self.items:
            body = "\n".join(f"- {m}" for m in self.items)
            pytest.fail(f"{title}: {len(self.items)} violation(s) of the contract\n{body}")


def labels(script: Sequence[Frame], positions: Sequence[int] | set[int], n: int = 8) -> str:
    count = Counter(script[p].label.split(":")[0] for p in positions)
    examples = sorted({script[p].label for p in positions})[:n]
    return f"{dict(count.most_common(n))}; e.g. {examples}"


def short(values: Any, n: int = 6) -> str:
    values = sorted(str(v)[:60] for v in values)
    more = f" (+{len(values) - n} more)" if len(values) > n else ""
    return f"{values[:n]}{more}"


# --- the contract ------------------------------------------------------------------------------


def verify(
    f: Failures,
    *,
    script: Sequence[Frame],
    gw: HostileGateway,
    delivered: list[str],
    dlq: Dlq,
    metric: float | None,
    python_sink: bool,
    dup_note: str = "",
) -> None:
    # Sessions: only our enders may end one (the last ends at shutdown).
    for a in gw.anomalies:
        f.check(False, f"gateway: {a}")
    for s in gw.sessions:
        if s.unexpected_end:
            last = script[s.sent[-1][0]].label if s.sent else "nothing"
            f.check(
                False,
                f"session {s.number} (started at script position {s.start}) was closed by the "
                f"client with code {s.close_code} without an ender of ours or its own complete; "
                f"the last frame it got: {last}",
            )
    n_enders = sum(1 for fr in script if fr.expect == ENDER)
    f.check(
        len(gw.enders_sent) == n_enders and gw.sessions != [] and gw.sessions[-1].finished,
        lambda: (
            f"the script was not streamed to its end: {len(gw.enders_sent)}/{n_enders} enders "
            f"sent, last session finished: {gw.sessions[-1].finished if gw.sessions else None}"
        ),
    )

    # The sink: every valid event exactly once, in order per primaryKey.
    by_uid = {fr.uid: (pos, fr) for pos, fr in enumerate(script) if fr.uid is not None}
    events = {fr.uid for fr in script if fr.expect == EVENT}
    undeliverable = {fr.uid for fr in script if fr.expect == UNDELIVERABLE}
    counts = Counter(delivered)
    missing = events - counts.keys()
    f.check(
        not missing,
        lambda: (
            f"{len(missing)} of {len(events)} valid events are not in the sink: "
            + labels(script, {by_uid[u][0] for u in missing})
        ),
    )
    twice = {u: n for u, n in counts.items() if n > 1}
    f.check(
        not twice,
        lambda: f"{len(twice)} events in the sink more than once: {short(twice)}{dup_note}",
    )
    allowed = events | (undeliverable if python_sink else set())
    extra = counts.keys() - allowed
    f.check(
        not extra,
        lambda: (
            f"{len(extra)} ids in the sink that are not valid events "
            f"(ghosts of unknown subscriptions, oversized or binary frames...): {short(extra)}"
        ),
    )
    want_order: dict[str, list[str]] = defaultdict(list)
    for fr in script:
        if fr.expect == EVENT and fr.primary_key is not None:
            want_order[fr.primary_key].append(fr.uid or "")
    got_order: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for u in delivered:
        hit = by_uid.get(u)
        if hit and hit[1].expect == EVENT and hit[1].primary_key is not None and u not in seen:
            seen.add(u)
            got_order[hit[1].primary_key].append(u)
    disordered = [
        k for k, ids in got_order.items() if ids != [i for i in want_order[k] if i in seen]
    ]
    f.check(not disordered, lambda: f"order per primaryKey broken for {short(disordered)}")

    # The DLQ.
    needed = {"payload_sha256", "payload_size"}
    if not f.check(
        needed <= dlq.columns,
        lambda: (
            f"dead_letters lacks column(s) {sorted(needed - dlq.columns)}; "
            "the malformed frames cannot be matched"
        ),
    ):
        return
    rows_by_sha = dlq.by("payload_sha256")
    rows_by_uid = dlq.by("unique_event_id")
    certain = gw.sent_frames(certain_only=True, expect=MALFORMED)
    every = gw.sent_frames(certain_only=False)
    absent = {sha: s for sha, s in certain.items() if sha not in rows_by_sha}
    f.check(
        not absent,
        lambda: (
            f"{len(absent)} malformed frames the daemon read are not in the DLQ "
            "(matched by payload_sha256 of the bytes sent): "
            + labels(script, {s.pos for s in absent.values()})
        ),
    )
    covered = {s.pos for sha, s in every.items() if sha in rows_by_sha}
    uncovered = {p for p, fr in enumerate(script) if fr.expect == MALFORMED} - covered
    f.check(
        not uncovered,
        lambda: (
            f"{len(uncovered)} malformed script frames have no DLQ row for any copy sent: "
            + labels(script, uncovered)
        ),
    )
    wrong: dict[str, list[str]] = defaultdict(list)
    for sha, sent in every.items():
        row = rows_by_sha.get(sha)
        fr = script[sent.pos]
        if row is None or fr.expect != MALFORMED:
            continue
        if row["reason"] != "malformed":
            wrong["reason is not 'malformed'"].append(f"{fr.label}: {row['reason']!r}")
        if not row["error"]:
            wrong["empty error"].append(fr.label)
        if row["dedup_key"] != "sha256:" + sha:
            wrong["dedup_key is not sha256:<digest of the bytes>"].append(
                f"{fr.label}: {str(row['dedup_key'])[:80]!r}"
            )
        if row["payload_size"] != sent.size:
            wrong["payload_size is not the byte length"].append(
                f"{fr.label}: {row['payload_size']} != {sent.size}"
            )
        payload = row["payload"] or ""
        if len(payload) > PAYLOAD_LIMIT:
            wrong[f"payload longer than {PAYLOAD_LIMIT} characters"].append(
                f"{fr.label}: {len(payload)}"
            )
        elif sent.size <= 8 * PAYLOAD_LIMIT:
            data = gw.render(sent)
            if data.isascii() and payload != data[:PAYLOAD_LIMIT].decode():
                wrong["payload is not the frame's first 65,536 characters"].append(fr.label)
    for what, items in wrong.items():
        f.check(False, f"malformed dead letters: {what} ({len(items)}): {short(items, 4)}")

    # Events no JSON writer can serialize: a dead letter with their id (the python sink, which
    # never serializes, may deliver them instead), never both.
    for uid in sorted(undeliverable):
        row, label = rows_by_uid.get(uid), by_uid[uid][1].label
        in_sink = uid in counts
        if python_sink:
            f.check(
                (row is None) != (not in_sink),
                f"{label} ({uid}): in the sink {in_sink}, in the DLQ {row is not None}: "
                "it must be exactly one of them",
            )
        else:
            f.check(row is not None, f"{label} ({uid}) is not in the DLQ by its uniqueEventId")
            f.check(not in_sink, f"{label} ({uid}) is in the sink although no writer can write it")
        if row is not None:
            f.check(bool(row["reason"]), f"{label} ({uid}): DLQ row with an empty reason")

    # Nothing else in the DLQ: not the ignored frames, not the enders, not valid events.
    for sha, sent in every.items():
        fr = script[sent.pos]
        if fr.expect in (IGNORED, ENDER) and sha in rows_by_sha:
            f.check(False, f"{fr.label}: dead-lettered, but it is an {fr.expect} frame")
    dead_events = events & rows_by_uid.keys()
    f.check(not dead_events, lambda: f"valid events dead-lettered: {short(dead_events)}")
    known = every.keys() | undeliverable
    strays = [
        r
        for r in dlq.rows
        if r["payload_sha256"] not in known and r["unique_event_id"] not in known
    ]
    f.check(
        not strays,
        lambda: (
            f"{len(strays)} DLQ rows match no frame sent: "
            + short(f"{r['reason']}/{r['unique_event_id']}/{str(r['error'])[:60]}" for r in strays)
        ),
    )

    # Frames for unknown subscription ids: counted.
    ignored = gw.sent_count(IGNORED, certain_only=True)
    f.check(
        metric is not None and metric >= ignored,
        lambda: (
            f'opera_consumer_frames_ignored_total{{stream="main"}} is {metric}; '
            f"{ignored} frames for unknown subscription ids were read"
        ),
    )


def long_lines(text: str) -> list[str]:
    return [
        f"{len(line)} characters: {line[:120]!r}..."
        for line in text.splitlines()
        if len(line) > LOG_LINE_LIMIT
    ]


def token_auth(sb: SandboxGateway) -> dict[str, Any]:
    o = SandboxOptions()
    return {
        "client_id": o.client_id,
        "client_secret": o.client_secret,
        "token_url": f"{sb.url}/oauth/v1/tokens",
    }


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sink_kind", SINKS)
async def test_hostile_gateway_every_sink(
    sink_kind: str,
    sandbox_factory: Callable[..., Any],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capfd: pytest.CaptureFixture[str],
) -> None:
    probe = await open_probe(sink_kind, tmp_path, request)
    script = build_script(
        20 + SINKS.index(sink_kind),
        events=EVENTS,
        bad=BAD,
        max_frame_bytes=MAX_FRAME,
        tag=sink_kind,
    )
    gw = HostileGateway(script)
    state = tmp_path / "state.db"
    f = Failures()
    try:
        sb = await sandbox_factory(backlog=0)
        await gw.start()
        settings = make_settings(
            tmp_path,
            gw.url,
            sink=probe.config(),
            auth=token_auth(sb),
            connection={"max_frame_bytes": MAX_FRAME, "complete_timeout_s": COMPLETE_S},
        )
        daemon = await Daemon.create(settings)
        task = asyncio.create_task(daemon.run())
        try:
            outcome = await settle(gw, probe, state, script, lambda: not task.done())
            f.check(outcome == "settled", f"waiting for the script to be consumed: {outcome}")
            metric = None
            if daemon.metrics_server is not None and not task.done():
                metric = await ignored_metric(daemon.metrics_server.port)
            f.check(
                not task.done(),
                lambda: f"the daemon exited by itself with status {daemon.exit_code}",
            )
        finally:
            daemon.request_stop()
            try:
                async with asyncio.timeout(40):
                    code = await task
            except Exception as exc:  # reported, not raised: the other checks still run
                code = None
                f.check(False, f"stopping the daemon raised {type(exc).__name__}: {exc}"[:500])
        f.check(code == 0, f"the daemon's exit status after the stop request is {code}, not 0")
        verify(
            f,
            script=script,
            gw=gw,
            delivered=await probe.delivered(),
            dlq=read_dlq(state),
            metric=metric,
            python_sink=probe.python_handles_anything,
            dup_note=probe.duplicates_note(),
        )
        out, err = capfd.readouterr()
        too_long = long_lines(out + err)
        f.check(not too_long, lambda: f"{len(too_long)} log lines too long: {too_long[:3]}")
    finally:
        await gw.close()
        await probe.close()
    f.report(f"{sink_kind} sink, script {summary(script)}, {len(gw.sessions)} sessions")


def process_config(
    tmp_path: Path,
    gw: HostileGateway,
    sb: SandboxGateway,
    *,
    state: str,
    sink: str,
    rest: str = '[metrics]\nport = 0\n\n[log]\nformat = "json"',
) -> Path:
    """The config of a daemon process reading ``gw`` (frames up to PROC_MAX_FRAME; tokens
    from the sandbox), with the given ``[state]`` lines, ``[sink]`` lines and the rest (by
    default: metrics on a free port, JSON logs)."""
    auth = token_auth(sb)
    connection = {
        **FAST_CONNECTION,
        "max_frame_bytes": PROC_MAX_FRAME,
        "complete_timeout_s": COMPLETE_S,
    }
    config = tmp_path / "config.toml"
    config.write_text(
        f"""[streams.main]
gateway_url = "{gw.url}"
chain_code = "DEMO"
app_key = "{SandboxOptions().app_key}"

[streams.main.auth]
client_id = "{auth["client_id"]}"
client_secret = "{auth["client_secret"]}"
token_url = "{auth["token_url"]}"

[streams.main.connection]
{chr(10).join(f"{k} = {v}" for k, v in connection.items())}

[state]
{state}

[sink]
{sink}

{rest}
"""
    )
    return config


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-1500:]


async def settled_peak(
    config: Path, log: Path, gw: HostileGateway, probe: Probe, *, state: Path, script: list[Frame]
) -> int:
    """Run the daemon until it has read the whole script, and its peak RSS then; SIGTERM
    stops it with 0."""
    proc = spawn_daemon(config, log)
    try:
        outcome = await settle(gw, probe, state, script, lambda: proc.poll() is None)
        peak = peak_rss(proc.pid) if proc.poll() is None else None
        assert outcome == "settled", (
            f"waiting for the script to be consumed: {outcome} (peak RSS {peak} bytes); "
            "the log ends: " + log_tail(log)
        )
        assert peak is not None
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            await wait_exit(proc)
    return peak


async def test_hostile_gateway_process_memory_state_and_logs(
    sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The jsonl case as a process, frames up to 1 MiB, ~1 GB of oversized frames going by:
    peak RSS, the state file and every log line stay bounded; SIGTERM stops it with 0."""
    big = flood(7, PROC_FLOOD, PROC_MAX_FRAME)
    script = build_script(
        99, events=500, bad=150, max_frame_bytes=PROC_MAX_FRAME, tag="proc", extra_bad=big
    )
    sb = await sandbox_factory(backlog=0)
    gw = await HostileGateway(script).start()
    probe = JsonlProbe(tmp_path)
    state, log = tmp_path / "state.db", tmp_path / "daemon.log"
    port = free_port()
    config = process_config(
        tmp_path,
        gw,
        sb,
        state=f'path = "{state}"\ncommit_interval_ms = 500',
        sink=f'type = "jsonl"\npath = "{probe.path}"',
        rest=f'[metrics]\nport = {port}\n\n[log]\nformat = "json"\nlevel = "debug"',
    )
    f = Failures()
    proc = spawn_daemon(config, log)
    try:
        outcome = await settle(gw, probe, state, script, lambda: proc.poll() is None)
        f.check(outcome == "settled", f"waiting for the script to be consumed: {outcome}")
        metric, peak = None, None
        if proc.poll() is None:
            metric = await ignored_metric(port)
            peak = peak_rss(proc.pid)
        f.check(
            proc.poll() is None,
            lambda: (
                f"the daemon exited by itself with status {proc.returncode}; its log ends: "
                + log_tail(log)
            ),
        )
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = await wait_exit(proc, 60)
        f.check(code == 0, f"exit status after SIGTERM is {code}, not 0")
    finally:
        if proc.poll() is None:
            proc.kill()
            await wait_exit(proc)
        await gw.close()

    bad_bytes = gw.sent_bytes()
    print(f"peak RSS {peak} bytes after {bad_bytes} bytes of bad frames")  # shown on failure
    # The run is only a test of boundedness if far more bad bytes went by than the bounds.
    assert bad_bytes >= 4 * RSS_LIMIT, f"only {bad_bytes} bad bytes sent: raise PROC_FLOOD"
    f.check(
        peak is not None and peak <= RSS_LIMIT,
        f"peak RSS (VmHWM) {peak} bytes, bound {RSS_LIMIT}, after {bad_bytes} bytes of bad frames",
    )
    dlq = read_dlq(state)
    files = [p for p in (state, Path(f"{state}-wal"), Path(f"{state}-shm")) if p.exists()]
    size = sum(p.stat().st_size for p in files)
    print(f"state store {size} bytes, {len(dlq.rows)} dead letters")
    bound = 16 * 2**20 + len(dlq.rows) * 4 * PAYLOAD_LIMIT
    f.check(
        size <= bound,
        f"state store {size} bytes with {len(dlq.rows)} dead letters (bound {bound}); "
        f"{bad_bytes} bytes of bad frames were sent",
    )
    verify(
        f,
        script=script,
        gw=gw,
        delivered=await probe.delivered(),
        dlq=dlq,
        metric=metric,
        python_sink=False,
    )
    too_long = long_lines(log.read_text(errors="replace"))
    f.check(not too_long, lambda: f"{len(too_long)} log lines too long: {too_long[:3]}")
    f.report(
        f"process, script {summary(script)}, {len(gw.sessions)} sessions, {bad_bytes} bad bytes"
    )


def large_events(
    seed: int, count: int, size: int, first: int = 1, key: str | None = None
) -> list[Frame]:
    """``count`` valid events of just under ``size`` bytes each (a long ``newValue``), offsets
    from ``first`` on, of five resources (or of ``key``)."""
    rng = random.Random(seed)
    d = RandomDraw(rng)
    frames = []
    for i in range(first, first + count):
        uid, pk = f"large-{i}", key or f"key-{i % 5}"
        ev = new_event(d, offset=str(i), uid=uid, primary_key=pk)
        ev["detail"] = [{"elementName": "Notes", "newValue": PAD.decode()}]
        target = size - rng.randint(0, 4096)
        frames.append(
            Frame(
                EVENT, "large", next_frame(ev), target_len=target, uid=uid, offset=str(i),
                primary_key=pk,
            )
        )  # fmt: skip
    return frames


async def test_large_valid_events_held_for_a_commit_stay_bounded_in_bytes(
    sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """Valid events of about 1 MiB each, with commits far apart (interval mode, 5 s or 100,000
    events; the backlog is read in less): what is written and not yet committed is bounded in
    bytes, not only in events, so the jsonl sink's buffer cannot grow to the whole backlog; a
    commit comes early instead (the last few MiB wait for the interval). Every event is in the
    file once and peak RSS stays well under what was sent."""
    script = large_events(11, LARGE_EVENTS, PROC_MAX_FRAME)
    sb = await sandbox_factory(backlog=0)
    gw = await HostileGateway(script).start()
    probe = JsonlProbe(tmp_path)
    state, log = tmp_path / "state.db", tmp_path / "daemon.log"
    config = process_config(
        tmp_path,
        gw,
        sb,
        state=f'path = "{state}"\ncommit_mode = "interval"\ncommit_interval_ms = 5000\n'
        "commit_max_events = 100000",
        sink=f'type = "jsonl"\npath = "{probe.path}"',
    )
    try:
        peak = await settled_peak(config, log, gw, probe, state=state, script=script)
    finally:
        await gw.close()
    sent = gw.sent_bytes(exclude=MALFORMED)  # every frame here is an event
    print(f"peak RSS {peak} bytes after {sent} bytes of events")  # shown on failure
    assert sent >= 1.5 * LARGE_RSS_LIMIT, f"only {sent} bytes sent: raise LARGE_EVENTS"
    assert peak <= LARGE_RSS_LIMIT, (
        f"peak RSS (VmHWM) {peak} bytes, bound {LARGE_RSS_LIMIT}, after {sent} bytes of events"
    )
    delivered = await probe.delivered()
    assert Counter(delivered) == Counter(f.uid for f in script)


async def test_frames_read_ahead_while_the_sink_waits_stay_bounded_in_bytes(
    sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The webhook receiver answers the first POST with 503 and Retry-After: 4: while the sink
    waits, the pipeline fills (16 MiB of 1 MiB events) and the reader stops; frames of just under
    4 MiB keep coming. What websockets reads ahead for the waiting reader is bounded in bytes (as
    many of the largest frames as fit in 16 MiB), not 64 frames of any size. Afterwards every
    event is delivered and every flood frame is in the DLQ."""
    script = [
        *large_events(12, 40, PROC_MAX_FRAME, key="one"),  # one worker's: it waits
        *flood(13, 100, PROC_MAX_FRAME, tag="ahead"),
        *large_events(14, 10, 8192, first=1000),  # delivered once the flood is read
    ]
    sb = await sandbox_factory(backlog=0)
    gw = await HostileGateway(script).start()
    probe = WebhookProbe()
    probe.rx.script(Reply(503, {"Retry-After": "4"}))
    state, log = tmp_path / "state.db", tmp_path / "daemon.log"
    config = process_config(
        tmp_path,
        gw,
        sb,
        state=f'path = "{state}"',
        sink=f'type = "webhook"\nurl = "{probe.rx.url}"',
    )
    try:
        peak = await settled_peak(config, log, gw, probe, state=state, script=script)
    finally:
        await gw.close()
        await probe.close()
    flood_bytes = gw.sent_bytes()  # the malformed frames (events excluded)
    print(f"peak RSS {peak} bytes; {flood_bytes} bytes of flood frames")  # shown on failure
    assert probe.rx.exchanges[0][1].status == 503  # the sink did wait
    assert flood_bytes >= 1.5 * AHEAD_RSS_LIMIT, f"only {flood_bytes} bytes: raise the flood"
    assert peak <= AHEAD_RSS_LIMIT, (
        f"peak RSS (VmHWM) {peak} bytes, bound {AHEAD_RSS_LIMIT}, while the sink waited"
    )
    assert Counter(await probe.delivered()) == Counter(f.uid for f in script if f.expect == EVENT)
