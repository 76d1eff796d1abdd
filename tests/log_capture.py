"""Every log line of the process into a buffer, in the daemon's own set-up (consumer.logs), so
that a test reads what an operator would; logging is put back afterwards."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from consumer.logs import configure


@contextmanager
def captured_logs(fmt: str = "json", level: str = "debug") -> Iterator[io.StringIO]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    buffer = io.StringIO()
    configure(level, fmt, stream=buffer)
    structlog.configure(cache_logger_on_first_use=False)
    try:
        yield buffer
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
        structlog.configure(**saved)


def records(buffer: io.StringIO) -> list[dict[str, Any]]:
    """The JSON log lines :func:`captured_logs` gathered, as dicts."""
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


@contextmanager
def log_records(level: str = "debug") -> Iterator[list[dict[str, Any]]]:
    """The daemon's own lines (loggers ``consumer.*``) logged in the block, as dicts in the
    list given, filled when the block ends. Not structlog.testing.capture_logs: a logger an
    earlier test's set-up cached bypasses that."""
    found: list[dict[str, Any]] = []
    with captured_logs("json", level) as buffer:
        try:
            yield found
        finally:
            found.extend(
                r
                for r in records(buffer)
                if str(r.get("logger", "consumer")).startswith("consumer")
            )
