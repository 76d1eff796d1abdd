"""A state path that names something other than a regular file (a FIFO, a device such as
/dev/null, a socket; the configuration refuses a directory): every command refuses it at once,
naming the path and the fix, in one line, exit 78 (EX_CONFIG: systemd does not restart it);
``preflight`` says so in a FAIL line.

Was: ``run`` took SQLite's failure on a FIFO or /dev/null for a disk I/O error and retried it
for ever ("state store unreachable at start; retrying"), and ``status``, ``dlq list``,
``offset show`` and ``preflight`` waited for ever on opening the FIFO for reading. Each command
a process, with a bounded wait."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from support import cli

from consumer.errors import ExitCode
from consumer.sandbox import launcher

# run and sink adopt --execute take the lease before they open the store: nothing may be made
# beside the path first (<state>.lock: /dev/null.lock in /dev, as root).
COMMANDS = (
    ("run",),
    ("sink", "adopt", "--execute"),
    ("status",),
    ("dlq", "list"),
    ("offset", "show"),
)


def write_config(tmp_path: Path, state: Path, sink: str = "") -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        launcher.stream_config("http://127.0.0.1:9")
        + f'[state]\npath = "{state}"\n'
        + (sink or f'[sink]\npath = "{tmp_path / "events.jsonl"}"\n')
        + "[metrics]\nenabled = false\n"
    )
    return config


def fifo(path: Path) -> None:
    os.mkfifo(path)


def null_device(path: Path) -> None:
    """/dev/null's twin (char device 1:3) in the test's directory: the daemon's start puts its
    lock file beside the store, which must not be in /dev."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("cannot create a device node here (needs CAP_MKNOD)")


def unix_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the socket file stays


@pytest.mark.parametrize(
    ("make", "kind"),
    [(fifo, "a FIFO"), (null_device, "a character device"), (unix_socket, "a socket")],
    ids=["fifo", "dev-null", "socket"],
)
def test_every_command_refuses_a_state_path_that_is_not_a_file(
    tmp_path: Path, make: Callable[[Path], None], kind: str
) -> None:
    state = tmp_path / "state.db"
    make(state)
    config = write_config(tmp_path, state)
    says = f"state store {state}: it is {kind}, not a regular file: set [state] path to a file"
    for args in COMMANDS:
        done = cli(*args, "--config", str(config))
        assert done.returncode == ExitCode.CONFIG, (args, done.stderr)
        assert "Traceback" not in done.stderr and "retrying" not in done.stderr, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], (args, done.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "state.db"], args


def test_preflight_fails_on_a_state_path_or_sink_path_that_is_a_fifo(tmp_path: Path) -> None:
    state, rows = tmp_path / "state.db", tmp_path / "rows.db"
    os.mkfifo(state)
    os.mkfifo(rows)
    config = write_config(tmp_path, state, f'[sink]\ntype = "sqlite"\npath = "{rows}"\n')
    done = cli("preflight", "--config", str(config))
    assert done.returncode == ExitCode.RUNTIME, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    store = next(x for x in lines if "state store" in x)
    assert store.startswith("FAIL") and f"{state}: it is a FIFO" in store, store
    assert "set [state] path to a file" in store, store
    sink = next(x for x in lines if " sink " in x)
    assert sink.startswith("FAIL") and f"{rows}: it is a FIFO" in sink, sink
    assert "set sink.path to a file" in sink, sink


@pytest.mark.parametrize(
    ("make", "kind"),
    [(fifo, "a FIFO"), (null_device, "a character device")],
    ids=["fifo", "dev-null"],
)
def test_run_refuses_a_sqlite_sink_path_that_is_not_a_file(
    tmp_path: Path, make: Callable[[Path], None], kind: str
) -> None:
    """Was: exit 1 on SQLite's disk I/O error, which systemd restarts for ever."""
    rows = tmp_path / "rows.db"
    make(rows)
    config = write_config(
        tmp_path, tmp_path / "state.db", f'[sink]\ntype = "sqlite"\npath = "{rows}"\n'
    )
    done = cli("run", "--config", str(config))
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert f"sink.path: {rows}: it is {kind}, not a regular file: set sink.path" in done.stderr
