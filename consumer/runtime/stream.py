"""One OHIP stream: connect, authenticate, subscribe, read, and reconnect per close code.

The reader only moves frames: decode, hand events to the pipeline (waiting when it is full),
answer pings. A wait for room that lasts reads on meanwhile (``read_ahead``): pings answered,
the rest held for the reader, bounded. Two helper tasks per session own the timers:
``_keepalive`` sends a ping every ``ping_interval_s`` (the first that long after
``connection_init``) and replaces a connection that shows no pong and no event within the
liveness deadline; ``_completer`` ends the session gracefully (``complete``, then wait for the
server to close) at shutdown or before the token expires. Every write has a deadline, kept
by the connection itself (:mod:`.connection`; a gateway that stops reading would otherwise
hold the session, and its stop, for good): a frame not written in time, or pongs unwritten past
a bound, abort the connection, taken as lost (1006).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential
from websockets.datastructures import Headers
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
)

from .. import __version__
from ..config import StreamSettings
from ..core import protocol
from ..core.close_policy import OVERSIZED_FACTOR, Action, ClosePolicy, Decision
from ..core.events import Event
from ..core.evidence import SHOWN_LIMIT, describe, masked, prefix
from ..core.liveness import Liveness, first_ping_due
from ..core.printable import printable
from ..core.protocol import DecodeError, Next, SubscribeInput
from ..core.retry_after import retry_after_seconds
from ..core.session import (
    ClientSession,
    ConnectionStatus,
    Ended,
    Ignored,
    Outcome,
    PongReceived,
    QueryDone,
    Reply,
    SessionState,
)
from ..core.subscribe_timing import SubscribeDeadline, gap_left
from ..core.upgrade_budget import UpgradeBudget
from ..core.watermark import Position
from ..errors import AuthError, Fenced, StoreError, StreamStopped
from ..logs import REDACTOR
from ..state.base import StateStore
from .auth import Token, TokenProvider
from .connection import Connection, WriteStalled, connect
from .origin import one_header, redirect_target
from .pipeline import StreamPipeline
from .read_ahead import ReadAhead

log = structlog.get_logger(__name__)
_T = TypeVar("_T")


@dataclass(slots=True)
class StreamStats:
    connections: int = 0
    events_received: int = 0
    malformed: int = 0
    ignored: int = 0  # frames for a subscription id that is not ours
    last_close: str = ""
    closes: Counter[str] = field(default_factory=Counter)  # by code: "4409", "http_429"...
    last_event: float | None = None  # monotonic
    # Resumes whose replay brought a new event before the checkpoint's own (inclusive replay
    # starts with it): events between the two were lost, e.g. to OHIP's 7-day retention.
    resume_gaps: int = 0
    # Server pings answered by the read-ahead while the reader waited for room downstream.
    paused_pings: int = 0


class StreamState(enum.StrEnum):
    STARTING = "starting"
    CONNECTING = "connecting"
    STREAMING = "streaming"
    COMPLETING = "completing"
    LOCKOUT = "lockout"  # another consumer holds the stream (4409, the gateway's "Active")
    # A rate the gateway or OHIP's quota asks for (HTTP 429 on the upgrade, the application
    # key's upgrade budget spent): deliberate too, but nothing to do with another consumer.
    THROTTLED = "throttled"
    # OHIP's resubscribe gap: after a completed subscription closed (a clean stop and start, a
    # rotation, the server's complete), before the next subscribe. Routine, not a 4409 lockout.
    GAP = "gap"
    BACKOFF = "backoff"  # after a failure
    STOPPED = "stopped"

    @property
    def ready(self) -> bool:
        """Streaming, or in a deliberate wait: nothing an operator needs to look at."""
        return self in _READY


_READY = frozenset(
    {
        StreamState.STREAMING,
        StreamState.COMPLETING,
        StreamState.LOCKOUT,
        StreamState.THROTTLED,
        StreamState.GAP,
    }
)
_RATE_LIMITED = "http_429"  # Decision.code of an upgrade refused with HTTP 429
_GAP_WAIT = "waiting out the resubscribe gap"  # what a GAP waits for, for a person

# A replay that begins with this many events already processed before the checkpoint's own is
# not checked further for a gap (each is a state store lookup, in the reader).
RESUME_CHECK_MAX = 1000


def _helper_ended(ws: Connection, task: asyncio.Task[None]) -> None:
    """A session's keepalive or completer ended: a failure (a bug) drops the connection, which
    the reader takes as lost and replaces, rather than the session going on without its
    liveness check or its completion (the next one replays what was in flight)."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None or isinstance(exc, ConnectionClosed):
        return
    log.error(
        "a session's helper failed; the connection is dropped and replaced",
        task=task.get_name(),
        exc_info=exc,
    )
    ws.transport.abort()


class _Ids:
    """A :class:`ClientSession`'s ``new_id``: a fresh UUID for each query, and for the
    subscription unless ``reused`` is given (set ``subscribing`` just before it subscribes)."""

    def __init__(self, reused: str | None) -> None:
        self.reused = reused
        self.subscribing = False

    def __call__(self) -> str:
        if self.subscribing and self.reused is not None:
            return self.reused
        return str(uuid.uuid4())


class StreamRunner:
    def __init__(
        self,
        name: str,
        settings: StreamSettings,
        *,
        tokens: TokenProvider,
        pipeline: StreamPipeline,
        store: StateStore,
        budget: UpgradeBudget,
        status_check: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self._status_check = status_check
        self._rng = rng or random.Random()
        self.settings = settings
        self._tokens = tokens
        self._pipeline = pipeline
        self._store = store
        self._budget = budget
        self._url = protocol.subscription_url(
            settings.gateway_url, settings.app_key.get_secret_value()
        )
        self.policy = ClosePolicy(settings.connection.policy(), rng)
        self._stop = asyncio.Event()
        self._anchored = True  # set by _subscribe_input: does the stream have a checkpoint?
        # Set by _subscribe_input: the durable checkpoint the subscription resumes from, whose
        # event the inclusive replay should bring first; the session checks it (_expecting).
        self._resume: Position | None = None
        self._expecting: Position | None = None
        self._examined = 0  # events already processed before the checkpoint's, this session
        self._paused = False
        self._ahead: ReadAhead | None = None  # the session's, while _read runs
        self._completing: str | None = None
        self._dead = False
        self._ended = ""  # why the server ended the current subscription, if it did
        self._server_ended = False  # the server ended (completed) this session's subscription
        self._ignored_logged: set[str] = set()  # the types of ignored frames logged this session
        self._delivered_before = 0
        self._session_started = 0.0
        self.state = StreamState.STARTING
        self.stats = StreamStats()
        self.liveness: Liveness | None = None
        self._waiting: tuple[str, float] | None = None  # a backoff or lockout: why, until
        self._gap: Decision | None = None  # the last resubscribe-gap decision (state GAP)
        self._warned = False  # the settings' warnings were logged
        self._active_answers = 0  # consecutive "Active" answers to the status query
        # The last connection's status query went unanswered: the next one subscribes unasked.
        self._status_unanswered = False
        # reuse_subscription_id: the id of every subscription of this stream in this process
        self._subscription_id = (
            str(uuid.uuid4()) if settings.connection.reuse_subscription_id else None
        )

    @property
    def read_ahead(self) -> ReadAhead | None:
        """The current session's read-ahead (what it holds, whether it reads); None between
        sessions."""
        return self._ahead

    @property
    def token_fetches(self) -> int:
        return self._tokens.fetches

    @property
    def token_failures(self) -> int:
        return self._tokens.failures

    async def _wait_or_stop(self, seconds: float) -> None:
        """Wait ``seconds``, or less if asked to stop (asyncio.timeout: on Python 3.11
        wait_for may swallow a cancel that lands as the event is set)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def _until_stopped(self, work: Awaitable[_T]) -> _T | None:
        """``work``'s result, or None (``work`` cancelled) as soon as a stop is requested: a
        failing token endpoint is retried for minutes, and shutdown must not wait for it."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            task.cancel()  # a no-op once it is done
        if task.done():
            return task.result()
        await asyncio.wait((task,))  # let it unwind (close its request)
        return None

    def waiting_for(self) -> str:
        """What the stream waits for, for a person (systemd's STATUS=, /readyz); "" if
        nothing."""
        if self.state is StreamState.CONNECTING:
            return self._tokens.waiting() or ""
        waits = (StreamState.BACKOFF, StreamState.LOCKOUT, StreamState.THROTTLED, StreamState.GAP)
        if self._waiting is not None and self.state in waits:
            why, until = self._waiting
            return f"{why}, retry in {max(0.0, until - time.monotonic()):.0f} s"
        return ""

    def request_stop(self) -> None:
        """Graceful: the current session sends ``complete`` and waits for the server to close."""
        self._stop.set()

    async def run(self) -> None:
        """Consume until :meth:`request_stop`; raises :class:`StreamStopped` for good."""
        with structlog.contextvars.bound_contextvars(stream=self.name):
            if not self._warned:  # once: a fleet may run the stream here more than once
                self._warned = True
                for key, what, fix in self.settings.warnings():
                    log.warning(
                        "configuration warning",
                        key=f"streams.{self.name}.{key}",
                        problem=what,
                        fix=fix,
                    )
            await self._wait_out_gap()
            while not self._stop.is_set():
                try:
                    decision = await self._attempt()
                except Fenced:
                    # Recording where the stream begins was refused: its lease is lost, and
                    # it is being stopped (the committer said so, as a warning). No bug.
                    decision = self.policy.on_network_error("fenced: the stream's lease is lost")
                except Exception as exc:  # a bug: reconnect with backoff, never a dead stream
                    log.error("unexpected error in the stream; reconnecting", exc_info=exc)
                    decision = self.policy.on_network_error(f"unexpected error: {describe(exc)}")
                self.stats.last_close = decision.reason
                if decision.code:
                    self.stats.closes[decision.code] += 1
                if self._stop.is_set():
                    break
                if decision.action is Action.STOP:
                    self.state = StreamState.STOPPED
                    log.error("stream stopped", reason=decision.reason)
                    raise StreamStopped(f"stream {self.name}: {decision.reason}")
                if decision.action is Action.REFRESH_TOKEN:
                    self._tokens.invalidate()
                self.state = (
                    StreamState.BACKOFF
                    if not decision.deliberate
                    else StreamState.THROTTLED
                    if decision.code == _RATE_LIMITED
                    else StreamState.LOCKOUT
                )
                why = printable(masked(decision.reason, SHOWN_LIMIT + 1, REDACTOR.scrub))
                if decision is self._gap:  # the resubscribe gap, not a lockout
                    self.state, why = StreamState.GAP, f"{_GAP_WAIT} ({why})"
                log.info("reconnecting", delay_s=round(decision.delay_s, 2), reason=decision.reason)
                self._waiting = (why, time.monotonic() + decision.delay_s)
                await self._wait_or_stop(decision.delay_s)
            self.state = StreamState.STOPPED

    async def _attempt(self) -> Decision:
        self.state = StreamState.CONNECTING
        try:
            token = await self._until_stopped(self._tokens.token())
        except AuthError as exc:
            if not exc.retriable:
                return Decision(Action.STOP, 0.0, str(exc))
            return self.policy.on_network_error(str(exc))
        if token is None:
            return Decision(Action.RECONNECT, 0.0, "stopping")
        sub = await self._subscribe_input()
        c = self.settings.connection
        wait = self._budget.reserve(time.monotonic())
        if wait > 0:
            self.state = StreamState.THROTTLED
            self._waiting = ("upgrade budget of the application key spent", time.monotonic() + wait)
            log.warning("upgrade budget spent: waiting", delay_s=round(wait, 1))
            await self._wait_or_stop(wait)
            if self._stop.is_set():
                return Decision(Action.RECONNECT, 0.0, "stopping")
        self.state = StreamState.CONNECTING
        max_size = c.max_frame_bytes * OVERSIZED_FACTOR  # larger frames close with 1009
        # The token on the upgrade as well, if asked (unconfirmed whether OHIP wants it).
        headers = {"Authorization": f"Bearer {token.value}"} if c.upgrade_authorization else None
        try:
            async with connect(
                self._url,
                headers=headers,
                subprotocols=[protocol.SUBPROTOCOL],
                max_size=max_size,
                open_timeout=c.open_timeout_s,
                close_timeout=max(c.complete_timeout_s, 1.0),
                proxy=c.proxy,
                user_agent=f"opera-consumer/{__version__}",
            ) as ws:
                self.stats.connections += 1
                if ws.subprotocol != protocol.SUBPROTOCOL:
                    await ws.close(1002, "graphql-transport-ws required")
                    return Decision(
                        Action.STOP,
                        0.0,
                        "the gateway did not accept the graphql-transport-ws subprotocol: "
                        "check gateway_url",
                    )
                return await self._session(ws, token, sub)
        except InvalidStatus as exc:
            return self._refused(exc.response.status_code, exc.response.headers)
        except ConnectionClosed as exc:
            # Closed before we subscribed (a subscribed session handles its own close): no
            # session ended, so nothing it delivered may reset the backoff.
            return self._after_close(exc, None)
        except TimeoutError:
            return self.policy.on_network_error(
                "timed out opening the connection or waiting for connection_ack"
            )
        except (OSError, InvalidHandshake) as exc:
            return self.policy.on_network_error(f"cannot connect: {describe(exc)}")

    def _refused(self, status: int, headers: Headers) -> Decision:
        """The upgrade answered ``status``: a redirect (not followed) says where to, host only;
        a refusal's Retry-After is honoured (429, 5xx)."""
        if 300 <= status < 400:
            target = redirect_target(self._url, one_header(headers, "Location"))
            if target is not None:
                host, same = target
                return self.policy.on_redirect(status, host, same_origin=same)
        after = retry_after_seconds(one_header(headers, "Retry-After"))
        return self.policy.on_handshake_status(status, after)

    async def _subscribe_input(self) -> SubscribeInput:
        """Always resume from what is done (inclusive replay, deduplicated); the configured
        start position only applies to a stream that has no checkpoint yet."""
        s = self.settings
        self._resume = None
        done = self._pipeline.position
        if done is not None:
            self._resume = await self._durable(done)
            return s.subscribe_input(done.offset)
        if await self._store.start_override(self.name) == "highest":
            # `opera-consumer offset reset --highest`: the first event re-anchors the stream.
            self._anchored = False
            return s.subscribe_input(None, highest=True)
        cp = await self._store.checkpoint(self.name)
        self._anchored = cp is not None
        if cp is not None:
            if cp.unique_event_id:  # "": set by an operator, no event to expect
                self._resume = Position(cp.offset, cp.unique_event_id)
            return s.subscribe_input(cp.offset)
        if s.subscription.start == "highest":
            return s.subscribe_input(None, highest=True)
        return s.subscribe_input(s.subscription.offset)  # None: the gateway's position

    async def _durable(self, done: Position) -> Position | None:
        """``done`` if the state store's checkpoint is that position: then every event up to
        it is recorded as processed there, and the gap check's lookups are exact. Else (its
        commit still to come) None: no check this session rather than a false alarm."""
        try:
            cp = await self._store.checkpoint(self.name)
        except StoreError:
            return None
        if cp is None or (cp.offset, cp.unique_event_id) != (done.offset, done.unique_event_id):
            return None
        return Position(done.offset, done.unique_event_id)

    async def _check_resume(self, event: Event, liveness: Liveness) -> None:
        """An event of a resumed session before the checkpoint's own: a replay that starts
        earlier brings events already processed (duplicates), but a new one means the replay
        began after the checkpoint (an offset older than OHIP's 7-day retention replays from
        the oldest event retained, without an error): the events between are lost. Said once
        a session, and counted."""
        expected = self._expecting
        assert expected is not None
        if event.unique_event_id == expected.unique_event_id:
            self._expecting = None
            return
        # One the [filter] drops left no processed id: no sign of a gap either way.
        known = self._pipeline.filters_out(event)
        if not known:
            try:
                async with self._backpressure(liveness):
                    seen = await self._store.seen(self.name, [event.unique_event_id])
            except StoreError as exc:
                self._expecting = None
                log.warning("cannot check the replay for a gap", error=describe(exc))
                return
            known = event.unique_event_id in seen
        if known:
            self._examined += 1
            if self._examined >= RESUME_CHECK_MAX:
                self._expecting = None
                log.warning(
                    "the replay began with many events before the checkpoint's: not checked "
                    "for a gap further",
                    events=self._examined,
                )
            return
        self._expecting = None
        self.stats.resume_gaps += 1
        log.error(
            "events may be missing: the replay from the checkpoint brought a new event before "
            "the checkpoint's own (an offset older than OHIP's retention of 7 days replays from "
            "the oldest event retained)",
            checkpoint_offset=expected.offset,
            checkpoint_event_id=prefix(expected.unique_event_id, 100),
            first_new_offset=event.offset,
            first_new_event_id=prefix(event.unique_event_id, 100),
            duplicates_before=self._examined,
        )

    async def _session(self, ws: Connection, token: Token, sub: SubscribeInput) -> Decision:
        c = self.settings.connection
        ws.write_timeout = lambda: c.ack_timeout_s  # until subscribed
        # What the last session left (declared dead, completing, ended by the server) must not
        # explain a close of this one: here, not at the subscribe, since the server may close
        # before it (4401 at connection_init after a session the liveness deadline ended).
        self._completing = None
        self._dead = False
        self._ended = ""
        self._server_ended = False
        ids = _Ids(self._subscription_id)
        session = ClientSession(max_frame_bytes=c.max_frame_bytes, new_id=ids, scrub=REDACTOR.scrub)
        # enterpriseId: unconfirmed whether OHIP reads it; Oracle's sample sends it.
        enterprise_id = self.settings.auth.enterprise_id if c.init_enterprise_id else None
        await ws.send(
            session.connection_init(
                token.value, self.settings.app_key.get_secret_value(), enterprise_id
            )
        )
        init_sent_at = time.monotonic()
        deadline = SubscribeDeadline.after_init(init_sent_at, c.subscribe_deadline_s)
        self._ignored_logged.clear()
        limit, binding = deadline.bound(c.ack_timeout_s, time.monotonic())
        try:
            async with asyncio.timeout(limit):
                while session.state is SessionState.INITIALIZING:
                    out = session.receive(await ws.recv(decode=False))
                    await self._before_subscribing(ws, out)
        except TimeoutError:
            if not binding:
                raise  # ack_timeout_s: as a connection that does not answer
            return await self._too_late(ws, "connection_ack")
        self.policy.acknowledged()  # the credentials worked: the 4401s in a row start again
        if self._status_check and self._status_unanswered:
            # A gateway silent to the query (reference 2.7: how it travels is unconfirmed)
            # would otherwise never be subscribed: no usable answer, as below, and 4409 still
            # guards. The connection after this one asks again.
            self._status_unanswered = False
            log.warning(
                "the connection status query went unanswered on the last connection; "
                "subscribing without it"
            )
        elif self._status_check:
            wait = await self._check_status(ws, session, deadline)
            if wait is not None:
                return wait
        if deadline.passed(time.monotonic()):
            return await self._too_late(
                ws, "the connection status" if self._status_check else "connection_ack"
            )
        ids.subscribing = True
        await ws.send(session.subscribe(sub))
        self._expecting, self._examined = self._resume, 0
        self.state = StreamState.STREAMING
        log.info(
            "subscribed",
            offset=sub.offset,
            highest=sub.highest,
            delta=sub.delta,
            hotel_codes=",".join(sub.hotel_codes) or None,
        )
        liveness = self.liveness = Liveness(
            time.monotonic(),
            floor_s=c.liveness_floor_s,
            multiplier=c.liveness_multiplier,
            ceiling_s=c.liveness_max_s,
        )
        ws.write_timeout = lambda: liveness.timeout
        self._delivered_before = self._pipeline.delivered
        self._session_started = time.monotonic()
        helpers = [
            asyncio.create_task(
                self._keepalive(ws, liveness, init_sent_at), name=f"keepalive-{self.name}"
            ),
            asyncio.create_task(
                self._completer(ws, session, token, liveness), name=f"complete-{self.name}"
            ),
        ]
        for t in helpers:
            t.add_done_callback(functools.partial(_helper_ended, ws))
        started = time.monotonic()
        try:
            decision = await self._read(ws, liveness, session)
        except ConnectionClosed as exc:
            decision = self._after_close(exc, started)
        finally:
            for t in helpers:
                t.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            # Closed now, however the server answered; or the server ended it (its `complete`
            # or `error`): a completed subscription either way, and OHIP's gap applies.
            if session.completed or self._server_ended:
                await self._record_completed()
        return self._gap_after_server_end(decision)

    def _gap_after_server_end(self, decision: Decision) -> Decision:
        """After the server ended our subscription, the next subscribe waits resubscribe_gap_s
        too (OHIP refuses one too soon after a completed subscription: 4409), whatever the
        close that followed asks for."""
        gap = self.settings.connection.resubscribe_gap_s
        if not self._server_ended or decision.action is Action.STOP or decision.delay_s >= gap:
            return decision
        # A wait the protocol asks for, as after our own complete: ready meanwhile (GAP).
        self._gap = dataclasses.replace(decision, delay_s=gap, deliberate=True)
        return self._gap

    async def _check_status(
        self, ws: Connection, session: ClientSession, deadline: SubscribeDeadline
    ) -> Decision | None:
        """Oracle's active/passive check: subscribe only when the gateway says no consumer is
        active on this stream; else close and ask again later (never fight for it: a second
        subscriber would get 4409 and the lockout). None: go ahead and subscribe. The answer
        and the jitter fit in what ``deadline`` leaves."""
        c = self.settings.connection
        await ws.send(session.query_connection())
        limit, binding = deadline.bound(c.ack_timeout_s, time.monotonic())
        try:
            async with asyncio.timeout(limit):
                while True:
                    out = session.receive(await ws.recv(decode=False))
                    if isinstance(out, ConnectionStatus):
                        break
                    await self._before_subscribing(ws, out)
        except TimeoutError:
            self._status_unanswered = True
            if not binding:
                raise
            return await self._too_late(ws, "the connection status")
        said = None if out.status is None else out.status.strip().lower()
        if said == "active":
            await ws.close(1000)
            return self._status_active(out.status or "")
        self._active_answers = 0
        if out.status is None:
            # No usable answer (a gateway without the query?): subscribe, 4409 still guards.
            log.warning("connection status query unanswered; subscribing", problem=out.problem)
        elif said != "inactive":
            # The schema says "Active or Inactive"; how the gateway answers is inferred, not
            # Oracle's word: anything else is no answer (never a wait for ever while ready).
            log.warning(
                "unexpected connection status; subscribing as if unanswered",
                status=printable(out.status, 40),
            )
        # Capped: a jitter that ran past the deadline would make us subscribe late.
        jitter = min(self._rng.uniform(0, c.takeover_jitter_s), deadline.left(time.monotonic()))
        if jitter > 0:
            await self._wait_or_stop(jitter)
            if self._stop.is_set():
                await ws.close(1000)
                return Decision(Action.RECONNECT, 0.0, "stopping")
        return None

    def _status_active(self, status: str) -> Decision:
        """The gateway says a consumer is active on this stream: ask again later. A deliberate
        wait (ready) until status_active_limit answers in a row; then not ready, and said."""
        c = self.settings.connection
        self._active_answers += 1
        n, limit = self._active_answers, c.status_active_limit
        delay = c.status_poll_s + self._rng.uniform(0, c.takeover_jitter_s)
        stuck = 0 < limit <= n
        if n == limit:
            log.warning(
                "the gateway keeps saying another consumer is active on this stream: check "
                "for another consumer of this application key and chain (a Postman or "
                "GraphiQL session, another deployment)",
                answers=n,
                status_poll_s=c.status_poll_s,
            )
        again = f", {n} times in a row" if stuck else ""
        return Decision(
            Action.RECONNECT,
            delay,
            f"the gateway says another consumer is {printable(status, 40)} on this stream"
            f"{again}; asking again later",
            code="status_active",
            deliberate=not stuck,
        )

    async def _too_late(self, ws: Connection, waited_for: str) -> Decision:
        """Waiting for ``waited_for`` left no time to subscribe within subscribe_deadline_s of
        connection_init: never subscribe late (the gateway may refuse it); close, and try a
        fresh connection after a backoff."""
        await ws.close(1000)
        limit = self.settings.connection.subscribe_deadline_s
        log.warning("no time left to subscribe; reconnecting", waited_for=waited_for, limit_s=limit)
        decision = self.policy.on_network_error(
            f"waiting for {waited_for} left no time to subscribe within {limit:g} s of "
            "connection_init"
        )
        return dataclasses.replace(decision, code="subscribe_deadline")

    async def _wait_out_gap(self) -> None:
        """Before this process's first subscribe of the stream (a start, a fleet takeover):
        OHIP refuses a subscribe too soon after the previous subscription was completed and
        closed (4409, and minutes of lockout), whichever process completed it. Waits what is
        left of resubscribe_gap_s since that close, as the state store recorded it, on the
        store's clock (in a fleet, the database's: another host may have closed it)."""
        gap = self.settings.connection.resubscribe_gap_s
        if gap <= 0:
            return
        try:
            closed_at, now = await self._store.completed_close(self.name)
        except StoreError as exc:  # a state store that fails: the whole gap, to be safe
            log.warning("cannot read when the last subscription closed", error=describe(exc))
            closed_at, now = 0.0, 0.0
        wait = gap_left(closed_at, now, gap)
        if wait <= 0:
            return
        self.state = StreamState.GAP
        self._waiting = (
            f"{_GAP_WAIT} after the previous subscription closed",
            time.monotonic() + wait,
        )
        log.info("waiting out the gap after the previous subscription", delay_s=round(wait, 2))
        await self._wait_or_stop(wait)

    async def _record_completed(self) -> None:
        """A completed subscription (by us or by the server) is closed (by the server, or by
        us after complete_timeout_s): remember when, for whichever process subscribes next."""
        try:
            await self._store.set_completed_closed_at(self.name)  # on the store's clock
        except StoreError as exc:  # the next subscriber then risks a 4409: no reason to fail
            log.warning("cannot record when the subscription closed", error=describe(exc))

    async def _read(self, ws: Connection, liveness: Liveness, session: ClientSession) -> Decision:
        c = self.settings.connection
        ahead = self._ahead = ReadAhead(
            ws,
            ws.send,
            session,
            liveness,
            self.stats,
            after_s=c.paused_read_ahead_after_s,
            limit_bytes=c.paused_read_ahead_bytes,
        )
        try:
            return await self._read_on(ws, liveness, session, ahead)
        finally:
            self._ahead = None
            await ahead.close()

    async def _read_on(
        self, ws: Connection, liveness: Liveness, session: ClientSession, ahead: ReadAhead
    ) -> Decision:
        pipeline = self._pipeline
        stats = self.stats
        receive = session.receive
        monotonic = time.monotonic
        held = ahead.held  # filled only while we wait in _backpressure
        recv = ws.recv
        while True:
            # What was read ahead during the last wait first, in arrival order. Bytes: orjson
            # parses them directly, skipping a UTF-8 decode per frame (and a text frame that
            # is not UTF-8 is a dead letter, not a 1007 close and a replay loop). A message
            # already received comes without a suspension (aiohttp's queue holds whole ones).
            out = ahead.take() if held else receive(await recv(decode=False))
            now = monotonic()
            if type(out) is Next:
                liveness.activity(now)
                stats.events_received += 1
                stats.last_event = now
                event = out.event
                if self._expecting is not None:
                    await self._check_resume(event, liveness)
                if not self._anchored:
                    # The gateway moves its own position as it sends: record where this
                    # stream began before anything else, or a crash now would skip events.
                    async with self._backpressure(liveness):
                        await self._anchor(event)
                    self._anchored = True
                if not pipeline.add(event):
                    async with self._backpressure(liveness):
                        await pipeline.room()
            elif type(out) is Reply:
                liveness.activity(now)
                await ws.send(out.text)
            elif type(out) is PongReceived:
                liveness.pong(now)
            elif isinstance(out, DecodeError):
                liveness.activity(now)
                stats.malformed += 1
                async with self._backpressure(liveness):
                    await pipeline.put_malformed(out)
            elif isinstance(out, Ignored):
                liveness.activity(now)
                self._ignore(out)
            elif type(out) is QueryDone:
                liveness.activity(now)
            elif isinstance(out, Ended):
                # The server ended our subscription (an `error`, or `complete`: the answer to
                # ours too). It closes the socket next, and its close code says what to do
                # (4400 stop, 4401 new token...), so wait for it rather than close first.
                log.warning("subscription ended by the server", detail=out.reason)
                assert not held, "read ahead past the end of the subscription"
                self._ended = f"subscription ended by the server: {prefix(out.reason, 200)}"
                self._server_ended = True
                await self._until_server_closes(ws, session)  # raises ConnectionClosed
                self._session_ended(self._session_started)
                ended, self._ended = self._ended, ""
                return self._completed() or self.policy.on_network_error(ended)

    async def _anchor(self, event: Event) -> None:
        """Persist the stream's first event as its checkpoint, waiting for a store that fails
        now (a full disk, a lock) with the read held: a fresh session would subscribe without
        an offset, from the gateway's position, after everything it already sent."""

        def failed(rs: RetryCallState) -> None:
            exc = rs.outcome.exception() if rs.outcome else None
            delay = rs.next_action.sleep if rs.next_action else 0.0
            log.warning(
                "cannot record where the stream begins; retrying",
                error=describe(exc),
                retry_in_s=round(delay, 1),
            )

        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(StoreError),
            wait=wait_exponential(multiplier=0.5, max=30.0),
            stop=lambda _: self._stop.is_set(),
            sleep=self._wait_or_stop,
            before_sleep=failed,
            reraise=True,
        ):
            with attempt:
                await self._pipeline.anchor(event)

    async def _until_server_closes(self, ws: Connection, session: ClientSession) -> None:
        """Read on until the server closes (ConnectionClosed), at most ``complete_timeout_s``;
        then close ourselves. Our subscription has ended: pings are answered and malformed
        frames dead-lettered as before; an event now is replayed by the next session."""
        try:
            async with asyncio.timeout(self.settings.connection.complete_timeout_s):
                while True:
                    await self._before_subscribing(ws, session.receive(await ws.recv(decode=False)))
        except TimeoutError:
            log.warning("server did not close after ending the subscription; closing")
        await ws.close(1000)

    async def _before_subscribing(self, ws: Connection, out: Outcome) -> None:
        """A frame before our subscription (or after it ended): answered, counted and
        dead-lettered as during it (a malformed one carries no event of ours, but the operator
        sees what came)."""
        if isinstance(out, Reply):
            await ws.send(out.text)
        elif isinstance(out, DecodeError):
            self.stats.malformed += 1
            await self._pipeline.put_malformed(out)
        elif isinstance(out, Ignored):
            self._ignore(out)

    @contextlib.asynccontextmanager
    async def _backpressure(self, liveness: Liveness) -> AsyncIterator[None]:
        """While we wait for room downstream we stop reading (after paused_read_ahead_after_s,
        the read-ahead reads on, bounded, and answers pings): our own doing, not the server's
        silence, so the liveness clock starts afresh afterwards."""
        self._paused = True
        ahead = self._ahead
        if ahead is not None:
            ahead.pause()
        try:
            yield
        finally:
            try:
                if ahead is not None:
                    await ahead.resume()  # before the reader reads again, however the wait ended
            finally:
                self._paused = False
                liveness.activity(time.monotonic())

    def _ignore(self, out: Ignored) -> None:
        """A frame for another subscription (we have one): counted, logged once a session for
        each type (a second connection_ack logged must not leave ignored events unsaid)."""
        self.stats.ignored += 1
        if out.kind not in self._ignored_logged:
            self._ignored_logged.add(out.kind)
            log.warning(
                "frame for an unknown subscription id ignored (logged once per session)",
                type=out.kind,
                id=out.id,
            )

    async def _keepalive(self, ws: Connection, liveness: Liveness, init_sent_at: float) -> None:
        interval = self.settings.connection.ping_interval_s
        due = first_ping_due(init_sent_at, interval, time.monotonic())
        # The ping being written: in a task of its own, so that a gateway that stopped reading
        # (the write waits, up to its own deadline) never holds the liveness check back.
        pinging: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                now = time.monotonic()
                # Woken late: the loop was busy and frames may be waiting unread; that is no
                # evidence against the server.
                liveness.unobserved(now - due)
                due = now + interval
                if self._paused:
                    liveness.activity(now)  # our own backpressure, not the server's silence
                elif liveness.is_dead(now):
                    self._dead = True
                    log.warning(
                        "connection declared dead: no pong and no event",
                        timeout_s=round(liveness.timeout, 1),
                        srtt_s=None if liveness.srtt is None else round(liveness.srtt, 3),
                    )
                    ws.transport.abort()
                    return
                if pinging is not None:
                    if not pinging.done():
                        continue  # the last ping is still unwritten: no other behind it
                    pinging.result()  # ConnectionClosed: the reader sees the close too
                liveness.ping_sent(now)
                pinging = asyncio.create_task(
                    ws.send(ClientSession.ping()),
                    name=f"ping-{self.name}",
                )
        finally:
            if pinging is not None:
                pinging.cancel()
                await asyncio.gather(pinging, return_exceptions=True)

    async def _completer(
        self, ws: Connection, session: ClientSession, token: Token, liveness: Liveness
    ) -> None:
        c = self.settings.connection
        margin = self.settings.auth.refresh_margin_s
        try:
            await asyncio.wait_for(
                self._stop.wait(), max(0.0, token.refresh_at(margin) - time.monotonic())
            )
            self._completing = "shutdown"
        except TimeoutError:
            self._completing = "token rotation" if await self._next_token() else "shutdown"
        log.info("completing subscription", why=self._completing)
        self.state = StreamState.COMPLETING
        text = session.complete()
        # From now on a frame not written within the wait for the server's close is moot: the
        # server cannot answer our complete then.
        ws.write_timeout = lambda: min(liveness.timeout, c.complete_timeout_s)
        if text is not None:
            await ws.send(text)
        # Keep reading what is in flight; the server closes the socket when it is done.
        await asyncio.sleep(c.complete_timeout_s)
        log.warning("server did not close after complete; closing")
        await ws.close(1000)

    async def _next_token(self) -> bool:
        """The next session's token, before this one is completed: a token endpoint that
        fails now would otherwise end a healthy stream at every rotation until it answers
        again (this session's token still has ``refresh_margin_s`` to live, and a server that
        closes at its expiry is reconnected as any close is). Asked once at a time, then
        again after 1, 2, 4 ... 30 s. False: a stop came first."""
        delay = 1.0
        while not self._stop.is_set():
            try:
                # A stop must not wait for the endpoint (auth.timeout_s): the session is
                # completed at once then, or the next start meets a 4409.
                return await self._until_stopped(self._tokens.token(retry=False)) is not None
            except AuthError as exc:
                log.warning(
                    "cannot fetch the next token; streaming on with the current one",
                    error=str(exc),
                    expires_in_s=round(self._tokens.expires_in() or 0.0, 1),
                    retry_in_s=delay,
                )
            await self._wait_or_stop(delay)
            delay = min(delay * 2, 30.0)
        return False

    def _session_ended(self, started: float) -> None:
        delivered = self._pipeline.delivered - self._delivered_before
        self.policy.session_ended(time.monotonic() - started, delivered)

    def _completed(self) -> Decision | None:
        """After a session we completed (shutdown, token rotation): the gap OHIP asks for
        before the next subscribe, whatever the close looked like."""
        why, self._completing = self._completing, None
        if why is None:
            return None
        self._gap = Decision(
            Action.RECONNECT, self.settings.connection.resubscribe_gap_s, why, deliberate=True
        )
        return self._gap

    def _after_close(self, exc: ConnectionClosed, started: float | None) -> Decision:
        if started is not None:
            self._session_ended(started)
        rcvd = exc.rcvd
        completed = self._completed()
        if completed is not None:
            return completed
        if self._dead:
            return self.policy.on_close(None, "liveness deadline passed")
        if isinstance(exc.__cause__, WriteStalled):
            return self.policy.on_close(None, f"the gateway stopped reading ({exc.__cause__})")
        if exc.sent is not None and not exc.rcvd_then_sent:  # we closed first
            ours = self.policy.on_closed_by_us(
                exc.sent.code, self.settings.connection.max_frame_bytes, exc.sent.reason
            )
            if ours is not None:
                return ours
        ended, self._ended = self._ended, ""
        said = rcvd.reason if rcvd is not None and rcvd.reason else ended
        return self.policy.on_close(rcvd.code if rcvd else None, said)
