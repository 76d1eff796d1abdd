"""``make demo``: start the sandbox gateway and the consumer, and show events flowing.

Everything lives in ``.demo/`` (config, state store, the JSONL sink, both logs). The demo runs
for ``DEMO_SECONDS`` (default 20): it catches up a backlog, follows live events, restarts the
consumer half-way with SIGTERM to show the resume, then checks the sink has every event once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEMO = Path(".demo")
BACKLOG = 2000
RATE = 20.0

CONFIG = """\
# Written by `make demo`: the bundled sandbox gateway on loopback, default credentials.
[streams.demo]
gateway_url = "http://127.0.0.1:{port}"
chain_code = "DEMO"
app_key = "sandbox-app-key"

[streams.demo.auth]
client_id = "sandbox-client"
client_secret = "sandbox-secret"

[streams.demo.connection]
resubscribe_gap_s = 1.0
complete_timeout_s = 3.0

[state]
path = "{dir}/state.db"

[sink]
path = "{dir}/events.jsonl"

[log]
format = "console"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "consumer", *args], stdout=out, stderr=subprocess.STDOUT
    )


def _stop(proc: subprocess.Popen[bytes], seconds: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


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
    port = _free_port()
    config = DEMO / "config.toml"
    config.write_text(CONFIG.format(port=port, dir=DEMO))
    sink = DEMO / "events.jsonl"
    print(
        f"1. sandbox gateway on http://127.0.0.1:{port}: {BACKLOG} events waiting, {RATE:g}/s more"
    )
    sandbox = _spawn(
        ["sandbox", "--port", str(port), "--backlog", str(BACKLOG), "--rate", str(RATE)],
        DEMO / "sandbox.log",
    )
    consumer: subprocess.Popen[bytes] | None = None
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", 20)
        print(f"2. opera-consumer run --config {config}   (log: {DEMO}/consumer.log)")
        consumer = _spawn(["run", "--config", str(config)], DEMO / "consumer.log")
        shown = 0
        started = time.monotonic()
        restarted = False
        while (elapsed := time.monotonic() - started) < seconds:
            time.sleep(1.0)
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
                print(f"   exit status {_stop(consumer)}; status from the state store:")
                subprocess.run(
                    [sys.executable, "-m", "consumer", "status", "--config", str(config)],
                    check=False,
                )
                print("4. started again: it resumes from the checkpoint (the replay is inclusive)")
                consumer = _spawn(["run", "--config", str(config)], DEMO / "consumer.log")
        _stop(consumer)
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
            _stop(consumer)
        _stop(sandbox)


if __name__ == "__main__":
    sys.exit(main())
