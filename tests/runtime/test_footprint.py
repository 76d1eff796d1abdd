"""Issue #12: the resident memory of a jsonl daemon. What a process maps counts in its RSS, so a
library it maps without needing it is a regression: frozenlist's C extension (aiohttp's, for
tracing signals the daemon never sets) is C++ and brings libstdc++, about 1 MB."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from support import committed, newest_offset, spawn_daemon, tail, toml_config, wait_exit, wait_until

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/maps").exists(), reason="needs Linux /proc/PID/maps"
)


def mapped_files(pid: int) -> set[str]:
    """The files the process maps (its executable, shared libraries, extension modules)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in lines if "/" in line}


async def test_a_jsonl_daemon_maps_no_cpp_runtime(sandbox_factory, tmp_path: Path) -> None:
    gw = await sandbox_factory(backlog=50)
    newest, state, log = newest_offset(gw), tmp_path / "state.db", tmp_path / "daemon.log"
    proc = spawn_daemon(toml_config(tmp_path, gw.url), log)
    try:
        # Every event committed: the token fetched (aiohttp), subscribed, written, synced.
        await wait_until(
            lambda: committed(state, newest) or proc.poll() is not None, timeout=60, interval=0.05
        )
        assert proc.poll() is None, tail(log)
        mapped = mapped_files(proc.pid)
        assert any("aiohttp" in path for path in mapped)  # the check sees extension modules
        assert not [p for p in mapped if "_frozenlist" in p or "libstdc++" in p], sorted(mapped)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0, tail(log)
    finally:
        proc.kill()
        await wait_exit(proc)
