"""Directories the daemon creates for its files (sink.path's, state.path's and the lease
file's) are private whatever the umask (found by a review: ``mkdir(parents=True)`` took
0777 & ~umask, so under a umask of 000, a container's or a shell's without one, they were
world-writable and any local user could remove, rename or replace the event files and the
state store in them; the files themselves always had an explicit mode)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import newest_offset, stop_when_committed, toml_config, wait_exit

from consumer.files import make_dirs
from consumer.sinks.jsonl import JsonlSink
from consumer.sinks.sqlite import SqliteSink
from consumer.state.lease import Lease
from consumer.state.sqlite import SqliteStore


@pytest.fixture
def no_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def modes(top: Path, leaf: Path) -> dict[str, str]:
    """The modes of ``leaf``'s directories below ``top`` (``top`` and ``leaf`` included)."""
    found = {}
    at = leaf
    while True:
        found[str(at.relative_to(top.parent))] = oct(stat.S_IMODE(at.stat().st_mode))
        if at == top:
            return found
        at = at.parent


@pytest.mark.usefixtures("no_umask")
@pytest.mark.parametrize("creator", ["jsonl", "sqlite sink", "state store", "lease"])
async def test_every_directory_created_for_a_file_is_0700_under_umask_000(
    tmp_path: Path, creator: str
) -> None:
    top = tmp_path / "new"
    folder = top / "a" / "b"
    if creator == "jsonl":
        sink = JsonlSink(folder / "events.jsonl")
        await sink.open(None)
        await sink.close()
    elif creator == "sqlite sink":
        lite = SqliteSink(folder / "events.db", "opera_events")
        await lite.open(None)
        await lite.close()
    elif creator == "state store":
        store = await SqliteStore.open(folder / "state.db")
        await store.close()
    else:
        Lease.acquire(folder / "state.db", ["main"]).release()
    assert set(modes(top, folder).values()) == {"0o700"}, modes(top, folder)


def test_a_directory_already_there_keeps_its_mode(tmp_path: Path) -> None:
    there = tmp_path / "there"
    there.mkdir()
    there.chmod(0o755)
    make_dirs(there / "new")
    assert stat.S_IMODE(there.stat().st_mode) == 0o755
    assert stat.S_IMODE((there / "new").stat().st_mode) == 0o700
    make_dirs(there / "new")  # there already: nothing to do


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FileExistsError):
        make_dirs(tmp_path / "file")
    with pytest.raises(FileExistsError):
        make_dirs(tmp_path / "file" / "below")


def spawn_without_umask(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen(
            [sys.executable, "-OO", "-m", "consumer", "run", "--config", str(config)],
            stdout=f,
            stderr=subprocess.STDOUT,
            umask=0,
        )


@pytest.mark.timeout(120)
async def test_directories_the_daemon_creates_are_not_world_writable_under_umask_000(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=20)
    out, keep = tmp_path / "out" / "jsonl", tmp_path / "keep"
    sink_path, state = out / "events.jsonl", keep / "state.db"
    config = toml_config(tmp_path, gw.url, sink=f'[sink]\npath = "{sink_path}"')
    config.write_text(config.read_text().replace(str(tmp_path / "state.db"), str(state)))
    log = tmp_path / "daemon.log"
    proc = spawn_without_umask(config, log)
    try:
        await stop_when_committed(proc, state, newest_offset(gw), log)
    finally:
        proc.kill()
        await wait_exit(proc)
    found = {**modes(tmp_path / "out", out), **modes(keep, keep)}
    assert set(found.values()) == {"0o700"}, found
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert stat.S_IMODE(sink_path.stat().st_mode) & 0o027 == 0
