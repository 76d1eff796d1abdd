"""Assembling a daemon: the process's one HTTP client, its secrets registered with the log
redactor, and the configured sink (with orchestration around it when enabled)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import aiohttp

from .. import __version__
from ..config import (
    JsonlSinkSettings,
    NatsSinkSettings,
    PostgresSinkSettings,
    PythonSinkSettings,
    RedisSinkSettings,
    Settings,
    SqliteSinkSettings,
    WebhookSinkSettings,
    secret_values,
)
from ..errors import SinkUnusable
from ..http_client import Connector
from ..logs import REDACTOR
from ..sinks.base import Sink
from ..sinks.jsonl import JsonlSink
from ..state.base import StateStore
from .auth import TokenProvider

if TYPE_CHECKING:
    from ..sinks.nats import NatsSink
    from ..sinks.redis import RedisSink

# Every sink but jsonl (the default) is imported where it is configured: a daemon carries the
# modules of its own sink only (#12's memory goal; 0.3 MB for the four below).


def register_secrets(settings: Settings) -> None:
    """Every secret the settings hold, in every form it may appear in (hashed, base64,
    percent-encoded...), is masked in every log line from now on."""
    REDACTOR.add(*secret_values(settings))


def http_client(settings: Settings) -> aiohttp.ClientSession:
    """The process's one pooled client: tokens, webhook, orchestration share its connections.
    Made inside the running event loop (aiohttp's session belongs to it)."""
    h = settings.http
    # aiohttp keeps every idle connection (up to the limit) for keepalive_expiry_s; none at
    # all for max_keepalive_connections = 0 or keepalive_expiry_s = 0.
    if h.max_keepalive_connections == 0 or h.keepalive_expiry_s == 0:
        connector = Connector(limit=h.max_connections, force_close=True)
    else:
        connector = Connector(limit=h.max_connections, keepalive_timeout=h.keepalive_expiry_s)
    return aiohttp.ClientSession(
        connector=connector,
        # connect: waiting for a free connection in the pool, then opening one
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=h.timeout_s + h.connect_timeout_s,
            sock_connect=h.connect_timeout_s,
            sock_read=h.timeout_s,
        ),
        headers={"User-Agent": f"opera-consumer/{__version__}"},
    )


def check_sink(settings: Settings) -> None:
    """ConfigError for sink settings the sink would refuse, found without connecting: what
    `check-config` reports, and what `run` refuses before it opens the state store. (The
    settings' own validation cannot: these checks are the client libraries'.)"""
    s = settings.sink
    if isinstance(s, NatsSinkSettings):
        from ..sinks.nats import check_settings  # noqa: PLC0415  # nats-py: an extra

        check_settings(s)
    elif isinstance(s, RedisSinkSettings):
        from ..sinks.redis import server  # noqa: PLC0415  # redis-py: an extra

        server(s)


def build_sink(
    settings: Settings,
    http: aiohttp.ClientSession,
    tokens: Mapping[str, TokenProvider] | None = None,
) -> Sink:
    """``http`` is the process's pooled client (webhook and orchestration share it);
    ``tokens``: the streams' token providers (made here when not given)."""
    sink = _plain(settings, http)
    if not settings.orchestration.enabled:
        return sink
    from ..sinks.orchestration import OrchestratingSink, Orchestrator  # noqa: PLC0415

    tokens = tokens or {n: TokenProvider(http, s) for n, s in settings.streams.items()}
    streams = {n: (s, tokens[n]) for n, s in settings.streams.items()}
    return OrchestratingSink(sink, Orchestrator(settings.orchestration, http, streams))


def _plain(settings: Settings, http: aiohttp.ClientSession) -> Sink:
    s = settings.sink
    if isinstance(s, JsonlSinkSettings):
        return JsonlSink(s.path, fsync=s.fsync, rotation=s.rotation())
    if isinstance(s, SqliteSinkSettings):
        from ..sinks.sqlite import SqliteSink, StoreTableSink  # noqa: PLC0415

        state = settings.state.path
        if s.path is None or s.path.resolve() == state.resolve():
            return StoreTableSink(state, s.table)
        return SqliteSink(s.path, s.table)
    if isinstance(s, WebhookSinkSettings):
        from ..sinks.webhook import WebhookSink  # noqa: PLC0415

        return WebhookSink(s, http)
    if isinstance(s, PostgresSinkSettings):
        from ..sinks.postgres import PostgresSink  # noqa: PLC0415  # asyncpg: an extra

        # The state in PostgreSQL on the very same DSN: the rows commit in the state store's
        # transaction, with the checkpoint (else the sink upserts on its own pool).
        st = settings.state
        same = (
            st.backend == "postgres"
            and st.dsn is not None
            and st.dsn.get_secret_value() == s.dsn.get_secret_value()
        )
        return PostgresSink(s, in_state_transaction=same)
    if isinstance(s, PythonSinkSettings):
        from ..sinks.python import PythonSink  # noqa: PLC0415

        return PythonSink(s)
    if isinstance(s, NatsSinkSettings | RedisSinkSettings):
        return bus_sink(settings, s)
    raise AssertionError(f"unknown sink settings {type(s).__name__}")


def bus_sink(settings: Settings, s: NatsSinkSettings | RedisSinkSettings) -> NatsSink | RedisSink:
    """The nats or redis sink (for the daemon, and for preflight's checks)."""
    chains = {name: stream.chain_code for name, stream in settings.streams.items()}
    if isinstance(s, NatsSinkSettings):
        from ..sinks.nats import NatsSink  # noqa: PLC0415  # nats-py only where configured

        return NatsSink(s, chains)
    from ..sinks.redis import RedisSink  # noqa: PLC0415  # redis only where configured

    return RedisSink(s, chains)


async def open_sink(sink: Sink, store: StateStore, state_path: object) -> None:
    """Open ``sink`` at its committed position; a sink that starts anywhere else (none yet,
    a file moved aside or shortened) has where it starts recorded before its first write
    (the daemon, and a `dlq replay`)."""
    committed = await store.sink_state(sink.name)
    try:
        await sink.open(committed)
    except SinkUnusable as exc:
        raise SinkUnusable(f"{exc} (state store: {state_path})") from None
    if (position := sink.position()) is not None and position != committed:
        # Record where the sink starts before its first write: a crash between that write
        # and the first commit must find this position to cut back to, not none (a file the
        # store knows nothing of) nor the one before (a longer length keeps the new lines as
        # committed, and their events come again: twice).
        try:
            await store.set_sink_state(sink.name, position)
        except BaseException:
            await sink.close()  # opened here: the caller only closes a sink that opened
            raise
