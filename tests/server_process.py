"""What the throwaway servers of the tests (tests/pg.py, tests/nats_server.py,
tests/redis_server.py) share: a process on 127.0.0.1 with its own temporary directory and
log, started on a free port (another one if that port was taken meanwhile), waited for until
it answers, stopped by a signal (then killed if it lingers), and removed with its directory.

A server subclasses :class:`ServerProcess` and supplies :meth:`ServerProcess._launch` (the
process, for ``self.port``) and :meth:`ServerProcess._ready` (one try at talking to it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from consumer.sandbox.launcher import free_port

S = TypeVar("S", bound="ServerProcess")


class ServerProcess:
    """One server; ``start``/``stop`` may be called again (same port, same directory)."""

    name = "server"  # in the errors: "<name> did not start", "<name> not ready in …"
    start_timeout_s = 20.0
    ready_pause_s = 0.02  # between two tries at talking to a starting server
    stop_signal = signal.SIGTERM

    def __init__(self, prefix: str, logname: str, *, directory: str | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self._base = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
        self.logfile = self._base / logname
        self._proc: subprocess.Popen[bytes] | None = None

    def _launch(self) -> subprocess.Popen[bytes]:
        """The server process, listening on ``self.host``:``self.port``."""
        raise NotImplementedError

    def _ready(self) -> bool:
        """One try: whether the server answers yet."""
        raise NotImplementedError

    def start(self) -> None:
        assert self._proc is None, "already running"
        for attempt in range(3):
            if not self.port or attempt:
                self.port = free_port()
            self._proc = self._launch()
            if self._wait_ready():
                return
            self._reap()
        raise RuntimeError(f"{self.name} did not start; its log:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        """Until the server answers (bounded); False if the process died (the port taken
        meanwhile, say: :meth:`start` tries another)."""
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                return False
            if self._ready():
                return True
            time.sleep(self.ready_pause_s)
        raise RuntimeError(f"{self.name} not ready in {self.start_timeout_s}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """A clean shutdown (``stop_signal``), a kill after 15 s; clients see the connection
        close."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(self.stop_signal)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    @property
    def pid(self) -> int | None:
        """The server's own process (its children are its workers, for PostgreSQL)."""
        return None if self._proc is None else self._proc.pid

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server stopped (SIGSTOP) within: its sockets stay open, nothing is read or
        answered; resumed after. Entered once every thread of it is stopped: the stop takes
        effect when one of them runs to take the signal, and on a loaded machine another one
        woken by the socket could answer first (a publish acknowledged "while frozen")."""
        pid = self.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            _wait_stopped(pid)
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self._base, ignore_errors=True)


def started(make: Callable[..., S]) -> Iterator[Callable[..., S]]:
    """The body of a factory fixture (``yield from started(make)``): ``start(**options)``
    gives ``make(**options)``, started; every one is removed at the end of the test."""
    servers: list[S] = []

    def start(**options: Any) -> S:
        server = make(**options)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.remove()


def _wait_stopped(pid: int, seconds: float = 10.0) -> None:
    """Until every thread of ``pid`` is stopped (state T in /proc), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                stat = (task / "stat").read_text()
                states.append(stat[stat.rindex(")") + 2])  # the field after "(comm)"
        if all(state in "tT" for state in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} not stopped {seconds} s after SIGSTOP: {states}")
        time.sleep(0.001)
