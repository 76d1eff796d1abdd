"""Catch-up benchmark: events/s from a sandbox backlog into a sink, and peak RSS.

    .venv/bin/python bench/catchup.py [--events 200000] [--workers N]
        [--sink jsonl|sqlite|postgres|webhook|nats|redis] [--dsn postgresql://...]
        [--batch-size N]

1. Starts the sandbox gateway in its own process with a backlog on two chains.
2. Measures the sandbox's own ceiling with a bare receive-only client (connect, subscribe,
   json.loads each frame, nothing else) on chain BARE.
3. Runs `opera-consumer run` as a process on chain BENCH with durable checkpoints (jsonl sink
   with fsync, or the sqlite sink in the state store, or the postgres sink at --dsn, or the
   webhook sink POSTing to a keep-alive HTTP/1.1 receiver in this process, or the nats or
   redis sink to a server this bench starts on loopback (tests/nats_server.py,
   tests/redis_server.py: Debian's nats-server and redis-server); SQLite
   synchronous=FULL, group commit) and times the catch-up until the checkpoint covers every
   event; peak RSS is the daemon's VmHWM from /proc.
Results go to stdout and bench/results/catchup.json. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from consumer.core import protocol
from consumer.sandbox import SandboxOptions, launcher

ROOT = Path(__file__).resolve().parent.parent


async def bare_client(url: str, chain: str, n: int) -> float:
    """Events/s a client that only receives and parses can take from the sandbox."""
    opts = SandboxOptions()
    token = await launcher.token(url)
    ws_url = protocol.subscription_url(url, opts.app_key)
    subprotocols = [Subprotocol(protocol.SUBPROTOCOL)]
    async with connect(ws_url, subprotocols=subprotocols, compression=None, max_size=2**24) as ws:
        await ws.send(protocol.connection_init(token, opts.app_key))
        await ws.recv()
        await ws.send(
            protocol.subscribe("bare", protocol.SubscribeInput(chain_code=chain, offset="0"))
        )
        started = time.perf_counter()
        got = 0
        async with asyncio.timeout(300):
            async for frame in ws:
                if json.loads(frame).get("type") == "next":
                    got += 1
                    if got == n:
                        break
        elapsed = time.perf_counter() - started
        await ws.send(protocol.complete("bare"))
    return n / elapsed


def processed(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute("SELECT processed_count FROM checkpoints").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


SINKS = {
    "jsonl": '[sink]\npath = "{work}/events.jsonl"\nfsync = true\n',
    "sqlite": '[sink]\ntype = "sqlite"\n',
    "postgres": '[sink]\ntype = "postgres"\ndsn = "{dsn}"\ntable = "bench_{stamp}"\n',
    "webhook": '[sink]\ntype = "webhook"\nurl = "{url}"\nbatch_size = {batch_size}\n',
    "nats": '[sink]\ntype = "nats"\nservers = ["{bus}"]\nstream = "BENCH"\n',
    "redis": '[sink]\ntype = "redis"\nurl = "{bus}"\n',
}


class _Receiver(ThreadingHTTPServer):
    """Counts the distinct events POSTed to it (an array or a single event per request)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.ids: set[str] = set()
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Receiver

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        docs = body if isinstance(body, list) else [body]
        with self.server.lock:
            self.server.ids.update(d["metadata"]["uniqueEventId"] for d in docs)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def delivered(
    sink: str,
    work: Path,
    dsn: str | None,
    stamp: str,
    receiver: _Receiver | None,
    *,
    bus: str = "",
) -> int:
    """What the sink holds at the end (every event once is the pass condition)."""
    if receiver is not None:
        return len(receiver.ids)
    if sink in ("nats", "redis"):
        return asyncio.run(_bus_count(sink, bus))
    if sink == "jsonl":
        return sum(1 for _ in (work / "events.jsonl").open("rb"))
    if sink == "sqlite":
        with sqlite3.connect(work / "state.db") as db:
            return int(db.execute("SELECT count(*) FROM opera_events").fetchone()[0])

    async def count() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return int(await conn.fetchval(f"SELECT count(*) FROM bench_{stamp}"))
        finally:
            await conn.close()

    return asyncio.run(count())


async def _bus_count(sink: str, bus: str) -> int:
    if sink == "nats":
        import nats  # only for this sink

        nc = await nats.connect(bus)
        try:
            info = await nc.jetstream().stream_info("BENCH")
            return int(info.state.messages)
        finally:
            await nc.close()
    from redis.asyncio import Redis  # only for this sink

    client = Redis.from_url(bus)
    try:
        return int(await client.xlen("opera:BENCH"))
    finally:
        await client.aclose()


@contextlib.contextmanager
def bus_server(sink: str) -> Iterator[str]:
    """A nats-server (JetStream) or redis-server on loopback for the run: its URL."""
    if sink not in ("nats", "redis"):
        yield ""
        return
    sys.path.insert(0, str(ROOT / "tests"))
    if sink == "nats":
        import nats_server  # tests/nats_server.py

        binary, make = nats_server.find_binary(), nats_server.NatsServer
    else:
        import redis_server  # tests/redis_server.py

        binary, make = redis_server.find_binary(), redis_server.RedisServer
    if binary is None:
        raise SystemExit(f"{sink}: server not installed (make bus-servers)")
    server = make(binary)
    server.start()
    try:
        yield server.url if sink == "nats" else server.url()
    finally:
        server.remove()


def run_daemon(
    url: str,
    n: int,
    workers: int | None,
    work: Path,
    *,
    sink: str,
    dsn: str | None,
    batch_size: int,
    bus: str = "",
) -> dict[str, float]:
    stamp = str(int(time.time()))
    receiver = _Receiver() if sink == "webhook" else None
    if receiver is not None:
        threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/events" if receiver else ""
    config = work / "config.toml"
    config.write_text(
        launcher.stream_config(url, stream="bench", chain="BENCH")
        + f"""
[streams.bench.subscription]
offset = "0"
[state]
path = "{work}/state.db"
synchronous = "full"
{SINKS[sink].format(work=work, dsn=dsn, stamp=stamp, url=hook, batch_size=batch_size, bus=bus)}
{"" if workers is None else f"[pipeline]{chr(10)}workers = {workers}"}
[metrics]
port = 0
[log]
format = "json"
level = "warning"
"""
    )
    db = work / "state.db"
    started = time.perf_counter()
    proc = launcher.spawn(["run", "--config", str(config)], work / "daemon.log")
    try:
        deadline = time.monotonic() + 900
        while processed(db) < n:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon failed; see {work}/daemon.log")
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        rss = peak_rss_mb(proc.pid)
    finally:
        launcher.stop(proc, 60)
    lines = delivered(sink, work, dsn, stamp, receiver, bus=bus)
    if receiver is not None:
        receiver.shutdown()
    return {"seconds": elapsed, "events_per_s": n / elapsed, "peak_rss_mb": rss, "lines": lines}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=None, help="default: the sink's own")
    parser.add_argument("--sink", choices=sorted(SINKS), default="jsonl")
    parser.add_argument("--dsn", help="PostgreSQL DSN for --sink postgres")
    parser.add_argument("--batch-size", type=int, default=1, help="events per POST (webhook)")
    args = parser.parse_args()
    if args.sink == "postgres" and not args.dsn:
        parser.error("--sink postgres needs --dsn")
    sandbox, url = launcher.start(
        ["--rate", "0", "--chains", "BARE,BENCH", "--backlog", str(args.events)]
    )
    try:
        ceiling = asyncio.run(bare_client(url, "BARE", args.events))
        with (
            tempfile.TemporaryDirectory(prefix="opera-bench-") as tmp,
            bus_server(args.sink) as bus,
        ):
            result = run_daemon(
                url,
                args.events,
                args.workers,
                Path(tmp),
                sink=args.sink,
                dsn=args.dsn,
                batch_size=args.batch_size,
                bus=bus,
            )
    finally:
        launcher.stop(sandbox, 30)
    report = {
        "events": args.events,
        "workers": args.workers,
        "sink": args.sink,
        "batch_size": args.batch_size if args.sink == "webhook" else None,
        "sandbox_ceiling_events_per_s": round(ceiling),
        "consumer_events_per_s": round(result["events_per_s"]),
        "consumer_seconds": round(result["seconds"], 2),
        "consumer_peak_rss_mb": round(result["peak_rss_mb"], 1),
        "sink_lines": int(result["lines"]),
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"catchup-{args.sink}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report["sink_lines"] == args.events else 1


if __name__ == "__main__":
    sys.exit(main())
