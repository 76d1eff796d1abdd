"""Throughput of the daemon per sink against the floor: a bare client on the same backlog.

    .venv/bin/python bench/compare.py [--events 300000] [--rounds 3]
        [--sinks jsonl,sqlite,postgres,webhook,webhook50] [--workers N]

1. The sandbox gateway runs in its own process (`opera-consumer sandbox --fast-backlog`): one
   chain, a backlog of --events templated events sent as pre-encoded frames, so the readers
   below are the bottleneck, not the sandbox.
2. Each round, for each sink in turn:
   * the floor: a bare client in this process (websockets with graphql-transport-ws,
     connection_init, subscribe from offset 0, `orjson.loads` of each frame, nothing else)
     until it has every event. Run on each side of every daemon run (the run after one
     sink is the run before the next), and the daemon is compared with the mean of the two:
     the machine's speed moves within a round;
   * the daemon (`python -OO -m consumer run` on the package's -OO bytecode, as the unit and the
     image run it; a fresh state directory each time, durable checkpoints: SQLite synchronous=FULL)
     with each sink, until its checkpoint is the backlog's last offset. Sinks: jsonl (fsync), sqlite
     (in the state store), postgres (a throwaway server from tests/pg.py, fsync off as in the tests
     but with PostgreSQL's default shared_buffers of 128 MB; skipped with a note without the server
     binaries), pgstate (the postgres sink with the state store in PostgreSQL too, on the same
     DSN: the rows commit in the state transaction, a fleet's exactly-once setup; its checkpoint
     polled in PostgreSQL), webhook (batch_size 1) and webhook50 (batch_size 50) against a
     keep-alive HTTP/1.1 receiver in its own process; the daemon on its default event loop
     (uvloop for the webhook sink, asyncio's for the others; OPERA_CONSUMER_EVENT_LOOP
     in the environment overrides it). Pipeline workers: the sink's default (one
     for jsonl and sqlite, whose writes never wait; four for postgres, here on a pool of its
     own, pgstate and webhook), or --workers.
   Just before the webhook sink, also the webhook floor: aiohttp alone, as the sink uses it with
   batch_size 1 (--workers tasks, default 4, POSTing the backlog's documents one at a time over one
   keep-alive pool to a fresh receiver, on the event loop the daemon gives the webhook sink):
   what the HTTP client itself manages on this machine.
   events/s is measured from the subscription (the floor: its subscribe message sent; the
   daemon: its "subscribed" log record) to the last event (the floor: received; the daemon:
   the checkpoint covering it seen in the state store, polled every 10 ms); "wall" is from
   the daemon's process start, start-up included. Peak RSS: VmRSS sampled every 100 ms from
   /proc (and the kernel's VmHWM at the end, whichever is larger). The event loop's thread's
   CPU per event (from the first checkpoint seen; per round, and in the JSON) says where a
   change went when the machine's speed moves between runs. After each run the sink is
   counted: every event once is the pass condition.
3. A table on stdout (per sink, min-max over the rounds: events/s, ratio to the mean of the
   floor runs either side, wall events/s, peak RSS) and bench/results/compare.json, with the
   machine's core count and load average at start and end.

Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, cast, get_args

import aiohttp
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/pg.py: a throwaway PostgreSQL server

from consumer.config import HttpSettings, WebhookSinkSettings  # noqa: E402
from consumer.config.settings import EventLoop  # noqa: E402
from consumer.core import protocol  # noqa: E402
from consumer.event_loop import chosen, factory  # noqa: E402
from consumer.http_client import ERROR_BODY_BYTES  # noqa: E402
from consumer.runtime.pipeline import WAITING_SINK_WORKERS  # noqa: E402
from consumer.sandbox import SandboxOptions, launcher  # noqa: E402
from consumer.sandbox.templated import TemplatedEvents  # noqa: E402
from consumer.state.sqlite import SqliteStore  # noqa: E402

CHAIN = "DEMO"
# The event loop the daemon runs a webhook sink on (its default, or the environment's choice):
# the webhook floor's too.
_LOOP_SETTING = os.environ.get("OPERA_CONSUMER_EVENT_LOOP", "auto")
if _LOOP_SETTING not in get_args(EventLoop):  # as the daemon refuses it
    choices = ", ".join(get_args(EventLoop))
    sys.exit(f"OPERA_CONSUMER_EVENT_LOOP={_LOOP_SETTING!r}: one of {choices}")
HOOK_LOOP = chosen(cast(EventLoop, _LOOP_SETTING), "webhook")
SEED = 1
STREAM = "bench"
SINKS = ("jsonl", "sqlite", "postgres", "pgstate", "webhook", "webhook50")
# Sinks written to the throwaway PostgreSQL server.
ON_POSTGRES = ("postgres", "pgstate")


# --- the machine ----------------------------------------------------------------------------


def compiled() -> None:
    """The package's -OO bytecode, up to date, as the unit and the image hold it in their lib
    (here the package is an editable checkout): else each daemon started would compile ~100
    modules first, 0.1 s of CPU and ~2 MB of resident memory that a deployed one never has."""
    subprocess.run(
        [sys.executable, "-OO", "-m", "compileall", "-q", "-j0", str(ROOT / "consumer")],
        check=True,
    )


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "at": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def proc_status(pid: int, field: str) -> float:
    """A ``kB`` line of /proc/PID/status in MB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _stat(where: str) -> list[str] | None:
    """The fields of a /proc stat file after the command's name (state first), or None."""
    try:
        return Path(where).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of a process so far, or of its thread ``tid`` (0 once gone)."""
    fields = _stat(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_queue_seconds(pid: int, tid: int) -> float:
    """How long a thread has waited runnable for a core (schedstat's second field; 0 when the
    kernel keeps no schedstats or the thread is gone): CPU contention, apart from its own
    CPU time and from sleeping (the socket, the GIL)."""
    try:
        return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def children(pid: int) -> dict[int, list[str]]:
    """The live (or not yet reaped) children of a process, with their /proc stat fields."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(f"/proc/{entry.name}/stat")
            if fields is not None and int(fields[1]) == pid:
                found[int(entry.name)] = fields
    return found


def _client(pid: int) -> bool:
    """Whether a PostgreSQL child serves a TCP client (its title names the client's address;
    the background workers' do not)."""
    try:
        return b"127.0.0.1(" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a server and its children so far, the reaped ones included (a PostgreSQL
    cluster: the postmaster, a backend per connection, its background workers)."""
    # The children before the parent: a child reaped meanwhile is in the parent's cutime.
    total = sum(int(f[11]) + int(f[12]) for f in children(pid).values())
    fields = _stat(f"/proc/{pid}/stat")
    if fields is not None:
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


# --- the floor: a bare client ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def acknowledged(url: str) -> AsyncIterator[ClientConnection]:
    """A bare graphql-transport-ws connection to the sandbox (websockets alone, no pings of
    ours), its ``connection_init`` acknowledged."""
    opts = SandboxOptions()
    token = await launcher.token(url)
    async with connect(
        protocol.subscription_url(url, opts.app_key),
        subprotocols=[Subprotocol(protocol.SUBPROTOCOL)],
        compression=None,
        max_size=2**24,
        ping_interval=None,
    ) as ws:
        await ws.send(protocol.connection_init(token, opts.app_key))
        await ws.recv()
        yield ws


async def bare_client(url: str, n: int) -> dict[str, Any]:
    """Receive ``n`` events and parse each frame, nothing else; events/s from the subscribe
    message to the last event."""
    sub_id = str(uuid.uuid4())  # as the daemon's: the sandbox's frames are built for its length
    async with acknowledged(url) as ws:
        sub = protocol.SubscribeInput(chain_code=CHAIN, offset="0")
        cpu0 = time.process_time()
        started = time.perf_counter()
        await ws.send(protocol.subscribe(sub_id, sub))
        got = 0
        last: Any = None
        async with asyncio.timeout(60 + n / 1000):
            async for frame in ws:
                msg = orjson.loads(frame)
                if msg["type"] == "next":
                    got += 1
                    if got == n:
                        last = msg
                        break
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu0
        await ws.send(protocol.complete(sub_id))
    return {
        "seconds": round(elapsed, 3),
        "events_per_s": round(n / elapsed),
        "client_cpu_s": round(cpu, 2),
        "last_offset": last["payload"]["data"]["newEvent"]["metadata"]["offset"],
    }


# --- the webhook floor: the HTTP client alone -----------------------------------------------


async def bare_webhook(url: str, n: int, workers: int) -> dict[str, Any]:
    """aiohttp as the webhook sink uses it with batch_size 1, nothing else: ``workers`` tasks
    each POST one document at a time (the backlog's ``newEvent`` objects, sliced from the
    sandbox's templates), over one keep-alive pool as the daemon's ([http] defaults), with the
    sink's headers, timeouts and bounded read of the answer. events/s from the first POST to
    the last answer; client_cpu_s is this process's CPU over that time."""
    events = TemplatedEvents(CHAIN, SEED)
    head = '{"data":{"newEvent":'
    # The defaults the daemon runs with: the pool as runtime.assembly.http_client makes it,
    # the timeout as WebhookSink makes it.
    pool = HttpSettings()
    t = WebhookSinkSettings.model_fields["timeout_s"].default
    timeout = aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t, sock_read=t)
    connector = aiohttp.TCPConnector(
        limit=pool.max_connections, keepalive_timeout=pool.keepalive_expiry_s
    )
    todo = iter(range(n))
    async with aiohttp.ClientSession(connector=connector) as http:

        async def post() -> None:
            for j in todo:
                text = events.payload(j)
                assert text.startswith(head)
                headers = {
                    "Content-Type": "application/json",
                    "X-Opera-Stream": STREAM,
                    "Idempotency-Key": events.unique_id(j),
                }
                async with http.post(
                    url,
                    data=text[len(head) : -2].encode(),
                    headers=headers,
                    timeout=timeout,
                    allow_redirects=False,
                ) as response:
                    await response.content.read(ERROR_BODY_BYTES)
                    if response.status != 200:
                        raise RuntimeError(f"the receiver answered {response.status}")

        cpu0 = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(post() for _ in range(workers)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu0
    return {
        "events_per_s": round(n / elapsed),
        "seconds": round(elapsed, 3),
        "client_cpu_s": round(cpu, 2),
    }


# --- the webhook receiver (its own process) ---------------------------------------------------


async def _receiver(port: int) -> None:
    """HTTP/1.1 keep-alive: 200 to every POST at once; ``GET /count``: distinct events seen."""
    ids: set[bytes] = set()
    posts = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal posts
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                chunked = False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"transfer-encoding" and b"chunked" in value.lower():
                        chunked = True
                if chunked:
                    parts = []
                    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                        parts.append(await reader.readexactly(size))
                        await reader.readexactly(2)
                    await reader.readuntil(b"\r\n")
                    body = b"".join(parts)
                else:
                    body = await reader.readexactly(length)
                if head.startswith(b"GET /count"):
                    out = json.dumps({"events": len(ids), "posts": posts}).encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(out), out)
                    )
                else:
                    posts += 1
                    doc = orjson.loads(body)
                    for d in doc if isinstance(doc, list) else [doc]:
                        ids.add(d["metadata"]["uniqueEventId"].encode())
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=2**20)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


class Receiver:
    """The receiver as a process on a free port."""

    def __init__(self) -> None:
        self.port = launcher.free_port()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--receiver", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the webhook receiver did not start")
        self.url = f"http://127.0.0.1:{self.port}/events"

    def count(self) -> int:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/count", timeout=10) as r:
            return int(json.loads(r.read())["events"])

    def stop(self) -> None:
        launcher.stop(self.proc, 5)


# --- PostgreSQL (a throwaway server from tests/pg.py) ----------------------------------------


class Postgres:
    def __init__(self) -> None:
        import pg
        import pytest

        bindir = pg.find_bindir()
        if bindir is None:
            raise RuntimeError(pg.NOT_INSTALLED)
        try:
            # PostgreSQL's own default shared_buffers, not the suite's 16 MB: the run's table
            # (0.74 KB a row with its indexes, measured) outgrows 16 MB at about 22,000 events,
            # and evicting dirty pages then costs the server CPU a stock server would not spend.
            self.server = pg.PostgresServer(bindir, shared_buffers="128MB")
        except pytest.skip.Exception as exc:  # root without a postgres user
            raise RuntimeError(str(exc)) from None
        try:
            self.server.init()
            self.server.start()
            self.server.execute(f'CREATE DATABASE "{pg.DATABASE}"')
        except BaseException:
            self.server.remove()
            raise
        self.dsn = self.server.dsn()

    def cpu_seconds(self) -> float:
        """The cluster's CPU so far, once the backends of the connections closed before the
        call are gone (bounded wait): one exiting meanwhile could count twice."""
        pid = self.server.pid
        assert pid is not None
        deadline = time.monotonic() + 5
        while any(_client(c) for c in children(pid)) and time.monotonic() < deadline:
            time.sleep(0.01)
        return tree_cpu_seconds(pid)

    def count(self, table: str) -> int:
        """The table's rows; then it is dropped (the next rounds need no room for it)."""
        import pg

        rows = int(asyncio.run(pg.sql(self.dsn, "fetchval", f"SELECT count(*) FROM {table}")))
        asyncio.run(pg.sql(self.dsn, "execute", f"DROP TABLE {table}"))
        return rows

    def drop_schema(self, schema: str) -> None:
        import pg

        asyncio.run(pg.sql(self.dsn, "execute", f'DROP SCHEMA "{schema}" CASCADE'))

    def remove(self) -> None:
        self.server.remove()


# --- the daemon -------------------------------------------------------------------------------


def open_state(db: Path) -> sqlite3.Connection | None:
    """The daemon's SQLite state store, read-only (None until it and its checkpoints exist)."""
    if not db.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1, check_same_thread=False)
        conn.execute("SELECT 1 FROM checkpoints LIMIT 1").fetchall()
    except sqlite3.Error:
        return None
    return conn


class SqliteCheckpoint:
    """A stream's checkpoint offset in the daemon's SQLite state store (None until the store
    and its checkpoint exist)."""

    def __init__(self, db: Path, stream: str = STREAM) -> None:
        self._db = db
        self._stream = stream
        self._conn: sqlite3.Connection | None = None

    def read(self) -> int | None:
        if self._conn is None:
            self._conn = open_state(self._db)
            if self._conn is None:
                return None
        # fetchall: no read transaction stays open
        rows = self._conn.execute(
            "SELECT offset FROM checkpoints WHERE stream = ?", (self._stream,)
        ).fetchall()
        return int(rows[0][0]) if rows else None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class PostgresCheckpoint:
    """The same in a PostgreSQL state store's schema: one connection, on an event loop of its
    own (a poll is one query, not a connection each)."""

    def __init__(self, dsn: str, schema: str) -> None:
        import asyncpg

        self._loop = asyncio.new_event_loop()
        self._conn = self._loop.run_until_complete(asyncpg.connect(dsn))
        self._query = f'SELECT "offset" FROM "{schema}".checkpoints WHERE stream = $1'
        self._not_yet = (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError)

    def read(self) -> int | None:
        try:
            offset = self._loop.run_until_complete(self._conn.fetchval(self._query, STREAM))
        except self._not_yet:
            return None  # not created yet
        return None if offset is None else int(offset)

    def close(self) -> None:
        self._loop.run_until_complete(self._conn.close())
        self._loop.close()


def subscribed_at(log: Path) -> float | None:
    """When the daemon subscribed (epoch s): its first "subscribed" record."""
    with log.open(errors="replace") as f:
        for line in f:
            if '"subscribed"' not in line:
                continue
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "subscribed":
                    return datetime.fromisoformat(record["timestamp"]).timestamp()
    return None


def state_schema(table: str) -> str:
    """pgstate: the state store's schema in the throwaway server, one per run."""
    return f"{table}_state"


def state_in_postgres(dsn: str, table: str) -> str:
    """pgstate: the lines of [state] that put the store in PostgreSQL."""
    return f'backend = "postgres"\ndsn = "{dsn}"\nschema = "{state_schema(table)}"\n'


def sink_table(sink: str, work: Path, *, hook: str, dsn: str, table: str) -> str:
    if sink == "jsonl":
        return f'[sink]\npath = "{work}/events.jsonl"\nfsync = true\n'
    if sink == "sqlite":
        return '[sink]\ntype = "sqlite"\n'
    if sink in ON_POSTGRES:
        return f'[sink]\ntype = "postgres"\ndsn = "{dsn}"\ntable = "{table}"\n'
    batch = 50 if sink == "webhook50" else 1
    return f'[sink]\ntype = "webhook"\nurl = "{hook}"\nbatch_size = {batch}\n'


def profile(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """BENCH_PROFILE=DIR: sample the daemon with py-spy (folded stacks, written when it exits;
    the profile's own cost slows the run a little)."""
    where = os.environ.get("BENCH_PROFILE")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not where or not Path(spy).exists():
        return None
    dest = Path(where) / out.name
    cmd = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "-o", str(dest)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def floor_run(
    url: str, n: int, last_offset: int, sandbox_pid: int, round_no: int
) -> dict[str, Any]:
    """One run of the bare client over the whole backlog (and the sandbox's CPU meanwhile),
    printed."""
    sandbox_cpu = cpu_seconds(sandbox_pid)
    floor = asyncio.run(bare_client(url, n))
    floor["sandbox_cpu_s"] = round(cpu_seconds(sandbox_pid) - sandbox_cpu, 2)
    if int(floor["last_offset"]) != last_offset:
        raise RuntimeError(f"the backlog ends at {floor['last_offset']}")
    print(
        f"round {round_no}: floor {floor['events_per_s']:,} events/s, "
        f"{floor['client_cpu_s'] / n * 1e6:.1f} µs CPU/event",
        flush=True,
    )
    return floor


def run_daemon(
    url: str,
    n: int,
    last_offset: int,
    work: Path,
    *,
    sink: str,
    workers: int | None,
    counter: Callable[[], int],
    hook: str = "",
    dsn: str = "",
    table: str = "",
    server_cpu: Callable[[], float] | None = None,
    history: Path | None = None,
) -> dict[str, Any]:
    work.mkdir(parents=True)
    if history is not None:
        shutil.copyfile(history, work / "state.db")
    config = work / "config.toml"
    config.write_text(
        launcher.stream_config(url, stream=STREAM, chain=CHAIN)
        + f"""
[streams.{STREAM}.subscription]
offset = "0"
[state]
path = "{work}/state.db"
synchronous = "full"
{state_in_postgres(dsn, table) if sink == "pgstate" else ""}
{sink_table(sink, work, hook=hook, dsn=dsn, table=table)}
{"" if workers is None else f"[pipeline]{chr(10)}workers = {workers}"}
[metrics]
port = 0
[log]
format = "json"
level = "info"
"""
    )
    log = work / "daemon.log"
    server_before = None if server_cpu is None else server_cpu()
    spawned = time.time()
    proc = launcher.spawn(["run", "--config", str(config)], log)
    profiler = profile(proc.pid, work.parent / f"profile-{work.name}.txt")
    peak = 0.0
    state: SqliteCheckpoint | PostgresCheckpoint = (
        PostgresCheckpoint(dsn, state_schema(table))
        if sink == "pgstate"
        else SqliteCheckpoint(work / "state.db")
    )
    first: float | None = None  # the loop thread's CPU at the first checkpoint seen
    first_at, first_wait = 0.0, 0.0  # ... and the time, and its wait for a core, then
    try:
        deadline = time.monotonic() + 60 + n / 200
        polls = 0
        while True:
            if polls % 10 == 0:
                peak = max(peak, proc_status(proc.pid, "VmRSS"))
            polls += 1
            cp = state.read()
            if cp is not None and first is None:  # the loop thread's CPU from here on
                first = cpu_seconds(proc.pid, proc.pid)
                first_at, first_wait = time.monotonic(), run_queue_seconds(proc.pid, proc.pid)
            if cp is not None and cp >= last_offset:
                done = time.time()
                break
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited ({proc.returncode}); see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not finish in time; see {log}")
            time.sleep(0.01)
        peak = max(peak, proc_status(proc.pid, "VmRSS"), proc_status(proc.pid, "VmHWM"))
        cpu = cpu_seconds(proc.pid)
        # Over the whole backlog (the sandbox's offsets are not one per event, so they cannot
        # say how many were done before the first poll): a slight underestimate.
        loop_us = None if first is None else (cpu_seconds(proc.pid, proc.pid) - first) / n * 1e6
        # The loop thread's share of the time since then: on a core, waiting for one, and
        # the rest asleep (for the socket, for room, for the GIL).
        span_s = time.monotonic() - first_at
        busy = None if first is None else (cpu_seconds(proc.pid, proc.pid) - first) / span_s
        queued = (
            None if first is None else (run_queue_seconds(proc.pid, proc.pid) - first_wait) / span_s
        )
    finally:
        state.close()
        launcher.stop(proc, 60)
        if profiler is not None:
            try:
                profiler.wait(60)
            except subprocess.TimeoutExpired:  # never hide the run's own error behind it
                profiler.kill()
                profiler.wait()
    start = subscribed_at(log)
    if start is None:
        raise RuntimeError(f"no 'subscribed' record in {log}")
    server_s = None if server_cpu is None else server_cpu() - (server_before or 0.0)
    delivered = counter()
    return {
        "events_per_s": round(n / (done - start)),
        "seconds": round(done - start, 3),
        "wall_events_per_s": round(n / (done - spawned)),
        "wall_seconds": round(done - spawned, 3),
        "startup_seconds": round(start - spawned, 3),
        "peak_rss_mb": round(peak, 1),
        "daemon_cpu_s": round(cpu, 2),
        # The event loop's thread (what bounds the rate): CPU per event after the first commit.
        "loop_cpu_us_per_event": None if loop_us is None else round(loop_us, 1),
        "loop_busy": None if busy is None else round(busy, 2),
        "loop_waiting_for_core": None if queued is None else round(queued, 2),
        # The sink's server (PostgreSQL: every process of the cluster), start-up included.
        "server_cpu_us_per_event": None if server_s is None else round(server_s / n * 1e6, 1),
        "delivered": delivered,
        "ok": delivered == n,
    }


def history_store(path: Path, ids: int) -> None:
    """A state store holding ``ids`` processed uniqueEventIds of the bench's stream (random
    UUIDs, as the sandbox's, stamped now so that no prune takes them): a week of a chain's
    history, which every commit's random inserts and every lookup go through."""

    async def create() -> None:
        await (await SqliteStore.open(path)).close()

    asyncio.run(create())
    now = time.time()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO processed_events (stream, event_id, processed_at) VALUES (?, ?, ?)",
            ((STREAM, i, now) for i in sorted(str(uuid.uuid4()) for _ in range(ids))),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def pgstate_count(postgres: Postgres | None, table: str) -> int:
    """The sink table's rows; then the run's state schema is dropped too."""
    if postgres is None:
        return 0
    rows = postgres.count(table)
    postgres.drop_schema(state_schema(table))
    return rows


def jsonl_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def sqlite_rows(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT count(*) FROM opera_events").fetchone()[0])


# --- the report -------------------------------------------------------------------------------


def span(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


def table(
    rounds: list[dict[str, Any]], sinks: list[str], notes: dict[str, str], workers: int
) -> str:
    floor = [f["events_per_s"] for r in rounds for f in r["floors"]]
    lines = [
        "| sink | events/s (subscribe to durable) | ratio to floor | events/s wall "
        "(incl. start-up) | peak RSS MB | sink check |",
        "|---|---|---|---|---|---|",
        f"| floor (bare client) | {span(floor, '{:,.0f}')} | 1 | - | - | - |",
    ]
    hooks = [r["webhook_floor"] for r in rounds if "webhook_floor" in r]
    if hooks:
        rates = [h["events_per_s"] for h in hooks]
        ratios = [h["events_per_s"] / h["floor_events_per_s"] for h in hooks]
        ok = all(h["ok"] for h in hooks)
        lines.append(
            f"| webhook floor (bare aiohttp on {HOOK_LOOP}, {workers} POSTs in flight) | "
            f"{span(rates, '{:,.0f}')} | {span(ratios, '{:.2f}')} | - | - | "
            f"{'every event once' if ok else 'FAILED (see json)'} |"
        )
    for sink in sinks:
        runs = [r["sinks"].get(sink) for r in rounds]
        good = [s for s in runs if s and "error" not in s]
        if not good:
            why = notes.get(sink) or next((s["error"] for s in runs if s), "not run")
            lines.append(f"| {sink} | skipped: {why} | | | | |")
            continue
        rates = [s["events_per_s"] for s in good]
        ratios = [s["events_per_s"] / s["floor_events_per_s"] for s in good]
        walls = [s["wall_events_per_s"] for s in good]
        rss = [s["peak_rss_mb"] for s in good]
        ok = all(s["ok"] for s in good) and len(good) == len(runs)
        check = "every event once" if ok else "FAILED (see json)"
        lines.append(
            f"| {sink} | {span(rates, '{:,.0f}')} | {span(ratios, '{:.2f}')} | "
            f"{span(walls, '{:,.0f}')} | {span(rss, '{:.1f}')} | {check} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sinks", default=",".join(SINKS), help=f"of {','.join(SINKS)}")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="the daemon's pipeline workers (default: the sink's own, as the daemon's; the "
        f"webhook floor's POSTs in flight: {WAITING_SINK_WORKERS})",
    )
    parser.add_argument(
        "--history",
        type=int,
        default=0,
        help="uniqueEventIds already in the state store before each daemon run (a week of a "
        "chain's history); the state store is SQLite's",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "compare.json")
    parser.add_argument("--receiver", type=int, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    in_flight = args.workers or WAITING_SINK_WORKERS  # the webhook floor: as the webhook sink
    if args.receiver is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_receiver(args.receiver))
        return 0
    sinks = [s.strip() for s in args.sinks.split(",") if s.strip()]
    unknown = set(sinks) - set(SINKS)
    if unknown:
        parser.error(f"unknown sinks: {', '.join(sorted(unknown))}")
    n = args.events
    compiled()
    started = machine()
    print(f"machine: {started['cores']} cores, load average {started['load_average']}", flush=True)
    expected_last = TemplatedEvents(CHAIN, SEED).key(n - 1)
    notes: dict[str, str] = {}
    postgres: Postgres | None = None
    if set(sinks) & set(ON_POSTGRES):
        try:
            postgres = Postgres()
        except Exception as exc:
            for sink in set(sinks) & set(ON_POSTGRES):
                notes[sink] = f"no PostgreSQL server ({exc})"
            print(f"{', '.join(ON_POSTGRES)}: skipped: {exc}", flush=True)
    t = time.perf_counter()
    backlog = ["--chains", CHAIN, "--backlog", str(n), "--seed", str(SEED), "--fast-backlog"]
    sandbox, url = launcher.start(["--rate", "0", *backlog])
    print(f"sandbox ready in {time.perf_counter() - t:.1f} s ({n:,} events)", flush=True)
    rounds: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="opera-compare-") as tmp:
            history: Path | None = None
            if args.history:
                t = time.perf_counter()
                history = Path(tmp) / "history.db"
                history_store(history, args.history)
                print(
                    f"state store with {args.history:,} ids of history ready in "
                    f"{time.perf_counter() - t:.1f} s ({history.stat().st_size / 1e6:.0f} MB)",
                    flush=True,
                )
            floor: dict[str, Any] | None = None  # the last floor run: the next sink's "before"
            for r in range(1, args.rounds + 1):
                result: dict[str, Any] = {"round": r, "floors": [], "sinks": {}}
                for sink in sinks:
                    if sink in notes:
                        continue
                    # A floor run on each side of every daemon run (the one after is the next
                    # one's before): the machine's speed moves within a round (2x within one
                    # run on some days), so the daemon is compared with the mean of the two.
                    if floor is None:
                        floor = floor_run(url, n, expected_last, sandbox.pid, r)
                        result["floors"].append(floor)
                    if sink == "webhook":
                        hook_rx = Receiver()
                        try:
                            with asyncio.Runner(loop_factory=factory(HOOK_LOOP)) as runner:
                                hook = runner.run(bare_webhook(hook_rx.url, n, in_flight))
                            hook["receiver_cpu_s"] = round(cpu_seconds(hook_rx.proc.pid), 2)
                            hook["ok"] = hook_rx.count() == n
                        finally:
                            hook_rx.stop()
                        hook["floor_events_per_s"] = floor["events_per_s"]
                        result["webhook_floor"] = hook
                        print(
                            f"round {r}: webhook floor (bare aiohttp, {HOOK_LOOP}) "
                            f"{hook['events_per_s']:,} events/s, "
                            f"{hook['client_cpu_s'] / n * 1e6:.0f} us of CPU per POST",
                            flush=True,
                        )
                    work = Path(tmp) / f"r{r}-{sink}"
                    receiver = Receiver() if sink.startswith("webhook") else None
                    name = f"bench_r{r}_{os.getpid()}"
                    counters: dict[str, Callable[[], int]] = {
                        "jsonl": lambda w=work: jsonl_lines(w / "events.jsonl"),
                        "sqlite": lambda w=work: sqlite_rows(w / "state.db"),
                        "postgres": lambda t=name: postgres.count(t) if postgres else 0,
                        "pgstate": lambda t=name: pgstate_count(postgres, t),
                    }
                    try:
                        sandbox_cpu = cpu_seconds(sandbox.pid)
                        run = run_daemon(
                            url,
                            n,
                            expected_last,
                            work,
                            sink=sink,
                            workers=args.workers,
                            counter=receiver.count if receiver else counters[sink],
                            hook=receiver.url if receiver else "",
                            dsn=postgres.dsn if postgres else "",
                            table=name,
                            server_cpu=postgres.cpu_seconds
                            if postgres and sink in ON_POSTGRES
                            else None,
                            history=history,
                        )
                        run["sandbox_cpu_s"] = round(cpu_seconds(sandbox.pid) - sandbox_cpu, 2)
                        if receiver is not None:
                            run["receiver_cpu_s"] = round(cpu_seconds(receiver.proc.pid), 2)
                    except Exception as exc:
                        run = {"error": str(exc)}
                    finally:
                        if receiver is not None:
                            receiver.stop()
                    after = floor_run(url, n, expected_last, sandbox.pid, r)
                    result["floors"].append(after)
                    run["floors_events_per_s"] = [floor["events_per_s"], after["events_per_s"]]
                    run["floor_events_per_s"] = round(
                        (floor["events_per_s"] + after["events_per_s"]) / 2
                    )
                    floor = after
                    result["sinks"][sink] = run
                    if "error" not in run and run["ok"]:
                        shutil.rmtree(work)  # hundreds of MB; a failed run's stays until the end
                    if "error" in run:
                        print(f"round {r}: {sink}: ERROR {run['error']}", flush=True)
                    else:
                        hook_floor = result.get("webhook_floor") if sink == "webhook" else None
                        of_hook = (
                            f", {run['events_per_s'] / hook_floor['events_per_s']:.2f} of the "
                            "webhook floor"
                            if hook_floor
                            else ""
                        )
                        print(
                            f"round {r}: {sink} {run['events_per_s']:,} events/s "
                            f"({run['events_per_s'] / run['floor_events_per_s']:.2f} of the "
                            "floors either side, "
                            + " and ".join(
                                f"{run['events_per_s'] / f:.2f}" for f in run["floors_events_per_s"]
                            )
                            + f" of each{of_hook}), "
                            f"wall {run['wall_seconds']} s, peak RSS {run['peak_rss_mb']} MB, "
                            f"loop thread {run['loop_cpu_us_per_event']} µs CPU/event "
                            f"(busy {run['loop_busy']}, waiting for a core "
                            f"{run['loop_waiting_for_core']}), "
                            + (
                                f"server {run['server_cpu_us_per_event']} µs CPU/event, "
                                if run.get("server_cpu_us_per_event") is not None
                                else ""
                            )
                            + f"delivered {run['delivered']:,}",
                            flush=True,
                        )
                rounds.append(result)
    finally:
        launcher.stop(sandbox, 30)
        if postgres is not None:
            postgres.remove()
    ended = machine()
    report = {
        "events": n,
        "rounds": args.rounds,
        "workers": args.workers,
        "history_ids": args.history,
        "sandbox": f"opera-consumer sandbox --fast-backlog --backlog {n} (one chain)",
        "measured": "events/s: from the subscription (floor: subscribe sent; daemon: its "
        "'subscribed' log record) to the last event (floor: received; daemon: the checkpoint "
        "covering it seen in the state store, 10 ms polls); wall: from the daemon's process "
        "start. Peak RSS: VmRSS every 100 ms and VmHWM at the end.",
        "machine_at_start": started,
        "machine_at_end": ended,
        "notes": notes,
        "results": rounds,
        "table": table(rounds, sinks, notes, in_flight),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(report["table"])
    print(f"\nload average at start {started['load_average']}, at end {ended['load_average']}")
    failed = any("error" in s or not s["ok"] for r in rounds for s in r["sinks"].values())
    failed = failed or any(not r["webhook_floor"]["ok"] for r in rounds if "webhook_floor" in r)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
