"""The sandbox gateway: a local OHIP Streaming emulator on loopback.

One port serves ``POST /oauth/v1/tokens`` (HTTP parsed with h11), ``GET /healthz``, three REST
resources built from the event log (see :meth:`SandboxGateway._rest`) and the ``/subscriptions``
WebSocket, which runs on websockets' sans-I/O :class:`ServerProtocol` so the sandbox controls
every byte (dropping a TCP connection without a close frame, for instance) and streams
pre-encoded frames with TCP backpressure.

Rules it enforces, as OHIP does: the hashed application key in the URL (else HTTP 400), the
``graphql-transport-ws`` subprotocol (else 4406), ``connection_init`` with a valid token and the
raw key (else 4401), one active subscription per chain (else 4409), schema patterns of the
``newEvent`` input (else 4400), known chains (else 4403), token expiry (4401). On REST: a valid
token and the raw key (else 401), ``x-hotelid`` on hotel routes (else 400), a rate limit (429).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import random
import re
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from ..http11 import read_request, request_path, respond
from .eventlog import ChainLog, Resource

SUBPROTOCOL = Subprotocol("graphql-transport-ws")
_HEAD_LIMIT = 64 * 1024

_ARG = re.compile(r'\s*(\w+)\s*:\s*("(?:[^"\\]|\\.)*"|true|false|[0-9]+)\s*,?')
_CONNECTION_QUERY = re.compile(r"^\s*(query\b[^{]*)?\{\s*connection\s*\{")
_INPUT = re.compile(r"newEvent\s*\(\s*input\s*:\s*\{(?P<args>[^{}]*)\}\s*\)")
_RULES: dict[str, tuple[str, int]] = {
    "chainCode": (r"^[A-Za-z0-9 _%#$&-]+$", 20),
    "offset": (r"^[0-9]+$", 20),
    "offsetType": (r"^(highest)$", 8),
    "hotelCode": (r"^[A-Za-z0-9 _%#$&,-]+$", 50),
}
# REST resources: path (hotel-scoped routes capture the hotel), event module, id field name.
_REST_ROUTES: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (
        re.compile(r"/rsv/v1/hotels/(?P<hotel>[^/]+)/reservations/(?P<id>[^/]+)"),
        "Reservation",
        "reservationId",
    ),
    (re.compile(r"/crm/v1/profiles/(?P<id>[^/]+)"), "Profile", "profileId"),
    (
        re.compile(r"/csh/v1/hotels/(?P<hotel>[^/]+)/transactions/(?P<id>[^/]+)"),
        "Financial",
        "transactionId",
    ),
)


@dataclass(frozen=True, kw_only=True)
class SandboxOptions:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    app_key: str = "sandbox-app-key"
    client_id: str = "sandbox-client"
    client_secret: str = "sandbox-secret"
    username: str = "sandbox-user"
    password: str = "sandbox-password"
    chains: tuple[str, ...] = ("DEMO",)
    backlog: int = 1000  # events generated per chain at start
    rate: float = 0.0  # new events per second per chain
    seed: int = 1
    token_ttl_s: float = 3600.0
    ping_interval_s: float = 15.0  # server pings; 0 disables
    init_timeout_s: float = 10.0  # connection_init deadline (4408)
    stale_hold_s: float = 0.0  # 4409 for this long after a subscriber drops without complete
    complete_close_delay_s: float = 0.0  # after a client's complete, wait before closing
    defer_pongs: bool = False  # as OHIP in burst mode: no pong until the backlog is sent
    # Chaos (deterministic for a given chaos_seed); 0 / False disables each.
    chaos_seed: int = 0
    drop_every: int = 0  # drop the TCP connection (no close frame) after about N events
    close_every: int = 0  # close with one of close_codes after about N events
    close_codes: tuple[int, ...] = (1001, 1000, 4500, 4504)
    malformed_every: int = 0  # a malformed frame in the log after every N events
    oversized_bytes: int = 0  # > 0: every 6th malformed frame is a `next` frame this large
    redeliver: int = 0  # a resume from an offset starts this many entries earlier
    ignore_pings: bool = False
    ack_delay_s: float = 0.0
    send_batch: int = 256
    rest_rate: float = 0.0  # REST requests per second, all routes together; 0: unlimited
    rest_burst: int = 5  # token-bucket size for rest_rate


@dataclass
class SandboxStats:
    token_requests: int = 0
    connections: int = 0
    events_sent: int = 0
    pings_received: int = 0
    pongs_received: int = 0
    pongs_sent: int = 0
    max_deferred_pongs: int = 0
    completes_received: int = 0
    subscribes: list[dict[str, Any]] = field(default_factory=list)  # parsed inputs, in order
    close_codes_sent: list[int] = field(default_factory=list)
    chaos_drops: int = 0
    upgrades: list[float] = field(default_factory=list)  # monotonic times of upgrade requests
    active_subscriptions: dict[str, int] = field(default_factory=dict)
    rest_requests: int = 0  # every REST GET, throttled and failed ones included
    rest_throttled: int = 0  # 429s of the rate limit (not injected ones)
    rest_paths: dict[str, int] = field(default_factory=dict)  # 200 responses per request path


class _Close(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason.encode()[:123].decode(errors="ignore")


class SandboxGateway:
    def __init__(self, options: SandboxOptions | None = None) -> None:
        self.options = options or SandboxOptions()
        self._logs = {c: ChainLog(c, self.options.seed) for c in self.options.chains}
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self.issued_tokens: list[str] = []
        self.token_requests: list[tuple[dict[str, str], dict[str, str]]] = []  # headers, form
        self._token_failures: list[tuple[int, float | None]] = []
        self._rest_failures: list[tuple[int, float | None]] = []
        self._bucket = float(max(1, self.options.rest_burst))  # starts full
        self._bucket_at = time.monotonic()
        self._upgrade_failures: list[int] = []
        self._close_on: dict[str, list[int]] = {}
        self._active: dict[str, _WsSession] = {}
        self._stale_until: dict[str, float] = {}
        self._delivered: dict[str, int] = {}
        self._sessions: set[_WsSession] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._closed = False
        self.stats = SandboxStats()
        self._chaos = random.Random(self.options.chaos_seed)
        self.malformed: dict[str, list[str]] = {c: [] for c in self.options.chains}
        self.key_hash = hashlib.sha256(self.options.app_key.encode()).hexdigest()

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        for chain in self._logs:
            self._grow(chain, self.options.backlog)
        self._server = await asyncio.start_server(
            self._handle, self.options.host, self.options.port, limit=_HEAD_LIMIT
        )
        if self.options.rate > 0:
            self._spawn(self._live())

    async def __aenter__(self) -> SandboxGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def serve_forever(self) -> None:
        assert self._server is not None, "start() first"
        await self._server.serve_forever()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.options.host}:{self.port}"

    # --- test and demo hooks ----------------------------------------------------------------

    def events(self, chain: str) -> list[dict[str, Any]]:
        """Ground truth: every valid event of the chain, in log order."""
        return self._logs[chain].events()

    def append(self, chain: str, n: int) -> list[dict[str, Any]]:
        return self._grow(chain, n)

    def _grow(self, chain: str, n: int) -> list[dict[str, Any]]:
        """Generate ``n`` events, with a malformed frame every ``malformed_every`` if asked."""
        log, every = self._logs[chain], self.options.malformed_every
        if not every:
            return log.generate(n)
        made: list[dict[str, Any]] = []
        while len(made) < n:
            made += log.generate(min(n - len(made), every - log.count % every))
            if log.count % every == 0:
                raw = _malformed_frame(
                    len(self.malformed[chain]), self._chaos, self.options.oversized_bytes
                )
                self.malformed[chain].append(raw)
                log.append_malformed(raw)
        return made

    def inject_malformed(self, chain: str, raw_text: str) -> None:
        """Append a frame sent verbatim (not wrapped in ``next``) at this point of the log."""
        self._logs[chain].append_malformed(raw_text)

    def inject_event(self, chain: str, new_event_json: str) -> None:
        """Append a ``newEvent`` given as JSON text, sent in a ``next`` frame of the session's
        subscription like any event: for absurd events (bad offsets, deep nesting) that the
        generator never makes. Not part of :meth:`events` (the ground truth of valid ones)."""
        self._logs[chain].append_raw_event(new_event_json)

    async def disconnect_all(self, code: int | None = None, reason: str = "") -> None:
        """Close every WebSocket with ``code``, or drop its TCP connection (``None``)."""
        for session in list(self._sessions):
            if code is None:
                session.writer.transport.abort()
            else:
                session.close(code, reason)
        await asyncio.sleep(0)

    def silence_connections(self) -> None:
        """Current connections go quiet, TCP still open: no events, no pongs (a half-open
        link as the client sees it). New connections are served normally."""
        for session in self._sessions:
            session.silent = True
            if session._sender is not None:
                session._sender.cancel()

    def fail_upgrades(self, statuses: list[int]) -> None:
        """The next upgrades are refused with these HTTP statuses (400, 429, 503...)."""
        self._upgrade_failures.extend(statuses)

    def close_on(self, message: str, codes: list[int]) -> None:
        """Close the next ``connection_init`` or ``subscribe`` messages with these codes."""
        self._close_on.setdefault(message, []).extend(codes)

    def fail_token_requests(self, statuses: list[int], retry_after: float | None = None) -> None:
        self._token_failures.extend((s, retry_after) for s in statuses)

    def fail_rest(self, statuses: list[int], retry_after: float | None = None) -> None:
        """The next REST requests answer these statuses, before auth and the rate limit."""
        self._rest_failures.extend((s, retry_after) for s in statuses)

    async def _live(self) -> None:
        period = 1.0 / self.options.rate
        while True:
            await asyncio.sleep(period)
            for chain in self._logs:
                self._grow(chain, 1)

    # --- HTTP -------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            parsed = await read_request(reader)
            if parsed is None:
                return
            head, conn, request = parsed
            target = request.target.decode("ascii", "replace")
            path = request_path(request.target)
            if path is None:
                respond(conn, writer, 400, b"bad request target\n", content_type="text/plain")
            elif request.method == b"HEAD":
                status = 200 if path == "/healthz" else 404
                respond(conn, writer, status, b"", content_type="text/plain", head=True)
            elif request.method == b"POST" and path == "/oauth/v1/tokens":
                await self._token_endpoint(conn, request, reader, writer)
            elif request.method == b"GET" and path == "/healthz":
                respond(conn, writer, 200, b"ok\n", content_type="text/plain")
            elif request.method == b"GET" and path == "/subscriptions":
                self.stats.connections += 1
                await self._websocket(head, target, reader, writer)
            elif request.method == b"GET" and (route := _rest_route(path)) is not None:
                self._rest(conn, request, writer, route)
            else:
                respond(conn, writer, 404, b"not found\n", content_type="text/plain")
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, h11.RemoteProtocolError):
            pass
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _token_endpoint(
        self,
        conn: h11.Connection,
        request: h11.Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.stats.token_requests += 1
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if _injected(self._token_failures, conn, writer):
            return
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        self.token_requests.append((headers, form))
        o = self.options
        grant = form.get("grant_type")
        if grant not in ("client_credentials", "password"):
            respond(
                conn,
                writer,
                400,
                _problem(400, "grant_type must be password or client_credentials"),
            )
            return
        if (
            _basic(headers.get("authorization")) != (o.client_id, o.client_secret)
            or headers.get("x-app-key") != o.app_key
            or (grant == "client_credentials" and not form.get("scope"))
            or (
                grant == "password"
                and (form.get("username"), form.get("password")) != (o.username, o.password)
            )
        ):
            respond(conn, writer, 401, _problem(401, "invalid client, app key, user or scope"))
            return
        token = secrets.token_urlsafe(32)
        self._tokens[token] = time.monotonic() + o.token_ttl_s
        self.issued_tokens.append(token)
        payload = {
            "access_token": token,
            "expires_in": int(o.token_ttl_s) if o.token_ttl_s >= 1 else o.token_ttl_s,
            "token_type": "Bearer",
            "oracle_tk_context": "user_assertion",
        }
        respond(conn, writer, 200, json.dumps(payload).encode())

    def _rest(
        self,
        conn: h11.Connection,
        request: h11.Request,
        writer: asyncio.StreamWriter,
        route: tuple[re.Match[str], str, str],
    ) -> None:
        """GET one resource as of the latest event of its primaryKey, in any chain.

        Body: ``{<id_name>: primaryKey, "hotelId", "chainCode", "version": events of the key so
        far, "lastEventName", "lastOffset", "fields": {elementName: latest newValue}}`` with
        ``id_name`` ``reservationId``, ``profileId`` or ``transactionId``. Checked in order:
        injected failures, the rate limit (429), token and app key (401), ``x-hotelid`` (400),
        existence at the path's hotel (404).
        """
        match, module, id_name = route
        self.stats.rest_requests += 1
        if _injected(self._rest_failures, conn, writer):
            return
        wait = self._rest_admit()
        if wait is not None:
            self.stats.rest_throttled += 1
            body = _problem(429, f"rate limit of {self.options.rest_rate:g} requests/s exceeded")
            respond(conn, writer, 429, body, extra={"Retry-After": str(wait)})
            return
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
        auth = headers.get("authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else ""
        if self._token_expiry(token) is None or headers.get("x-app-key") != self.options.app_key:
            body = _problem(401, "Unauthorised - Invalid credentials")
            respond(conn, writer, 401, body, extra={"WWW-Authenticate": "Bearer"})
            return
        scoped = match.groupdict().get("hotel")
        hotel = unquote(scoped) if scoped is not None else None
        if hotel is not None and headers.get("x-hotelid") != hotel:
            respond(conn, writer, 400, _problem(400, "x-hotelid must match the hotel in the path"))
            return
        key = unquote(match["id"])
        found = self._find(module, key, hotel)
        if found is None:
            where = f" at hotel {hotel}" if hotel is not None else ""
            respond(conn, writer, 404, _problem(404, f"{module} {key} not found{where}"))
            return
        chain, res = found
        payload = {
            id_name: res.key,
            "hotelId": res.hotel,
            "chainCode": chain,
            "version": res.version,
            "lastEventName": res.last_event,
            "lastOffset": res.last_offset,
            "fields": res.values,
        }
        respond(conn, writer, 200, json.dumps(payload).encode())
        path = match.string
        self.stats.rest_paths[path] = self.stats.rest_paths.get(path, 0) + 1

    def _rest_admit(self) -> int | None:
        """Take a token from the REST bucket: None if admitted, else whole seconds to wait."""
        rate = self.options.rest_rate
        if rate <= 0:
            return None
        now = time.monotonic()
        size = max(1, self.options.rest_burst)  # a burst below 1 could never admit anything
        self._bucket = min(size, self._bucket + (now - self._bucket_at) * rate)
        self._bucket_at = now
        if self._bucket >= 1:
            self._bucket -= 1
            return None
        return max(1, math.ceil((1 - self._bucket) / rate))

    def _find(self, module: str, key: str, hotel: str | None) -> tuple[str, Resource] | None:
        """The first chain's resource with this key and module (and hotel, when scoped):
        chains number their keys independently, so two chains may share one."""
        for chain, log in self._logs.items():
            res = log.resource(key)
            if res is not None and res.module == module and hotel in (None, res.hotel):
                return chain, res
        return None

    # --- WebSocket --------------------------------------------------------------------------

    async def _websocket(
        self, head: bytes, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        proto = ServerProtocol(
            subprotocols=[SUBPROTOCOL],
            select_subprotocol=lambda _p, offered: SUBPROTOCOL if SUBPROTOCOL in offered else None,
            max_size=1 << 20,
        )
        proto.receive_data(head)
        events = proto.events_received()
        if not events or not isinstance(events[0], Request):
            return
        key = parse_qs(urlsplit(target).query).get("key", [""])[0]
        self.stats.upgrades.append(time.monotonic())
        if key != self.key_hash:
            response = proto.reject(400, "Incorrect key or URL\n")
        elif self._upgrade_failures:
            status = self._upgrade_failures.pop(0)
            response = proto.reject(status, "injected failure\n")
        else:
            response = proto.accept(events[0])
        proto.send_response(response)
        _flush(proto, writer)
        if response.status_code != 101:
            return
        session = _WsSession(self, proto, reader, writer)
        self._sessions.add(session)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            session.ended()

    # --- subscription registry (used by sessions) ---------------------------------------------

    def _token_expiry(self, token: str) -> float | None:
        expiry = self._tokens.get(token)
        return expiry if expiry is not None and expiry > time.monotonic() else None


class _WsSession:
    def __init__(
        self,
        gw: SandboxGateway,
        proto: ServerProtocol,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.gw = gw
        self.proto = proto
        self.reader = reader
        self.writer = writer
        self.acked = False
        self.sub_id: str | None = None
        self.chain: str | None = None
        self.completed = False
        self.silent = False
        self._init_seen = False
        self._bursting = False
        self._deferred_pongs = 0
        self._sender: asyncio.Task[None] | None = None
        self._helpers: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        o = self.gw.options
        if self.proto.subprotocol != SUBPROTOCOL:
            self.close(4406, "Subprotocol not acceptable")
        else:
            self._helpers.append(asyncio.create_task(self._init_deadline(o.init_timeout_s)))
        try:
            while self.proto.state is not State.CLOSED:
                data = await self.reader.read(65536)
                if data:
                    self.proto.receive_data(data)
                else:
                    self.proto.receive_eof()
                for frame in self.proto.events_received():
                    if self.silent:
                        continue
                    if isinstance(frame, Frame) and frame.opcode is Opcode.TEXT:
                        self._on_text(bytes(frame.data))
                _flush(self.proto, self.writer)
                if not data:
                    break
        finally:
            for t in [*self._helpers, *([self._sender] if self._sender else [])]:
                t.cancel()
            await asyncio.gather(*self._helpers, return_exceptions=True)
            if self._sender is not None:
                await asyncio.gather(self._sender, return_exceptions=True)

    def ended(self) -> None:
        gw = self.gw
        if self.chain is not None and gw._active.get(self.chain) is self:
            del gw._active[self.chain]
            gw.stats.active_subscriptions[self.chain] -= 1
            if not self.completed and gw.options.stale_hold_s > 0:
                gw._stale_until[self.chain] = time.monotonic() + gw.options.stale_hold_s

    def close(self, code: int, reason: str) -> None:
        if self.proto.state is not State.OPEN:
            return
        self.gw.stats.close_codes_sent.append(code)
        self.proto.send_close(code, reason.encode()[:123].decode(errors="ignore"))
        _flush(self.proto, self.writer)
        if self._sender is not None:
            self._sender.cancel()

    def send(self, text: str) -> None:
        if self.proto.state is State.OPEN and not self.silent:
            self.proto.send_text(text.encode())
            _flush(self.proto, self.writer)

    def _pong(self) -> None:
        self.gw.stats.pongs_sent += 1
        self.send('{"type":"pong"}')

    def _on_text(self, data: bytes) -> None:
        try:
            msg = json.loads(data)
            if not isinstance(msg, dict):
                raise _Close(4400, "Message must be a JSON object")
            self._dispatch(msg)
        except _Close as exc:
            self.close(exc.code, exc.reason)
        except ValueError:
            self.close(4400, "Invalid message received")

    def _dispatch(self, msg: dict[str, Any]) -> None:
        gw = self.gw
        kind = msg.get("type")
        injected = gw._close_on.get(str(kind))
        if injected:
            raise _Close(injected.pop(0), "injected")
        if kind == "ping":
            gw.stats.pings_received += 1
            if gw.options.ignore_pings:
                pass
            elif self._bursting and gw.options.defer_pongs:
                self._deferred_pongs += 1
                gw.stats.max_deferred_pongs = max(gw.stats.max_deferred_pongs, self._deferred_pongs)
            else:
                self._pong()
        elif kind == "pong":
            gw.stats.pongs_received += 1
        elif kind == "connection_init":
            self._init(msg.get("payload"))
        elif kind == "subscribe":
            self._subscribe(msg)
        elif kind == "complete":
            if msg.get("id") == self.sub_id and self.sub_id is not None:
                gw.stats.completes_received += 1
                self.completed = True
                if self._sender is not None:
                    self._sender.cancel()
                self._helpers.append(asyncio.create_task(self._close_later()))
        else:
            raise _Close(4400, f"Invalid message type {kind!r}")

    def _init(self, payload: object) -> None:
        if self.acked or self._init_seen:
            raise _Close(4429, "Too many initialisation requests")
        self._init_seen = True
        p = payload if isinstance(payload, dict) else {}
        auth = str(p.get("Authorization", ""))
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else ""
        expiry = self.gw._token_expiry(token)
        if expiry is None or p.get("x-app-key") != self.gw.options.app_key:
            raise _Close(4401, "Unauthorised - Invalid credentials")
        self._helpers.append(asyncio.create_task(self._ack(self.gw.options.ack_delay_s)))
        self._helpers.append(asyncio.create_task(self._expire(expiry)))
        if self.gw.options.ping_interval_s > 0:
            self._helpers.append(asyncio.create_task(self._pinger()))

    def _subscribe(self, msg: dict[str, Any]) -> None:
        gw = self.gw
        if not self.acked:
            raise _Close(4401, "Unauthorized")
        sub_id = msg.get("id")
        payload = msg.get("payload")
        query = payload.get("query") if isinstance(payload, dict) else None
        if not isinstance(sub_id, str) or not sub_id or not isinstance(query, str):
            raise _Close(4400, "Invalid subscribe message")
        if _CONNECTION_QUERY.search(query):
            # Query.connection: is a consumer subscribed (Active)? One next, then complete.
            status = "Active" if any(gw._active.values()) else "Inactive"
            data = {"data": {"connection": {"id": str(id(self)), "status": status}}}
            self.send(json.dumps({"id": sub_id, "type": "next", "payload": data}))
            self.send(json.dumps({"id": sub_id, "type": "complete"}))
            return
        if self.sub_id is not None:
            raise _Close(4409, f"Subscriber for {sub_id} already exists")
        args = _parse_input(query)
        gw.stats.subscribes.append(args)
        chain = args.get("chainCode")
        if not isinstance(chain, str):
            raise _Close(4400, "Value for chainCode is required")
        log = gw._logs.get(chain)
        if log is None:
            raise _Close(4403, "Forbidden")
        holder = gw._active.get(chain)
        stale = gw._stale_until.get(chain, 0.0) > time.monotonic()
        if (holder is not None and holder is not self) or stale:
            raise _Close(4409, "Subscriber already exists")
        self.sub_id, self.chain = sub_id, chain
        gw._active[chain] = self
        gw.stats.active_subscriptions[chain] = gw.stats.active_subscriptions.get(chain, 0) + 1
        highest = args.get("offsetType") == "highest"
        offset = args.get("offset")
        if offset is None and not highest:
            start = gw._delivered.get(chain, 0)
        else:
            start = log.start_index(offset if isinstance(offset, str) else None, highest=highest)
            if offset is not None:
                start = max(0, start - gw.options.redeliver)  # duplicates to deduplicate
        hotels = args.get("hotelCode")
        hotel_set = frozenset(str(hotels).split(",")) if hotels else None
        self._sender = asyncio.create_task(
            self._stream(log, start, delta=args.get("delta") is True, hotels=hotel_set)
        )

    async def _stream(
        self, log: ChainLog, index: int, *, delta: bool, hotels: frozenset[str] | None
    ) -> None:
        gw = self.gw
        assert self.sub_id is not None and self.chain is not None
        prefix = '{"id":' + json.dumps(self.sub_id) + ',"type":"next","payload":'
        o = gw.options
        batch = o.send_batch
        proto, writer = self.proto, self.writer
        drop_at, close_at = self._fault_point(o.drop_every), self._fault_point(o.close_every)
        total = 0
        while proto.state is State.OPEN:
            entries = log.entries
            self._bursting = index < len(entries)
            if not self._bursting:
                for _ in range(self._deferred_pongs):
                    self._pong()
                self._deferred_pongs = 0
                changed = log.changed()
                if index >= len(log.entries):
                    await changed.wait()
                continue
            room = min(drop_at, close_at) - total  # stop exactly at a fault point
            end = min(len(entries), index + batch, index + max(1, int(min(room, batch))))
            sent = 0
            for entry in entries[index:end]:
                if entry.offset is None:
                    text = entry.payload
                elif hotels is not None and entry.hotel not in hotels:
                    continue
                else:
                    text = prefix + (entry.delta_payload() if delta else entry.payload) + "}"
                proto.send_text(text.encode())
                sent += 1
            index = end
            gw._delivered[self.chain] = index
            gw.stats.events_sent += sent
            total += sent
            _flush(proto, writer)
            await writer.drain()
            if total >= drop_at:
                gw.stats.chaos_drops += 1
                writer.transport.abort()
                return
            if total >= close_at:
                self.close(gw._chaos.choice(o.close_codes), "chaos")
                return

    def _fault_point(self, every: int) -> float:
        """About ``every`` events from now (seeded jitter), or never."""
        return self.gw._chaos.randint(max(1, every // 2), every * 3 // 2) if every else math.inf

    async def _ack(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        self.acked = True
        self.send('{"type":"connection_ack","payload":{"applicationName":"sandbox"}}')

    async def _close_later(self) -> None:
        await asyncio.sleep(self.gw.options.complete_close_delay_s)
        self.close(1000, "Normal Closure")

    async def _init_deadline(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if not self.acked:
            self.close(4408, "Connection initialisation timeout")

    async def _expire(self, expiry: float) -> None:
        await asyncio.sleep(max(0.0, expiry - time.monotonic()))
        self.close(4401, "Token expired")

    async def _pinger(self) -> None:
        while True:
            await asyncio.sleep(self.gw.options.ping_interval_s)
            self.send('{"type":"ping"}')


def _parse_input(query: str) -> dict[str, Any]:
    """The inline ``newEvent(input: {...})`` arguments, validated like the schema's scalars."""
    m = _INPUT.search(query)
    if m is None:
        raise _Close(4400, "Invalid GraphQL Subscription: newEvent(input: {...}) expected")
    text = m.group("args")
    args: dict[str, Any] = {}
    pos = 0
    while pos < len(text.rstrip()):
        a = _ARG.match(text, pos)
        if a is None:
            raise _Close(4400, "Invalid GraphQL Subscription: cannot parse input")
        name, raw = a.group(1), a.group(2)
        pos = a.end()
        if name == "delta":
            if raw not in ("true", "false"):
                raise _Close(4400, "Value for delta is invalid - Expected a Boolean")
            args[name] = raw == "true"
            continue
        if name not in _RULES:
            raise _Close(4400, f"Field {name} is not defined by type NewEventInput")
        value = json.loads(raw) if raw.startswith('"') else raw
        pattern, max_len = _RULES[name]
        if not isinstance(value, str) or len(value) > max_len or not re.match(pattern, value):
            raise _Close(
                4400,
                f"Value for {name} is invalid - Expected {raw[:20]} to match pattern {pattern}",
            )
        args[name] = value
    return args


def _malformed_frame(n: int, rng: random.Random, oversized: int = 0) -> str:
    """The n-th malformed frame: each kind a consumer must survive, each text unique."""
    if oversized and n % 6 == 5:
        padding = "x" * oversized
        return (
            '{"id":"x","type":"next","payload":{"data":{"newEvent":{"metadata":{"offset":"1",'
            f'"uniqueEventId":"big-{n}"}},"detail":[{{"elementName":"Notes","newValue":"{padding}"'
            "}]}}}}"
        )
    kinds = (
        '{"id":"x","type":"next","payload":{"data":{"newEvent":{"metadata":{"offset":"',  # cut
        '{"id":"x","type":"next","payload":{"data":{"newEvent":{"eventName":"NO METADATA %d"}}}}',
        '{"id":"x","type":"next","payload":{"data":{"newEvent":{"metadata":'
        '{"offset":%d,"uniqueEventId":null}}}}}',  # wrong types
        '[%d, "not an object"]',
        '{"type":"surprise","n":%d}',
    )
    kind = kinds[n % len(kinds)]
    return (kind % n if "%d" in kind else kind + str(n)) + " " * rng.randrange(3)


def _flush(proto: ServerProtocol, writer: asyncio.StreamWriter) -> None:
    for chunk in proto.data_to_send():
        if chunk:
            writer.write(chunk)
        elif writer.can_write_eof():
            writer.write_eof()


def _rest_route(path: str) -> tuple[re.Match[str], str, str] | None:
    for pattern, module, id_name in _REST_ROUTES:
        if (m := pattern.fullmatch(path)) is not None:
            return m, module, id_name
    return None


def _injected(
    failures: list[tuple[int, float | None]], conn: h11.Connection, writer: asyncio.StreamWriter
) -> bool:
    """Answer with the next injected failure, if one is queued."""
    if not failures:
        return False
    status, retry_after = failures.pop(0)
    extra = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
    respond(conn, writer, status, _problem(status, "injected failure"), extra=extra)
    return True


def _problem(status: int, detail: str) -> bytes:
    return json.dumps({"title": h11_reason(status), "status": status, "detail": detail}).encode()


def h11_reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.startswith("Basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password


async def run_sandbox(options: SandboxOptions, *, announce: Callable[[str], None] = print) -> None:
    """Serve until SIGINT/SIGTERM (the ``opera-consumer sandbox`` command)."""
    gw = SandboxGateway(options)
    await gw.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    o = options
    rest = f"{o.rest_rate:g} requests/s, burst {o.rest_burst}" if o.rest_rate > 0 else "no limit"
    announce(
        f"sandbox gateway listening on {gw.url}\n"
        f'  gateway_url   = "{gw.url}"\n'
        f'  app_key       = "{o.app_key}"\n'
        f'  client_id     = "{o.client_id}"  client_secret = "{o.client_secret}"\n'
        f"  chains        = {', '.join(o.chains)}  ({o.backlog} events waiting each, "
        f"{o.rate:g} new/s)\n"
        f"  REST          = /rsv/v1, /crm/v1, /csh/v1  ({rest})\n"
        "Ctrl-C to stop."
    )
    try:
        await stop.wait()
    finally:
        await gw.close()
