"""TLS to PostgreSQL by default (consumer/pg_target.py, for the postgres sink and the PostgreSQL
state store alike). A DSN without sslmode got asyncpg's default, ``prefer``: TLS without checking
the certificate, and plain text after a server answered that it had none, so a man in the middle
that asked for AuthenticationCleartextPassword received the DSN's password. Off this machine the
default is now verify-full (the system's CAs or the DSN's sslrootcert, the host name checked);
a server that cannot prove itself is refused before the password is sent, with exit 78 naming
sink.dsn / state.dsn and the fix.

The servers here listen on 127.0.0.1 only; the host that is "not this machine" is an alias of
127.0.0.1 (the machine's own name), which Target does not resolve: only ``localhost`` and
loopback addresses are taken as this machine."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nats_server import make_certificates
from operator_support import write_config
from support import spawn_daemon, tail, wait_exit

from consumer.config import PostgresSinkSettings
from consumer.errors import ConfigError, StoreError
from consumer.pg_target import Target, is_local
from consumer.sinks.postgres import PostgresSink
from consumer.state.postgres import PostgresStore

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")

SECRET = "pg-Sink-Secret-91c4"
SSL_REQUEST = (80877103).to_bytes(4, "big")


@pytest.mark.parametrize(
    ("dsn", "verifies"),
    [
        ("postgresql://u:pw@db.example.com/ev", True),
        ("postgresql://u:pw@10.0.0.5:5432/ev", True),
        ("postgresql://u:pw@[2001:db8::1]:5432/ev", True),
        ("postgresql://u:pw@127.0.0.1:5432,db.example.com:5433/ev", True),  # any host off it
        ("postgresql://u:pw@vm/ev", True),  # a name is not resolved: only localhost is trusted
        ("postgresql://u:pw@db.example.com/ev?sslmode=require", False),  # the operator's choice
        ("postgresql://u:pw@db.example.com/ev?sslmode=disable", False),
        ("postgresql://u:pw@db.example.com/ev?sslmode=verify-ca&sslrootcert=/ca.pem", False),
        ("postgresql://u:pw@127.0.0.1:5432/ev", False),
        ("postgresql://u:pw@127.8.9.10/ev", False),
        ("postgresql://u:pw@[::1]:5432/ev", False),
        ("postgresql://u:pw@localhost/ev", False),
        ("postgresql://u:pw@LocalHost./ev", False),
        ("postgresql://u:pw@/ev?host=/var/run/postgresql", False),  # a Unix socket
        ("postgresql://u:pw@%2Fvar%2Frun%2Fpostgresql/ev", False),
        ("postgresql:///ev", False),  # the driver's default: a local socket or localhost
    ],
)
def test_which_dsns_verify_the_server_by_default(dsn: str, verifies: bool) -> None:
    assert Target(dsn).verifies is verifies
    assert (Target(dsn).tls() is not None) is verifies


def test_the_environment_counts_as_the_dsn_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncpg reads PGSSLMODE and PGHOST where the DSN says nothing: so does the decision."""
    monkeypatch.setenv("PGHOST", "db.example.com")
    assert Target("postgresql://u:pw@/ev").verifies
    monkeypatch.setenv("PGSSLMODE", "require")
    assert not Target("postgresql://u:pw@/ev").verifies
    assert not Target("postgresql://u:pw@db.example.com/ev").verifies


def test_the_default_context_verifies_against_the_system_or_the_dsns_ca(tmp_path: Path) -> None:
    context = Target("postgresql://u:pw@db.example.com/ev").tls()
    assert context is not None
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)


async def test_a_ca_file_that_cannot_be_loaded_is_named(tmp_path: Path) -> None:
    """The driver loads the DSN's sslrootcert (verify-full, no sslmode written) before it
    connects: a missing file is a configuration error naming state.dsn, not a wait."""
    missing = tmp_path / "nope.pem"
    with pytest.raises(StoreError) as info:
        await PostgresStore.open(
            f"postgresql://u:pw@db.example.com/ev?sslrootcert={missing}", timeout_s=5.0
        )
    assert not info.value.retriable
    assert "state.dsn: " in str(info.value) and "cannot be loaded" in str(info.value)


def alias() -> str:
    """A name of 127.0.0.1 that is not 'localhost' (the machine's own, in /etc/hosts)."""
    name = socket.gethostname()
    try:
        addresses = {a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)}
    except OSError:
        addresses = set()
    if is_local(name) or addresses != {"127.0.0.1"}:
        pytest.skip(f"this machine's name {name!r} is not an alias of 127.0.0.1 only")
    return name


@dataclass
class FakeServer:
    """Answers the SSLRequest (``tls``: with a handshake, else 'N'), then asks for the
    password in clear text, and records what it was sent: (over TLS?, password)."""

    context: ssl.SSLContext | None
    port: int = 0
    passwords: list[tuple[bool, bytes]] = field(default_factory=list)
    client_certs: list[bool] = field(default_factory=list)  # per TLS handshake: one presented?

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readexactly(8)
                tls = request[4:] == SSL_REQUEST and self.context is not None
                if request[4:] == SSL_REQUEST:
                    writer.write(b"S" if tls else b"N")
                    await writer.drain()
                    if tls:
                        await writer.start_tls(self.context)  # type: ignore[arg-type]
                        self.client_certs.append(bool(writer.get_extra_info("peercert")))
                    size = int.from_bytes(await reader.readexactly(4), "big")
                    await reader.readexactly(size - 4)  # the StartupMessage
                else:  # a StartupMessage right away
                    await reader.readexactly(int.from_bytes(request[:4], "big") - 8)
                writer.write(b"R" + (8).to_bytes(4, "big") + (3).to_bytes(4, "big"))
                await writer.drain()
                kind = await reader.readexactly(1)
                size = int.from_bytes(await reader.readexactly(4), "big")
                body = await reader.readexactly(size - 4)
                if kind == b"p":
                    self.passwords.append((tls, body.rstrip(b"\x00")))
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def fake(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FakeServer]:
    """``request.param``: "unverifiable TLS" (a certificate no system CA signed) or "no TLS"."""
    context = None
    if request.param == "unverifiable TLS":
        certs = make_certificates(tmp_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certs.server_cert, certs.server_key)
    server = FakeServer(context)
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listening.sockets[0].getsockname()[1]
    async with listening:
        yield server


def sink_settings(dsn: str) -> PostgresSinkSettings:
    return PostgresSinkSettings(type="postgres", dsn=dsn, table="opera_events", timeout_s=5.0)  # type: ignore[arg-type]


FAKES = pytest.mark.parametrize("fake", ["unverifiable TLS", "no TLS"], indirect=True)


@FAKES
async def test_the_sink_never_gives_its_password_to_a_server_it_cannot_verify(
    fake: FakeServer, request: pytest.FixtureRequest
):
    """Was: with no sslmode the password went over TLS to a self-signed certificate, and in
    plain text to a server that said it had no TLS; the sink then retried for ever."""
    dsn = f"postgresql://opera:{SECRET}@{alias()}:{fake.port}/opera_test"
    sink = PostgresSink(sink_settings(dsn))
    with pytest.raises(ConfigError) as info:
        await sink.open(None)
    await sink.close()
    assert fake.passwords == []
    message = str(info.value)
    assert message.startswith("sink.dsn: PostgreSQL at ")
    what = {"unverifiable TLS": "certificate cannot be verified", "no TLS": "does not offer TLS"}
    assert what[request.node.callspec.params["fake"]] in message
    assert "the DSN has no sslmode" in message
    assert "sslrootcert=" in message and "sslmode=require" in message
    assert SECRET not in message


@FAKES
async def test_the_state_store_never_gives_its_password_to_a_server_it_cannot_verify(
    fake: FakeServer,
):
    """The same Target: a StoreError that is not retried (exit 78, not a wait for ever),
    naming state.dsn."""
    dsn = f"postgresql://opera:{SECRET}@{alias()}:{fake.port}/opera_test"
    with pytest.raises(StoreError) as info:
        await PostgresStore.open(dsn, timeout_s=5.0)
    assert fake.passwords == []
    assert not info.value.retriable
    assert "state.dsn: PostgreSQL at " in str(info.value)
    assert "sslmode=require" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("fake", ["unverifiable TLS"], indirect=True)
async def test_an_explicit_sslmode_is_the_operators_choice(fake: FakeServer):
    """sslmode=require: encrypted, not verified, as the operator wrote."""
    dsn = f"postgresql://opera:{SECRET}@{alias()}:{fake.port}/opera_test?sslmode=require"
    sink = PostgresSink(sink_settings(dsn))
    with pytest.raises(Exception):  # noqa: B017  # the fake server ends there
        await sink.open(None)
    await sink.close()
    assert fake.passwords == [(True, SECRET.encode())]


def ca_signed(d: Path, host: str) -> None:
    """In ``d``: ca.pem (a CA of the test's own), server.pem/.key for ``host`` and
    client.pem/.key, both signed by it."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    try:
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key",
            "-out", "ca.pem", "-subj", "/CN=opera-test-ca")  # fmt: skip
    except FileNotFoundError:
        pytest.skip("openssl not installed: apt-get install openssl")
    (d / "san.ext").write_text(f"subjectAltName = DNS:{host}\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN=opera-{name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *ext)  # fmt: skip


def server_context(d: Path, *, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(d / "server.pem", d / "server.key")
    if client_cert:  # pg_hba's "hostssl ... cert": no handshake without one
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(d / "ca.pem")
    return context


async def test_the_dsns_sslrootcert_verifies_the_server(tmp_path: Path):
    """No sslmode, the CA in sslrootcert, a certificate for the DSN's host name: verified TLS,
    and only then the password."""
    name = alias()
    ca_signed(tmp_path, name)
    fake = FakeServer(server_context(tmp_path))
    listening = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    async with listening:
        dsn = (
            f"postgresql://opera:{SECRET}@{name}:{port}/opera_test"
            f"?sslrootcert={tmp_path / 'ca.pem'}"
        )
        sink = PostgresSink(sink_settings(dsn))
        with pytest.raises(Exception):  # noqa: B017  # the fake server ends there
            await sink.open(None)
        await sink.close()
    assert fake.passwords == [(True, SECRET.encode())]


async def test_a_real_server_without_tls_off_this_machine_exits_78(
    postgres_server, sandbox_factory, tmp_path: Path
):
    """The daemon against the test cluster (no TLS) reached by a name that is not loopback:
    refused at start, exit 78, the log naming the key and the fix; its own loopback address
    keeps working (every other test), and sslmode=disable in the DSN is taken as written."""
    name = alias()
    dsn = postgres_server.dsn().replace("@127.0.0.1:", f"@{name}:")
    assert dsn != postgres_server.dsn()
    gw = await sandbox_factory(backlog=5)
    for key, config in (
        ("sink.dsn", write_config(tmp_path, gw.url, sink={"type": "postgres", "dsn": dsn})),
        (
            "state.dsn",
            write_config(
                tmp_path,
                gw.url,
                name="state.toml",
                sink={"type": "jsonl", "path": str(tmp_path / "events.jsonl")},
                state={"backend": "postgres", "dsn": dsn},
            ),
        ),
    ):
        log = tmp_path / f"{key}.log"
        proc = spawn_daemon(config, log)
        try:
            code = await wait_exit(proc, 60)
        finally:
            proc.kill()
        assert code == 78, f"{key}: exit {code}: {tail(log, 800)}"
        assert f"{key}: PostgreSQL at {name}:" in tail(log, 4000), tail(log, 800)
        assert "does not offer TLS" in tail(log, 4000)
        assert postgres_server.password not in log.read_text()
    sink = PostgresSink(sink_settings(dsn + "?sslmode=disable"))
    await sink.open(None)
    await sink.close()


async def open_store(dsn: str) -> None:
    with pytest.raises(Exception):  # noqa: B017  # the fake server ends after the password
        store = await PostgresStore.open(dsn, timeout_s=5.0)
        await store.close()


async def test_the_ca_and_client_certificate_from_where_the_driver_looks_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No sslmode: the default context took the system's CAs or the DSN's sslrootcert only,
    so a CA given by PGSSLROOTCERT (or ~/.postgresql/root.crt) was refused (exit 78), and the
    DSN's client certificate was not presented (a server that authenticates by certificate
    refused the daemon, which said to fix the password). The driver's own verify-full now
    takes them where libpq does."""
    name = alias()
    ca_signed(tmp_path, name)
    server = FakeServer(server_context(tmp_path))
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    async with listening:
        port = listening.sockets[0].getsockname()[1]
        with monkeypatch.context() as env:
            env.setenv("PGSSLROOTCERT", str(tmp_path / "ca.pem"))
            await open_store(f"postgresql://opera:{SECRET}@{name}:{port}/opera_test")
    assert server.passwords == [(True, SECRET.encode())]
    needs_cert = FakeServer(server_context(tmp_path, client_cert=True))
    listening = await asyncio.start_server(needs_cert.handle, "127.0.0.1", 0)
    async with listening:
        port = listening.sockets[0].getsockname()[1]
        await open_store(
            f"postgresql://opera:{SECRET}@{name}:{port}/opera_test?sslrootcert="
            f"{tmp_path / 'ca.pem'}&sslcert={tmp_path / 'client.pem'}"
            f"&sslkey={tmp_path / 'client.key'}"
        )
    assert needs_cert.client_certs == [True]
    assert needs_cert.passwords == [(True, SECRET.encode())]


@pytest.mark.parametrize("fake", ["no TLS"], indirect=True)
async def test_a_host_from_a_service_file_is_verified(
    fake: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DSN naming a connection service (?service=, PGSERVICE): the driver reads its host
    from the service file, which the check did not: taken for this machine, the password went
    in plain text to a server that said it had no TLS."""
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[prod]\nhost={alias()}\nport={fake.port}\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    dsn = f"postgresql://opera:{SECRET}@/opera_test?service=prod"
    assert Target(dsn).verifies
    with pytest.raises(StoreError):
        await PostgresStore.open(dsn, timeout_s=5.0)
    assert fake.passwords == []


def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *files: str) -> Path:
    """HOME in ``tmp_path`` with these files in its .postgresql (where libpq looks), and no
    PG* certificate variable: the test's own view of where the driver looks."""
    home = tmp_path / "home"
    (home / ".postgresql").mkdir(parents=True)
    for name in files:
        (home / ".postgresql" / name).write_text("not read: the CA check fails first\n")
    monkeypatch.setenv("HOME", str(home))
    for var in ("PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGSSLCRL", "PGSSLMODE", "PGSERVICE"):
        monkeypatch.delenv(var, raising=False)
    return home


async def refusals(dsn: str) -> tuple[str, str]:
    """What the sink's open and the state store's open say (neither may be retried)."""
    sink = PostgresSink(sink_settings(dsn))
    with pytest.raises(ConfigError) as refused:
        await sink.open(None)
    await sink.close()
    with pytest.raises(StoreError) as stored:
        await PostgresStore.open(dsn, timeout_s=5.0)
    assert not stored.value.retriable
    return str(refused.value), str(stored.value)


@pytest.mark.parametrize("fake", ["no TLS"], indirect=True)
@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ("missing", "it does not exist"),
        ("directory", "it is a directory"),
        ("not PEM", "it holds no PEM certificate"),
    ],
)
async def test_a_ca_file_named_by_pgsslrootcert_that_cannot_be_loaded_is_named(
    fake: FakeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
    problem: str,
) -> None:
    """The driver verifies with PGSSLROOTCERT's file (no sslmode, a server off this machine):
    was a list of every place a certificate may come from, not the file, nor why."""
    isolated_home(tmp_path, monkeypatch)
    ca = tmp_path / "ca.pem"
    if setting == "directory":
        ca.mkdir()
    elif setting == "not PEM":
        ca.write_text("-----BEGIN NOTHING-----\n")
    monkeypatch.setenv("PGSSLROOTCERT", str(ca))
    dsn = f"postgresql://opera:{SECRET}@{alias()}:{fake.port}/opera_test"
    for key, message in zip(("sink.dsn", "state.dsn"), await refusals(dsn), strict=True):
        assert f"{key}: PostgreSQL at " in message
        assert f"the CA file {ca} (named by PGSSLROOTCERT) cannot be loaded: {problem}" in message
        assert "the DSN has no sslmode and the server is not on this machine" in message
        assert "make PGSSLROOTCERT name a CA file readable by uid" in message
        assert SECRET not in message
    assert fake.passwords == []


@pytest.mark.parametrize("fake", ["no TLS"], indirect=True)
@pytest.mark.parametrize(
    ("env", "query"),
    [
        pytest.param({}, "", id="a client certificate in ~/.postgresql"),
        pytest.param({"PGSSLCERT": "client.pem"}, "", id="PGSSLCERT"),
        pytest.param({}, "?sslcert={tmp}/client.pem", id="the DSN's sslcert"),
        pytest.param({}, "?sslmode=verify-full", id="sslmode=verify-full written"),
        pytest.param({"PGSSLMODE": "verify-ca"}, "", id="PGSSLMODE=verify-ca"),
    ],
)
async def test_no_ca_where_the_driver_looks_is_named_not_an_unparsable_dsn(
    fake: FakeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    query: str,
) -> None:
    """The driver verifies (a client certificate configured, or verify-ca/verify-full asked
    for) and finds no CA: no sslrootcert, no PGSSLROOTCERT, no ~/.postgresql/root.crt. Its
    ClientConfigurationError was taken for a parse error: 'invalid sink.dsn: it cannot be
    parsed ... percent-encode any # / ? @ :' sent the operator after the password."""
    home = isolated_home(tmp_path, monkeypatch, *([] if env or query else ["postgresql.crt"]))
    (tmp_path / "client.pem").write_text("a client certificate\n")
    for var, value in env.items():
        monkeypatch.setenv(var, str(tmp_path / value) if value.endswith(".pem") else value)
    dsn = f"postgresql://opera:{SECRET}@{alias()}:{fake.port}/opera_test"
    dsn += query.format(tmp=tmp_path)
    root = home / ".postgresql" / "root.crt"
    for key, message in zip(("sink.dsn", "state.dsn"), await refusals(dsn), strict=True):
        assert "cannot be parsed" not in message
        assert f"{key}: PostgreSQL at " in message
        assert f"the CA file {root} (~/.postgresql/root.crt: the driver's default" in message
        assert "cannot be loaded: it does not exist" in message
        assert "sslrootcert=/path/ca.pem in the DSN" in message
        assert SECRET not in message
    assert fake.passwords == []


@pytest.mark.parametrize("fake", ["no TLS"], indirect=True)
async def test_sslmode_require_with_a_missing_ca_file_is_not_retried_for_ever(
    fake: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sslmode=require loads PGSSLROOTCERT's file too: its FileNotFoundError was taken for a
    server that cannot be reached, retried for ever (the sink) or waited out at start (the
    state store)."""
    isolated_home(tmp_path, monkeypatch)
    monkeypatch.setenv("PGSSLROOTCERT", str(tmp_path / "gone.pem"))
    dsn = f"postgresql://opera:{SECRET}@127.0.0.1:{fake.port}/opera_test?sslmode=require"
    for message in await refusals(dsn):
        assert f"the CA file {tmp_path / 'gone.pem'} (named by PGSSLROOTCERT)" in message
        assert "sslmode=require" in message
    assert fake.passwords == []


@pytest.mark.parametrize("fake", ["no TLS"], indirect=True)
async def test_the_daemon_names_the_missing_ca_and_exits_78(
    fake: FakeServer, sandbox_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: a client certificate in ~/.postgresql and no root.crt beside it."""
    home = isolated_home(tmp_path, monkeypatch, "postgresql.crt")
    gw = await sandbox_factory(backlog=5)
    dsn = f"postgresql://opera:{SECRET}@{alias()}:{fake.port}/opera_test"
    config = write_config(tmp_path, gw.url, sink={"type": "postgres", "dsn": dsn})
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(config, log)
    try:
        code = await wait_exit(proc, 60)
    finally:
        proc.kill()
    assert code == 78, f"exit {code}: {tail(log, 800)}"
    text = log.read_text()
    assert f"the CA file {home / '.postgresql' / 'root.crt'}" in text, tail(log, 800)
    assert "cannot be parsed" not in text
    assert SECRET not in text
    assert fake.passwords == []
