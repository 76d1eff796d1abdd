"""A throwaway PostgreSQL server on 127.0.0.1 for the PostgreSQL sink's tests.

``postgres_dsn`` (session scope) is the DSN of a fresh database on it, with a password (the
server asks for one over TCP, as a real deployment would). ``postgres_server`` is the server
itself, for tests that stop and start it. Without the server binaries the tests skip; `make
test` installs them where it can (Debian's ``postgresql`` package).

The cluster lives in a temporary directory: ``initdb`` (fsync off), then ``postgres`` on a free
loopback port with its socket in that directory, stopped and removed at the end of the session.
PostgreSQL refuses to run as root, so as root both run as the ``postgres`` user (which Debian's
package creates), through ``subprocess``'s ``user=``/``group=`` (a setuid/setgid before exec).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

USER = "opera"
PASSWORD = "pg-test-secret-7f3a"  # the throwaway cluster's superuser password
DATABASE = "opera_test"
START_TIMEOUT_S = 30.0
NOT_INSTALLED = (
    "PostgreSQL server not installed: apt-get install postgresql, or run make test which "
    "installs it"
)


def find_bindir() -> Path | None:
    """A directory holding both ``initdb`` and ``postgres``: PATH first, then Debian's."""
    candidates: list[Path] = []
    found = shutil.which("postgres")
    if found:
        candidates.append(Path(found).resolve().parent)
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: _version(Path(p).parent.name), reverse=True)
    candidates += [Path(p) for p in versions]
    for d in candidates:
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            return d
    return None


def _version(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in name.split("."))
    except ValueError:
        return (0,)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, whatever loop this thread has."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def sql(dsn: str, method: str, statement: str, *args: Any) -> Any:
    """One statement on a connection of its own: ``method`` is asyncpg's (``fetch``,
    ``fetchval``, ``fetchrow``, ``execute``)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await getattr(conn, method)(statement, *args)
    finally:
        await conn.close()


class PostgresServer:
    """One cluster; ``start``/``stop`` may be called again (same port, same data)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.host = "127.0.0.1"
        self.port = 0
        self.user = USER
        self.password = PASSWORD
        # As root, somewhere the postgres user can reach ($TMPDIR may be private to root).
        root = os.geteuid() == 0 and os.path.isdir("/tmp")
        self._base = Path(tempfile.mkdtemp(prefix="opera-pg-", dir="/tmp" if root else None))
        self.data = self._base / "data"
        self.sockets = self._base / "sock"
        self.logfile = self._base / "postgres.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self._base, ignore_errors=True)
                pytest.skip(
                    "running as root and there is no 'postgres' user to run PostgreSQL as "
                    "(apt-get install postgresql creates it)"
                )
            self._as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            os.chown(self._base, pw.pw_uid, pw.pw_gid)
        self.sockets.mkdir(mode=0o700)
        if self._as:
            os.chown(self.sockets, self._as["user"], self._as["group"])

    def dsn(self, database: str = DATABASE, *, password: str | None = None) -> str:
        pw = self.password if password is None else password
        return f"postgresql://{self.user}:{pw}@{self.host}:{self.port}/{database}"

    def _spawn(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # our own arguments
            args,
            cwd=self._base,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
            **self._as,
            **kwargs,
        )

    def init(self) -> None:
        pwfile = self._base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as:
            os.chown(pwfile, self._as["user"], self._as["group"])
        proc = self._spawn(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                self.user,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = proc.communicate(timeout=120)
        pwfile.unlink()
        if proc.returncode != 0:
            raise RuntimeError(
                f"initdb failed ({proc.returncode}):\n{out.decode(errors='replace')}"
            )

    def start(self) -> None:
        assert self._proc is None, "already running"
        for attempt in range(3):
            if not self.port or attempt:
                self.port = _free_port()
            with self.logfile.open("ab") as log:
                self._proc = self._spawn(
                    [
                        str(self.bindir / "postgres"),
                        "-D",
                        str(self.data),
                        "-k",
                        str(self.sockets),
                        "-h",
                        self.host,
                        "-p",
                        str(self.port),
                        "-F",  # fsync off: a test server
                        "-c",
                        "max_connections=50",
                        "-c",
                        "shared_buffers=16MB",
                        "-c",
                        "full_page_writes=off",
                        "-c",
                        "synchronous_commit=off",
                    ],
                    stdout=log,
                    stderr=log,
                )
            if self._wait_ready():
                return
            self._reap()
        raise RuntimeError(f"PostgreSQL did not start; its log:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        """Until the server accepts a login (bounded); False if the process died."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                return False  # e.g. the port was taken meanwhile: try another
            try:
                _run_sync(self._ping())
                return True
            except (OSError, asyncpg.exceptions.CannotConnectNowError, TimeoutError):
                time.sleep(0.05)
        raise RuntimeError(f"PostgreSQL not ready in {START_TIMEOUT_S}s:\n{self.log_tail()}")

    async def _ping(self) -> None:
        conn = await asyncpg.connect(self.dsn("postgres"), timeout=2)
        await conn.close()

    def execute(self, sql: str, database: str = "postgres") -> None:
        async def run() -> None:
            conn = await asyncpg.connect(self.dsn(database), timeout=5)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        _run_sync(run())

    def stop(self) -> None:
        """Fast shutdown (SIGINT): clients are disconnected, the port closes."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(NOT_INSTALLED)
    server = PostgresServer(bindir)
    try:
        server.init()
        server.start()
        server.execute(f'CREATE DATABASE "{DATABASE}"')
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """``postgresql://opera:…@127.0.0.1:PORT/opera_test``: a database for the session."""
    return postgres_server.dsn()
