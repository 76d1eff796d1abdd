"""The daemon: wires store, sink, committer, pipelines and streams, and shuts them down.

Shutdown is one fixed, idempotent sequence (first SIGTERM/SIGINT/SIGHUP): streams send
``complete`` and wait for the server to close → pipelines drain within ``drain_timeout_s`` →
workers are cancelled (one that does not end is abandoned, and the process exits 1 once the
rest is done) → a final commit → the resources opened at start (metrics listener, sink,
HTTP client, state store, lease) close in reverse order, each even if another fails. A second
signal exits at once (a stop the daemon began itself counts as no signal); the state on disk
stays consistent because every commit is one transaction and the jsonl sink is cut back to the
committed length on the next start.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401  (see below)
import contextlib
import functools
import gc
import os
import signal
import sys
import time
from asyncio import FIRST_COMPLETED
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, cast

import structlog

from .. import __version__, early_signals, event_loop
from ..config import Settings
from ..config.settings import (
    DOCUMENTED_STOP_S,
    STOP_GRACE_S,
    STOP_SLACK_S,
    StopBudget,
    StopStep,
    stop_budget,
)
from ..core import protocol
from ..core.evidence import describe, shown
from ..core.filters import EventFilter
from ..core.printable import printable
from ..core.records import Fence
from ..core.retention import PruneCutoff
from ..core.upgrade_budget import UpgradeBudget
from ..errors import (
    ConfigError,
    ExitCode,
    LeaseHeld,
    SinkLost,
    SinkUnusable,
    StoreError,
    StreamStopped,
    exit_code_for,
)
from ..logs import REDACTOR
from ..sinks.base import Sink
from ..state import lease, open_store
from ..state.base import StateStore
from . import store_wait, systemd
from .assembly import build_sink, check_sink, http_client, open_sink, register_secrets
from .auth import TokenProvider
from .committer import OPERATOR_FENCE, Committer
from .fleet import DuplicateMember, Fleet, StreamProbe, member_table
from .metrics import Metrics, MetricsServer
from .pipeline import QUEUE_PER_WORKER, StreamPipeline, default_workers
from .progress import ProgressLog
from .status import CommitStatus, FleetStatus, StreamStatus
from .stream import StreamRunner, StreamState

if TYPE_CHECKING:
    from ..state.postgres import PostgresLease, PostgresStore

# concurrent.futures.thread above: the default executor's module, which asyncio.to_thread would
# import at the first commit. Out of file descriptors then, every commit failed on the import.
log = structlog.get_logger(__name__)

SIGNALS = early_signals.SIGNALS  # SIGHUP too: see there
_MOVES = ("fleet-release-", "fleet-lose-")  # the names of the fleet's handover tasks

SHOWN_STATUS_CHARS = 500  # of a stream's last close or wait, in /readyz, STATUS= and `status`

# A sink or state store that cannot be written to (any more): the daemon stops, with the
# status exit_code_for gives (78: an operator must look; 1: a restart may help), whether a
# running daemon's commit or write met it or the stop's final commit.
_UNUSABLE = (SinkUnusable, SinkLost, StoreError)


def for_a_person(text: str) -> str:
    """A stream's last close or what it waits for, as every view shows it (/readyz, systemd's
    STATUS=, ``status``): exception text may hold a secret (websockets' InvalidURI quotes the
    subscription URL and its ``key=``) and a newline (STATUS= would take it for another
    assignment). Masked before it is cut, so no piece of a secret survives at the cut."""
    return printable(REDACTOR.scrub(text), SHOWN_STATUS_CHARS)


@dataclass
class Daemon:
    settings: Settings
    store: StateStore
    sink: Sink
    committer: Committer
    _resources: contextlib.AsyncExitStack
    pipelines: dict[str, StreamPipeline] = field(default_factory=dict)
    runners: dict[str, StreamRunner] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _signals: int = 0  # received; a stop of our own (sink unusable...) counts none
    _closed: bool = False
    # Set when the sink or the store became unusable: nothing drains any more (the worker that
    # met it has ended, and no commit would take the rest), so no stop waits for a drain.
    _undrainable: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int = ExitCode.OK
    metrics_server: MetricsServer | None = None
    metrics: Metrics | None = None
    fleet: Fleet | None = None
    _tokens: dict[str, TokenProvider] = field(default_factory=dict)
    _budgets: dict[str, UpgradeBudget] = field(default_factory=dict)  # one per app key
    _stream_tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _filter: EventFilter | None = None  # [filter]: one for every stream
    _handovers: dict[str, _Handover] = field(default_factory=dict)  # fleet: graceful stops
    _lease: PostgresLease | None = None  # outside a fleet on PostgreSQL: watched (_watch_lease)
    # Workers that did not end when their pipeline's stop cancelled them (a handler that
    # swallows the cancellation): no wait of ours waits for them, and the stop ends with 1.
    abandoned: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    async def create(cls, settings: Settings, *, sink: Sink | None = None) -> Daemon:
        """Open the state store and the sink (``sink`` replaces the configured one)."""
        resources = contextlib.AsyncExitStack()
        try:
            return await cls._create(settings, sink, resources)
        except BaseException:
            await resources.aclose()
            raise

    @classmethod
    async def _create(
        cls, settings: Settings, sink: Sink | None, resources: contextlib.AsyncExitStack
    ) -> Daemon:
        if sink is None:
            check_sink(settings)  # before anything connects
        st = settings.state
        table = None
        watched = None  # outside a fleet on PostgreSQL: a lease its server may drop (run)
        if settings.fleet.enabled:
            # A single daemon on the same schema would consume every stream beside the fleet.
            # It holds the fleet lock exclusively, and our fleet connection holds it shared,
            # taken again on every reconnect, for as long as we run. Its lease too (role
            # "daemon", not a `dlq replay`'s): one of a version before the lock holds only that.
            single = await lease.current_holder(st)
            if single is not None and single.get("role") == "daemon":
                raise LeaseHeld(f"schema {st.schema_} (a daemon outside the fleet)", single)
            table = member_table(settings)
            resources.push_async_callback(table.close)
            await table.connect(st.timeout_s)
        else:
            # One daemon per state store: a second one would fight over the checkpoints (and
            # OHIP would lock one of them out with 4409 anyway). A fleet shares it, with a
            # lease per stream instead (runtime.fleet), and holds the fleet lock we take too.
            held = await lease.acquire(st, settings.streams, outside_fleet=True)
            resources.push_async_callback(held.release)
            if st.backend == "postgres":
                watched = cast("PostgresLease", held)
        store = await open_store(st)
        resources.push_async_callback(store.close)
        if st.backend == "postgres" and not settings.fleet.enabled:
            # ...and a fleet on this schema would share the streams with us: refuse both ways.
            # Members cut off from the server (it restarted) hold no fleet lock until they
            # reconnect, but have live rows (they stop their streams before those expire).
            members = await lease.current_holder(st, fleet=True)
            if members is not None:
                raise LeaseHeld(
                    f"schema {st.schema_} (fleet members; set [fleet] enabled)", members
                )
        fence = None
        if watched is not None:
            # Our lease is free while its session is gone, until _watch_lease takes it again:
            # an operator's `offset set/reset` taking it then moves these epochs, and our
            # commits after it are refused (the change stands, see PostgresStore.stream_epochs).
            epochs = await cast("PostgresStore", store).stream_epochs(settings.streams)
            fence = Fence("", epochs)
        http = http_client(settings)
        resources.push_async_callback(http.close)
        tokens = {name: TokenProvider(http, stream) for name, stream in settings.streams.items()}
        await _check_checkpoints(store, settings)
        if sink is None:
            sink = build_sink(settings, http, tokens)
        await open_sink(sink, store, st.path)
        resources.push_async_callback(sink.close)
        committer = Committer(
            store,
            sink,
            max_events=st.commit_max_events,
            interval_s=st.commit_interval_ms / 1000,
            adaptive=st.commit_mode == "adaptive",
            min_interval_s=st.commit_min_interval_ms / 1000,
            event_timezone=settings.metrics.event_timezone,
        )
        self = cls(settings, store, sink, committer, resources)
        self._lease = watched
        self._tokens = tokens
        self._filter = EventFilter.from_settings(settings.filter)
        if settings.fleet.enabled:
            fleet = self.fleet = Fleet(
                settings,
                start_stream=self.start_stream,
                stop_stream=self.stop_stream,
                spawn=self._spawn,
                table=table,
                probe=self._stream_probe,
            )
            committer.configure_fence(fleet.fence, fleet.lost)
        else:
            if fence is not None:
                committer.configure_fence(lambda: fence, self._changed_meanwhile, OPERATOR_FENCE)
            for name in settings.streams:
                await self._build_stream(name)
        m = settings.metrics
        if m.enabled:
            metrics = self.metrics = Metrics(self, event_timezone=m.event_timezone)
            for name, pipeline in self.pipelines.items():
                pipeline.on_write = metrics.observer(name)
            server = MetricsServer(self, metrics, m.address, m.port)
            try:
                await server.start()
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen for metrics on {m.address}:{m.port} ({exc}): set [metrics] "
                    "address and port, or enabled = false"
                ) from None
            resources.push_async_callback(server.close)
            self.metrics_server = server
        return self

    # --- streams: all of them, or (fleet mode) those whose lease this member holds --------

    async def start_stream(self, name: str) -> None:
        await self._build_stream(name)
        self._launch(name)

    async def _build_stream(self, name: str) -> None:
        settings = self.settings
        stream = settings.streams[name]
        c, p = stream.connection, settings.pipeline
        budget = self._budgets.setdefault(
            protocol.key_hash(stream.app_key.get_secret_value()),
            UpgradeBudget(c.upgrade_limit, c.upgrade_window_s),
        )
        workers = p.workers or default_workers(self.sink)
        pipeline = StreamPipeline(
            name,
            sink=self.sink,
            committer=self.committer,
            workers=workers,
            queue_size=p.queue_size or QUEUE_PER_WORKER * workers,
            queue_max_bytes=p.queue_max_bytes,
            batch_max=p.batch_max,
            retry_initial_s=p.sink_retry_initial_s,
            retry_max_s=p.sink_retry_max_s,
            # The parked resources are the DLQ's rows, asked about per batch (runtime/parking),
            # never all loaded: a DLQ of a million would be a GB here.
            park_key=stream.on_permanent_failure == "park-key",
            event_filter=self._filter,
            # No write past the self-fence deadline (a process paused past its leases), nor
            # once the stream is found lost.
            past_fence=(
                None if self.fleet is None else functools.partial(self.fleet.past_fence, name)
            ),
        )
        if self.metrics is not None:
            pipeline.on_write = self.metrics.observer(name)
        check = c.status_check == "on" or (c.status_check == "auto" and settings.fleet.enabled)
        runner = StreamRunner(
            name,
            stream,
            tokens=self._tokens[name],
            pipeline=pipeline,
            store=self.store,
            budget=budget,
            status_check=check,
        )
        # The checkpoint gauge from the start, not from a first commit here (a sink down from
        # the start would leave the stuck-checkpoint alert no series): when the store last
        # wrote it, or now for a stream without one.
        cp = await self.store.checkpoint(name)
        age = 0.0 if cp is None else max(0.0, time.time() - cp.updated_at)
        self.committer.checkpointed_at[name] = time.monotonic() - age
        self.pipelines[name], self.runners[name] = pipeline, runner

    def _launch(self, name: str) -> None:
        pipeline, runner = self.pipelines[name], self.runners[name]
        pipeline.start()
        for t in pipeline.tasks:
            self._tasks.add(t)
            t.add_done_callback(self._task_done)
        self._stream_tasks[name] = self._spawn(runner.run(), f"stream-{name}")

    async def stop_stream(self, name: str, lost: bool) -> None:
        """Stop one stream (fleet mode). Handed over (``lost`` False): ``complete``, drain,
        commit, as at shutdown. Lost (another member holds it, or we cannot renew): stop
        delivering and reading at once; what is done is offered to one more commit, which the
        epoch lets through only if no one took the stream meanwhile. Lost while its handover
        is under way: that stop goes on as a lost one's (this call cuts it and returns)."""
        runner, pipeline = self.runners.get(name), self.pipelines.get(name)
        handover = self._handovers.get(name)
        if lost and handover is not None:
            log.warning("stream found lost while handed over: stopping it at once", stream=name)
            handover.lost.set()
            if pipeline is not None:
                await _cut(handover.session, pipeline)
            return
        task = self._stream_tasks.pop(name, None)
        if runner is None or pipeline is None:
            return
        c = self.settings.streams[name].connection
        grace = c.complete_timeout_s + STOP_GRACE_S  # the settings check counts on it
        lost_grace = (
            grace if self.fleet is None else min(grace, self.fleet.settings.renew_interval_s)
        )
        if lost:
            await _cut(task, pipeline)
            await _end(task, lost_grace)
        else:
            handover = self._handovers[name] = _Handover(task)
        try:
            if handover is not None:
                runner.request_stop()
                if task is not None and not await handover.until_lost(task, grace):
                    await _end(task, lost_grace if handover.lost.is_set() else 0.0)
                drained = asyncio.ensure_future(self._drained(pipeline))
                try:
                    if (
                        not await handover.until_lost(
                            drained, self.settings.pipeline.drain_timeout_s
                        )
                        and not handover.lost.is_set()
                    ):
                        log.warning(
                            "drain deadline passed; the next holder replays the rest",
                            stream=name,
                        )
                finally:
                    drained.cancel()
                    await asyncio.gather(drained, return_exceptions=True)
                lost = handover.lost.is_set()
            grace = lost_grace if lost else grace
            await pipeline.stop()
            try:
                await asyncio.wait_for(self.committer.flush(), grace)
            except Exception as exc:
                log.warning("commit before handing over failed", stream=name, error=describe(exc))
        finally:
            self._handovers.pop(name, None)
        self.committer.forget(name)
        self.abandoned.update(pipeline.abandoned)
        self.runners.pop(name, None)
        self.pipelines.pop(name, None)
        log.info("stream stopped here", stream=name, lost=lost)

    async def _drained(self, pipeline: StreamPipeline) -> None:
        """Until ``pipeline`` is drained, or nothing can drain any more (the sink or the store
        became unusable meanwhile: a handover's drain then ends as the shutdown's does)."""
        drained = asyncio.ensure_future(pipeline.drained())
        undrainable = asyncio.ensure_future(self._undrainable.wait())
        try:
            await asyncio.wait([drained, undrainable], return_when=FIRST_COMPLETED)
        finally:
            for f in (drained, undrainable):
                f.cancel()
            await asyncio.gather(drained, undrainable, return_exceptions=True)

    # --- the read-only view (metrics, readiness, systemd) -----------------------------------

    def stream_statuses(self) -> list[StreamStatus]:
        out = []
        for name, runner in self.runners.items():
            pipeline, stats = self.pipelines[name], runner.stats
            liveness = runner.liveness
            out.append(
                StreamStatus(
                    name=name,
                    state=runner.state,
                    last_close=for_a_person(stats.last_close),
                    received=stats.events_received,
                    delivered=pipeline.delivered,
                    duplicates=pipeline.duplicates,
                    dead_lettered=pipeline.dead_lettered,
                    sink_retries=pipeline.sink_retries,
                    sink_failing_since=pipeline.sink_failing_since,
                    ignored=stats.ignored,
                    resume_gaps=stats.resume_gaps,
                    paused_pings=stats.paused_pings,
                    malformed=stats.malformed,
                    connections=stats.connections,
                    token_fetches=runner.token_fetches,
                    token_failures=runner.token_failures,
                    closes=dict(stats.closes),
                    filtered=dict(pipeline.filtered),
                    in_flight=pipeline.in_flight,
                    position=pipeline.position,
                    checkpoint_moved_at=self.committer.checkpointed_at.get(name),
                    last_event_at=stats.last_event,
                    srtt_s=None if liveness is None else liveness.srtt,
                    waiting=for_a_person(runner.waiting_for()),
                )
            )
        return out

    def commit_status(self) -> CommitStatus:
        c = self.committer
        error = for_a_person(c.last_error) if c.last_error else ""
        return CommitStatus(c.failures, c.failing_since, c.busy_since, error)

    def sink_counters(self) -> dict[str, float]:
        return self.sink.counters()

    def fleet_status(self) -> FleetStatus | None:
        f = self.fleet
        if f is None:
            return None
        c = f.counters
        return FleetStatus(
            member=f.member,
            leases_held=f.leases_held,
            members_live=f.members_live,
            takeovers=c.takeovers,
            lost=c.lost,
            fencing_rejections=self.committer.fencing_rejections,
            self_fenced=c.self_fenced,
            released_unreachable=c.released_unreachable,
        )

    def _stream_probe(self, name: str) -> StreamProbe | None:
        runner = self.runners.get(name)
        if runner is None:
            return None
        closes = runner.stats.closes
        return StreamProbe(runner.state, closes["4409"] + closes["status_active"])

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if isinstance(exc, StreamStopped):
            if all(r.state is StreamState.STOPPED for r in self.runners.values()):
                log.error("every stream has stopped; exiting", exit_code=int(ExitCode.CONFIG))
                self.exit_code = ExitCode.CONFIG
                self._stop.set()
            return
        if isinstance(exc, DuplicateMember):
            log.error(
                "fleet member name in use; stopping",
                error=describe(exc),
                exit_code=int(ExitCode.CONFIG),
            )
            self.exit_code = ExitCode.CONFIG
        elif isinstance(exc, LeaseHeld):  # the fleet's: a daemon outside the fleet runs
            log.error(
                "a daemon outside the fleet holds the schema; stopping",
                error=describe(exc),
                exit_code=int(ExitCode.CONFIG),
            )
            self.exit_code = ExitCode.CONFIG
        elif isinstance(exc, _UNUSABLE):
            # Writing on could lose data: an operator must look (exit 78), unless a restart
            # helps (a state store that may clear, a sink's lost writes replayed: exit 1).
            what = "state store" if isinstance(exc, StoreError) else "sink"
            code = exit_code_for(exc)
            log.error(f"{what} unusable; stopping", error=describe(exc), exit_code=int(code))
            self.exit_code = code
            self._undrainable.set()
        else:
            log.error("task failed; shutting down", task=task.get_name(), exc_info=exc)
            self.exit_code = ExitCode.SOFTWARE
        self._stop.set()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            self._spawn(self.committer.run(), "committer")
            self._spawn(self._prune_forever(), "pruner")
            if (lg := self.settings.log).progress_interval_s > 0:
                progress = ProgressLog(
                    self,
                    interval_s=lg.progress_interval_s,
                    caught_up_s=lg.progress_caught_up_s,
                    event_timezone=self.settings.metrics.event_timezone,
                )
                self._spawn(progress.run(), "progress")
            if self._lease is not None:
                self._spawn(self._watch_lease(self._lease), "lease-watch")
            if self.fleet is None:
                for name in self.runners:
                    self._launch(name)
            else:
                self._spawn(self.fleet.run(), "fleet")
            self._spawn(self._report_to_systemd(), "systemd")
            if self.settings.allow_insecure_http:
                log.warning(
                    "allow_insecure_http = true: credentials and events may travel over plain "
                    "http:// to hosts other than loopback; use it on a trusted test network only"
                )
            for key, what, fix in self.settings.shared_warnings():  # each stream logs its own
                log.warning("configuration warning", key=key, problem=what, fix=fix)
            most = stop_budget(self.settings).total_s + STOP_SLACK_S
            if most > DOCUMENTED_STOP_S and not (
                os.environ.get("NOTIFY_SOCKET")  # systemd: the stop extends its timeout
            ):
                log.warning(
                    f"a stop may take longer than a {DOCUMENTED_STOP_S:g} s grace: give docker "
                    "stop -t, "
                    "stop_grace_period or terminationGracePeriodSeconds at least stop_within_s "
                    "(a plain docker stop gives 10 s), or lower pipeline.drain_timeout_s, "
                    "connection.complete_timeout_s or a nats or redis sink's timeout_s; "
                    "killed, it is safe but reported failed",
                    stop_within_s=round(most),
                )
            log.info(
                "opera-consumer running",
                version=__version__,
                event_loop=event_loop.running(),
                streams=list(self.runners),
                fleet_member=None if self.fleet is None else self.fleet.member,
                filter=None
                if self._filter is None or self._filter.passes_all
                else repr(self._filter),
            )
            await self._stop.wait()
        finally:
            await self.close()
            for sig in SIGNALS:
                loop.remove_signal_handler(sig)
        return self.exit_code

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            _exit_now(sig)
        log.info("signal received: draining", signal=sig.name)
        if sig == signal.SIGHUP and self.exit_code == ExitCode.OK:
            self.exit_code = ExitCode.RUNTIME  # a status we chose (78: do not restart) stays
        self._stop.set()

    async def close(self) -> None:
        """The shutdown sequence; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        systemd.notify("STOPPING=1")
        budget = stop_budget(self.settings)
        _extend_stop(budget, "streams_s")
        systemd.status("draining")
        if self.fleet is not None:
            self.fleet.stop_acquiring()
        streams = [t for t in self._stream_tasks.values() if not t.done()]
        for r in self.runners.values():
            r.request_stop()
        await _wait(streams, budget.streams_s)
        for t in streams:  # still reading after the grace period: stop intake now
            t.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        _extend_stop(budget, "drain_s")
        started = time.monotonic()
        deadline = 0.0 if self._undrainable.is_set() else budget.drain_s
        # Copies: a fleet handover under way may stop a stream (and drop it) meanwhile.
        for name, pipeline in list(self.pipelines.items()):
            left = max(0.0, deadline - (time.monotonic() - started))
            try:
                await asyncio.wait_for(self._drained(pipeline), left)
                drained = not self._undrainable.is_set()
            except TimeoutError:
                drained = False
            if not drained and pipeline.in_flight:
                log.warning(
                    "not drained (the sink or the state store is unusable); the rest is "
                    "replayed on the next start"
                    if self._undrainable.is_set()
                    else "drain deadline passed; the rest is replayed on the next start",
                    stream=name,
                    in_flight=pipeline.in_flight,
                )
        # Together: each gives a worker stuck in its sink CANCEL_GRACE_S to end, at most.
        await asyncio.gather(*[p.stop() for p in list(self.pipelines.values())])
        # A handover under way ends as it would have (drained, committed, released): cancelled,
        # its stream would be dropped before hand_over() releases it (held until the lease ran
        # out) and its last commit refused. Each is bounded by the time the settings allow it.
        moving = [t for t in self._tasks if t.get_name().startswith(_MOVES)]
        if moving and self.fleet is not None:
            _extend_stop(budget, "handovers_s")
            await _wait(moving, budget.handovers_s)
        for pipeline in self.pipelines.values():  # those a handover stopped: recorded there
            self.abandoned.update(pipeline.abandoned)
        if self.abandoned and self.exit_code == ExitCode.OK:
            self.exit_code = ExitCode.RUNTIME  # the process ends under them (run)
        # Not the abandoned workers: cancelled again, they would be waited for for ever.
        rest = [t for t in self._tasks if t not in self.abandoned]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        _extend_stop(budget, "commit_s")
        try:
            await self.committer.flush()
        except Exception as exc:
            # As a running daemon's would (_task_done): a sink or store unusable stops with 78
            # whatever status the stop had (systemd must not restart into it), or 1.
            code = exit_code_for(exc) if isinstance(exc, _UNUSABLE) else ExitCode.RUNTIME
            if self.exit_code == ExitCode.OK or code == ExitCode.CONFIG:
                self.exit_code = code
            log.error(
                "final commit failed; uncommitted events are replayed on the next start",
                error=describe(exc),
                exit_code=int(self.exit_code),
            )
        if self.fleet is not None:
            await self.fleet.hand_over()  # committed: the next members may take over now
        # Asked before the close: a NATS or Redis sink's connection to a frozen server takes
        # its timeout_s to close, past what the commit's extension left.
        _extend_stop(budget, "close_s")
        try:
            await self._resources.aclose()  # each closes even if another fails
        except Exception as exc:
            log.error("closing failed", error=describe(exc))
        log.info(
            "stopped",
            delivered={n: p.delivered for n, p in self.pipelines.items()},
            abandoned_workers=len(self.abandoned),
            exit_code=self.exit_code,
        )

    def status_line(
        self, stored: dict[str, str] | None = None, limit: int = systemd.STATUS_MAX_BYTES
    ) -> str:
        """Per stream: its state, offset and what it waits for; ``stored``: the checkpoints on
        disk, the offset of a stream that has done nothing yet in this run. Longer than
        ``limit`` bytes: how many streams are in each state, then as many as fit (those not
        streaming first) and how many more."""
        parts = []  # (streaming, its line)
        for name, runner in self.runners.items():
            done = self.pipelines[name].position
            offset = done.offset if done else (stored or {}).get(name, "-")
            waiting = for_a_person(runner.waiting_for())
            parts.append(
                (
                    runner.state is StreamState.STREAMING,
                    f"{name}: {runner.state.value}, offset {offset}"
                    + (f" ({waiting})" if waiting else ""),
                )
            )
        line = "; ".join(part for _, part in parts)
        if len(line.encode()) <= limit:
            return line
        states = Counter(r.state.value for r in self.runners.values())
        head = f"{len(parts)} streams: " + ", ".join(f"{n} {s}" for s, n in states.most_common())
        room = limit - len(f"{head}; … and {len(parts)} more".encode())
        shown = []
        for _, part in sorted(parts, key=lambda p: p[0]):
            room -= len(part.encode()) + 2
            if room < 0:
                break
            shown.append(part)
        return "; ".join([head, *shown, f"… and {len(parts) - len(shown)} more"])

    async def _report_to_systemd(self) -> None:
        """READY=1 once local set-up is done (never waiting for OHIP: an outage must not
        become a restart loop); then STATUS= and, under WatchdogSec=, WATCHDOG=1 from this
        loop, so a blocked loop gets the process restarted."""
        period = systemd.watchdog_period()
        stored = await self._stored_offsets(period)
        if self._stop.is_set():
            # Stopping already (a signal while starting): systemd, still in its start state,
            # would take READY=1 after STOPPING=1 for a completed start of a stopping process.
            return
        systemd.notify("READY=1")  # alone: a datagram too long for systemd is lost whole
        systemd.status(self.status_line(stored))
        while True:
            await asyncio.sleep(period or 5.0)
            # Local health only (the upstream being down is no reason to restart): this loop
            # runs, and nothing has held the store's writer (a commit, a prune) for a minute.
            busy = self.committer.writing_since
            healthy = busy is None or time.monotonic() - busy < 60.0
            if period and healthy:
                systemd.notify("WATCHDOG=1")
            # Still beating while we drain (a drain may outlast WatchdogSec), saying so.
            prefix = "draining: " if self._closed else ""
            stored = await self._stored_offsets(period)
            systemd.status(
                prefix + self.status_line(stored, systemd.STATUS_MAX_BYTES - len(prefix))
            )

    async def _stored_offsets(self, period: float | None) -> dict[str, str]:
        """The checkpoints on disk while a stream has done nothing in this run (connecting,
        waiting for a token): where it resumes, as ``status`` shows it, not "-"."""
        if all(p.position is not None for p in self.pipelines.values()):
            return {}
        try:  # a status line: never holding up the watchdog's beat for long
            async with asyncio.timeout(min(1.0, (period or 2.0) / 2)):
                return {c.stream: printable(c.offset, 40) for c in await self.store.checkpoints()}
        except (StoreError, TimeoutError):  # the committer reports the store's troubles
            return {}

    async def _watch_lease(self, held: PostgresLease) -> None:
        """Outside a fleet on PostgreSQL, the lease is a session advisory lock, which the
        server drops with the session while we run on (a server restart, the backend
        terminated, a cut it gave up on): a second daemon or a fleet member could then start
        beside us. Checked every ``[state] lease_check_interval_s`` (each check and each
        attempt within ``timeout_s``; timed from its start, as the fleet's ticks are), and
        taken again once lost, as often as it takes while the server cannot answer.

        The streams run on while the lease is unconfirmed: a session's end is no sign that
        another daemon runs (a server restart ends every session), and stopping would spend
        every stream's reconnects and upgrades on each blip. No one can take the lease while
        the server is unreachable (and our commits fail then: nothing becomes durable);
        once it answers, the first attempt tells, and a daemon that won the race still has
        its start ahead (store, sink, connects) before delivering anything. Found taken, every
        stream is cut at once and its uncommitted work dropped (a commit now would write over
        the new holder's), and the daemon exits 78."""
        interval = self.settings.state.lease_check_interval_s
        while True:
            started = time.monotonic()
            if not await held.check() and not await self._retake_lease(held, interval):
                return
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _retake_lease(self, held: PostgresLease, interval: float) -> bool:
        """Until the lease is ours again (True), or found another's (False: stopping)."""
        lost_at, said = time.monotonic(), ""
        schema = self.settings.state.schema_
        log.warning("state store lease lost (its PostgreSQL session ended); taking it again")
        while True:
            started = time.monotonic()
            try:
                await held.retake()
            except LeaseHeld as exc:
                await self._lease_taken(exc)
                return False
            except StoreError as exc:
                if describe(exc) != said:  # once per different reason, not every attempt
                    said = describe(exc)
                    log.warning("cannot take the state store lease again yet; retrying", error=said)
            else:
                log.info(
                    "state store lease taken again",
                    schema=schema,
                    after_s=round(time.monotonic() - lost_at, 1),
                )
                return True
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _lease_taken(self, exc: LeaseHeld) -> None:
        """Another daemon (or a fleet member) holds the schema now and runs every stream: ours
        stop delivering at once, nothing more of theirs is committed, and we exit 78. An
        operator's command (`offset set`, `sink adopt`, `dlq replay`) that took the free lease
        is changing what we would commit: we stop the same way, but exit 1 for a restart (it
        lets go in seconds; 78, which systemd does not restart, left the stream down)."""
        holder = exc.holder or {}
        command = holder.get("role") not in (None, "daemon") and not holder.get("member")
        code = ExitCode.RUNTIME if command else ExitCode.CONFIG
        log.error(
            "state store lease taken by an operator's command while ours was lost: stopping "
            "every stream at once; a restart takes it again once the command is done"
            if command
            else "state store lease taken by another process while ours was lost: stopping "
            "every stream at once",
            error=describe(exc),
            role=holder.get("role"),
            exit_code=int(code),
        )
        await self._stop_at_once(code)

    def _changed_meanwhile(self, streams: frozenset[str]) -> None:
        """The store refused a commit (outside a fleet, on PostgreSQL): an operator's `offset
        set/reset` changed these streams while our lease was lost, and our in-memory position
        would write over the change. We stop as for a command that holds the lease, exit 1:
        the restart takes the lease again and resumes where the operator said."""
        if self._undrainable.is_set():
            return  # stopping so already
        log.error(
            "streams changed by an operator's command while the state store lease was lost: "
            "stopping every stream at once; a restart resumes where the command set them",
            streams=sorted(streams),
            exit_code=int(ExitCode.RUNTIME),
        )
        self._spawn(self._stop_at_once(ExitCode.RUNTIME), "lease-fenced")

    async def _stop_at_once(self, code: ExitCode) -> None:
        """Every stream cut at once and its uncommitted work dropped (a commit now would write
        over another's change), then the stop, exiting ``code``."""
        self.exit_code = code
        self._undrainable.set()  # no drain waits: nothing of ours may reach the sink now
        for name, pipeline in list(self.pipelines.items()):
            await _cut(self._stream_tasks.get(name), pipeline)
            self.committer.forget(name)
        self._stop.set()

    async def _prune_forever(self) -> None:
        st = self.settings.state
        cutoffs = PruneCutoff(st.processed_retention_days * 86400)
        while True:
            # A fleet member prunes the streams it holds: the members share the work.
            streams = None if self.fleet is None else sorted(self.fleet.epochs)
            try:
                newest = await self.store.newest_processed_at() if cutoffs.first else None
                cutoff = cutoffs.next(time.time(), time.monotonic(), newest)
                n = 0 if streams == [] else await self.committer.prune(cutoff, streams)
            except Exception:
                log.exception("pruning processed event ids failed; retrying later")
            else:
                if n:
                    log.info("pruned processed event ids", rows=n)
            await asyncio.sleep(st.prune_interval_s)


async def _check_checkpoints(store: StateStore, settings: Settings) -> None:
    """A stored offset the subscription would refuse could never be resumed from: say so now."""
    for name in settings.streams:
        cp = await store.checkpoint(name)
        if cp is not None and not protocol.valid_offset(cp.offset):
            raise ConfigError(
                f"stream {name}: the stored checkpoint offset {shown(cp.offset, 40)!r} is not "
                f"1-20 digits, so no subscription can resume from it: run `opera-consumer "
                f"offset set {name} <offset> --execute` (or `offset reset {name} --highest "
                f"--execute`)"
            )


def _extend_stop(budget: StopBudget, step: StopStep) -> None:
    """Ask systemd (236 and later) to wait for the rest of the stop, from ``step`` on, past
    TimeoutStopSec= if need be: every step is bounded, so a long drain ends as it should and
    is not killed (and reported failed, a fleet's streams then waiting out their leases).
    systemd only ever lengthens its timeout by this; outside systemd it is a no-op."""
    systemd.extend_timeout(budget.left(step) + STOP_SLACK_S)


async def _wait(tasks: list[asyncio.Task[None]], seconds: float) -> None:
    if tasks:
        await asyncio.wait(tasks, timeout=seconds)


async def _end(task: asyncio.Task[None] | None, seconds: float) -> None:
    """Give a stream's session ``seconds`` more to end, then cancel it."""
    if task is not None:
        await _wait([task], seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _cut(session: asyncio.Task[None] | None, pipeline: StreamPipeline) -> None:
    """A lost stream: another member may be delivering it already, so every write from here on
    could be a second one. The workers stop (what is not done is the next holder's), and the
    session is cut rather than completed."""
    if session is not None:
        session.cancel()
    await pipeline.stop()


class _Handover:
    """A stream's graceful stop under way (fleet mode), which a loss found meanwhile (another
    member holds the stream now) turns into a lost one's: what it still waits for (the
    session's close, the drain) would deliver beside the new holder."""

    def __init__(self, session: asyncio.Task[None] | None) -> None:
        self.session = session
        self.lost = asyncio.Event()

    async def until_lost(self, waited: asyncio.Future[Any], seconds: float) -> bool:
        """Wait for ``waited`` within ``seconds``, or till found lost; whether it ended."""
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            await asyncio.wait([waited, lost], timeout=seconds, return_when=FIRST_COMPLETED)
        finally:
            lost.cancel()
        return waited.done()


async def run(settings: Settings) -> int:
    register_secrets(settings)
    # Signals during start-up (the lease, the store, a sink that is slow to answer): the
    # default action would kill us by the signal, which systemd takes for a clean exit after
    # SIGHUP. Noted: the start under way is cancelled (store_wait.when_reachable: what it
    # opened closed), or, if it finished first, the daemon stops at once.
    loop = asyncio.get_running_loop()
    early: list[signal.Signals] = []
    stopping = asyncio.Event()  # ends a wait for the state store at once
    daemon: Daemon | None = None

    def on_signal(sig: signal.Signals) -> None:
        if daemon is not None:  # dispatched late, after the check below: the daemon's own
            daemon._on_signal(sig)
            return
        if early:
            _exit_now(sig)
        log.info("signal received while starting: stopping once started", signal=sig.name)
        early.append(sig)
        stopping.set()

    for sig in SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    if (noted := early_signals.take()) is not None:  # one before this loop handled them
        on_signal(noted)
    try:
        daemon = await store_wait.when_reachable(
            settings, lambda: Daemon.create(settings), stopping
        )
    except BaseException as exc:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
        if isinstance(exc, store_wait.Stopped):  # nothing started, nothing to drain
            return ExitCode.RUNTIME if early[0] == signal.SIGHUP else ExitCode.OK
        raise
    if early:
        if early[0] == signal.SIGHUP:
            daemon.exit_code = ExitCode.RUNTIME
        daemon._signals = len(early)  # the next one exits at once
        daemon.request_stop()
    tune_gc()
    # Our handlers stay until Daemon.run replaces them (no await between): a signal in
    # between is delivered to its handler, never to the default action that would kill us.
    code = await daemon.run()
    # Stopped, committed and closed: the process ends now, with its code. asyncio's teardown
    # would wait without a limit for the default executor's threads (a getaddrinfo a cancelled
    # connect left to a DNS server that does not answer: some 30 s, outside the stop budget,
    # with our signal handlers gone, so that a second SIGTERM killed us by the signal), and
    # cancel any abandoned worker once more and wait for it: for ever.
    _exit(code)


def _exit_now(sig: signal.Signals) -> NoReturn:
    log.warning("second signal: exiting now", signal=sig.name)
    # The store is transactional and the jsonl tail is cut on restart: nothing to save.
    _exit(ExitCode.INTERRUPTED)


def _exit(code: int) -> NoReturn:
    """End the process now, without asyncio's or the interpreter's teardown."""
    # A reader of our log gone (a dead pipe) must not keep us from exiting.
    for out in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            out.flush()
    os._exit(code)


def tune_gc() -> None:
    """Every parsed event is a tree of dicts that reference counting frees; the cyclic
    collector only finds nothing in them, yet at its default threshold (700 allocations) it ran
    thousands of times a second in a catch-up and walked every queued event each time (~20% of
    the CPU per event, measured). What start-up built is frozen out of its walks, and the
    youngest generation is collected a hundred times less often; the older ones keep their
    default ratios, so cycles that outlive a collection (an HTTP client makes some per request) are
    still freed within seconds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(70_000, 10, 10)
