"""The configured sink, built from ``[sink]``."""

from __future__ import annotations

import httpx

from ..config import (
    JsonlSinkSettings,
    PostgresSinkSettings,
    PythonSinkSettings,
    Settings,
    SqliteSinkSettings,
    WebhookSinkSettings,
)
from .base import Sink
from .jsonl import JsonlSink
from .python import PythonSink
from .sqlite import SqliteSink, StoreTableSink
from .webhook import WebhookSink


def build_sink(settings: Settings, http: httpx.AsyncClient) -> Sink:
    """``http`` is the process's pooled client (the webhook shares it)."""
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
        from .postgres import PostgresSink  # asyncpg is imported only when configured

        return PostgresSink(s)
    if isinstance(s, PythonSinkSettings):
        return PythonSink(s)
    raise AssertionError(f"unknown sink settings {type(s).__name__}")
