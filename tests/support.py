"""Test helpers: settings with test-scaled timers, sink readers, bounded waiting.

Also the positive conditions that tests wait for (issue #9 item 12: never "sleep, then assert
nothing happened"): ``committed`` (the daemon has committed the gateway's newest event, so every
event is in the sink and none is still in flight), ``committed_sink_length`` (a commit is
through) and ``sink_failures`` (an outage really met a write).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

from aiohttp import web

from consumer.commands import dlq
from consumer.config import Settings
from consumer.core.events import Event
from consumer.core.protocol import Next, decode
from consumer.core.records import DeadLetter
from consumer.errors import TransientSinkError
from consumer.runtime.daemon import Daemon
from consumer.runtime.status import StreamStatus
from consumer.runtime.stream import StreamState
from consumer.sandbox import SandboxGateway, SandboxOptions, launcher
from consumer.sinks.jsonl import JsonlSink

# Protocol timers scaled for tests: the behaviour is the same, only faster.
FAST_CONNECTION: dict[str, Any] = {
    "ping_interval_s": 0.5,
    "ack_timeout_s": 5.0,
    "complete_timeout_s": 2.0,
    "resubscribe_gap_s": 0.1,
    "backoff_initial_s": 0.05,
    "backoff_max_s": 0.5,
    "abnormal_min_s": 0.1,
    "lockout_s": 0.5,
    "lockout_jitter_s": 0.1,
    "lockout_max_s": 2.0,
    "rate_limited_s": 0.5,
}


def stream_config(url: str, **overrides: Any) -> dict[str, Any]:
    opts = SandboxOptions()
    conn = {**FAST_CONNECTION, **overrides.pop("connection", {})}
    cfg: dict[str, Any] = {
        "gateway_url": url,
        "chain_code": "DEMO",
        "app_key": opts.app_key,
        "auth": {"client_id": opts.client_id, "client_secret": opts.client_secret},
        "connection": conn,
    }
    cfg.update(overrides)
    return cfg


def make_settings(
    tmp_path: Path,
    url: str,
    *,
    streams: dict[str, dict[str, Any]] | None = None,
    pipeline: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    sink: dict[str, Any] | None = None,
    **stream_overrides: Any,
) -> Settings:
    return Settings(
        streams=streams or {"main": stream_config(url, **stream_overrides)},  # type: ignore[arg-type]
        state={"path": tmp_path / "state.db", "commit_interval_ms": 20, **(state or {})},  # type: ignore[arg-type]
        sink=sink or {"type": "jsonl", "path": tmp_path / "events.jsonl"},  # type: ignore[arg-type]
        pipeline={"workers": 4, "drain_timeout_s": 10.0, **(pipeline or {})},  # type: ignore[arg-type]
        metrics={"port": 0},  # type: ignore[arg-type]
    )


def toml_config(
    tmp_path: Path,
    url: str,
    extra: str = "",
    *,
    commit_interval_ms: int = 20,
    connection: dict[str, Any] | None = None,
    sink: str | None = None,
) -> Path:
    """The same test settings as a TOML file, for the daemon run as a process. ``sink``: the
    whole ``[sink]`` table (default: the jsonl file)."""
    conn = "\n".join(f"{k} = {v}" for k, v in {**FAST_CONNECTION, **(connection or {})}.items())
    text = f"""{launcher.stream_config(url)}
[streams.main.connection]
{conn}
[state]
path = "{tmp_path / "state.db"}"
commit_interval_ms = {commit_interval_ms}
commit_max_events = {500 if commit_interval_ms < 1000 else 10_000_000}
commit_mode = "{"adaptive" if commit_interval_ms < 1000 else "interval"}"
{sink or f'[sink]{chr(10)}path = "{tmp_path / "events.jsonl"}"'}
[metrics]
port = 0
[log]
format = "json"
level = "debug"
{extra}
"""
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def read_sink(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f]


def sink_ids(path: Path) -> list[str]:
    return [e["metadata"]["uniqueEventId"] for e in read_sink(path)]


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


async def wait_until(
    predicate: Callable[[], bool], *, timeout: float = 30.0, interval: float = 0.02
) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """:func:`wait_until` for a condition that must be awaited (a database's answer)."""
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.02)


class Held:
    """One of an object's thread steps (a method that takes one argument, as the jsonl sink's
    ``_write`` and ``_fsync_files``) held until ``release``, as by a disk that does not
    answer; ``done`` once the held call has returned or raised."""

    def __init__(self, owner: Any, step: str) -> None:
        self.entered, self.release, self.done = (threading.Event() for _ in range(3))
        real = getattr(owner, step)

        def held(arg: Any) -> None:
            self.entered.set()
            assert self.release.wait(10)
            try:
                real(arg)
            finally:
                self.done.set()

        setattr(owner, step, held)

    async def reached(self) -> None:
        await wait_until(self.entered.is_set, timeout=10)


class DownSink(JsonlSink):
    """A jsonl sink down from the start: every write fails transiently, and is retried."""

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        raise TransientSinkError("sink down")


@asynccontextmanager
async def running(settings: Settings, **kwargs: Any) -> AsyncIterator[Daemon]:
    daemon = await Daemon.create(settings, **kwargs)
    task = asyncio.create_task(daemon.run())
    try:
        yield daemon
    finally:
        daemon.request_stop()
        async with asyncio.timeout(30):
            await task


def truth_ids(events: Sequence[dict[str, Any]]) -> list[str]:
    return [e["metadata"]["uniqueEventId"] for e in events]


async def sandbox_token(gw: SandboxGateway) -> str:
    return await launcher.token(gw.url)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m consumer ARGS`` to its end, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "consumer", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def spawn_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``opera-consumer run --config CONFIG`` as a process, its output appended to ``log``."""
    return launcher.spawn(["run", "--config", str(config)], log)


async def wait_exit(proc: subprocess.Popen[bytes], seconds: float = 60.0) -> int:
    async with asyncio.timeout(seconds):
        while proc.poll() is None:
            await asyncio.sleep(0.02)
    return proc.returncode


def checkpoint(state: Path, stream: str = "main") -> tuple[str, str] | None:
    """(offset, uniqueEventId) of the stream's checkpoint in the state store, if any."""
    with closing(sqlite3.connect(state, timeout=10)) as db:
        row = db.execute(
            "SELECT offset, unique_event_id FROM checkpoints WHERE stream = ?", (stream,)
        ).fetchone()
    return None if row is None else (row[0], row[1])


SINK_FAILED = "sink write failed; retrying"  # the pipeline's log event for a failed write


def newest_offset(gw: SandboxGateway, chain: str = "DEMO") -> str:
    """The offset of the chain's newest valid event (compute it once: the log can be long)."""
    return str(gw.events(chain)[-1]["metadata"]["offset"])


def committed(state: Path, offset: str, stream: str = "main") -> bool:
    """Whether the stream's checkpoint in the state store is ``offset``. The checkpoint is the
    newest position whose whole prefix is done and commits with the sink's position, so once
    it is the gateway's newest offset every event is in the sink and none is still in flight.
    (A stream's very first event is checkpointed on arrival, before any commit.) Read only;
    False while the state store or its schema does not exist yet."""
    if not state.exists():
        return False  # sqlite3.connect would create it
    try:
        cp = checkpoint(state, stream)
    except sqlite3.OperationalError:  # no table yet (the daemon is creating the schema)
        return False
    return cp is not None and cp[0] == offset


def committed_sink_length(state: Path, sink: str = "jsonl") -> int:
    """The sink length (bytes of the jsonl file) the state store has committed; 0 while it has
    none. Positive once the daemon's first commit is through."""
    if not state.exists():
        return 0
    try:
        with closing(sqlite3.connect(state, timeout=10)) as db:
            row = db.execute("SELECT state FROM sink_state WHERE sink = ?", (sink,)).fetchone()
    except sqlite3.OperationalError:  # no table yet
        return 0
    return 0 if row is None else sink_length(row[0])


def sink_length(position: str | None) -> int:
    """The length a jsonl position records: a bare number (from before positions named their
    file), or the ``length`` of its JSON."""
    if position is None:
        return 0
    if position.isdigit():
        return int(position)
    length = json.loads(position)["length"]
    assert isinstance(length, int)
    return length


def caught(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler for ``sig`` (its SigCgt mask, in /proc)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next((line.split()[1] for line in text.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(mask, 16) >> (sig - 1) & 1)


async def stop_when_committed(
    proc: subprocess.Popen[bytes], state: Path, offset: str, log: Path, timeout: float = 180.0
) -> None:
    """Wait until the checkpoint covers ``offset`` (every event written, none in flight) and
    the daemon handles SIGTERM, then SIGTERM: the daemon must still be running then and exit 0.
    Killed whatever happens. (A checkpoint that covered it before the spawn would have the
    signal sent while the interpreter starts, when it takes its default action.)"""
    try:
        await wait_until(
            lambda: (
                (committed(state, offset) and caught(proc.pid, signal.SIGTERM))
                or proc.poll() is not None
            ),
            timeout=timeout,
            interval=0.1,
        )
        assert proc.poll() is None, tail(log)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0, tail(log)
    finally:
        proc.kill()
        await wait_exit(proc)


def tail(log: Path, chars: int = 3000) -> str:
    """The end of a daemon's log, for an assertion message."""
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def log_records(log: Path, event: str) -> list[dict[str, Any]]:
    """The daemon's records of ``event`` in a JSON log (other lines skipped)."""
    if not log.exists():
        return []
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            found.append(record)
    return found


def sink_failures(log: Path) -> list[dict[str, Any]]:
    """The daemon's "sink write failed; retrying" records in a JSON log."""
    return log_records(log, SINK_FAILED)


def read_table(text: str) -> list[dict[str, str]]:
    """The rows of a table the commands print (consumer/commands/output.py ``emit``), by
    column: a cell may hold spaces, so each column is cut where its header begins."""
    header, *lines = text.splitlines()
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    bounds = [*starts[1:], None]
    return [
        {name: line[a:b].strip() for name, a, b in zip(names, starts, bounds, strict=True)}
        for line in lines
    ]


@asynccontextmanager
async def untrusted_tls_server(directory: Path) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TLS server on 127.0.0.1 whose certificate no trusted CA signed: yields its port and
    the requests it got, which stay empty unless a client completed the handshake anyway."""
    import ssl

    from nats_server import make_certificates

    certs = make_certificates(directory)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.read(65536))  # only after a completed handshake
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1], requests


def assert_each_once_in_order(
    lines: Sequence[dict[str, Any]], truth: Sequence[dict[str, Any]]
) -> None:
    """The sink's events (``lines``) are the gateway's (``truth``), each exactly once, and each
    resource's (primaryKey's) in the gateway's order."""
    from collections import Counter

    def uid(e: dict[str, Any]) -> str:
        return str(e["metadata"]["uniqueEventId"])

    assert Counter(map(uid, lines)) == Counter(map(uid, truth))  # once, all
    order_truth: dict[str, list[str]] = {}
    for e in truth:
        order_truth.setdefault(e["primaryKey"], []).append(uid(e))
    order_sink: dict[str, list[str]] = {}
    for e in lines:
        order_sink.setdefault(e["primaryKey"], []).append(uid(e))
    assert order_sink == order_truth


def stream_status(**fields: Any) -> StreamStatus:
    """A stream's status as the daemon reports it: one session, streaming, nothing counted;
    ``fields`` say what differs."""
    base: dict[str, Any] = {
        "name": "main",
        "state": StreamState.STREAMING,
        "last_close": "",
        "received": 0,
        "delivered": 0,
        "duplicates": 0,
        "dead_lettered": 0,
        "ignored": 0,
        "malformed": 0,
        "connections": 1,
        "token_fetches": 1,
        "token_failures": 0,
        "closes": {},
        "in_flight": 0,
        "position": None,
        "checkpoint_moved_at": None,
        "last_event_at": None,
        "srtt_s": None,
    }
    return StreamStatus(**(base | fields))


def as_received(newevent: dict[str, Any] | bytes) -> Event:
    """The event the daemon builds from a compact ``next`` frame of this ``newEvent`` (an
    object, or its JSON text): kept as its text, not parsed."""
    text = (
        newevent
        if isinstance(newevent, bytes)
        else json.dumps(newevent, separators=(",", ":")).encode()
    )
    msg = decode(b'{"id":"s","type":"next","payload":{"data":{"newEvent":' + text + b"}}}")
    assert isinstance(msg, Next) and msg.event.text == text, msg
    return msg.event


def first_line_then_close(argv: list[str]) -> tuple[str, str, int]:
    """``argv | head -1``: read one line of its output, close the pipe; that line, stderr
    and the exit status."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            line = proc.stdout.readline()
            proc.stdout.close()
            err = proc.stderr.read()
            return line, err, proc.wait(timeout=60)
        finally:
            proc.kill()


def dead_letter(i: int, *, stream: str = "main", detail: Any = (), name: str = "E") -> DeadLetter:
    """A dead letter of event ``uid-<i>`` (offset 100 + i, primaryKey ``pk-<i>``), as the
    pipeline writes one for a sink's refusal: for the dlq commands' tests."""
    uid = f"uid-{i}"
    event = {
        "metadata": {"offset": str(100 + i), "uniqueEventId": uid},
        "eventName": name,
        "primaryKey": f"pk-{i}",
        "detail": list(detail),
    }
    return DeadLetter(
        stream=stream,
        reason="sink_rejected",
        error="x",
        payload=json.dumps(event),
        offset=str(100 + i),
        unique_event_id=uid,
        event_name=name,
        primary_key=f"pk-{i}",
    )


def dead_letter_rows(state: Path) -> list[dict[str, Any]]:
    """The SQLite state store's dead_letters rows, oldest first."""
    with closing(sqlite3.connect(state, timeout=10)) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM dead_letters ORDER BY id")]


async def replayed(settings: Settings, ids: Sequence[int] | None = None) -> list[dlq.Outcome]:
    """`dlq replay` of these dead letters (None: every one): its outcomes, in order."""
    outcomes: list[dlq.Outcome] = []
    selection = dlq.Selection(ids=None if ids is None else tuple(ids))
    await dlq.replay(settings, selection, dry_run=False, on_outcome=outcomes.append)
    return outcomes


@asynccontextmanager
async def serving(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 running ``serve`` for each connection; yields its port. At
    exit the connections' tasks are cancelled and awaited, then the server closed."""
    tasks: set[asyncio.Task[None]] = set()

    def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.ensure_future(serve(r, w)))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


@asynccontextmanager
async def serving_web(
    app: web.Application, *, shutdown_timeout: float = 60.0
) -> AsyncIterator[str]:
    """An aiohttp ``app`` on 127.0.0.1 and a free port: its base URL (a REST API, a receiver)."""
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
