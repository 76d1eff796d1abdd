"""Configuration files for the config tests: written, refused at load, refused by ``run``."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from consumer.config import load_settings
from consumer.errors import ConfigError, ExitCode


def write(folder: Path, text: str, name: str = "config.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def config_error(path: Path | None) -> str:
    """What ``load_settings`` refuses ``path`` with."""
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


async def run_refused(make_config: Callable[[str], Path], env: dict[str, str] | None = None) -> str:
    """``python -m consumer run`` for the config ``make_config(gateway_url)`` (a listener on
    loopback): exit 78, no traceback, and no connection reached the gateway. Its output."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        config = make_config(f"http://127.0.0.1:{port}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "consumer",
            "run",
            "--config",
            str(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == ExitCode.CONFIG, text
    assert "Traceback" not in text, text
    assert connections == []
    return text
