"""The ``/subscriptions`` WebSocket after its upgrade: a :class:`WsSession` per connection on
websockets' sans-I/O :class:`ServerProtocol`, so the sandbox controls every byte.

A session enforces ``graphql-transport-ws`` (4406), ``connection_init`` within the deadline
(4408) with a valid token and an accepted raw app key (4401, again when the token expires), one
``connection_init`` (4429), valid ``subscribe`` messages (4400, 4403), with
``subscribe_deadline_s`` a ``subscribe`` within that long of ``connection_init`` (4408), and one
subscriber per chain (4409, see :class:`Subscriptions`; with ``resubscribe_gap_s``, none too
soon after a completed one either); it streams the chain's log in pre-encoded batches
with TCP backpressure, pings and answers pings, and closes after a client's ``complete``. With
``client_timeout_s``, a session from which no frame arrived for that long is dropped (TCP
aborted, no close handshake: the client may be frozen).

With ``fast_backlog`` (a templated log, see :mod:`.templated`), the backlog goes out as
pre-encoded chunks of frames (one ``bytes.replace`` of the subscription id and one write per
chunk), and later events as frames encoded here in one piece per batch: no per-frame work in
websockets' protocol. A ``delta`` or ``hotelCode`` subscription takes the ordinary path.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from .eventlog import ChainLog
from .faults import Chaos, PongPolicy
from .graphql import Close, is_connection_query, parse_input
from .options import SandboxOptions, SandboxStats
from .subscriptions import Subscriptions
from .templated import text_frames
from .tokens import bearer

SUBPROTOCOL = Subprotocol("graphql-transport-ws")


def flush(proto: ServerProtocol, writer: asyncio.StreamWriter) -> None:
    """Write what the protocol has to send (an empty chunk: half-close the connection)."""
    for chunk in proto.data_to_send():
        if chunk:
            writer.write(chunk)
        elif writer.can_write_eof():
            writer.write_eof()


@dataclass(frozen=True)
class SessionContext:
    """What the gateway hands its sessions."""

    options: SandboxOptions
    stats: SandboxStats
    logs: Mapping[str, ChainLog]
    token_expiry: Callable[[str], float | None]
    subscriptions: Subscriptions[WsSession]
    chaos: Chaos
    clock: Callable[[], float]


async def run_session(
    ctx: SessionContext,
    proto: ServerProtocol,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Run a session on an accepted upgrade until its connection ends."""
    session = WsSession(ctx, proto, reader, writer)
    ctx.subscriptions.sessions.add(session)
    try:
        await session.run()
    finally:
        ctx.subscriptions.sessions.discard(session)
        session.ended()


class WsSession:
    def __init__(
        self,
        ctx: SessionContext,
        proto: ServerProtocol,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._ctx = ctx
        self._proto = proto
        self._reader = reader
        self._writer = writer
        self._acked = False
        self._sub_id: str | None = None
        self.app_key: str | None = None  # the key of its accepted connection_init
        self._chain: str | None = None
        self._completed = False
        self._silent = False
        self._init_seen = False
        self._init_at = 0.0  # when the accepted connection_init arrived
        self._pinged = False  # a ping came on this session
        self._bursting = False
        self._pongs = PongPolicy(ctx.options, ctx.stats)
        self._sender: asyncio.Task[None] | None = None
        self._helpers: list[asyncio.Task[None]] = []
        self._last_frame = ctx.clock()  # when the last frame arrived (or the session began)

    async def run(self) -> None:
        o = self._ctx.options
        if self._proto.subprotocol != SUBPROTOCOL:
            self.close(4406, "Subprotocol not acceptable")
        else:
            self._helpers.append(asyncio.create_task(self._init_deadline(o.init_timeout_s)))
        if o.client_timeout_s > 0:
            self._helpers.append(asyncio.create_task(self._client_deadline(o.client_timeout_s)))
        try:
            while self._proto.state is not State.CLOSED:
                data = await self._reader.read(65536)
                if data:
                    self._proto.receive_data(data)
                else:
                    self._proto.receive_eof()
                frames = self._proto.events_received()
                if frames:
                    self._last_frame = self._ctx.clock()
                for frame in frames:
                    if self._silent:
                        continue
                    if isinstance(frame, Frame) and frame.opcode is Opcode.TEXT:
                        self._on_text(bytes(frame.data))
                flush(self._proto, self._writer)
                if not data:
                    break
        finally:
            for t in [*self._helpers, *([self._sender] if self._sender else [])]:
                t.cancel()
            await asyncio.gather(*self._helpers, return_exceptions=True)
            if self._sender is not None:
                await asyncio.gather(self._sender, return_exceptions=True)

    def ended(self) -> None:
        """Release the subscription: as a drop (the stale hold applies) unless the client sent
        ``complete``, whoever ended the connection (a client timeout included)."""
        if self._chain is not None:
            self._ctx.subscriptions.release(self._chain, self, completed=self._completed)

    def close(self, code: int, reason: str) -> None:
        if self._proto.state is not State.OPEN:
            return
        self._ctx.stats.close_codes_sent.append(code)
        self._proto.send_close(code, reason.encode()[:123].decode(errors="ignore"))
        flush(self._proto, self._writer)
        if self._sender is not None:
            self._sender.cancel()

    def complete_subscription(self) -> None:
        """The server ends the subscription: ``complete`` for it, then the close (after
        ``complete_close_delay_s``); the chain's resubscribe gap applies as after a client's
        ``complete``."""
        if self._sub_id is None or self._completed or self._proto.state is not State.OPEN:
            return
        self._completed = True
        if self._sender is not None:
            self._sender.cancel()
        self.send(json.dumps({"id": self._sub_id, "type": "complete"}))
        self._helpers.append(asyncio.create_task(self._close_later()))

    def unsent_bytes(self) -> int:
        """What the transport holds, not yet taken by the kernel (whose buffers are full)."""
        return self._writer.transport.get_write_buffer_size()

    def drop(self) -> None:
        """Drop the TCP connection, without a close frame."""
        self._writer.transport.abort()

    def silence(self) -> None:
        """Go quiet with TCP still open: no more events, no pongs, client messages ignored."""
        self._silent = True
        if self._sender is not None:
            self._sender.cancel()

    def send(self, text: str) -> None:
        if self._proto.state is State.OPEN and not self._silent:
            self._proto.send_text(text.encode())
            flush(self._proto, self._writer)

    def _pong(self) -> None:
        self._ctx.stats.pongs_sent += 1
        self.send('{"type":"pong"}')

    def _on_text(self, data: bytes) -> None:
        msg: Any = None
        try:
            msg = json.loads(data)
            if not isinstance(msg, dict):
                raise Close(4400, "Message must be a JSON object")
            self._dispatch(msg)
        except Close as exc:
            sub_id = msg.get("id") if isinstance(msg, dict) else None
            if sub_id and self._ctx.options.end_frames and msg.get("type") == "subscribe":
                # as graphql-ws servers do: the operation's error, then the close
                error = [{"message": exc.reason, "extensions": {"code": exc.code}}]
                self.send(json.dumps({"id": sub_id, "type": "error", "payload": error}))
            self.close(exc.code, exc.reason)
        except ValueError:
            self.close(4400, "Invalid message received")

    def _dispatch(self, msg: dict[str, Any]) -> None:
        ctx = self._ctx
        kind = msg.get("type")
        injected = ctx.chaos.close_for(str(kind))
        if injected is not None:
            raise Close(injected, "injected")
        if kind == "ping":
            ctx.stats.pings_received += 1
            if self._init_seen and not self._pinged:
                self._pinged = True
                ctx.stats.first_ping_after_init_s.append(ctx.clock() - self._init_at)
            if self._pongs.answer_now(bursting=self._bursting):
                self._pong()
        elif kind == "pong":
            ctx.stats.pongs_received += 1
        elif kind == "connection_init":
            self._init(msg.get("payload"))
        elif kind == "subscribe":
            self._subscribe(msg)
        elif kind == "complete":
            if msg.get("id") == self._sub_id and self._sub_id is not None:
                ctx.stats.completes_received += 1
                ctx.stats.completes_at.append(ctx.clock())
                self._completed = True
                if self._sender is not None:
                    self._sender.cancel()
                if ctx.options.end_frames:  # the operation is done: said, as graphql-ws does
                    self.send(json.dumps({"id": self._sub_id, "type": "complete"}))
                self._helpers.append(asyncio.create_task(self._close_later()))
        else:
            raise Close(4400, f"Invalid message type {kind!r}")

    def _init(self, payload: object) -> None:
        o = self._ctx.options
        if self._acked or self._init_seen:
            raise Close(4429, "Too many initialisation requests")
        self._init_seen = True
        self._ctx.stats.inits += 1
        p = payload if isinstance(payload, dict) else {}
        self._ctx.stats.init_enterprise_ids.append(p.get("enterpriseId"))
        expiry = self._ctx.token_expiry(bearer(str(p.get("Authorization", ""))))
        key = p.get("x-app-key")
        if expiry is None or not isinstance(key, str) or not o.accepts_app_key(key):
            raise Close(4401, "Unauthorised - Invalid credentials")
        self.app_key = key
        self._init_at = self._ctx.clock()
        self._helpers.append(asyncio.create_task(self._ack(o.ack_delay_s)))
        if o.subscribe_deadline_s > 0:
            self._helpers.append(asyncio.create_task(self._subscribe_deadline()))
        self._helpers.append(asyncio.create_task(self._expire(expiry)))
        if o.ping_interval_s > 0:
            self._helpers.append(asyncio.create_task(self._pinger()))

    def _subscribe(self, msg: dict[str, Any]) -> None:
        ctx = self._ctx
        if not self._acked:
            raise Close(4401, "Unauthorized")
        sub_id = msg.get("id")
        payload = msg.get("payload")
        query = payload.get("query") if isinstance(payload, dict) else None
        if not isinstance(sub_id, str) or not sub_id or not isinstance(query, str):
            raise Close(4400, "Invalid subscribe message")
        if is_connection_query(query):
            # Query.connection: is a consumer subscribed (Active)? One next, then complete.
            # OHIP's stream is app key + gateway + chain, but the query comes before any
            # subscribe, so the chain is unknown: the sandbox scopes the answer to the asking
            # session's app key (Active iff a session initialized with the same key holds the
            # subscription of some chain).
            assert self.app_key is not None  # acked
            ctx.stats.query_ids.append(sub_id)
            if ctx.options.connection_query_silent:
                return
            status = "Active" if ctx.subscriptions.active_for(self.app_key) else "Inactive"
            if ctx.options.connection_status is not None:
                status = ctx.options.connection_status
            data = {"data": {"connection": {"id": str(id(self)), "status": status}}}
            self._greet()
            self.send(json.dumps({"id": sub_id, "type": "next", "payload": data}))
            self.send(json.dumps({"id": sub_id, "type": "complete"}))
            return
        if self._sub_id is not None:
            ctx.stats.duplicate_subscribe_ids += 1
            raise Close(4409, f"Subscriber for {sub_id} already exists")
        limit = ctx.options.subscribe_deadline_s
        if limit > 0 and ctx.clock() - self._init_at > limit:  # before the timer noticed
            ctx.stats.subscribe_timeouts += 1
            raise Close(4408, "Subscribe timeout")
        args = parse_input(query)
        ctx.stats.subscribes.append(args)
        ctx.stats.subscription_ids.append(sub_id)
        chain = args.get("chainCode")
        if not isinstance(chain, str):
            raise Close(4400, "Value for chainCode is required")
        log = ctx.logs.get(chain)
        if log is None:
            raise Close(4403, "Forbidden")
        assert self.app_key is not None  # acked
        refusal = ctx.subscriptions.claim(chain, self, self.app_key)
        if refusal is not None:
            if refusal == "held":
                ctx.stats.subscriber_conflicts += 1
            elif refusal == "gap":
                ctx.stats.gap_refusals += 1
            else:
                ctx.stats.stale_refusals += 1
            raise Close(4409, "Subscriber already exists")
        self._sub_id, self._chain = sub_id, chain
        highest = args.get("offsetType") == "highest"
        offset = args.get("offset")
        if offset is None and not highest:
            start = ctx.subscriptions.resume_index(chain)
            ctx.stats.position_starts.append(start)
        else:
            start = log.start_index(offset if isinstance(offset, str) else None, highest=highest)
            if offset is not None:
                start = ctx.chaos.rewind(start)  # duplicates to deduplicate
        if ctx.options.retention_events > 0 and not highest:
            start = max(start, log.size - ctx.options.retention_events)  # the rest expired
        hotels = args.get("hotelCode")
        hotel_set = frozenset(str(hotels).split(",")) if hotels else None
        self._sender = asyncio.create_task(
            self._stream(log, start, delta=args.get("delta") is True, hotels=hotel_set)
        )

    async def _stream(
        self, log: ChainLog, index: int, *, delta: bool, hotels: frozenset[str] | None
    ) -> None:
        ctx = self._ctx
        assert self._sub_id is not None and self._chain is not None
        sub_json = json.dumps(self._sub_id)
        prefix = '{"id":' + sub_json + ',"type":"next","payload":'
        batch = ctx.options.send_batch
        proto, writer = self._proto, self._writer
        drop_at = ctx.chaos.fault_point(ctx.options.drop_every)
        close_at = ctx.chaos.fault_point(ctx.options.close_every)
        # The templated backlog goes out as pre-encoded frames (unless filtered or in delta).
        wire = log.templated if not delta and hotels is None else None
        id_bytes = sub_json.encode()
        total = 0
        while proto.state is State.OPEN:
            size = log.size
            self._bursting = index < size
            if not self._bursting:
                for _ in range(self._pongs.release()):
                    self._pong()
                changed = log.changed()
                if index >= log.size:
                    await changed.wait()
                continue
            room = min(drop_at, close_at) - total  # stop exactly at a fault point
            if wire is not None and index < log.backlog:
                end = min(log.backlog, wire.chunk_end(index))
                if room < end - index:
                    end = index + max(1, int(room))
                frames = wire.wire(len(id_bytes), log.backlog, index, end)
                flush(proto, writer)  # nothing pending may follow these frames
                writer.write(frames.replace(wire.placeholder(len(id_bytes)), b'{"id":' + id_bytes))
                sent = end - index
                index = end
            else:
                end = min(size, index + batch, index + max(1, int(min(room, batch))))
                texts: list[str] = []
                for entry in log.between(index, end):
                    if entry.offset is None:
                        texts.append(entry.payload)
                    elif hotels is None or entry.hotel in hotels:
                        texts.append(
                            prefix + (entry.delta_payload() if delta else entry.payload) + "}"
                        )
                if wire is not None:  # fast_backlog: live events pre-encoded too
                    flush(proto, writer)
                    writer.write(text_frames(texts))
                else:
                    for text in texts:
                        proto.send_text(text.encode())
                sent = len(texts)
                index = end
            ctx.subscriptions.delivered(self._chain, index)
            ctx.stats.events_sent += sent
            total += sent
            flush(proto, writer)
            await writer.drain()
            if total >= drop_at:
                ctx.stats.chaos_drops += 1
                writer.transport.abort()
                return
            if total >= close_at:
                self.close(ctx.chaos.close_code(), "chaos")
                return

    async def _ack(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        self._acked = True
        self._greet()
        self.send('{"type":"connection_ack","payload":{"applicationName":"sandbox"}}')

    def _greet(self) -> None:
        for frame in self._ctx.chaos.greetings:
            self.send(frame)

    async def _close_later(self) -> None:
        await asyncio.sleep(self._ctx.options.complete_close_delay_s)
        self.close(1000, "Normal Closure")

    async def _init_deadline(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if not self._acked:
            self.close(4408, "Connection initialisation timeout")

    async def _subscribe_deadline(self) -> None:
        """No subscription within ``subscribe_deadline_s`` of connection_init: 4408."""
        await asyncio.sleep(self._ctx.options.subscribe_deadline_s)
        if self._sub_id is None and self._proto.state is State.OPEN:
            self._ctx.stats.subscribe_timeouts += 1
            self.close(4408, "Subscribe timeout")

    async def _client_deadline(self, limit: float) -> None:
        """Drop the connection once no frame arrived for ``limit`` seconds: abort the TCP
        transport, no close handshake (a frozen client would never answer one).

        At the deadline, a few loop iterations first read what is already in the socket: after
        a stall of the sandbox's own loop (a test blocking it), a frame may be waiting there,
        and the client is not the silent one."""
        while True:
            left = self._last_frame + limit - self._ctx.clock()
            if left > 0:
                await asyncio.sleep(left)  # until the deadline of the last frame: <= limit
                continue
            seen = self._last_frame
            for _ in range(5):
                await asyncio.sleep(0)
            if self._last_frame == seen:
                break
        self._ctx.stats.client_timeouts += 1
        self.drop()

    async def _expire(self, expiry: float) -> None:
        await asyncio.sleep(max(0.0, expiry - self._ctx.clock()))
        self.close(4401, "Token expired")

    async def _pinger(self) -> None:
        while True:
            await asyncio.sleep(self._ctx.options.ping_interval_s)
            self.send('{"type":"ping"}')
