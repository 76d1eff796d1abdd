"""structlog set-up: JSON lines when not on a terminal, readable output on one.

Every line, ours and the libraries' (websockets, aiohttp via the stdlib bridge), passes through
:class:`Redactor`, which masks any registered secret (app keys and their hashes, client
secrets, passwords, access tokens) wherever it appears, exception text included.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

MASK = "***"


class Redactor:
    def __init__(self) -> None:
        self._static: set[str] = set()
        self._recent: deque[str] = deque(maxlen=32)  # access tokens rotate; keep the latest

    def add(self, *values: str | None) -> None:
        for v in values:
            if v and len(v) >= 4:  # a 1-3 character "secret" would mask half the log
                self._static.add(v)

    def add_token(self, value: str) -> None:
        self._recent.append(value)

    def scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in (*self._static, *self._recent):
                if secret in value:
                    value = value.replace(secret, MASK)
            return value
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        return value

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event_dict.items():
            event_dict[key] = self.scrub(value)
        return event_dict


REDACTOR = Redactor()


class RateLimitedLogger:
    """At most ``per_s`` lines a second per message (a token bucket of ``burst``), so that a
    flood (bad frames, failing writes, hostile clients) cannot flood the journal; the next line
    that passes carries ``suppressed``: how many of that message were dropped before it."""

    def __init__(self, logger: Any, *, per_s: float = 5.0, burst: int = 20) -> None:
        self._logger = logger
        self._per_s = per_s
        self._burst = float(burst)
        self._buckets: dict[str, tuple[float, float, int]] = {}  # event -> tokens, at, dropped

    def _allow(self, event: str) -> int | None:
        """None: drop this line; else the number of lines dropped before it."""
        now = time.monotonic()
        tokens, at, dropped = self._buckets.get(event, (self._burst, now, 0))
        tokens = min(self._burst, tokens + (now - at) * self._per_s)
        if tokens < 1.0:
            self._buckets[event] = (tokens, now, dropped + 1)
            return None
        self._buckets[event] = (tokens - 1.0, now, 0)
        return dropped

    def _log(self, level: str, event: str, kw: dict[str, Any]) -> None:
        dropped = self._allow(event)
        if dropped is None:
            return
        if dropped:
            kw["suppressed"] = dropped
        getattr(self._logger, level)(event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._log("error", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log("info", event, kw)


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    out = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.filter_by_level,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    # Tracebacks as plain text, never with local variables (they may hold tokens); then scrub.
    final: list[Any] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.format_exc_info,
        REDACTOR,
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer(),
    ]
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiohttp", "aiosqlite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.INFO if level == "debug" else logging.WARNING)
