"""structlog set-up: JSON lines when not on a terminal, readable output on one.

Every line, ours and the libraries' (websockets, httpx via the stdlib bridge), passes through
:class:`Redactor`, which masks any registered secret (app keys and their hashes, client
secrets, passwords, access tokens) wherever it appears, exception text included.
"""

from __future__ import annotations

import logging
import sys
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
    for noisy in ("httpx", "httpcore", "aiosqlite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.INFO if level == "debug" else logging.WARNING)
