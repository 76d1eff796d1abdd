"""The one port's HTTP: each connection's request head (parsed with h11) is routed to the token
endpoint (``POST /oauth/v1/tokens``), ``/healthz`` (``GET`` and ``HEAD``), a REST route, or
the ``/subscriptions`` upgrade, which this module answers (the hash of an accepted app key in
the URL, else 400; queued failures; with ``require_upgrade_authorization`` a valid bearer
token in its Authorization header, else 401) before handing the connection to a WebSocket
session. Anything else is 404, a request target that does not parse 400."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import h11
from websockets.http11 import Request
from websockets.server import ServerProtocol

from ..http11 import read_request, request_path, respond
from .faults import Chaos
from .options import SandboxStats
from .rest import RestResources, match_route
from .tokens import TokenEndpoint, bearer
from .websocket import SUBPROTOCOL, SessionContext, flush, run_session

HEAD_LIMIT = 64 * 1024


class Router:
    def __init__(
        self,
        *,
        stats: SandboxStats,
        key_hashes: frozenset[str],
        clock: Callable[[], float],
        tokens: TokenEndpoint,
        rest: RestResources,
        chaos: Chaos,
        sessions: SessionContext,
    ) -> None:
        self._stats = stats
        self._key_hashes = key_hashes  # of every accepted application key
        self._clock = clock
        self._tokens = tokens
        self._rest = rest
        self._chaos = chaos
        self._sessions = sessions
        self.writers: set[asyncio.StreamWriter] = set()  # open connections

    async def listen(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self.handle, host, port, limit=HEAD_LIMIT)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
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
                await self._tokens.handle(conn, request, reader, writer)
            elif request.method == b"GET" and path == "/healthz":
                respond(conn, writer, 200, b"ok\n", content_type="text/plain")
            elif request.method == b"GET" and path == "/subscriptions":
                self._stats.connections += 1
                await self._upgrade(head, target, reader, writer)
            elif request.method == b"GET" and (route := match_route(path)) is not None:
                self._rest.handle(conn, request, writer, route)
            else:
                respond(conn, writer, 404, b"not found\n", content_type="text/plain")
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, h11.RemoteProtocolError):
            pass
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _upgrade(
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
        self._stats.upgrades.append(self._clock())
        token = bearer(events[0].headers.get("Authorization", ""))
        if key not in self._key_hashes:
            response = proto.reject(400, "Incorrect key or URL\n")
        elif (status := self._chaos.upgrade_failure()) is not None:
            response = proto.reject(status, "injected failure\n")
        else:
            self._stats.upgrade_tokens.append(token)
            required = self._sessions.options.require_upgrade_authorization
            if required and (not token or self._tokens.expiry(token) is None):
                response = proto.reject(401, "Unauthorized\n")
            else:
                response = proto.accept(events[0])
        proto.send_response(response)
        flush(proto, writer)
        if response.status_code != 101:
            return
        await run_session(self._sessions, proto, reader, writer)
