"""The event loop `run` runs the daemon on (consumer.event_loop): uvloop for the webhook sink
unless told otherwise, asyncio's for every other sink, and a daemon that behaves the same on
either (every event delivered once, a SIGTERM a clean stop), also with io_uring denied."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from receiver import Receiver
from support import log_records, spawn_daemon, tail, toml_config, truth_ids, wait_exit, wait_until

from consumer.event_loop import chosen
from consumer.sandbox.launcher import DEPLOYED_ENV

SINKS = ("jsonl", "sqlite", "postgres", "python", "nats", "redis", "webhook")


@pytest.mark.parametrize("sink", SINKS)
def test_auto_is_uvloop_for_the_webhook_sink_alone(sink: str) -> None:
    assert chosen("auto", sink) == ("uvloop" if sink == "webhook" else "asyncio")


@pytest.mark.parametrize("sink", SINKS)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_explicit_choice_holds_for_every_sink(loop: str, sink: str) -> None:
    assert chosen(loop, sink) == loop  # type: ignore[arg-type]


def running_on(log: Path) -> str:
    (record,) = log_records(log, "opera-consumer running")
    return str(record["event_loop"])


async def webhook_daemon(
    sandbox_factory,
    tmp_path: Path,
    setting: str | None = None,
    spawn: Callable[[Path, Path], subprocess.Popen[bytes]] = spawn_daemon,
) -> str:
    """Run a webhook daemon (``spawn``-ed, ``event_loop = setting``) until the receiver has
    every event or the process ended; stop it. Checks a clean exit and every event once;
    the loop it ran on."""
    gw = await sandbox_factory(backlog=60)
    truth = truth_ids(gw.events("DEMO"))
    log = tmp_path / "daemon.log"
    with Receiver() as rx:
        sink = f'[sink]\ntype = "webhook"\nurl = "{rx.url}/events"\n'
        config = toml_config(tmp_path, gw.url, sink=sink)
        if setting is not None:  # a top-level key: before the first table
            config.write_text(f'event_loop = "{setting}"\n' + config.read_text())
        proc = spawn(config, log)
        try:
            await wait_until(
                lambda: len(rx.exchanges) >= len(truth) or proc.poll() is not None, timeout=60
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            code = await wait_exit(proc)
        keys = [r.header("Idempotency-Key") for r, _ in rx.exchanges]
    assert code == 0, tail(log)
    assert sorted(keys) == sorted(truth), tail(log)  # each once, none missing
    return running_on(log)


@pytest.mark.parametrize(
    ("setting", "expected"), [(None, "uvloop"), ("asyncio", "asyncio")], ids=["auto", "asyncio"]
)
async def test_a_webhook_daemon_delivers_every_event_once_on_its_loop(
    sandbox_factory, tmp_path: Path, setting: str | None, expected: str
) -> None:
    assert await webhook_daemon(sandbox_factory, tmp_path, setting) == expected


async def test_a_jsonl_daemon_runs_on_asyncio_by_default(sandbox_factory, tmp_path: Path) -> None:
    gw = await sandbox_factory(backlog=0)
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(toml_config(tmp_path, gw.url), log)
    try:
        await wait_until(lambda: "opera-consumer running" in log.read_text(), timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await wait_exit(proc)
    assert code == 0, tail(log)
    assert running_on(log) == "asyncio"


# prctl(PR_SET_NO_NEW_PRIVS), then a filter returning EPERM for io_uring_setup on x86_64 and
# allowing the rest; then exec the daemon as the launcher runs it.
WRAPPER = """
import ctypes, errno, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def op(code, k, jt=0, jf=0):
    return struct.pack("HBBI", code, jt, jf, k)
LOAD, JEQ, RET = 0x20, 0x15, 0x06
prog = b"".join([
    op(LOAD, 4), op(JEQ, 0xC000003E, 1, 0), op(RET, 0x7FFF0000),  # another arch: allow
    op(LOAD, 0), op(JEQ, 425, 0, 1), op(RET, 0x00050000 | errno.EPERM),
    op(RET, 0x7FFF0000),
])
code = ctypes.create_string_buffer(prog)
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
program = Program(len(prog) // 8, ctypes.addressof(code))
if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(program), 0, 0) != 0:
    sys.exit(f"seccomp: {os.strerror(ctypes.get_errno())}")
params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
if libc.syscall(425, 8, params) != -1 or ctypes.get_errno() != errno.EPERM:
    sys.exit("io_uring_setup is not denied")
os.execv(sys.executable, [sys.executable, "-OO", "-m", "consumer", *sys.argv[1:]])
"""


def spawn_denied(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``opera-consumer run --config CONFIG`` under the filter, its output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", WRAPPER, "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **DEPLOYED_ENV},
        )


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="a seccomp filter for x86_64 Linux (io_uring_setup is syscall 425 there)",
)
async def test_with_io_uring_denied_a_webhook_daemon_streams_on_uvloop(
    sandbox_factory, tmp_path: Path
) -> None:
    """libuv sets up an io_uring at start; Docker's default seccomp profile denies io_uring
    (EPERM), and the systemd unit's SystemCallFilter may: libuv falls back to epoll."""
    assert await webhook_daemon(sandbox_factory, tmp_path, spawn=spawn_denied) == "uvloop"
