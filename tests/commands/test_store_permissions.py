"""A state store the daemon's user may not use: every command names the directory or file at
fault and the fix, in one line, exit 78 (preflight: a FAIL line), never a traceback.

``status``, ``dlq list``, ``offset show`` and ``preflight`` failed with "unexpected internal
error (PermissionError ...)", exit 70, when the store's directory could not be entered (a
``stat`` of the file); with a root-owned 0600 file in a writable directory, ``run`` and
``status`` said "make its directory writable", the wrong fix.

Run as an operator meets it: as root, the store made by root, the commands as another user
(``setpriv --reuid``), each a process."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumer.errors import ExitCode
from consumer.sandbox import launcher
from consumer.state import SqliteStore
from consumer.state.lease import Lease, lock_path

NOBODY = 65534
ROOT = Path(__file__).parents[2]
COMMANDS = (("status",), ("dlq", "list"), ("offset", "show"), ("run",))


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is private to root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the store is root's, the commands run as another user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot run as another user")
    base = Path(tempfile.mkdtemp(prefix="opera-perm-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def write_config(base: Path, state: Path) -> Path:
    config = base / "config.toml"
    config.write_text(
        launcher.stream_config("http://127.0.0.1:9")
        + f'[state]\npath = "{state}"\n[sink]\npath = "{base / "events.jsonl"}"\n'
        + "[metrics]\nenabled = false\n"
    )
    config.chmod(0o644)
    return config


def as_nobody(base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-m",
            "consumer",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=base,
        # This checkout's code, not whatever `consumer` the venv installed (another worktree).
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def make_store(path: Path) -> None:
    path.parent.mkdir(exist_ok=True)
    store = await SqliteStore.open(path)
    await store.close()


def assert_named(result: subprocess.CompletedProcess[str], says: str) -> None:
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr


def test_a_directory_the_user_cannot_enter_is_named(public_dir: Path) -> None:
    folder = public_dir / "state"
    state = folder / "state.db"
    asyncio.run(make_store(state))
    folder.chmod(0o700)  # root's
    config = write_config(public_dir, state)
    says = f"state store {state}: cannot enter directory {folder}: let the daemon's user"
    for command in COMMANDS:
        assert_named(as_nobody(public_dir, *command, "--config", str(config)), says)
    checked = as_nobody(public_dir, "preflight", "--config", str(config))
    assert checked.returncode == ExitCode.RUNTIME, checked.stdout + checked.stderr
    assert "Traceback" not in checked.stderr and "internal error" not in checked.stderr
    line = next(x for x in checked.stdout.splitlines() if "state store" in x)
    assert line.startswith("FAIL") and f"cannot enter directory {folder}" in line, line


def test_a_store_file_of_another_user_is_named_not_its_directory(public_dir: Path) -> None:
    folder = public_dir / "state"
    state = folder / "state.db"
    asyncio.run(make_store(state))
    folder.chmod(0o777)  # writable by anyone: the file is at fault
    state.chmod(0o600)
    config = write_config(public_dir, state)
    says = f"state store {state}: it is not readable and writable by the daemon's user"
    for command in COMMANDS:
        result = as_nobody(public_dir, *command, "--config", str(config))
        assert_named(result, says)
        assert "make its directory writable" not in result.stderr


def test_a_replay_lock_left_by_root_is_named(public_dir: Path) -> None:
    """A `dlq replay` run as root leaves <state>.dlq-replay.lock root's: the next replay as
    the daemon's user said "cannot write there ... make its directory writable", of a
    writable directory. It names the lock file; preflight warns of it."""
    folder = public_dir / "state"
    state = folder / "state.db"
    asyncio.run(make_store(state))
    folder.chmod(0o777)
    state.chmod(0o666)
    Lease.acquire(state, (), purpose="dlq-replay").release()  # as root, 0600
    lock = lock_path(state, "dlq-replay")
    config = write_config(public_dir, state)
    result = as_nobody(public_dir, "dlq", "replay", "--all", "--config", str(config))
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert f"{lock} is not readable and writable by the daemon's user" in result.stderr
    assert "make its directory writable" not in result.stderr
    checked = as_nobody(public_dir, "preflight", "--config", str(config))
    line = next(x for x in checked.stdout.splitlines() if "dlq replay lock" in x)
    assert line.startswith("WARN") and str(lock) in line, checked.stdout


def test_preflight_fails_on_a_lock_file_run_cannot_open(public_dir: Path) -> None:
    """A root-owned <state>.lock: `run` cannot take its lease (exit 78), and preflight said
    PASS for the state store (it looked at the file and its directory only)."""
    folder = public_dir / "state"
    state = folder / "state.db"
    asyncio.run(make_store(state))
    folder.chmod(0o777)
    state.chmod(0o666)
    Lease.acquire(state, ()).release()  # as root, 0600
    config = write_config(public_dir, state)
    checked = as_nobody(public_dir, "preflight", "--config", str(config))
    line = next(x for x in checked.stdout.splitlines() if " state store " in x)
    assert line.startswith("FAIL"), checked.stdout
    assert f"{lock_path(state)} is not readable and writable" in line
    assert checked.returncode == ExitCode.RUNTIME
    ran = as_nobody(public_dir, "run", "--config", str(config))
    assert_named(ran, f"{lock_path(state)} is not readable and writable by the daemon's user")
