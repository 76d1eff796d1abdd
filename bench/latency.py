"""End-to-end latency: from an event's timestamp to the moment it is durable in the daemon.

    .venv/bin/python bench/latency.py [--rates 100,1000,5000] [--seconds 20] [--warmup 5]
        [--poll-ms 2] [--drain 5] [--commit-interval-ms N]

For each rate (events per second, one chain):
1. The sandbox gateway runs in its own process (`opera-consumer sandbox --fast-backlog
   --live-timestamps --rate R --backlog 0`): every event carries the wall clock's time (UTC,
   microseconds) at which it entered the gateway's log; a caught-up subscriber is sent it at
   that moment. The sandbox and this process read the same host clock.
2. The daemon (`python -OO -m consumer run`, fresh state directory) consumes it into the jsonl
   sink with fsync and durable checkpoints (SQLite synchronous=FULL; the daemon's default
   commit interval and size unless --commit-interval-ms).
3. This process polls the stream's checkpoint in the state store (a read-only connection,
   every --poll-ms) and records when each advance became visible. A visible checkpoint is
   durable: SQLite makes a commit visible after its fsync, and the checkpoint only covers
   events the sink has written and fsynced. So an event is durable at the first poll that saw
   a checkpoint at or past its offset (an overestimate of at most one poll interval).
4. After --warmup seconds of events (connection, catch-up of the first events), the events
   whose timestamps fall in the next --seconds are measured: durable instant - timestamp,
   for every event (read back from the jsonl file; polls go on --drain seconds after the
   window, and an event still not durable then is counted, and fails the run). p50, p90,
   p99 and max per rate go to stdout and bench/results/latency.json, with the achieved rate,
   the daemon's CPU and the load average.
5. Just before the daemon, against a sandbox of its own at the same rate, the **floor**: a bare
   loop in this process (websockets, ``orjson.loads`` per frame) that appends each event's line
   to a file in the same directory and fsyncs it, a batch at a time (whatever arrived while the
   last fsync ran); an event is durable when its fsync returns. The same window and percentiles:
   a p99 the floor misses too is the disk's (a stall), not the daemon's.
6. For both windows, the share of the time some task on the machine was stalled on I/O
   (``/proc/pressure/io``, its ``some`` total; None without PSI): a disk that stalls shows
   there. Machine-wide, so the measured process's own fsyncs count too.

Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from compare import (  # bench/ is on sys.path
    SqliteCheckpoint,
    acknowledged,
    compiled,
    cpu_seconds,
    machine,
    proc_status,
)

from consumer.core import protocol
from consumer.runtime.metrics import event_time
from consumer.sandbox import launcher

ROOT = Path(__file__).resolve().parent.parent
CHAIN = "DEMO"
STREAM = "latency"
UTC = ZoneInfo("UTC")


def io_stalled_s() -> float | None:
    """Seconds some task on this machine spent stalled on I/O since boot (``/proc/pressure/io``,
    the ``some`` line's total; None without PSI). Machine-wide: the fsyncs of the process
    measured count too, so compare the floor's window with the daemon's."""
    try:
        with open("/proc/pressure/io") as f:
            some = f.readline().split()
    except OSError:
        return None
    total = dict(field.split("=", 1) for field in some[1:]).get("total")
    return int(total) / 1e6 if total is not None else None


def stalled_percent(start: float | None, end: float | None, seconds: float) -> float | None:
    return None if start is None or end is None else round(100 * (end - start) / seconds, 1)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted values."""
    k = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def start_sandbox(rate: float) -> tuple[subprocess.Popen[bytes], str]:
    live = ["--rate", f"{rate:g}", "--fast-backlog", "--live-timestamps"]
    return launcher.start([*live, "--chains", CHAIN, "--backlog", "0"])


def summary(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        raise RuntimeError("no event measured")
    ms = sorted(x * 1000 for x in latencies)
    return {
        "p50_ms": round(percentile(ms, 50), 1),
        "p90_ms": round(percentile(ms, 90), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(ms[-1], 1),
        "min_ms": round(ms[0], 1),
        "mean_ms": round(statistics.fmean(ms), 1),
    }


async def durable_floor(
    url: str, args: argparse.Namespace, path: Path
) -> tuple[list[float], float | None]:
    """The floor (5. above): per event timestamped in the window, its fsync's return minus its
    timestamp; and the share of the window the machine was stalled on I/O. Every wait is
    bounded."""
    stamps: list[float | None] = []  # of the lines not yet written, in order
    lines: list[bytes] = []
    latencies: list[float] = []
    window: list[float] = []  # [measure_from, measure_to] once the first event arrived
    stalled: dict[str, float | None] = {}  # io_stalled_s() at the window's start and end
    wake = asyncio.Event()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)

    def write(data: bytes) -> None:
        os.write(fd, data)
        os.fsync(fd)

    async def writer() -> None:
        while True:
            await wake.wait()
            wake.clear()
            batch, data = stamps[:], b"".join(lines)
            del stamps[:], lines[:]
            await asyncio.to_thread(write, data)
            now = time.time()
            latencies.extend(now - t for t in batch if t is not None and window[0] <= t < window[1])

    try:
        async with acknowledged(url) as ws:
            sub_id = str(uuid.uuid4())  # as the daemon's: the sandbox's frames are built for it
            await ws.send(protocol.subscribe(sub_id, protocol.SubscribeInput(chain_code=CHAIN)))
            task = asyncio.create_task(writer())
            try:
                async with asyncio.timeout(60 + args.warmup + args.seconds + args.drain):
                    async for frame in ws:
                        msg = orjson.loads(frame)
                        if msg["type"] == "ping":
                            await ws.send(protocol.PONG)
                        if msg["type"] != "next":
                            continue
                        ev = msg["payload"]["data"]["newEvent"]
                        if not window:
                            start = time.time() + args.warmup
                            window[:] = [start, start + args.seconds]
                        stamps.append(event_time(ev.get("timestamp"), UTC))
                        lines.append(orjson.dumps(ev) + b"\n")
                        wake.set()
                        now = time.time()
                        if "start" not in stalled and now >= window[0]:
                            stalled["start"] = io_stalled_s()
                        if "end" not in stalled and now >= window[1]:
                            stalled["end"] = io_stalled_s()
                        if now >= window[1] + args.drain:
                            break
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        os.close(fd)
    return latencies, stalled_percent(stalled.get("start"), stalled.get("end"), args.seconds)


def run_floor(rate: float, args: argparse.Namespace, work: Path) -> dict[str, float | None]:
    sandbox, url = start_sandbox(rate)
    try:
        latencies, stalled = asyncio.run(durable_floor(url, args, work / "floor.jsonl"))
    finally:
        launcher.stop(sandbox, 30)
    return {
        **{f"floor_{k}": v for k, v in summary(latencies).items()},
        "floor_io_stalled_percent": stalled,
    }


def run_rate(rate: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sandbox, url = start_sandbox(rate)
    commit = f"commit_interval_ms = {args.commit_interval_ms}\n" if args.commit_interval_ms else ""
    config = work / "config.toml"
    config.write_text(
        launcher.stream_config(url, stream=STREAM, chain=CHAIN)
        + f"""
[state]
path = "{work}/state.db"
synchronous = "full"
{commit}[sink]
path = "{work}/events.jsonl"
fsync = true
[metrics]
port = 0
[log]
format = "json"
level = "warning"
"""
    )
    sink = work / "events.jsonl"
    log = work / "daemon.log"
    proc = launcher.spawn(["run", "--config", str(config)], log)
    advances: list[tuple[int, float]] = []  # (checkpoint offset, when first seen)
    poll = args.poll_ms / 1000
    peak = 0.0
    state = SqliteCheckpoint(work / "state.db", STREAM)
    try:
        # Until the first checkpoint: the daemon is up and streaming.
        deadline = time.monotonic() + 60
        while state.read() is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start streaming; see {log}")
            time.sleep(0.05)
        streaming = time.time()
        measure_from = streaming + args.warmup
        measure_to = measure_from + args.seconds
        cpu_at: dict[str, float] = {}
        sandbox_cpu_at: dict[str, float] = {}
        stalled: dict[str, float | None] = {}
        last = -1
        polls = 0
        # Polls go on for --drain seconds after the window: its last events become durable.
        next_poll = time.monotonic()
        while (now := time.time()) < measure_to + args.drain:
            cp = state.read()
            if cp is not None and cp > last:
                advances.append((cp, now))
                last = cp
            if "start" not in cpu_at and now >= measure_from:
                cpu_at["start"] = cpu_seconds(proc.pid)
                sandbox_cpu_at["start"] = cpu_seconds(sandbox.pid)
                stalled["start"] = io_stalled_s()
            if "end" not in cpu_at and now >= measure_to:
                cpu_at["end"] = cpu_seconds(proc.pid)
                sandbox_cpu_at["end"] = cpu_seconds(sandbox.pid)
                stalled["end"] = io_stalled_s()
            polls += 1
            if polls % max(1, round(0.1 / poll)) == 0:
                peak = max(peak, proc_status(proc.pid, "VmRSS"))
                if proc.poll() is not None:
                    raise RuntimeError(f"the daemon exited ({proc.returncode}); see {log}")
            next_poll += poll
            time.sleep(max(0.0, next_poll - time.monotonic()))
        peak = max(peak, proc_status(proc.pid, "VmHWM"))
    finally:
        state.close()
        launcher.stop(proc, 30)
        launcher.stop(sandbox, 30)
    offsets = [a[0] for a in advances]
    latencies: list[float] = []
    events_in_window = 0
    undurable = 0
    with sink.open("rb") as f:
        for line in f:
            ev = orjson.loads(line)
            stamp = event_time(ev.get("timestamp"), UTC)
            if stamp is None or not measure_from <= stamp < measure_to:
                continue
            events_in_window += 1
            i = bisect.bisect_left(offsets, int(ev["metadata"]["offset"]))
            if i == len(offsets):
                undurable += 1
                continue
            latencies.append(advances[i][1] - stamp)
    window = args.seconds
    return {
        "rate": rate,
        "achieved_rate": round(events_in_window / window, 1),
        "events_measured": len(latencies),
        "events_not_durable_in_time": undurable,
        **summary(latencies),
        "checkpoint_advances_per_s": round(
            sum(1 for _, t in advances if measure_from <= t < measure_to) / window, 1
        ),
        "daemon_cpu_percent": round(100 * (cpu_at["end"] - cpu_at["start"]) / window, 1),
        "sandbox_cpu_percent": round(
            100 * (sandbox_cpu_at["end"] - sandbox_cpu_at["start"]) / window, 1
        ),
        "daemon_peak_rss_mb": round(peak, 1),
        "io_stalled_percent": stalled_percent(stalled["start"], stalled["end"], window),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100,1000,5000", help="events/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per rate")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds ignored first")
    parser.add_argument("--poll-ms", type=float, default=2.0, help="checkpoint poll interval")
    parser.add_argument(
        "--drain", type=float, default=5.0, help="seconds of polls after the window"
    )
    parser.add_argument(
        "--commit-interval-ms", type=int, default=0, help="the daemon's (0: its default)"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "latency.json")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    compiled()
    started = machine()
    print(f"machine: {started['cores']} cores, load average {started['load_average']}", flush=True)
    results = []
    for rate in rates:
        with tempfile.TemporaryDirectory(prefix="opera-latency-") as tmp:
            floor = run_floor(rate, args, Path(tmp))
            result = {**run_rate(rate, args, Path(tmp)), **floor}
        results.append(result)
        print(
            f"rate {rate:g}/s (achieved {result['achieved_rate']:g}): "
            f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms "
            f"over {result['events_measured']:,} events; daemon CPU "
            f"{result['daemon_cpu_percent']}%, I/O stalled {result['io_stalled_percent']}%; "
            f"the floor just before: p50 {floor['floor_p50_ms']} ms, p99 "
            f"{floor['floor_p99_ms']} ms, max {floor['floor_max_ms']} ms, I/O stalled "
            f"{floor['floor_io_stalled_percent']}%",
            flush=True,
        )
    ended = machine()
    lines = [
        "| rate (events/s) | achieved | events | p50 ms | p90 ms | p99 ms | max ms | "
        "daemon CPU % | floor p50 / p99 / max ms | I/O stalled %, daemon / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['rate']:g} | {r['achieved_rate']:g} | {r['events_measured']:,} | "
            f"{r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['max_ms']} | "
            f"{r['daemon_cpu_percent']} | {r['floor_p50_ms']} / {r['floor_p99_ms']} / "
            f"{r['floor_max_ms']} | {r['io_stalled_percent']} / "
            f"{r['floor_io_stalled_percent']} |"
            for r in results
        ),
    ]
    report = {
        "seconds": args.seconds,
        "warmup_seconds": args.warmup,
        "poll_ms": args.poll_ms,
        "drain_seconds": args.drain,
        "commit_interval_ms": args.commit_interval_ms or "daemon default",
        "sink": "jsonl, fsync = true; state: SQLite synchronous = FULL",
        "floor": "a bare loop in the bench: websockets, orjson.loads per frame, each event's "
        "line appended to a file and fsynced a batch at a time (group commit), against its own "
        "sandbox at the same rate just before the daemon; per event, its fsync's return minus "
        "its timestamp, same window",
        "measured": "per event: the first checkpoint poll (every poll_ms, read-only) that saw "
        "the checkpoint at or past its offset, minus its timestamp (the sandbox's wall clock "
        "when it entered the gateway's log); events timestamped in the window after warm-up",
        "io_stalled": "the share of the window in which some task on the machine was stalled "
        "on I/O (/proc/pressure/io, 'some'; the measured process's own fsyncs included)",
        "machine_at_start": started,
        "machine_at_end": ended,
        "results": results,
        "table": "\n".join(lines),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(report["table"])
    print(f"\nload average at start {started['load_average']}, at end {ended['load_average']}")
    return 0 if all(r["events_not_durable_in_time"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
