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
