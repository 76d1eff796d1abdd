"""Start-up while the state store cannot be used yet (a PostgreSQL server still booting, an
operator's `dlq replay`, `offset set` or `sink adopt` holding the store for its run): the
start is retried in-process with capped backoff. Exiting 1 at once made systemd restart us
5 s later, and its start limit (5 starts in 10 minutes) left the unit failed for good after
some 30 s.

Only what may clear by itself is waited out (a retriable :class:`~consumer.errors.StoreError`:
the server cannot be reached, is starting or stopping, has no connection free); refused
credentials, a DSN that does not parse, a schema too new, a lease held end the start at once
with their exit status, as before. Each failure is logged in the store's own words (server and
schema, never the DSN) and shown as what the daemon waits for: systemd's ``STATUS=`` (the
start timeout extended meanwhile, so the wait is no start failure) and ``/readyz`` (503, each
stream "starting", "waiting" saying why). A signal ends the wait at once, and cancels an
attempt under way (a sink slow to open would hold the stop for its connect timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from ..config import Settings
from ..core.printable import printable
from ..errors import LeaseHeld, StoreError
from ..logs import REDACTOR
from ..state.lease import OPERATOR_ROLES
from . import systemd
from .metrics import Metrics, MetricsServer
from .status import CommitStatus, FleetStatus, StreamStatus
from .stream import StreamState

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

FIRST_WAIT_S = 1.0
MAX_WAIT_S = 30.0  # between two attempts, at most
# How long systemd is asked to wait for our next word (a failure, or READY=1) beyond the
# next attempt's delay: the attempt, then the rest of the start.
_START_SLACK_S = 90.0


class Stopped(Exception):
    """A signal came while the daemon waited for its state store."""


def _unreachable(exc: BaseException) -> bool:
    """What clears by itself: a server that cannot be reached now, or an operator's command
    holding the store for its run (`dlq replay`, `offset set`, `sink adopt`: a daemon refused
    then, exit 78, would not be restarted by systemd: the stream would stay down after it)."""
    if isinstance(exc, LeaseHeld):
        return exc.holder is not None and exc.holder.get("role") in OPERATOR_ROLES
    return isinstance(exc, StoreError) and exc.retriable


async def when_reachable(
    settings: Settings, start: Callable[[], Awaitable[_T]], stopping: asyncio.Event
) -> _T:
    """``start()``, again while it fails for a state store that cannot be reached now;
    :class:`Stopped` when ``stopping`` is set meanwhile."""
    waiting = _Waiting(settings)

    async def sleep(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)
        if stopping.is_set():
            raise Stopped

    def failed(rs: RetryCallState) -> None:
        exc = rs.outcome.exception() if rs.outcome else None
        delay = rs.next_action.sleep if rs.next_action else 0.0
        why = printable(REDACTOR.scrub(str(exc)), 500)
        log.warning(
            "state store unreachable at start; retrying",
            error=why,
            attempt=rs.attempt_number,
            retry_in_s=round(delay, 1),
        )
        waiting.why = f"waiting for the state store ({why}), retry in {delay:.0f} s"
        systemd.extend_timeout(delay + _START_SLACK_S)
        systemd.status(waiting.why)  # apart: an error's text could make it too long

    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_unreachable),
            wait=wait_exponential_jitter(initial=FIRST_WAIT_S, max=MAX_WAIT_S, jitter=1.0),
            sleep=sleep,
            before_sleep=failed,
            reraise=True,
        ):
            with attempt:
                await waiting.close()  # the daemon's own listener takes the port
                if stopping.is_set():  # a signal during the last attempt
                    raise Stopped
                return await _unless_stopped(start(), stopping)
            await waiting.open()  # between attempts: /readyz says what we wait for
    finally:
        await waiting.close()
    raise AssertionError("unreachable: AsyncRetrying either returns or raises")


async def _unless_stopped(started: Awaitable[_T], stopping: asyncio.Event) -> _T:
    """``started``'s result; cancelled on a signal meanwhile (a sink slow to answer would
    hold the stop for its connect timeout, then exit 1 for its failure): :class:`Stopped`,
    once it has closed what it opened (Daemon.create does, on any exception)."""
    task = asyncio.ensure_future(started)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # ourselves cancelled: it closes what it opened before we go on
        task.cancel()
        await asyncio.wait((task,))
        raise
    finally:
        stop.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait((task,))
    if task.cancelled():
        raise Stopped
    if (exc := task.exception()) is not None and stopping.is_set():
        raise Stopped from exc  # failed as it was stopped (its error is of no account now)
    return task.result()  # done before the stop took: the caller stops the daemon it made


class _Waiting:
    """The metrics listener of a daemon still waiting for its state store: /readyz answers
    503 with each configured stream "starting" and why."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._server: MetricsServer | None = None
        self.why = ""

    async def open(self) -> None:
        m = self._settings.metrics
        if not m.enabled or self._server is not None:
            return
        server = MetricsServer(
            self, Metrics(self, event_timezone=m.event_timezone), m.address, m.port
        )
        try:
            await server.start()
        except OSError:
            return  # the daemon's own start says what is wrong with the address
        self._server = server

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.close()

    # --- the status source of the listener ---------------------------------------------------

    def stream_statuses(self) -> list[StreamStatus]:
        return [
            StreamStatus(
                name=name,
                state=StreamState.STARTING,
                last_close="",
                received=0,
                delivered=0,
                duplicates=0,
                dead_lettered=0,
                ignored=0,
                malformed=0,
                connections=0,
                token_fetches=0,
                token_failures=0,
                closes={},
                in_flight=0,
                position=None,
                checkpoint_moved_at=None,
                last_event_at=None,
                srtt_s=None,
                waiting=self.why,
            )
            for name in self._settings.streams
        ]

    def commit_status(self) -> CommitStatus:
        return CommitStatus(0, None, None)

    def sink_counters(self) -> dict[str, float]:
        return {}

    def fleet_status(self) -> FleetStatus | None:
        return None
