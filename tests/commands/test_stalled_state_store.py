"""Operator commands against a PostgreSQL state store that accepts the connection and then
never answers (tests/stalled_pg.py): each ends with exit status 1 and a message naming the
store and ``[state] timeout_s``, instead of waiting for ever. The commands run as processes;
``HANG_S`` only catches a hang, far above what they take (a few times timeout_s)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from stalled_pg import stalled_postgres

HANG_S = 60.0
TIMEOUT_S = 0.5  # [state] timeout_s


def write_config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "stalled.toml"
    path.write_text(
        "[streams.a]\n"
        'gateway_url = "http://127.0.0.1:9"\n'  # nothing listens: preflight's items fail fast
        'chain_code = "CHA"\n'
        'app_key = "key-0001"\n'
        "[streams.a.auth]\n"
        'client_id = "cid"\n'
        'client_secret = "secret-0002"\n'
        "[state]\n"
        'backend = "postgres"\n'
        f'dsn = "postgresql://opera:pw-0003@127.0.0.1:{port}/opera"\n'
        f"timeout_s = {TIMEOUT_S}\n"
        "[sink]\n"
        'type = "webhook"\n'
        'url = "http://127.0.0.1:9/hook"\n'
        "[metrics]\n"
        "enabled = false\n"
    )
    return path


@pytest.mark.parametrize(
    "command",
    [
        ("offset", "set", "a", "1"),
        ("offset", "set", "a", "1", "--execute"),
        ("offset", "reset", "a", "--highest", "--execute"),
        ("preflight",),
    ],
    ids=" ".join,
)
async def test_a_silent_state_store_ends_the_command(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    async with stalled_postgres() as server:
        config = write_config(tmp_path, server.port)
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "consumer", *command, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=HANG_S,
            check=False,
        )
        assert server.connections >= 1  # it got past the connect
    said = done.stdout + done.stderr
    assert done.returncode == 1, said
    assert f"state store PostgreSQL 127.0.0.1:{server.port}/opera (schema opera_consumer)" in said
    assert f"no answer within {TIMEOUT_S} s ([state] timeout_s)" in said
    assert "pw-0003" not in said
