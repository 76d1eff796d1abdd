"""A throwaway NATS server with JetStream on 127.0.0.1, for the nats sink's tests.

``nats_server`` is a fresh server for the test (``nats-server -js -a 127.0.0.1 -p PORT -sd
DIR``), stopped and removed at its end; ``nats_factory`` starts more of them, optionally with
users (a configuration file with an ``authorization`` block, for the wrong-credentials tests),
with per-user permissions, without JetStream, with a smaller ``max_payload``, or with TLS and
client certificates (:func:`make_certificates`); :func:`start_cluster` starts several as one
JetStream cluster (``cluster``: a :class:`Cluster`, their route ports on 127.0.0.1).
:meth:`NatsServer.stop` and :meth:`NatsServer.start` stop and start the same server again (same
port, same store directory: the streams and their messages survive), for outage tests.

Without the ``nats-server`` binary the tests skip; `make test` installs it where it can
(Debian's ``nats-server`` package). The fixtures here are for tests/conftest.py to import (as
it does tests/pg.py's); a test module may instead define its own from :func:`servers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import RawStreamMsg
from server_process import ServerProcess, free_port, started
from support import serving

NOT_INSTALLED = "nats-server not installed: apt-get install nats-server, or run make test"
START_TIMEOUT_S = 20.0


def find_binary() -> str | None:
    return shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/bin")


def _quote(text: str) -> str:
    return json.dumps(text)  # a double-quoted string the server's configuration reads


class NatsServer(ServerProcess):
    """One server; ``start``/``stop`` may be called again (same port, same store).

    ``users``: name -> password (then every client must log in), and ``permissions``: name ->
    the server's permissions block for that user, as a dict (``{"publish": {"allow": [...]}}``).
    Stopped with SIGTERM: JetStream flushes its store.
    """

    name = "nats-server"
    start_timeout_s = START_TIMEOUT_S

    def __init__(
        self,
        binary: str,
        *,
        users: Mapping[str, str] | None = None,
        permissions: Mapping[str, Mapping[str, Any]] | None = None,
        jetstream: bool = True,
        max_payload: int | None = None,
        tls: Certificates | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        super().__init__("opera-nats-", "nats.log")
        self.binary = binary
        self.users = dict(users or {})
        self._permissions = dict(permissions or {})
        self.jetstream = jetstream
        self.max_payload = max_payload
        self.tls = tls  # TLS required, client certificates verified
        self.cluster = cluster  # a member of a JetStream cluster (see start_cluster)
        self.store = self._base / "store"
        self.config = self._base / "nats.conf"

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    def _write_config(self) -> None:
        lines = []
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.users:
            entries = []
            for user, password in self.users.items():
                entry = f"{{user: {_quote(user)}, password: {_quote(password)}"
                if user in self._permissions:
                    entry += f", permissions: {json.dumps(self._permissions[user])}"
                entries.append(entry + "}")
            lines.append("authorization {\n  users = [\n    " + ",\n    ".join(entries))
            lines.append("  ]\n}")
        if self.tls is not None:
            t = self.tls
            lines.append(
                f"tls {{\n  cert_file: {_quote(str(t.server_cert))}\n"
                f"  key_file: {_quote(str(t.server_key))}\n  ca_file: {_quote(str(t.ca))}\n"
                "  verify: true\n  timeout: 5\n}"
            )
        if self.cluster is not None:
            c = self.cluster
            routes = ", ".join(_quote(f"nats://{self.host}:{p}") for p in c.route_ports)
            lines.append(f"server_name: {_quote(c.server_name)}")
            lines.append(
                f"cluster {{\n  name: {_quote(c.name)}\n  listen: {_quote(f'{self.host}:{c.port}')}"
                f"\n  routes: [{routes}]\n}}"
            )
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self._write_config()
        super().start()

    def _launch(self) -> subprocess.Popen[bytes]:
        args = [self.binary, "-c", str(self.config), "-a", self.host, "-p", str(self.port)]
        if self.jetstream:
            args += ["-js", "-sd", str(self.store)]
        with self.logfile.open("ab") as log:
            return subprocess.Popen(  # our own arguments
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self._base
            )

    def _ready(self) -> bool:
        """Whether the server greets a client with its INFO (JetStream on, when asked for)."""
        info = self._info()
        return info is not None and bool(info.get("jetstream") or not self.jetstream)

    def _info(self) -> dict[str, Any] | None:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                line = s.makefile("rb").readline(65536)
        except OSError:
            return None
        if not line.startswith(b"INFO "):
            return None
        try:
            info = json.loads(line[5:])
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    # --- reading the bus (for assertions) -------------------------------------------------

    def _credentials(self) -> dict[str, Any]:
        """connect() options for the helpers below: the first user, the client certificate."""
        options: dict[str, Any] = {}
        if self.users:
            user, password = next(iter(self.users.items()))
            options.update(user=user, password=password)
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
            options["tls"] = context
        return options

    async def stream_messages(self, stream: str = "OPERA") -> list[RawStreamMsg]:
        """Every message of the stream, in sequence order ([] while it does not exist)."""
        nc = await nats.connect(self.url, allow_reconnect=False, **self._credentials())
        try:
            js = nc.jetstream(timeout=10)
            try:
                info = await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                return []
            found = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                if info.state.messages == 0:
                    break
                try:
                    found.append(await js.get_msg(stream, seq))
                except nats.js.errors.NotFoundError:  # deleted
                    continue
            return found
        finally:
            await nc.close()

    async def message_count(self, stream: str = "OPERA") -> int:
        """The stream's message count; 0 while it does not exist or the server is down."""
        try:
            nc = await nats.connect(
                self.url, allow_reconnect=False, connect_timeout=2, **self._credentials()
            )
        except (nats.errors.Error, OSError, TimeoutError):
            return 0
        try:
            info = await nc.jetstream(timeout=5).stream_info(stream)
            return int(info.state.messages)
        except (nats.errors.Error, OSError, TimeoutError):
            return 0
        finally:
            await nc.close()

    async def stream_info(self, stream: str = "OPERA") -> Any:
        nc = await nats.connect(self.url, allow_reconnect=False, **self._credentials())
        try:
            return await nc.jetstream(timeout=10).stream_info(stream)
        finally:
            await nc.close()

    async def add_stream(self, name: str, subjects: Sequence[str], **config: Any) -> None:
        nc = await nats.connect(self.url, allow_reconnect=False, **self._credentials())
        try:
            await nc.jetstream(timeout=10).add_stream(name=name, subjects=list(subjects), **config)
        finally:
            await nc.close()


@dataclass(frozen=True)
class Certificates:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True)
class Cluster:
    """A server's place in a JetStream cluster: its name, its route port, its peers'."""

    server_name: str
    port: int
    route_ports: tuple[int, ...]
    name: str = "opera-test"


def start_cluster(factory: Callable[..., NatsServer], size: int = 3) -> list[NatsServer]:
    """``size`` servers of one JetStream cluster on 127.0.0.1 (``factory``: ``nats_factory``);
    ``await cluster_ready(servers)`` before using JetStream (a meta leader is elected)."""
    ports = [free_port() for _ in range(size)]
    return [
        factory(cluster=Cluster(f"n{i}", port, tuple(p for p in ports if p != port)))
        for i, port in enumerate(ports)
    ]


async def cluster_ready(members: Sequence[NatsServer], timeout_s: float = 60.0) -> None:
    """Until JetStream answers on every member (bounded).

    Before the meta leader is elected a request goes unanswered: it is asked again with a
    timeout that starts short (a cluster is ready within half a second) and grows to 2 s (a
    loaded machine's server)."""
    async with asyncio.timeout(timeout_s):
        for member in members:
            wait = 0.25
            while True:
                nc = await nats.connect(member.url, allow_reconnect=False)
                try:
                    await nc.jetstream(timeout=wait).account_info()
                    break
                except nats.errors.Error:
                    wait = min(2 * wait, 2.0)
                    await asyncio.sleep(0.05)
                finally:
                    await nc.close()


def make_certificates(directory: Path) -> Certificates:
    """Made with the openssl command (the test skips without it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed: apt-get install openssl")
    d = directory

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=60)

    subj = ["-subj"]
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key",
        "-out", "ca.pem", *subj, "/CN=opera-test-ca")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", *subj, f"/CN=opera-test-{name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *ext)  # fmt: skip
    return Certificates(
        d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key"
    )


async def subscribed(nc: Client, timeout_s: float = 10.0) -> None:
    """Until the server has registered every subscription ``nc`` made so far (bounded).

    ``await nc.flush()`` does not prove it: nats-py writes its PING straight to the socket,
    ahead of a SUB still queued for its flusher, so the PONG can come back before the server
    has read the SUB, and a message published meanwhile finds no subscriber. A message ``nc``
    publishes to an inbox of its own comes back only once the server has read everything
    queued before it, those SUBs included."""
    inbox = await nc.subscribe(nc.new_inbox())
    try:
        await nc.publish(inbox.subject, b"")
        await inbox.next_msg(timeout=timeout_s)
    finally:
        await inbox.unsubscribe()


def event_ids(messages: Sequence[RawStreamMsg]) -> list[str]:
    """The uniqueEventId of each message's body, in sequence order."""
    return [json.loads(m.data or b"{}")["metadata"]["uniqueEventId"] for m in messages]


def order_by_key(messages: Sequence[RawStreamMsg]) -> dict[str, list[str]]:
    """primaryKey -> the uniqueEventIds of its messages, in sequence order."""
    keys: dict[str, list[str]] = {}
    for m in sorted(messages, key=lambda m: m.seq or 0):
        doc = json.loads(m.data or b"{}")
        key = doc.get("primaryKey") or doc["metadata"]["uniqueEventId"]
        keys.setdefault(key, []).append(doc["metadata"]["uniqueEventId"])
    return keys


def servers() -> Iterator[Callable[..., NatsServer]]:
    """The body of a ``nats_factory`` fixture (``yield from servers()``): ``start(**options)``
    gives a running :class:`NatsServer` (see its options), removed at the end of the test.
    Skips the test when nats-server is not installed."""
    binary = find_binary()
    if binary is None or not os.access(binary, os.X_OK):
        pytest.skip(NOT_INSTALLED)
    yield from started(functools.partial(NatsServer, binary))


@pytest.fixture
def nats_factory() -> Iterator[Callable[..., NatsServer]]:
    """``start(**options)``: a running :class:`NatsServer`, removed at the end of the test."""
    yield from servers()


# What an interposer carries one way: (reader of one side, writer to the other, writer back).
Carry = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamWriter], Awaitable[None]
]


async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, _: object = None) -> None:
    """Carry what ``r`` reads to ``w`` as it comes, then close ``w``."""
    with contextlib.suppress(OSError):
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    w.close()


@contextlib.asynccontextmanager
async def interposed(
    target: NatsServer, *, from_client: Carry = pipe, from_server: Carry = pipe
) -> AsyncIterator[str]:
    """A TCP proxy on 127.0.0.1 in front of ``target`` (its nats:// URL), each connection's
    bytes carried by ``from_client(client reader, server writer, client writer)`` and
    ``from_server(server reader, client writer, server writer)``: a server that answers
    something else than nats-server would, or the client's messages itself."""

    async def serve(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(target.host, target.port)
        except OSError:
            cw.close()
            return
        try:
            await asyncio.gather(from_client(cr, sw, cw), from_server(sr, cw, sw))
        finally:
            sw.close()
            cw.close()

    async with serving(serve) as port:
        yield f"nats://127.0.0.1:{port}"


@pytest.fixture
def nats_server(nats_factory: Callable[..., NatsServer]) -> NatsServer:
    """A running server with JetStream and no authentication, for this test."""
    return nats_factory()
