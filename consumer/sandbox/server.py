"""The sandbox gateway: a local OHIP Streaming emulator on loopback.

One port serves ``POST /oauth/v1/tokens``, ``/healthz``, three REST resources built from the
event log and the ``/subscriptions`` WebSocket. :class:`SandboxGateway` assembles the parts,
each in its module: the HTTP router (:mod:`.router`), the token endpoint (:mod:`.tokens`), the
REST resources (:mod:`.rest`), the WebSocket sessions (:mod:`.websocket`, with
:mod:`.graphql` and :mod:`.subscriptions`) and fault injection (:mod:`.faults`); it owns the
event logs, the lifecycle and the hooks the tests and the demo drive. :func:`run_sandbox` is
the ``opera-consumer sandbox`` command.

Rules it enforces, as OHIP does: the hashed application key in the URL (else HTTP 400), the
``graphql-transport-ws`` subprotocol (else 4406), ``connection_init`` with a valid token and the
raw key (else 4401), one active subscription per chain (else 4409), schema patterns of the
``newEvent`` input (else 4400), known chains (else 4403), token expiry (4401). On REST: a valid
token and the raw key (else 401), ``x-hotelid`` on hotel routes (else 400), a rate limit (429).
"The key" is ``app_key`` or any of ``app_keys``: several applications may share the gateway
(each session remembers its key; the ``connection`` query answers per key). With
``client_timeout_s``, a session silent that long is dropped, as a gateway drops a dead consumer.

Every part reads the time through :func:`_monotonic`, which looks ``time`` up in this module:
a test freezes the whole sandbox's clock by replacing ``server.time``.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .eventlog import ChainLog
from .faults import Chaos
from .options import SandboxOptions, SandboxStats
from .rest import RestResources
from .router import Router
from .subscriptions import Subscriptions
from .templated import TemplatedEvents
from .tokens import TokenEndpoint
from .websocket import SessionContext, WsSession

__all__ = ["SandboxGateway", "SandboxOptions", "SandboxStats", "run_sandbox"]


UUID_JSON_BYTES = 38  # len(json.dumps(str(uuid.uuid4())))


def _monotonic() -> float:
    """The sandbox's clock (``time`` looked up at each call, so a test may replace it)."""
    return time.monotonic()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class SandboxGateway:
    def __init__(self, options: SandboxOptions | None = None) -> None:
        self.options = o = options or SandboxOptions()
        self.stats = SandboxStats()
        self.key_hash = _sha256(o.app_key)  # of app_key; the URL may carry any accepted key's
        if o.fast_backlog and o.malformed_every:
            raise ValueError("fast_backlog makes no malformed frames: unset malformed_every")
        self._logs = {
            c: ChainLog(c, o.seed, TemplatedEvents(c, o.seed) if o.fast_backlog else None)
            for c in o.chains
        }
        self._chaos = Chaos(o)
        self.malformed: dict[str, list[str]] = self._chaos.malformed  # per chain, in log order
        self._tokens = TokenEndpoint(o, self.stats, self._chaos.token_failures, _monotonic)
        self.issued_tokens: list[str] = self._tokens.issued
        self.token_requests: list[tuple[dict[str, str], dict[str, str]]] = self._tokens.requests
        rest = RestResources(
            o,
            self.stats,
            logs=self._logs,
            failures=self._chaos.rest_failures,
            token_expiry=self._tokens.expiry,
            clock=_monotonic,
        )
        self._subscriptions: Subscriptions[WsSession] = Subscriptions(
            o.stale_hold_s, self.stats, _monotonic, gap_s=o.resubscribe_gap_s
        )
        sessions = SessionContext(
            options=o,
            stats=self.stats,
            logs=self._logs,
            token_expiry=self._tokens.expiry,
            subscriptions=self._subscriptions,
            chaos=self._chaos,
            clock=_monotonic,
        )
        self._router = Router(
            stats=self.stats,
            key_hashes=frozenset(_sha256(k) for k in o.all_app_keys),
            clock=_monotonic,
            tokens=self._tokens,
            rest=rest,
            chaos=self._chaos,
            sessions=sessions,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._closed = False

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        o = self.options
        for log in self._logs.values():
            if o.live_timestamps:  # the backlog is what happened before the start
                log.end_backlog_at(int(time.time() * 1_000_000), o.backlog)
            if log.templated is not None:
                log.add_backlog(o.backlog)
                # Every consumer's subscription id is a UUID: its JSON is 38 bytes.
                log.templated.prebuild(UUID_JSON_BYTES, o.backlog)
            else:
                self._chaos.grow(log, o.backlog, decoded=False)
            log.stamp_now = o.live_timestamps
        self._server = await self._router.listen(self.options.host, self.options.port)
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
        for w in list(self._router.writers):
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

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
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

    async def _live(self) -> None:
        """``rate`` new events per second per chain, on the loop's clock: each wake-up makes
        the events due by then (wake-ups at least 1 ms apart), so a high rate is kept, not
        only attempted; a debt of more than a second (a stalled loop) is forgiven."""
        rate = self.options.rate
        loop = asyncio.get_running_loop()
        started, made = loop.time(), 0
        most = max(1, math.ceil(rate / 100))  # per wake-up: at most 10 ms worth
        while True:
            await asyncio.sleep(max(started + (made + 1) / rate - loop.time(), 0.001))
            now = loop.time()
            due = int((now - started) * rate) - made
            if due > rate + most:
                started, due = now - made / rate, 1
            n = min(due, most)
            if n <= 0:
                continue
            for log in self._logs.values():
                self._chaos.grow(log, n, decoded=False)
            made += n

    # --- test and demo hooks ----------------------------------------------------------------

    def events(self, chain: str) -> list[dict[str, Any]]:
        """Ground truth: every valid event of the chain, in log order."""
        return self._logs[chain].events()

    def event_keys(self, chain: str) -> list[tuple[str, str, str | None]]:
        """Ground truth, lighter: ``(uniqueEventId, offset, primaryKey)`` of every valid event
        of the chain, in log order (those of :meth:`events`, without decoding them)."""
        return self._logs[chain].event_keys()

    def append(self, chain: str, n: int) -> list[dict[str, Any]]:
        """Generate ``n`` events (with malformed frames if ``malformed_every`` asks for them)."""
        return self._chaos.grow(self._logs[chain], n)

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
        for session in list(self._subscriptions.sessions):
            if code is None:
                session.drop()
            else:
                session.close(code, reason)
        await asyncio.sleep(0)

    def complete_subscriptions(self) -> None:
        """Every subscribed session gets the server's ``complete`` for its subscription, then
        a close: a completed subscription (``resubscribe_gap_s`` applies to the next)."""
        for session in list(self._subscriptions.sessions):
            session.complete_subscription()

    def unsent_bytes(self) -> int:
        """Bytes of frames the WebSocket sessions have written (their events counted as sent,
        and as the chain's position) that still wait in the sandbox's own buffers because the
        peer is not reading: a drop (``disconnect_all(None)``) loses them."""
        return sum(s.unsent_bytes() for s in self._subscriptions.sessions)

    def silence_connections(self) -> None:
        """Current connections go quiet, TCP still open: no events, no pongs (a half-open
        link as the client sees it). New connections are served normally."""
        for session in self._subscriptions.sessions:
            session.silence()

    def fail_upgrades(self, statuses: list[int]) -> None:
        """The next upgrades are refused with these HTTP statuses (400, 429, 503...)."""
        self._chaos.fail_upgrades(statuses)

    def close_on(self, message: str, codes: list[int]) -> None:
        """Close the next ``connection_init`` or ``subscribe`` messages with these codes."""
        self._chaos.close_on(message, codes)

    def greet_with(self, frames: list[str]) -> None:
        """Send these frames (any text) before each connection_ack and each answer to the
        connection query: what a client sees before it has subscribed."""
        self._chaos.greetings.extend(frames)

    def fail_token_requests(self, statuses: list[int], retry_after: float | None = None) -> None:
        self._chaos.token_failures.extend(statuses, retry_after)

    @property
    def token_failures_left(self) -> int:
        """Injected token failures not answered yet."""
        return len(self._chaos.token_failures)

    def clear_token_failures(self) -> None:
        self._chaos.token_failures.clear()

    def fail_rest(self, statuses: list[int], retry_after: float | None = None) -> None:
        """The next REST requests answer these statuses, before auth and the rate limit."""
        self._chaos.rest_failures.extend(statuses, retry_after)


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
        f'  enterprise_id = "{o.enterprise_id or o.demo_enterprise_id}"'
        f"{'' if o.enterprise_id else '  (any is taken)'}\n"
        f"  chains        = {', '.join(o.chains)}  ({o.backlog} events waiting each, "
        f"{o.rate:g} new/s{', fast backlog' if o.fast_backlog else ''}"
        f"{'' if o.live_timestamps else ', fixed timestamps'})\n"
        f"  REST          = /rsv/v1, /crm/v1, /csh/v1  ({rest})\n"
        "Ctrl-C to stop."
    )
    try:
        await stop.wait()
    finally:
        await gw.close()
