"""The configured sink, built from ``[sink]``."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from ..config import (
    JsonlSinkSettings,
    PostgresSinkSettings,
    PythonSinkSettings,
    Settings,
    SqliteSinkSettings,
    WebhookSinkSettings,
)
from ..runtime.auth import TokenProvider
from ..runtime.orchestration import OrchestratingSink, Orchestrator
from .base import Sink
from .jsonl import JsonlSink
from .postgres import PostgresSink
from .python import PythonSink
from .sqlite import SqliteSink, StoreTableSink
from .webhook import WebhookSink


def build_sink(
    settings: Settings,
    http: httpx.AsyncClient,
    tokens: Mapping[str, TokenProvider] | None = None,
) -> Sink:
    """``http`` is the process's pooled client (webhook and orchestration share it);
    ``tokens``: the streams' token providers (made here when not given)."""
    sink = _plain(settings, http)
    if not settings.orchestration.enabled:
        return sink
    tokens = tokens or {n: TokenProvider(http, s) for n, s in settings.streams.items()}
    streams = {n: (s, tokens[n]) for n, s in settings.streams.items()}
    return OrchestratingSink(sink, Orchestrator(settings.orchestration, http, streams))


def _plain(settings: Settings, http: httpx.AsyncClient) -> Sink:
    s = settings.sink
    if isinstance(s, JsonlSinkSettings):
        return JsonlSink(s.path, fsync=s.fsync)
    if isinstance(s, SqliteSinkSettings):
        state = settings.state.path
        if s.path is None or s.path.resolve() == state.resolve():
            return StoreTableSink(state, s.table)
        return SqliteSink(s.path, s.table)
    if isinstance(s, WebhookSinkSettings):
        return WebhookSink(s, http)
    if isinstance(s, PostgresSinkSettings):
        return PostgresSink(s)
    if isinstance(s, PythonSinkSettings):
        return PythonSink(s)
    raise AssertionError(f"unknown sink settings {type(s).__name__}")
