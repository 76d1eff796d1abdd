"""A throwaway Redis server on 127.0.0.1, for the redis sink's tests.

``redis_server`` is a fresh server for the test (``redis-server --port PORT --bind 127.0.0.1
--save "" --appendonly no --dir DIR``), stopped and removed at its end; ``redis_factory``
starts more of them: with ACL users (``users``: name -> (password, rules); the default user
is then off, for the wrong-credentials tests), with persistence (``appendonly``: an AOF with
``appendfsync always``, so what the server answered survives a stop, even a kill), with TLS
only (``tls``: a throwaway CA and a certificate for 127.0.0.1 made with ``openssl``; the URL
is ``rediss://``, :attr:`RedisServer.ca_file` the CA), or with any other ``redis-server``
option (``options``, after the helper's own: they can override them). A primary starts a
replica's sync at once (``--repl-diskless-sync-delay 0``, not redis' 5 s wait).
:meth:`RedisServer.stop` and :meth:`RedisServer.start` stop and start the same server again
(same port, same directory: with ``appendonly`` the data survives), for outage tests.

Without the ``redis-server`` binary the tests skip; `make test` installs it where it can
(Debian's ``redis-server`` package). tests/conftest.py imports the fixtures (they are named
``redis_factory`` and ``redis_server``; the functions have other names, so that a test's
argument does not shadow an import).
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from server_process import ServerProcess, started

NOT_INSTALLED = "redis-server not installed: apt-get install redis-server, or run make test"
START_TIMEOUT_S = 20.0
ADMIN = "admin"
ADMIN_PASSWORD = "redis-Admin-5b2f-test-secret"  # the tests' own user on an ACL server


def find_binary() -> str | None:
    return shutil.which("redis-server") or shutil.which(
        "redis-server", path="/usr/bin:/usr/sbin:/usr/local/bin"
    )


class RedisServer(ServerProcess):
    """One server; ``start``/``stop`` may be called again (same port, same directory).

    ``users``: name -> (password, ACL rules such as ``"~opera:* +@all"``). With users, the
    default user is off and the tests read and write as ``admin`` (every right); without,
    everyone is the default user, without a password. Stopped with SIGTERM (the AOF is
    flushed).
    """

    name = "redis-server"
    start_timeout_s = START_TIMEOUT_S

    def __init__(
        self,
        binary: str,
        *,
        users: Mapping[str, tuple[str, str]] | None = None,
        appendonly: bool = False,
        tls: bool = False,
        options: Sequence[str] = (),
    ) -> None:
        super().__init__("opera-redis-", "redis.log")
        self.binary = binary
        self.users = dict(users or {})
        self.appendonly = appendonly
        self.options = list(options)
        self.tls = tls
        self.ca_file = self._base / "ca.crt"
        if tls:
            self._make_certificates()

    def _make_certificates(self) -> None:
        """A CA, and a certificate it signed for 127.0.0.1 (EC keys: quick to make)."""
        openssl = shutil.which("openssl")
        if openssl is None:
            shutil.rmtree(self._base, ignore_errors=True)
            pytest.skip("openssl not installed: apt-get install openssl")
        (self._base / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for args in (
            ["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=opera-consumer test CA"],
            ["req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
            ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext"],
        ):  # fmt: skip
            subprocess.run(
                [openssl, *args], cwd=self._base, check=True, capture_output=True, timeout=60
            )

    def url(self, *, user: str | None = None, password: str | None = None, db: int = 0) -> str:
        auth = ""
        if user is not None or password is not None:
            auth = f"{user or ''}:{password or ''}@"
        return f"{'rediss' if self.tls else 'redis'}://{auth}{self.host}:{self.port}/{db}"

    def _args(self) -> list[str]:
        port = ["--port", str(self.port)]
        if self.tls:
            port = ["--port", "0", "--tls-port", str(self.port),
                    "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
                    "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"]  # fmt: skip
        args = [
            self.binary,
            *port,
            "--bind", self.host,
            "--save", "",
            "--dir", str(self._base),
            "--logfile", str(self.logfile),
            "--daemonize", "no",
            # A replica's sync starts at once: redis waits 5 s by default for more replicas
            # to share a diskless transfer (each replica, and each restart of one, waited).
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.users:
            args += ["--user", "default", "off"]
            users = {ADMIN: (ADMIN_PASSWORD, "~* &* +@all"), **self.users}
            for name, (password, rules) in users.items():
                # Each word of the rules a separate argument: redis-server joins them into
                # one "user" line of its configuration.
                args += ["--user", name, "on", f">{password}", "resetkeys", *rules.split()]
        return args + self.options

    def _launch(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # our own arguments
            self._args(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self._base,
        )

    def _credentials(self) -> dict[str, Any]:
        """How the tests' own clients log in (and trust the server, with TLS)."""
        found: dict[str, Any] = {}
        if self.users:
            found |= {"username": ADMIN, "password": ADMIN_PASSWORD}
        if self.tls:
            found |= {"ssl": True, "ssl_ca_certs": str(self.ca_file)}
        return found

    def _ready(self) -> bool:
        """Whether the server answers PING (and has loaded its data)."""
        try:
            with redis.Redis(
                host=self.host,
                port=self.port,
                socket_timeout=2,
                socket_connect_timeout=2,
                **self._credentials(),
            ) as client:
                return bool(client.ping())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return False  # not listening yet, or still loading (BusyLoadingError)

    def kill(self) -> None:
        """SIGKILL: what the server answered survives only with ``appendonly``."""
        self._reap()

    def remove(self) -> None:
        """Killed, not stopped: its data goes with its directory, and a primary's clean
        shutdown waited (up to a second) for its replicas to acknowledge the last writes."""
        self._reap()
        super().remove()

    # --- reading and preparing the data (for assertions) ----------------------------------

    def client(self) -> AsyncRedis:
        """An asyncio client with every right (close it: ``async with server.client() as r``)."""
        return AsyncRedis(
            host=self.host,
            port=self.port,
            socket_timeout=10,
            socket_connect_timeout=10,
            **self._credentials(),
        )

    def sync_client(self) -> redis.Redis:
        """A blocking client with every right, for the process tests' polling (close it)."""
        return redis.Redis(
            host=self.host,
            port=self.port,
            socket_timeout=10,
            socket_connect_timeout=10,
            **self._credentials(),
        )

    def entries(self, key: str) -> list[tuple[str, dict[str, bytes]]]:
        """Every entry of the stream ``key`` as (id, fields), in stream order ([] while
        the key does not exist)."""
        with self.sync_client() as r:
            found: list[tuple[bytes, dict[bytes, bytes]]] = r.xrange(key)
        return [(i.decode(), {k.decode(): v for k, v in f.items()}) for i, f in found]

    def length(self, key: str) -> int:
        """XLEN of ``key``; 0 while it does not exist or the server is down."""
        try:
            with self.sync_client() as r:
                return int(r.xlen(key))
        except redis.exceptions.RedisError:
            return 0


async def replicating(primary: RedisServer, replicas: int = 1, timeout_s: float = 30.0) -> None:
    """Until the primary has ``replicas`` replicas online (bounded)."""
    async with asyncio.timeout(timeout_s), primary.client() as r:
        while True:
            info = await r.info("replication")
            online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            if sum(1 for v in online if v.get("state") == "online") >= replicas:
                return
            await asyncio.sleep(0.05)


def event_ids(entries: Sequence[tuple[str, Mapping[str, bytes]]]) -> list[str]:
    """The ``uniqueEventId`` field of each entry, in stream order."""
    return [fields["uniqueEventId"].decode() for _, fields in entries]


@pytest.fixture(name="redis_factory")
def redis_factory_fixture() -> Iterator[Callable[..., RedisServer]]:
    """``redis_factory(users=..., appendonly=..., options=[...])``: a started server,
    removed at the end of the test."""
    binary = find_binary()
    if binary is None:
        pytest.skip(NOT_INSTALLED)
    yield from started(functools.partial(RedisServer, binary))


@pytest.fixture(name="redis_server")
def redis_server_fixture(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A fresh server for the test, without users or persistence."""
    return redis_factory()
