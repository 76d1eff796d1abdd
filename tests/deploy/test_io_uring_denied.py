"""A webhook daemon runs on uvloop (consumer.event_loop), whose libuv sets up an io_uring at
start. Docker's default seccomp profile denies io_uring (EPERM), and the systemd unit's
SystemCallFilter may: the daemon must then stream as before (libuv falls back to epoll).
The daemon runs here under a seccomp filter that denies ``io_uring_setup``, installed by a
wrapper that then execs it (the filter survives exec)."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from receiver import Receiver
from support import log_records, tail, toml_config, truth_ids, wait_exit, wait_until

from consumer.sandbox.launcher import DEPLOYED_ENV

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="a seccomp filter for x86_64 Linux (io_uring_setup is syscall 425 there)",
)

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


async def test_io_uring_denied_the_webhook_daemon_streams_on_uvloop(
    sandbox_factory, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=40)
    truth = truth_ids(gw.events("DEMO"))
    log = tmp_path / "daemon.log"
    with Receiver() as rx:
        sink = f'[sink]\ntype = "webhook"\nurl = "{rx.url}/events"\n'
        config = toml_config(tmp_path, gw.url, sink=sink)
        proc = spawn_denied(config, log)
        try:
            # Or the daemon's end: the wrapper refusing to run it, say.
            await wait_until(
                lambda: len(rx.exchanges) >= len(truth) or proc.poll() is not None, timeout=60
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            code = await wait_exit(proc)
        keys = sorted(r.header("Idempotency-Key") or "" for r, _ in rx.exchanges)
    assert code == 0, tail(log)
    assert keys == sorted(truth), tail(log)
    (running,) = log_records(log, "opera-consumer running")
    assert running["event_loop"] == "uvloop"
