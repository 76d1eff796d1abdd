"""``make demo``: start the sandbox gateway and the consumer, and show events flowing.

Everything lives in ``.demo/`` (config, state store, the JSONL sink, both logs). The demo runs
for ``DEMO_SECONDS`` (default 20): it catches up a backlog, follows live events, restarts the
consumer half-way with SIGTERM to show the resume, then checks the sink has every event once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .sandbox import launcher

DEMO = Path(".demo")
BACKLOG = 2000
RATE = 20.0

CONFIG = """\
# Written by `make demo`: the bundled sandbox gateway on loopback, default credentials.
{streams}
[streams.demo.connection]
resubscribe_gap_s = 1.0
complete_timeout_s = 3.0

[state]
path = "{dir}/state.db"

[sink]
path = "{dir}/events.jsonl"

[metrics]
port = {metrics_port}

[log]
format = "console"
"""


def _lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _show(event: dict[str, object]) -> str:
    meta = event.get("metadata")
    offset = meta.get("offset") if isinstance(meta, dict) else "?"
    return (
        f"  offset {offset!s:>8}  {event.get('eventName')!s:<20} "
        f"{event.get('moduleName')!s:<12} key {event.get('primaryKey')!s:<8} "
        f"hotel {event.get('hotelId')}"
    )


def _event_id(event: dict[str, object]) -> str:
    meta = event.get("metadata")
    return str(meta.get("uniqueEventId")) if isinstance(meta, dict) else ""


def main() -> int:
    seconds = float(os.environ.get("DEMO_SECONDS", "20"))
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir()
    sandbox, url = launcher.start(
        ["--backlog", str(BACKLOG), "--rate", str(RATE)], DEMO / "sandbox.log"
    )
    print(f"1. sandbox gateway on {url}: {BACKLOG} events waiting, {RATE:g}/s more")
    config = DEMO / "config.toml"
    metrics_port = launcher.free_port()
    streams = launcher.stream_config(url, stream="demo")
    config.write_text(CONFIG.format(streams=streams, dir=DEMO.resolve(), metrics_port=metrics_port))
    sink = DEMO / "events.jsonl"
    consumer: subprocess.Popen[bytes] | None = None
    try:
        print(f"2. opera-consumer run --config {config}   (log: {DEMO}/consumer.log)")
        print(f"   metrics while it runs: curl http://127.0.0.1:{metrics_port}/metrics")
        consumer = launcher.spawn(["run", "--config", str(config)], DEMO / "consumer.log")
        shown = 0
        started = time.monotonic()
        restarted = False
        elapsed = 0.0
        while elapsed < seconds:
            time.sleep(1.0)
            elapsed = time.monotonic() - started
            events = _lines(sink)
            for event in events[shown : shown + 3]:
                print(_show(event))
            print(f"   {elapsed:4.0f}s  events in the sink: {len(events)}")
            shown = len(events)
            if consumer.poll() is not None:
                print(f"the consumer exited ({consumer.returncode}); see {DEMO}/consumer.log")
                return 1
            if not restarted and elapsed >= seconds / 2:
                restarted = True
                print("3. SIGTERM: the consumer completes the subscription, drains and checkpoints")
                print(f"   exit status {launcher.stop(consumer)}; status from the state store:")
                subprocess.run(
                    [sys.executable, "-m", "consumer", "status", "--config", str(config)],
                    check=False,
                )
                print("4. started again: it resumes from the checkpoint (the replay is inclusive)")
                consumer = launcher.spawn(["run", "--config", str(config)], DEMO / "consumer.log")
        launcher.stop(consumer)
        events = _lines(sink)
        ids = [_event_id(e) for e in events]
        print(
            f"5. done: {len(events)} events in {sink}, {len(set(ids))} distinct, "
            f"{len(ids) - len(set(ids))} duplicates"
        )
        print("   try: .venv/bin/opera-consumer status --config .demo/config.toml")
        return 0 if ids and len(ids) == len(set(ids)) else 1
    finally:
        if consumer is not None:
            launcher.stop(consumer)
        launcher.stop(sandbox)


if __name__ == "__main__":
    sys.exit(main())
