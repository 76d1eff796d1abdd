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
import glob
import os
import pwd
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from server_process import ServerProcess
from tcp_proxy import TcpProxy

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


class PostgresServer(ServerProcess):
    """One cluster; ``start``/``stop`` may be called again (same port, same data)."""

    name = "PostgreSQL"
    start_timeout_s = START_TIMEOUT_S
    ready_pause_s = 0.05
    stop_signal = signal.SIGINT  # fast shutdown: clients are disconnected, the port closes

    def __init__(self, bindir: Path, *, shared_buffers: str = "16MB") -> None:
        # As root, somewhere the postgres user can reach ($TMPDIR may be private to root).
        root = os.geteuid() == 0 and os.path.isdir("/tmp")
        super().__init__("opera-pg-", "postgres.log", directory="/tmp" if root else None)
        self.bindir = bindir
        self.shared_buffers = shared_buffers  # small for the suite's servers
        self.user = USER
        self.password = PASSWORD
        self.data = self._base / "data"
        self.sockets = self._base / "sock"
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

    def _launch(self) -> subprocess.Popen[bytes]:
        with self.logfile.open("ab") as log:
            return self._spawn(
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
                    f"shared_buffers={self.shared_buffers}",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "synchronous_commit=off",
                ],
                stdout=log,
                stderr=log,
            )

    def _ready(self) -> bool:
        """Whether the server accepts a login."""
        try:
            _run_sync(self._ping())
            return True
        except (OSError, asyncpg.exceptions.CannotConnectNowError, TimeoutError):
            return False

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


@pytest.fixture
async def schema(postgres_dsn: str) -> AsyncIterator[str]:
    """A fresh schema name on the session's database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield name
    await sql(postgres_dsn, "execute", f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def pg_proxy(postgres_dsn: str) -> Iterator[TcpProxy]:
    """A :class:`TcpProxy` to the server (a partition on demand); :func:`proxied` dsn."""
    parts = urlsplit(postgres_dsn)
    assert parts.hostname is not None and parts.port is not None
    with TcpProxy(parts.hostname, parts.port) as proxy:
        yield proxy


def proxied(dsn: str, port: int) -> str:
    """``dsn`` through the proxy listening on ``port``."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit(":", 1)[0] + f":{port}"))
