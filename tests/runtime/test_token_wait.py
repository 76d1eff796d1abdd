"""Issue #13: a daemon that cannot reach its token endpoint showed `starting` forever and took
12 s to stop on SIGTERM. It says what it waits for (/readyz, systemd's STATUS=) and stops at
once: the token wait gives way to a stop, as every other wait of the stream does."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from pathlib import Path

import httpx
from support import cli, make_settings, spawn_daemon, tail, toml_config, wait_exit, wait_until

from consumer.runtime.daemon import Daemon
from consumer.sandbox import launcher

DRAIN_S = 10.0  # the drain deadline the stop must meet
GRACE_S = 60.0  # complete_timeout_s: what a stream in a session may take to end (far longer)


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_status_line_says_what_it_waits_for(tmp_path: Path) -> None:
    port = refused_port()
    url = f"http://127.0.0.1:{port}"
    settings = make_settings(
        tmp_path,
        url,
        pipeline={"drain_timeout_s": DRAIN_S},
        connection={"complete_timeout_s": GRACE_S},
        auth={"client_id": "c", "client_secret": "client-secret-0001", "retry_max_s": 600.0},
    )
    daemon = await Daemon.create(settings)
    task = asyncio.create_task(daemon.run())
    try:
        await wait_until(lambda: "retry in" in daemon.status_line())
        line = daemon.status_line()
        assert line.startswith("main: connecting, offset - (waiting for token ("), line
        assert f"{url}/oauth/v1/tokens: connection refused), retry in " in line
        [status] = daemon.stream_statuses()
        assert status.state.value == "connecting" and status.waiting in line
    finally:
        daemon.request_stop()
        async with asyncio.timeout(DRAIN_S):  # not GRACE_S: nothing waits for the token
            await task
    assert daemon.runners["main"].state.value == "stopped"


async def test_sigterm_during_the_token_wait_stops_within_the_drain_deadline(
    tmp_path: Path,
) -> None:
    port = refused_port()
    metrics = launcher.free_port()
    config = toml_config(
        tmp_path,
        f"http://127.0.0.1:{port}",
        f"[pipeline]\ndrain_timeout_s = {DRAIN_S}",
        connection={"complete_timeout_s": GRACE_S},
    )
    text = config.read_text().replace("[metrics]\nport = 0", f"[metrics]\nport = {metrics}")
    config.write_text(
        text.replace("[streams.main.auth]\n", "[streams.main.auth]\nretry_max_s = 600\n")
    )
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(config, log)
    try:
        waiting: list[str] = []

        async def says_what_it_waits_for() -> bool:
            try:
                async with httpx.AsyncClient(timeout=2.0) as http:
                    ready = (await http.get(f"http://127.0.0.1:{metrics}/readyz")).json()
            except (httpx.HTTPError, ValueError):
                return False
            main = ready["streams"]["main"]
            waiting[:] = [main["state"], main["waiting"] or ""]
            return "retry in" in waiting[1]

        async with asyncio.timeout(60):
            while not await says_what_it_waits_for():
                assert proc.poll() is None, tail(log)
                await asyncio.sleep(0.1)
        state, what = waiting
        assert state == "connecting"
        assert what.startswith(f"waiting for token (http://127.0.0.1:{port}/oauth/v1/tokens: ")
        assert "connection refused), retry in " in what
        # `status` says it too, beside the state (both at once: each `status` of a running
        # daemon takes a second between its two scrapes)
        out, shown = await asyncio.gather(
            asyncio.to_thread(cli, "status", "--config", str(config), "--json"),
            asyncio.to_thread(cli, "status", "--config", str(config)),
        )
        [row] = json.loads(out.stdout)
        assert row["state"] == "connecting", row
        assert row["waiting_for"].startswith("waiting for token (http://127.0.0.1:"), row
        table = shown.stdout
        assert "connecting: waiting for token (" in table, table
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, DRAIN_S) == 0, tail(log)
    finally:
        proc.kill()
        await wait_exit(proc)
