"""Sink-outage benchmark: the daemon's memory while its sink is down and the server's backlog
keeps growing, then the catch-up once the sink is back.

    .venv/bin/python bench/outage.py [--seconds 600] [--rate 300]

The sandbox runs in this process and adds `rate` events per second; the daemon runs as a
process (tests/harness.py: the real daemon, its jsonl sink behind an outage switch). Peak RSS
is sampled from /proc every second. Results go to stdout and bench/results/outage.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from catchup import processed  # bench/ is on sys.path when this runs as a script

from consumer.sandbox import SandboxGateway, SandboxOptions, launcher

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "harness.py"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(seconds: float, rate: int, work: Path) -> dict[str, float]:
    gw = SandboxGateway(SandboxOptions(backlog=1000))
    await gw.start()
    config = work / "config.toml"
    config.write_text(
        launcher.stream_config(gw.url)
        + f'\n[state]\npath = "{work}/state.db"\n[sink]\npath = "{work}/events.jsonl"\n'
        '[metrics]\nport = 0\n[log]\nlevel = "warning"\nformat = "json"\n'
    )
    outage = work / "outage"
    log = (work / "daemon.log").open("ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HARNESS), str(config), str(outage), stdout=log, stderr=log
    )
    db = work / "state.db"
    try:
        async with asyncio.timeout(60):
            while processed(db) < 1000:
                await asyncio.sleep(0.2)
        outage.touch()
        peak_outage = 0.0
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            gw.append("DEMO", rate)  # the server's backlog grows
            peak_outage = max(peak_outage, rss_mb(proc.pid))
            await asyncio.sleep(1.0)
        outage.unlink()
        total = len(gw.events("DEMO"))
        recovered = time.monotonic()
        peak_after = 0.0
        async with asyncio.timeout(seconds + 600):
            while processed(db) < total:
                peak_after = max(peak_after, rss_mb(proc.pid))
                await asyncio.sleep(0.2)
        catch_up = time.monotonic() - recovered
        proc.terminate()
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
        log.close()
        await gw.close()
    with (work / "events.jsonl").open() as f:
        ids = Counter(json.loads(line)["metadata"]["uniqueEventId"] for line in f)
    truth = Counter(e["metadata"]["uniqueEventId"] for e in gw.events("DEMO"))
    return {
        "outage_seconds": seconds,
        "backlog_grown_by": seconds * rate,
        "peak_rss_mb_during_outage": round(peak_outage, 1),
        "peak_rss_mb_during_catch_up": round(peak_after, 1),
        "catch_up_seconds": round(catch_up, 2),
        "lost": sum((truth - ids).values()),
        "duplicated": sum(n - 1 for n in ids.values() if n > 1) + len(set(ids) - set(truth)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--rate", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="opera-outage-") as tmp:
        report = asyncio.run(run(args.seconds, args.rate, Path(tmp)))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "outage.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report["lost"] == report["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
