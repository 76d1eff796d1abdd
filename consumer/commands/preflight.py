"""``opera-consumer preflight``: the pre-go-live checklist, one line per item with its fix.

It authenticates and opens the WebSocket like the daemon, but never subscribes to events, so it
cannot take the stream from a running consumer (it sends only ``connection_init``, pings and the
``query { connection { status } }`` query). Each item answers within its own timeouts (one
token request, no retries) and a failure names the URL and the reason.

It changes nothing: files and directories the daemon would create are only looked at, SQLite
files are read with ``immutable=1``, and the PostgreSQL set-up (schema, table) runs in a
transaction that is rolled back, so its privileges are really tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.typing import Subprotocol

from ..config import (
    JsonlSinkSettings,
    NatsSinkSettings,
    PostgresSinkSettings,
    RedisSinkSettings,
    Settings,
    SqliteSinkSettings,
    StreamSettings,
    mask_url,
)
from ..core import protocol
from ..core.evidence import describe, quoted
from ..core.printable import printable
from ..core.session import (
    ClientSession,
    ConnectionStatus,
    Outcome,
    PongReceived,
    Reply,
    SessionState,
)
from ..core.unreachable import reason
from ..errors import AuthError, ConfigError, SinkError, SinkUnusable, StoreError
from ..logs import REDACTOR
from ..pg_target import Target
from ..runtime import tls
from ..runtime.assembly import bus_sink, http_client, register_secrets
from ..runtime.auth import TokenProvider
from ..runtime.origin import one_header, redirect_target
from ..sinks import sqlite as sqlite_sink
from ..sinks.jsonl import JsonlSink
from ..state import sqlite
from ..state.lease import REPLAY, current_holder, lock_path

HEADER_LIMIT = 8 * 1024  # the gateway's request header limit
SLOW_RTT_S = 0.5
DETAIL_LIMIT = 1000  # characters of one line's detail: a server's words are in some


@dataclass(frozen=True)
class Item:
    level: str  # PASS, WARN, FAIL
    stream: str
    what: str
    detail: str


class _Checks:
    def __init__(self, emit: Callable[[Item], None]) -> None:
        self._emit = emit
        self.failed = False

    def add(self, level: str, stream: str, what: str, detail: str) -> None:
        self.failed |= level == "FAIL"
        # One line each, whatever a server said (a close reason, a status): controls escaped.
        self._emit(Item(level, stream, what, printable(REDACTOR.scrub(detail), DETAIL_LIMIT)))


class NoRedirects(connect):
    """websockets' connect, a redirect raised as the InvalidStatus it is (see
    :mod:`consumer.runtime.origin`)."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


async def run(settings: Settings, emit: Callable[[Item], None]) -> bool:
    """Run every check; returns True when none failed."""
    register_secrets(settings)
    checks = _Checks(emit)
    async with http_client(settings) as http:
        for name, stream in settings.streams.items():
            await _stream(checks, name, stream, http)
    await _local(checks, settings)
    return not checks.failed


async def _stream(
    checks: _Checks, name: str, s: StreamSettings, http: aiohttp.ClientSession
) -> None:
    add = checks.add
    tokens = TokenProvider(http, s)
    try:
        token = await tokens.token(retry=False)
    except AuthError as exc:
        add("FAIL", name, "token", str(exc))
        return
    add("PASS", name, "token", f"obtained, valid for {token.lifetime_s:.0f} s")
    for key, what, fix in s.warnings():  # valid, but probably wrong (as check-config says)
        add("WARN", name, key, f"{what}: {fix}")
    c = s.connection
    url = protocol.subscription_url(s.gateway_url, s.app_key.get_secret_value())
    # As the daemon connects: the token on the upgrade too when asked.
    upgrade = {"Authorization": f"Bearer {token.value}"} if c.upgrade_authorization else None
    try:
        async with NoRedirects(  # as the daemon: a redirect is not followed
            url,
            additional_headers=upgrade,
            subprotocols=[Subprotocol(protocol.SUBPROTOCOL)],
            open_timeout=c.open_timeout_s,
            ping_interval=None,
            proxy=c.proxy,
            compression=None,
            **tls.connect_options(url),
        ) as ws:
            headers = len(ws.request.serialize()) if ws.request is not None else 0
            add(
                "PASS" if headers < HEADER_LIMIT else "FAIL",
                name,
                "request headers",
                f"{headers} bytes (gateway limit {HEADER_LIMIT})",
            )
            if ws.subprotocol != protocol.SUBPROTOCOL:
                add("FAIL", name, "gateway", "graphql-transport-ws refused: check gateway_url")
                return
            add("PASS", name, "gateway", "reachable; the hashed application key was accepted")
            await _session(checks, name, s, ws, token.value)
    except InvalidStatus as exc:
        code = exc.response.status_code
        target = redirect_target(url, one_header(exc.response.headers, "Location"))
        if 300 <= code < 400 and target is not None:
            host, same = target
            where = host if same else f"another origin ({host})"
            add(
                "FAIL",
                name,
                "gateway",
                f"redirected with HTTP {code} to {where}: not followed (the daemon does not "
                "follow it either; credentials are not sent there); if it is the gateway now, "
                "set gateway_url to it",
            )
            return
        fix = "check app_key, gateway_url, approval, Streaming Enabled" if code == 400 else ""
        url = mask_url(s.gateway_url)
        add("FAIL", name, "gateway", f"{url}: upgrade refused with HTTP {code}. {fix}".strip())
    except (OSError, TimeoutError, WebSocketException) as exc:
        where = mask_url(s.gateway_url)
        add("FAIL", name, "gateway", f"{where} unreachable: {reason(exc)}; check gateway_url")
    sub = s.subscription
    filters = f"delta={'on' if sub.delta else 'off'}, hotels={','.join(sub.hotel_codes) or 'all'}"
    add(
        "PASS" if not sub.hotel_codes else "WARN",
        name,
        "subscription",
        filters
        + ("" if not sub.hotel_codes else ": Oracle recommends hotel filters only for replays"),
    )


async def _session(
    checks: _Checks, name: str, s: StreamSettings, ws: ClientConnection, token: str
) -> None:
    add = checks.add
    session = ClientSession(max_frame_bytes=s.connection.max_frame_bytes, scrub=REDACTOR.scrub)
    enterprise_id = s.auth.enterprise_id if s.connection.init_enterprise_id else None
    await ws.send(session.connection_init(token, s.app_key.get_secret_value(), enterprise_id))
    try:
        async with asyncio.timeout(s.connection.ack_timeout_s):
            while session.state is SessionState.INITIALIZING:
                out = session.receive(await ws.recv(decode=False))
                if isinstance(out, Reply):
                    await ws.send(out.text)
    except (TimeoutError, WebSocketException) as exc:
        add("FAIL", name, "authentication", f"no connection_ack ({exc}): check app_key and token")
        return
    add("PASS", name, "authentication", "connection_ack received")
    rtts = []
    for _ in range(3):
        started = time.monotonic()
        await ws.send(session.ping())
        async with asyncio.timeout(10):
            while not isinstance(await _answer(ws, session), PongReceived):
                pass
        rtts.append(time.monotonic() - started)
    rtt = min(rtts)
    if rtt > SLOW_RTT_S:
        add("WARN", name, "round trip", f"{rtt * 1000:.0f} ms: deploy closer to the OPERA region")
    else:
        add("PASS", name, "round trip", f"{rtt * 1000:.0f} ms")
    await ws.send(session.query_connection())
    try:
        async with asyncio.timeout(10):
            while not isinstance(answer := await _answer(ws, session), ConnectionStatus):
                pass
    except (TimeoutError, WebSocketException) as exc:
        add("WARN", name, "connection status", f"query not answered ({type(exc).__name__})")
        return
    if answer.status is None:
        add("WARN", name, "connection status", f"query not answered: {answer.problem}")
    elif answer.status == "Active":
        add("WARN", name, "connection status", "Active: another consumer holds this stream (4409)")
    elif answer.status == "Inactive":
        add("PASS", name, "connection status", answer.status)
    else:  # the daemon takes it as no answer (and subscribes)
        add("WARN", name, "connection status", f"unexpected answer {quoted(answer.status, 50)}")


async def _answer(ws: ClientConnection, session: ClientSession) -> Outcome:
    """The next outcome, answering the server's pings on the way."""
    out = session.receive(await ws.recv(decode=False))
    if isinstance(out, Reply):
        await ws.send(out.text)
    return out


async def _local(checks: _Checks, settings: Settings) -> None:
    add = checks.add
    sink_state: str | _Unknown | None = _UNKNOWN  # the sink's committed position
    try:
        if settings.state.backend == "sqlite":
            item = _sqlite_file("state store", settings.state.path, "[state] path")
            add(*item)
            if item[0] == "PASS" and (replay := _replay_lock(settings.state.path)) is not None:
                add(*replay)
            if item[0] == "PASS":
                sink_state = _sqlite_sink_state(settings.state.path, settings.sink.type)
        else:
            detail, sink_state = await _postgres_state(settings)
            add("PASS", "-", "state store", detail)
    except StoreError as exc:
        add("FAIL", "-", "state store", str(exc))
    await _sink(checks, settings, sink_state)
    m = settings.metrics
    if m.enabled:
        await _metrics_address(checks, settings)


async def _metrics_address(checks: _Checks, settings: Settings) -> None:
    """Whether ``run`` can listen on the metrics address: bound as asyncio.start_server binds
    (SO_REUSEADDR, so a just-stopped daemon's TIME_WAIT connections are no obstacle). Taken:
    our running daemon's (a WARN, as the connection status says), or something else's, which
    `run` refuses (exit 78): a FAIL."""
    m = settings.metrics
    where = f"{m.address}:{m.port}"
    try:
        infos = socket.getaddrinfo(
            m.address or None, m.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        checks.add("FAIL", "-", "metrics address", f"{where}: {exc}: fix [metrics] address")
        return
    problem = None
    with contextlib.ExitStack() as probes:  # every address, held together, as the server does
        for family, kind, proto, _, address in dict.fromkeys(infos):
            probe = probes.enter_context(socket.socket(family, kind, proto))
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                problem = exc.strerror or str(exc)
                break
    if problem is None:
        checks.add("PASS", "-", "metrics address", f"{where} free")
        return
    try:
        running = await current_holder(settings.state)
        if running is None and settings.fleet.enabled:  # members hold no single-daemon lease
            running = await current_holder(settings.state, fleet=True)
    except Exception:  # the state store's line says why it cannot be read
        running = None
    if running is not None:
        pid = running.get("pid") or running.get("member")
        checks.add(
            "WARN",
            "-",
            "metrics address",
            f"{where} in use: the running daemon{f' ({pid})' if pid else ''} holds the state "
            "store, and most likely this address",
        )
        return
    checks.add(
        "FAIL",
        "-",
        "metrics address",
        f"{where}: {problem}, and no opera-consumer holds the state store: another program "
        "has it, and `run` would stop (exit 78): set [metrics] port (or address) to a free "
        "one, or stop that program",
    )


def _sqlite_file(what: str, path: Path, setting: str) -> tuple[str, str, str, str]:
    """(level, "-", what, detail) for a SQLite file the daemon writes (``setting`` names it),
    looked at without creating or changing it (SQLite itself would create a missing file, or
    its -wal/-shm)."""
    try:
        if not path.exists():
            return _creatable(what, path)
    except OSError as exc:  # a directory this user cannot enter: name it and the fix
        return "FAIL", "-", what, f"{path}: {sqlite.access_fault(path) or exc.strerror}"
    # Before SQLite opens it: reading a FIFO waits for a writer for ever.
    if (fault := sqlite.not_a_file(path, setting)) is not None:
        return "FAIL", "-", what, f"{path}: {fault}"
    try:
        uri = f"{path.resolve().as_uri()}?mode=ro&immutable=1"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error as exc:
        return "FAIL", "-", what, str(sqlite.store_error(path, exc))
    if version > len(sqlite.MIGRATIONS):
        return "FAIL", "-", what, f"{path}: written by a newer opera-consumer: upgrade it"
    # The directory or file at fault by name (through a link: the file's, where SQLite makes
    # its -wal): its -wal, -shm and the daemon's .lock too, one left by a command run as root
    # (a dlq replay, a status) stops the daemon's start while the file itself is fine.
    if (fault := sqlite.access_fault(path)) is not None:
        return "FAIL", "-", what, f"{path}: {fault}"
    if not (os.access(path, os.W_OK) and os.access(path.resolve().parent, os.W_OK)):
        fix = "make it and its directory writable by the daemon's user, or set another path"
        return "FAIL", "-", what, f"{path} is not writable: {fix}"
    return "PASS", "-", what, f"{path} writable"


def _replay_lock(path: Path) -> tuple[str, str, str, str] | None:
    """A WARN when ``dlq replay`` could not take its lock beside the store (not `run`'s)."""
    lock = lock_path(path, REPLAY)
    try:
        if not lock.exists() or os.access(lock, os.R_OK | os.W_OK):
            return None
    except OSError:
        return None  # the state store's line says why
    return (
        "WARN",
        "-",
        "dlq replay lock",
        f"{lock} is not readable and writable by this user (uid {os.geteuid()}): `dlq "
        "replay` would fail; chown it to the daemon's user (a replay run as root leaves it "
        "root's)",
    )


class _Unknown:
    """The sink's committed position could not be read (the state store's line says why)."""


_UNKNOWN = _Unknown()


def _sqlite_sink_state(path: Path, sink: str) -> str | None:
    """The sink's committed position in the SQLite store, read without changing it. Read
    as immutable unless a -wal is there (a running or crashed daemon's commits may be in it
    alone); read-only either way."""
    if not path.exists():
        return None
    wal = sqlite.beside(path, "-wal").exists()  # beside the file, not a link to it
    uri = f"{path.resolve().as_uri()}?mode=ro{'' if wal else '&immutable=1'}"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
            if not int(db.execute("PRAGMA user_version").fetchone()[0]):
                return None  # an empty file: no tables yet
            row = db.execute("SELECT state FROM sink_state WHERE sink = ?", (sink,)).fetchone()
    except sqlite3.Error as exc:
        raise sqlite.store_error(path, exc) from None
    return None if row is None else str(row[0])


def _sqlite_table(path: Path, table: str, *, in_store: bool = False) -> str | None:
    """What the sqlite sink's open would refuse in its table (the sink's own check, run on a
    read-only connection), or None: no such table yet (the sink creates it), or a file the
    other lines already fail."""
    try:
        if in_store:
            sqlite_sink.check_store_table_name(table, path)
        if not path.is_file():
            return None  # no file yet (created at the start), or the file's line says why
        # Immutable unless a -wal is there (a running daemon's commits may be in it alone).
        wal = sqlite.beside(path, "-wal").exists()
        uri = f"{path.resolve().as_uri()}?mode=ro{'' if wal else '&immutable=1'}"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
            sqlite_sink.check_table(db, table, path)
            if in_store:
                sqlite_sink.check_store_guards(db, table, path)
    except ConfigError as exc:
        return str(exc)
    except sqlite3.Error as exc:
        if in_store:
            return None  # the state store's line says why
        return str(sqlite_sink.open_error(exc, table, path, "sink.path"))
    except OSError:
        return None  # the file's line says why
    return None


def _creatable(what: str, path: Path) -> tuple[str, str, str, str]:
    """A file the daemon creates (with its missing directories) at its first start."""
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK):
        return "PASS", "-", what, f"{path} does not exist yet: the daemon creates it"
    return "FAIL", "-", what, f"{path} cannot be created: {folder} is not writable"


class _RolledBack:
    """Stands in for an asyncpg pool: every ``acquire`` gets the one connection, inside a
    transaction the caller rolls back. So the daemon's own set-up (privileges, locks, DDL:
    PostgreSQL's DDL is transactional) is really tried, and leaves nothing behind."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    @contextlib.asynccontextmanager
    async def acquire(self, **_: Any) -> AsyncIterator[Any]:  # timeout=: nothing to wait for
        yield self._conn

    async def fetchval(self, *args: Any, **kwargs: Any) -> Any:  # the store's one-row reads
        return await self._conn.fetchval(*args, **kwargs)


@contextlib.asynccontextmanager
async def _rolled_back(conn: Any) -> AsyncIterator[_RolledBack]:
    tx = conn.transaction()
    await tx.start()
    try:
        yield _RolledBack(conn)
    except asyncio.CancelledError:
        raise  # a timeout: the caller drops the connection (a ROLLBACK would wait as well)
    except BaseException:
        await tx.rollback()
        raise
    await tx.rollback()


async def _postgres_state(settings: Settings) -> tuple[str, str | None]:
    """What to say of the store, and the sink's committed position in it. The connect and
    every statement (BEGIN, the wait for the migration lock, the reads) within one
    ``[state] timeout_s``, the goodbye within another: a server that accepts the connection
    and then goes silent fails the item instead of holding the checklist."""
    import asyncpg  # noqa: PLC0415  # an extra: only where PostgreSQL is configured

    from ..state import postgres  # noqa: PLC0415

    st = settings.state
    assert st.dsn is not None  # the settings refuse postgres without one
    target, timeout_s = Target(st.dsn.get_secret_value()), st.timeout_s
    conn: Any = None
    try:
        async with asyncio.timeout(timeout_s):
            conn = await asyncpg.connect(
                target.dsn(), ssl=target.tls(), timeout=timeout_s, command_timeout=timeout_s
            )
            async with _rolled_back(conn) as pool:
                store = postgres.PostgresStore(pool, target, st.schema_, timeout_s)
                await store._migrate(create=True)
                sink_state = await store.sink_state(settings.sink.type)
    except TimeoutError:
        raise postgres.no_answer(target, st.schema_, "trying the set-up", timeout_s) from None
    except (*postgres.DRIVER_ERRORS, ValueError) as exc:
        doing = "connecting" if conn is None else "trying the set-up"
        raise postgres.store_error(target, st.schema_, exc, doing) from None
    finally:
        if conn is not None:
            await postgres.close_bounded(conn, timeout_s)
    return f"PostgreSQL {target.where} reachable, schema {st.schema_} ready or creatable", (
        sink_state
    )


async def _sink(checks: _Checks, settings: Settings, committed: str | _Unknown | None) -> None:
    """What can be checked without delivering anything. ``committed``: the sink's position
    in the state store."""
    add = checks.add
    s = settings.sink
    if isinstance(s, SqliteSinkSettings):
        state = settings.state.path
        if s.path is None or s.path.resolve() == state.resolve():  # as the assembly decides
            level, detail = "PASS", f"rows go into the state store {state}"
            problem = _sqlite_table(state, s.table, in_store=True)
        else:
            level, _, _, detail = _sqlite_file("sink", s.path, "sink.path")
            problem = _sqlite_table(s.path, s.table) if level == "PASS" else None
        if problem is not None:
            level, detail = "FAIL", problem
        add(level, "-", "sink", f"sqlite: {detail}")
    elif isinstance(s, JsonlSinkSettings):
        try:
            if not s.path.exists():
                level, _, _, detail = _creatable("sink", s.path)
            elif s.path.is_file() and os.access(s.path, os.W_OK):
                level, detail = "PASS", f"{s.path} writable"
            else:
                level, detail = "FAIL", f"{s.path} is not a writable file"
        except OSError as exc:  # a directory this user cannot enter
            level, detail = "FAIL", f"{s.path}: {exc.strerror}: check sink.path"
        if level != "FAIL" and not isinstance(committed, _Unknown):
            # The sink's own start-up decisions (a file the state store has no length for...)
            try:
                await JsonlSink(s.path, rotation=s.rotation()).check(committed)
            except SinkUnusable as exc:
                level, detail = "FAIL", str(exc)
        add(level, "-", "sink", f"jsonl: {detail}")
    elif isinstance(s, PostgresSinkSettings):
        try:
            await _postgres_sink(s)
            add("PASS", "-", "sink", f"postgres: connected, table {s.table} ready or creatable")
        except (SinkError, StoreError, ConfigError) as exc:  # their messages say what to fix
            add("FAIL", "-", "sink", f"postgres: {exc}")
        except Exception as exc:  # the server's or the driver's own: bounded
            add("FAIL", "-", "sink", f"postgres: {describe(exc)}")
    elif isinstance(s, NatsSinkSettings | RedisSinkSettings):
        # Connect, authenticate, check the stream or key and the permissions: nothing sent.
        try:
            said = await bus_sink(settings, s).preflight()
        except (SinkError, ConfigError) as exc:  # their messages say it all
            add("FAIL", "-", "sink", f"{s.type}: {exc}")
        except Exception as exc:
            add("FAIL", "-", "sink", f"{s.type}: {describe(exc)}")
        else:
            add("WARN" if "; WARNING: " in said else "PASS", "-", "sink", f"{s.type}: {said}")
    else:  # webhook, python: nothing to try without delivering an event
        add("PASS", "-", "sink", f"{s.type}: configured")


async def _postgres_sink(s: PostgresSinkSettings) -> None:
    """The sink's own table set-up, rolled back."""
    from ..sinks.postgres import PostgresSink  # noqa: PLC0415  # asyncpg: an extra

    sink = PostgresSink(s)
    pool = await sink._create_pool(1, 1)  # its errors say what to fix
    try:
        async with pool.acquire(timeout=s.timeout_s) as conn, _rolled_back(conn) as once:
            await sink._prepare_table(once)
    finally:
        await sink._close_pool(pool)
