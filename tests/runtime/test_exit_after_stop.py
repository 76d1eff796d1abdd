"""The process ends as soon as the daemon has stopped, committed and closed: asyncio's teardown
waited without a limit for the default executor's threads, where a stream's cancelled connect
left a getaddrinfo running (a DNS server that does not answer), and meanwhile the daemon's
signal handlers were gone, so a second SIGTERM killed it by the signal, which systemd counts
as a clean stop (found by a review). A real process; its resolver made to hang."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from support import caught, log_records, tail, toml_config, wait_exit, wait_until

STARTER = """
import socket, sys, time
from pathlib import Path
real = socket.getaddrinfo
def hanging(host, *a, **k):
    if host == "gateway.invalid":
        Path({entered!r}).touch()
        time.sleep(120)  # a resolver that gets no answer
        raise socket.gaierror(-3, "Temporary failure in name resolution")
    return real(host, *a, **k)
socket.getaddrinfo = hanging
from consumer.cli import main
sys.exit(main(["run", "--config", {config!r}]))
"""


def start(script: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT
        )


async def test_the_process_exits_once_the_daemon_has_stopped(tmp_path: Path) -> None:
    config = toml_config(tmp_path, "http://gateway.invalid:8765", "")
    config.write_text("allow_insecure_http = true\n" + config.read_text())
    entered, log = tmp_path / "entered", tmp_path / "daemon.log"
    proc = start(STARTER.format(entered=str(entered), config=str(config)), log)
    try:
        await wait_until(
            lambda: (
                (entered.exists() and caught(proc.pid, signal.SIGTERM)) or proc.poll() is not None
            ),
            timeout=30,
        )
        assert proc.poll() is None, tail(log)
        proc.send_signal(signal.SIGTERM)
        # Ends with its own code, long before the resolver would have let go.
        assert await wait_exit(proc, 60) == 0, tail(log)
        assert log_records(log, "stopped"), tail(log)
    finally:
        proc.kill()
        await wait_exit(proc)
