"""The sandbox as a separate process (for the demo and the benchmark), and config text that
points a consumer at it with the sandbox's credentials."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

from ..http_client import basic_auth
from .server import SandboxOptions

# The environment the systemd unit and the image give the daemon beyond -OO (the unit's
# Environment=, the Dockerfile's ENV): two malloc arenas, not one per allocating thread.
DEPLOYED_ENV = {"MALLOC_ARENA_MAX": "2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def spawn(args: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
    """``python -OO -m consumer ARGS`` with its output appended to ``log`` (or discarded).

    ``-OO`` and :data:`DEPLOYED_ENV` as the systemd unit and the image run the daemon
    (``PYTHONOPTIMIZE=2``): no docstrings held in memory (1.7 MB of them in what the daemon
    imports) and no asserts, which guard nothing the daemon relies on. So the tests, the demo
    and the benchmarks run the daemon as it is deployed."""
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            [sys.executable, "-OO", "-m", "consumer", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **DEPLOYED_ENV},
        )
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]


def start(
    args: list[str], log: Path | None = None, ready_s: float = 300.0
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``opera-consumer sandbox ARGS`` on a free port; returns it and its gateway URL
    once it answers (generating a large backlog takes a while)."""
    port = free_port()
    proc = spawn(["sandbox", "--port", str(port), *args], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", ready_s)
    except OSError:
        stop(proc)
        raise
    return proc, url


def stop(proc: subprocess.Popen[bytes], seconds: float = 15.0) -> int:
    """SIGTERM, then SIGKILL after ``seconds``; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def stream_config(url: str, *, stream: str = "main", chain: str = "DEMO") -> str:
    """A ``[streams.NAME]`` table (with its auth) for the sandbox at ``url``."""
    o = SandboxOptions()
    return (
        f'[streams.{stream}]\ngateway_url = "{url}"\nchain_code = "{chain}"\n'
        f'app_key = "{o.app_key}"\n\n[streams.{stream}.auth]\nclient_id = "{o.client_id}"\n'
        f'client_secret = "{o.client_secret}"\nenterprise_id = "{o.demo_enterprise_id}"\n'
    )


async def token(url: str) -> str:
    """An access token from the sandbox at ``url``, with the sandbox's credentials."""
    o = SandboxOptions()
    async with (
        aiohttp.ClientSession(raise_for_status=True) as http,
        http.post(
            f"{url}/oauth/v1/tokens",
            data={"grant_type": "client_credentials", "scope": "s"},
            headers={
                "x-app-key": o.app_key,
                "Authorization": basic_auth(o.client_id, o.client_secret),
            },
        ) as r,
    ):
        return str((await r.json())["access_token"])
