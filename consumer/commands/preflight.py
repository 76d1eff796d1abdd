"""``opera-consumer preflight``: the pre-go-live checklist, one line per item with its fix.

It authenticates and opens the WebSocket like the daemon, but never subscribes to events, so it
cannot take the stream from a running consumer (it sends only ``connection_init``, pings and the
``query { connection { status } }`` query).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
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
)
from ..core import protocol
from ..core.evidence import describe
from ..core.session import (
    ClientSession,
    ConnectionStatus,
    Outcome,
    PongReceived,
    Reply,
    SessionState,
)
from ..errors import AuthError, ConfigError, SinkError, StoreError
from ..logs import REDACTOR
from ..runtime.assembly import register_secrets
from ..runtime.auth import TokenProvider
from ..state import open_store

if TYPE_CHECKING:
    from ..sinks.nats import NatsSink
    from ..sinks.redis import RedisSink

HEADER_LIMIT = 8 * 1024  # the gateway's request header limit
SLOW_RTT_S = 0.5


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
        self._emit(Item(level, stream, what, REDACTOR.scrub(detail)))


async def run(settings: Settings, emit: Callable[[Item], None]) -> bool:
    """Run every check; returns True when none failed."""
    register_secrets(settings)
    checks = _Checks(emit)
    async with httpx.AsyncClient(timeout=15.0) as http:
        for name, stream in settings.streams.items():
            await _stream(checks, name, stream, http)
    await _local(checks, settings)
    return not checks.failed


async def _stream(checks: _Checks, name: str, s: StreamSettings, http: httpx.AsyncClient) -> None:
    add = checks.add
    tokens = TokenProvider(http, s)
    try:
        token = await tokens.token()
    except AuthError as exc:
        add("FAIL", name, "token", str(exc))
        return
    add("PASS", name, "token", f"obtained, valid for {token.lifetime_s:.0f} s")
    c = s.connection
    try:
        async with connect(
            protocol.subscription_url(s.gateway_url, s.app_key.get_secret_value()),
            subprotocols=[Subprotocol(protocol.SUBPROTOCOL)],
            open_timeout=c.open_timeout_s,
            ping_interval=None,
            proxy=c.proxy,
            compression=None,
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
        fix = "check app_key, gateway_url, approval, Streaming Enabled" if code == 400 else ""
        add("FAIL", name, "gateway", f"upgrade refused with HTTP {code}. {fix}".strip())
    except (OSError, TimeoutError, WebSocketException) as exc:
        add("FAIL", name, "gateway", f"unreachable: {type(exc).__name__}: {exc}; check gateway_url")
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
    session = ClientSession(max_frame_bytes=s.connection.max_frame_bytes)
    await ws.send(session.connection_init(token, s.app_key.get_secret_value()))
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
    else:
        add("PASS", name, "connection status", answer.status)


async def _answer(ws: ClientConnection, session: ClientSession) -> Outcome:
    """The next outcome, answering the server's pings on the way."""
    out = session.receive(await ws.recv(decode=False))
    if isinstance(out, Reply):
        await ws.send(out.text)
    return out


async def _local(checks: _Checks, settings: Settings) -> None:
    add = checks.add
    try:
        store = await open_store(settings.state)
        await store.close()
        st = settings.state
        where = (
            f"{st.path} writable"
            if st.backend == "sqlite"
            else "PostgreSQL reachable, schema ready"
        )
        add("PASS", "-", "state store", where)
    except StoreError as exc:
        add("FAIL", "-", "state store", str(exc))
    await _sink(checks, settings)
    m = settings.metrics
    if m.enabled:
        with socket.socket() as probe:
            try:
                probe.bind((m.address, m.port))
                add("PASS", "-", "metrics address", f"{m.address}:{m.port} free")
            except OSError:
                add(
                    "WARN",
                    "-",
                    "metrics address",
                    f"{m.address}:{m.port} in use (a running daemon?)",
                )


async def _sink(checks: _Checks, settings: Settings) -> None:
    """What can be checked without delivering anything."""
    add = checks.add
    s = settings.sink
    if isinstance(s, JsonlSinkSettings | SqliteSinkSettings):
        path = s.path or settings.state.path
        folder = path.resolve().parent
        if os.access(folder, os.W_OK):
            add("PASS", "-", "sink", f"{s.type}: {path} writable")
        else:
            add("FAIL", "-", "sink", f"{s.type}: cannot write in {folder}")
    elif isinstance(s, PostgresSinkSettings):
        from ..sinks.postgres import PostgresSink  # noqa: PLC0415  # asyncpg: an extra

        sink = PostgresSink(s)
        try:
            await sink.open(None)  # connects and creates the table if missing
            add("PASS", "-", "sink", f"postgres: connected, table {s.table} ready")
        except Exception as exc:
            add("FAIL", "-", "sink", f"postgres: {exc}")
        finally:
            await sink.close()
    elif isinstance(s, NatsSinkSettings | RedisSinkSettings):
        # Connect, authenticate, check the stream or key and the permissions: nothing sent.
        try:
            said = await _bus_sink(settings, s).preflight()
        except (SinkError, ConfigError) as exc:  # their messages say it all
            add("FAIL", "-", "sink", f"{s.type}: {exc}")
        except Exception as exc:
            add("FAIL", "-", "sink", f"{s.type}: {describe(exc)}")
        else:
            add("WARN" if "; WARNING: " in said else "PASS", "-", "sink", f"{s.type}: {said}")
    else:  # webhook, python: nothing to try without delivering an event
        add("PASS", "-", "sink", f"{s.type}: configured")


def _bus_sink(settings: Settings, s: NatsSinkSettings | RedisSinkSettings) -> NatsSink | RedisSink:
    chains = {name: stream.chain_code for name, stream in settings.streams.items()}
    if isinstance(s, NatsSinkSettings):
        from ..sinks.nats import NatsSink  # noqa: PLC0415  # only where configured

        return NatsSink(s, chains)
    from ..sinks.redis import RedisSink  # noqa: PLC0415  # only where configured

    return RedisSink(s, chains)
