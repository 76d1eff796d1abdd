"""Prometheus metrics, /healthz and /readyz, served from the daemon's own event loop.

Served on the loop on purpose: a blocked loop stops answering, and the health check fails.
Counters that the pipeline already keeps are read at scrape time (nothing added to the
per-event path); only the two latency histograms are observed, once per sink write.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import h11
import orjson
import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import gzip_accepted
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .. import __version__
from ..core.events import Event, event_time
from ..core.evidence import shown
from ..core.printable import printable
from ..http11 import read_request, reject, request_path, respond
from ..http_client import read_at_most
from ..logs import RateLimitedLogger
from .status import FleetStatus, StatusSource
from .stream import StreamState

_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 86400)
# How far ahead of our clock an event's timestamp may be and still count for the lag (the
# gateway's clock and ours may disagree a little). One within it holds the lag at 0 until
# our clock passes it, at most this long.
FUTURE_SLACK_S = 60.0


class Metrics:
    def __init__(self, source: StatusSource, *, event_timezone: str = "UTC") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.newest: dict[str, float] = {}  # stream -> event time of the newest delivered event
        self.registry.register(_StatusCollector(source, self.newest))
        # What the default registry would carry: process_* (CPU, memory, fds, start time),
        # python_info and python_gc_*; and which build is running, as the usual _info gauge.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        Info("opera_consumer_build", "The running build.", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self._zone = ZoneInfo(event_timezone)
        self.sink_seconds = Histogram(
            "opera_consumer_sink_write_seconds",
            "Time to hand a batch to the sink.",
            ["stream"],
            registry=self.registry,
        )
        self.end_to_end = Histogram(
            "opera_consumer_end_to_end_seconds",
            "From the event's timestamp to its delivery to the sink (newest of each batch).",
            ["stream"],
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )

    def observer(self, stream: str) -> Callable[[float, Event], None]:
        sink = self.sink_seconds.labels(stream)
        e2e = self.end_to_end.labels(stream)
        zone = self._zone

        def observe(seconds: float, newest: Event) -> None:
            sink.observe(seconds)
            produced = event_time(newest.timestamp, zone)
            if produced is not None:
                now = time.time()
                e2e.observe(max(0.0, now - produced))  # clocks may disagree
                # A timestamp further ahead than clocks disagree is no sign of being caught
                # up: kept, one such event would hold the lag at 0 for good (the max).
                if produced <= now + FUTURE_SLACK_S:
                    self.newest[stream] = max(produced, self.newest.get(stream, produced))

        return observe

    def scrape(self) -> bytes:
        return generate_latest(self.registry)

    def exposition(self, accept_encoding: str) -> tuple[bytes, dict[str, str]]:
        """The scrape and its extra headers: gzipped when the client accepts it (Prometheus
        does), as prometheus-client's own servers do."""
        body = self.scrape()
        if not gzip_accepted(accept_encoding):
            return body, {"Vary": "Accept-Encoding"}
        return gzip.compress(body), {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}


class _StatusCollector(Collector):
    def __init__(self, source: StatusSource, newest: dict[str, float]) -> None:
        self._source = source
        self._newest = newest

    def collect(self) -> Iterator[Metric]:
        # The runtime keeps monotonic times; exported as Unix time (Prometheus practice:
        # timestamps, not "seconds since", so that `time() - x` works after any scrape gap).
        to_wall = time.time() - time.monotonic()
        label = ["stream"]

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"opera_consumer_{name}", doc, labels=label)

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"opera_consumer_{name}", doc, labels=label)

        received = counter("events_received", "Events read from the stream.")
        processed = counter("events_processed", "Events delivered to the sink.")
        dedup = counter("events_deduplicated", "Events already processed, skipped.")
        dead = counter("events_dead_lettered", "Events and frames sent to the DLQ.")
        retries = counter(
            "sink_retries", "Failed sink writes retried (a sink down or refusing for a while)."
        )
        ignored = counter("frames_ignored", "Frames for a subscription id that is not ours.")
        connections = counter("connections", "WebSocket connections opened.")
        gaps = counter(
            "resume_gaps",
            "Resumes whose replay brought a new event before the checkpoint's own: events "
            "between them were lost (e.g. to OHIP's 7-day retention).",
        )
        paused_pings = counter(
            "paused_pings_answered",
            "Server pings answered while the reader waited for room downstream (read ahead).",
        )
        tokens = counter("token_refreshes", "OAuth token requests sent (retries included).")
        token_failures = counter(
            "token_failures", "OAuth token requests refused, unanswered or without a token."
        )
        closes = CounterMetricFamily(
            "opera_consumer_closes", "Sessions ended, by close code.", labels=["stream", "code"]
        )
        filtered = CounterMetricFamily(
            "opera_consumer_events_filtered",
            "Events the [filter] kept from the sink (checkpointed all the same), by reason.",
            labels=["stream", "reason"],
        )
        depth = gauge("queue_depth", "Events read and not yet done.")
        connected = gauge("connected", "1 while subscribed.")
        ready = gauge("ready", "1 while streaming or in a deliberate wait.")
        moved = gauge("checkpoint_timestamp_seconds", "Unix time the checkpoint last moved.")
        last = gauge("last_event_timestamp_seconds", "Unix time the last event arrived.")
        srtt = gauge("srtt_seconds", "Smoothed ping round-trip time.")
        lag = gauge("lag_seconds", "Now minus the newest delivered event's timestamp.")
        for st in self._source.stream_statuses():
            name = [st.name]
            received.add_metric(name, st.received)
            processed.add_metric(name, st.delivered)
            dedup.add_metric(name, st.duplicates)
            dead.add_metric(name, st.dead_lettered)
            retries.add_metric(name, st.sink_retries)
            ignored.add_metric(name, st.ignored)
            connections.add_metric(name, st.connections)
            gaps.add_metric(name, st.resume_gaps)
            paused_pings.add_metric(name, st.paused_pings)
            tokens.add_metric(name, st.token_fetches)
            token_failures.add_metric(name, st.token_failures)
            for code, n in st.closes.items():
                closes.add_metric([st.name, code], n)
            for reason, n in st.filtered.items():
                filtered.add_metric([st.name, reason], n)
            depth.add_metric(name, st.in_flight)
            connected.add_metric(name, 1.0 if st.state is StreamState.STREAMING else 0.0)
            ready.add_metric(name, 1.0 if st.state.ready else 0.0)
            if st.checkpoint_moved_at is not None:
                moved.add_metric(name, st.checkpoint_moved_at + to_wall)
            if st.last_event_at is not None:
                last.add_metric(name, st.last_event_at + to_wall)
            if st.srtt_s is not None:
                srtt.add_metric(name, st.srtt_s)
            if st.name in self._newest:
                lag.add_metric(name, max(0.0, time.time() - self._newest[st.name]))
        yield from (
            received,
            processed,
            dedup,
            filtered,
            dead,
            retries,
            ignored,
            connections,
            gaps,
            paused_pings,
            tokens,
            token_failures,
            closes,
        )
        failures = GaugeMetricFamily(
            "opera_consumer_commit_failures", "Consecutive failed commits of the state store."
        )
        commit = self._source.commit_status()
        failures.add_metric([], commit.failures)
        yield failures
        started = GaugeMetricFamily(
            "opera_consumer_commit_started_timestamp_seconds",
            "Unix time the commit under way started (no sample between commits).",
        )
        if commit.busy_since is not None:
            started.add_metric([], commit.busy_since + to_wall)
        yield started
        yield from (depth, connected, ready, moved, last, srtt, lag)
        for key, value in self._source.sink_counters().items():
            family = CounterMetricFamily(
                f"opera_consumer_{key}", _SINK_COUNTERS.get(key, "A figure of the sink's own.")
            )
            family.add_metric([], value)
            yield family
        fleet = self._source.fleet_status()
        if fleet is not None:
            yield from fleet_families(fleet)


def fleet_families(f: FleetStatus) -> Iterator[Metric]:
    for name, doc, value in (
        ("fleet_leases_held", "Stream leases this member holds.", f.leases_held),
        ("fleet_members_live", "Fleet members with a live heartbeat.", f.members_live),
    ):
        g = GaugeMetricFamily(f"opera_consumer_{name}", doc, labels=["member"])
        g.add_metric([f.member], value)
        yield g
    for name, doc, value in (
        ("fleet_takeovers", "Leases taken from another member.", f.takeovers),
        ("fleet_leases_lost", "Leases found taken by another member.", f.lost),
        (
            "fleet_fencing_rejections",
            "Commits the store refused: the lease's epoch had moved on.",
            f.fencing_rejections,
        ),
        (
            "fleet_self_fenced",
            "Times every stream was stopped for want of a lease renewal.",
            f.self_fenced,
        ),
        (
            "fleet_released_unreachable",
            "Streams handed over for not connecting here while another member could.",
            f.released_unreachable,
        ),
    ):
        c = CounterMetricFamily(f"opera_consumer_{name}", doc, labels=["member"])
        c.add_metric([f.member], value)
        yield c


_SINK_COUNTERS = {
    "orchestration_requests": "GETs sent to the OHIP REST API (retries included).",
    "orchestration_coalesced": "Resource fetches answered by another one's GET.",
    "orchestration_throttled": "429 answers from the OHIP REST API.",
    "nats_published": "Events the NATS stream stored (first copies).",
    "nats_duplicates": "Publishes the NATS stream acknowledged as duplicates (replays).",
    "nats_reconnects": "Reconnections of the NATS sink's connection.",
    "redis_added": "Events added to the Redis stream (first copies).",
    "redis_duplicates": "Events the Redis guard found already added (replays).",
    "redis_wait_refused": "Batches WAIT found on fewer replicas than sink.wait_replicas (retried).",
}


def readiness(source: StatusSource) -> tuple[bool, dict[str, Any]]:
    now = time.monotonic()
    streams = {
        st.name: {
            "state": st.state.value,
            # Its sink writes failing (retried): nothing flows, whatever the connection says.
            "ready": st.state.ready and st.sink_failing_since is None,
            "last_close": st.last_close or None,
            "waiting": st.waiting or None,
            "sink_failing_for_s": None
            if st.sink_failing_since is None
            else round(now - st.sink_failing_since, 1),
        }
        for st in source.stream_statuses()
    }
    # Commits that keep failing: nothing is being made durable, whatever the streams say.
    commit = source.commit_status()
    failing = commit.failing_since
    commits = {
        "ok": failing is None,
        "failures": commit.failures,
        # how long they have failed (a duration: the monotonic clock is this process's), and
        # why the last one did (masked, one line, bounded)
        "failing_for_s": None if failing is None else round(now - failing, 1),
        "last_error": commit.last_error or None,
    }
    ready = commit.failing_since is None and all(s["ready"] for s in streams.values())
    return ready, {"streams": streams, "commits": commits}


_MAX_CONNECTIONS = 64  # handled at once; a new one beyond them closes the oldest
_HEAD_LIMIT = 8 * 1024  # bytes of request head (a scraper sends a few hundred)
_HEAD_TIMEOUT_S = 5.0  # to send the request head
_WRITE_TIMEOUT_S = 10.0  # to take the response
_LOG_EVERY_S = 60.0  # one line per kind of trouble at most, with a count of the ones held back
_ALLOW = {"Allow": "GET, HEAD"}
# What clients do to a listener: quietly closed (OSError covers resets and broken pipes).
_CLIENT_TROUBLE = (
    TimeoutError,
    OSError,
    UnicodeError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    h11.RemoteProtocolError,
)

_log = structlog.get_logger(__name__)


class MetricsServer:
    """``/metrics``, ``/healthz`` (the loop answers) and ``/readyz`` (every stream is
    streaming or in a deliberate wait) on one loopback port by default.

    GET and HEAD only (405 otherwise). Hostile clients get an answer or a close and never a
    traceback: at most ``_MAX_CONNECTIONS`` at once (a new one closes the oldest: every one
    waits for its client, and refusing the newest let 64 silent connections, re-opened as
    they timed out, fail every health probe), a bounded head sent within ``_HEAD_TIMEOUT_S``,
    400 for a head or target that does not parse; anything unexpected is logged once a
    minute at most."""

    def __init__(self, source: StatusSource, metrics: Metrics, host: str, port: int) -> None:
        self._source = source
        self._metrics = metrics
        self._host, self._port = host, port
        self._server: asyncio.Server | None = None
        self._handlers: dict[asyncio.Task[Any], None] = {}  # oldest first
        # One line per kind of trouble a minute at most, counting the ones held back.
        self._log = RateLimitedLogger(_log, per_s=1 / _LOG_EVERY_S, burst=1)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, limit=_HEAD_LIMIT
        )

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            handlers = list(self._handlers)
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection. Nothing leaves it: an exception here would reach the loop's
        exception handler (a traceback per connection)."""
        task = asyncio.current_task()
        if task is None:
            writer.close()
            return
        if len(self._handlers) >= _MAX_CONNECTIONS:
            self._log.warning(
                "metrics listener full: the oldest connections closed", limit=_MAX_CONNECTIONS
            )
            oldest = next(iter(self._handlers))
            del self._handlers[oldest]
            oldest.cancel()
        self._handlers[task] = None
        try:
            await self._serve(reader, writer)
        except _CLIENT_TROUBLE:
            pass
        except asyncio.CancelledError:
            pass  # close(): nobody awaits this task, and a cancelled one would be reported
        except Exception as exc:  # a bug of ours (h11.LocalProtocolError, a collector...)
            self._log.warning("metrics listener: a request failed", exc_info=exc)
        finally:
            self._handlers.pop(task, None)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_HEAD_TIMEOUT_S):
                parsed = await read_request(reader)
        except asyncio.LimitOverrunError:
            reject(writer, 431, b'{"error": "request head too large"}')
        except h11.RemoteProtocolError as exc:  # not HTTP/1.1, or not ASCII
            reject(writer, exc.error_status_hint, b'{"error": "bad request"}')
        else:
            if parsed is None:
                reject(writer, 400, b'{"error": "bad request"}')
            else:
                _, conn, request = parsed
                status, body, content_type, extra = self._answer(request)
                head = request.method == b"HEAD"
                respond(
                    conn, writer, status, body, content_type=content_type, extra=extra, head=head
                )
        async with asyncio.timeout(_WRITE_TIMEOUT_S):
            await writer.drain()

    def _answer(self, request: h11.Request) -> tuple[int, bytes, str, dict[str, str]]:
        """Status, body, content type and extra headers for a parsed request."""
        json_type = "application/json"
        path = request_path(request.target)
        if path is None:
            return 400, b'{"error": "bad request target"}', json_type, {}
        if request.method not in (b"GET", b"HEAD"):
            return 405, b'{"error": "method not allowed"}', json_type, _ALLOW
        try:
            if path == "/metrics":
                accept = b", ".join(v for k, v in request.headers if k == b"accept-encoding")
                body, headers = self._metrics.exposition(accept.decode("latin-1"))
                return 200, body, CONTENT_TYPE_LATEST, headers
            if path == "/healthz":
                return 200, b'{"status": "ok"}', json_type, {}
            if path == "/readyz":
                ok, detail = readiness(self._source)
                body = json.dumps({"ready": ok, **detail}).encode()
                return 200 if ok else 503, body, json_type, {}
        except Exception as exc:
            self._log.warning("metrics listener: a request failed", exc_info=exc, path=path)
            return 500, b'{"error": "internal error"}', json_type, {}
        return 404, b'{"error": "not found"}', json_type, {}


# Of an answer to live_status: a daemon's /metrics is about 2 KB a stream. A longer one is
# not our listener (and is not read to its end).
LIVE_BODY_BYTES = 8 * 2**20


async def _body(response: aiohttp.ClientResponse) -> bytes:
    body = await read_at_most(response, LIVE_BODY_BYTES + 1)
    if len(body) > LIVE_BODY_BYTES:
        raise ValueError("answer too long")
    return body


def _commits(given: Any, at: float) -> dict[str, Any] | None:
    """/readyz's ``commits``, checked as a peer's answer: None when not there (an older
    daemon); ``failing_since`` as wall-clock time."""
    if not isinstance(given, dict) or not isinstance(given.get("ok"), bool):
        return None
    failures = given.get("failures")
    failing_for = given.get("failing_for_s")
    error = given.get("last_error")
    return {
        "ok": given["ok"],
        "failures": failures if isinstance(failures, int) else None,
        "failing_since": (
            at - failing_for
            if isinstance(failing_for, int | float) and 0 <= failing_for < float("inf")
            else None
        ),
        # printable: `status` prints it in a line of its own, not a table cell
        "last_error": printable(error, 300) if isinstance(error, str) and error else None,
    }


async def live_status(host: str, port: int) -> dict[str, dict[str, Any]] | None:
    """One look at a running daemon through its listener (None: no daemon answers): per
    stream, ``state`` (/readyz), and from /metrics ``processed`` (a counter), ``lag_s`` and
    ``waiting`` (None when not exposed), with ``at``: the wall clock of the scrape. The rates
    are the caller's, from two looks (``status``: :mod:`consumer.core.progress`).

    Its answers are checked like any peer's: one not shaped like our listener's gives None too.
    """
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    wanted = {
        "opera_consumer_events_processed_total": "processed",
        "opera_consumer_lag_seconds": "lag_s",
        "opera_consumer_queue_depth": "waiting",
    }
    try:
        base = f"http://{host}:{port}"
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(f"{base}/readyz", allow_redirects=False) as r:
                # orjson: a nesting too deep for it is a ValueError, where json recurses.
                ready = orjson.loads(await _body(r))
            async with http.get(f"{base}/metrics", allow_redirects=False) as r:
                text = (await _body(r)).decode("utf-8", errors="replace")
        at = time.time()
        figures: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = wanted.get(s.name)
                if key is not None and "stream" in s.labels and abs(s.value) < float("inf"):
                    figures.setdefault(s.labels["stream"], {})[key] = s.value
        streams = ready["streams"]
        commits = _commits(ready.get("commits"), at)
        return {
            shown(name, 200): {
                "state": shown(info["state"], 100),
                # what it waits for (a token endpoint that fails, a backoff)
                "waiting_for": shown(info.get("waiting") or "", 300) or None,
                "at": at,
                "processed": int(figures.get(name, {}).get("processed", 0)),
                "lag_s": figures.get(name, {}).get("lag_s"),
                "waiting": int(figures.get(name, {}).get("waiting", 0)),
                "commits": commits,
            }
            for name, info in streams.items()
        }
    except (aiohttp.ClientError, TimeoutError, ValueError, TypeError, KeyError, AttributeError):
        return None
