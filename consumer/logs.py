"""structlog set-up: JSON lines when not on a terminal, readable output on one.

Every line, ours and the libraries' (websockets, aiohttp via the stdlib bridge), passes through
:class:`Redactor`, which masks any registered secret (app keys and their hashes, client
secrets, passwords, access tokens) wherever it appears, exception text included, also as a
JSON string escapes it (a receiver or endpoint echoing a request as JSON) and inside any
base64 (one echoing it encoded); values that are not text as they are rendered (their repr).
On a terminal, text from outside is escaped before it is printed (:func:`escape_for_console`).
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

from .core.evidence import describe, masked, scrub_with
from .core.printable import printable

MASK = "***"
MIN_SECRET_CHARS = 4  # a 1-3 character "secret" would mask half the log
# An access token is masked until this long after it expires: a line about a request made
# with it may come later (a retry's error, a slow answer).
TOKEN_GRACE_S = 3600.0
# At most this many tokens are remembered (the soonest to expire are forgotten first): more
# than the live ones (one or two a stream) of a hundred streams, and bounded whatever the
# endpoint does: every line is scrubbed of each (4,096 cost ~3 ms a log line, measured).
MAX_TOKENS = 256
# Of a value that is neither text nor a number (its repr): as much as a log line needs.
OTHER_VALUE_CHARS = 2000


# Encoders that write more as \\uXXXX than JSON needs, and their hex's case: .NET's
# System.Text.Json (its default encoder: HTML-sensitive characters and all non-ASCII, upper
# case) and Gson (HTML-safe by default, lower case).
_ESCAPING: tuple[tuple[str, bool], ...] = (("+'<>&`\"", True), ("<>&='", False))


def json_escaped_forms(secret: str) -> list[str]:
    """``secret`` and how a JSON encoder may write it inside a string: with non-ASCII as
    ``\\uXXXX`` or as is, ``/`` as ``\\/`` (PHP's default) or as is, ``<>&`` as ``\\u003c``
    and so on (Go's default), .NET's and Gson's escapes (:data:`_ESCAPING`), and ``"``,
    ``\\`` and controls escaped. Without duplicates."""
    forms = [secret]
    for ascii_only in (True, False):
        escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
        html = escaped.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        for form in (escaped, html):
            forms += [form, form.replace("/", "\\/")]
    for chars, upper in _ESCAPING:
        forms.append(_escaped(secret, chars, upper=upper))
    return list(dict.fromkeys(forms))


# A secret's base64 is masked only where it is long enough to mean it (of an 8-character
# secret at least).
MIN_BASE64_CHARS = 8


def base64_forms(secret: str) -> list[str]:
    """What any base64 (standard or URL-safe) of a text holding ``secret`` holds of it, at
    each of the three places a byte can start in a group of three: the characters made of
    its bytes alone. A request echoed as base64 (``Authorization: Bearer <token>`` inside)
    holds the token's bytes at an offset that is not a multiple of three, so not the token's
    own base64."""
    data = secret.encode()
    forms = []
    for skip in range(3):
        encoded = base64.b64encode(bytes(skip) + data).decode()
        # The characters whose six bits are all of the secret's bytes.
        start, end = -(-8 * skip // 6), (8 * (skip + len(data))) // 6
        core = encoded[start:end]
        if len(core) >= MIN_BASE64_CHARS:
            forms += [core, core.replace("+", "-").replace("/", "_")]
    return list(dict.fromkeys(forms))


def _escaped(secret: str, chars: str, *, upper: bool) -> str:
    """``secret`` as an encoder writes it that escapes ``chars``, controls and non-ASCII as
    ``\\uXXXX`` (``upper``: upper-case hex; surrogate pairs for the astral plane)."""
    out: list[str] = []
    for c in secret:
        if c in chars or not 0x20 <= ord(c) <= 0x7E:
            units = c.encode("utf-16-be", "surrogatepass")
            for i in range(0, len(units), 2):
                code = f"{int.from_bytes(units[i : i + 2], 'big'):04x}"
                out.append("\\u" + (code.upper() if upper else code))
        elif c in '"\\':
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def secret_forms(secret: str) -> list[str]:
    """Every form of ``secret`` masked: as JSON may escape it, and inside any base64."""
    return json_escaped_forms(secret) + base64_forms(secret)


class Redactor:
    """Masks every registered secret, longest first (a secret inside another is never masked
    alone, which would leave the rest of the longer one visible). Lines are logged from other
    threads too: what :meth:`scrub` reads is replaced, never changed in place."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_tokens: int = MAX_TOKENS
    ) -> None:
        self._clock = clock
        self._max_tokens = max_tokens
        self._static: frozenset[str] = frozenset()  # every form of every secret
        # access token -> when to forget it (monotonic), and its forms
        self._tokens: dict[str, tuple[float, list[str]]] = {}
        self._ordered: tuple[str, ...] = ()  # all of them, longest first

    def add(self, *values: str | None) -> None:
        forms = [f for v in values if v and len(v) >= MIN_SECRET_CHARS for f in secret_forms(v)]
        self._static = self._static.union(forms)
        self._order()

    def add_token(self, value: str, lifetime_s: float) -> None:
        """An access token, masked until ``lifetime_s`` plus :data:`TOKEN_GRACE_S` from now:
        by time, not by count, so that the tokens of many streams are all remembered."""
        if len(value) < MIN_SECRET_CHARS:
            return
        now = self._clock()
        forget_at = now + max(0.0, lifetime_s) + TOKEN_GRACE_S
        tokens = {t: kept for t, kept in self._tokens.items() if kept[0] > now}
        if value in tokens:
            forget_at = max(forget_at, tokens[value][0])
        tokens[value] = (forget_at, secret_forms(value))
        while len(tokens) > self._max_tokens:
            del tokens[min(tokens, key=lambda t: tokens[t][0])]
        self._tokens = tokens
        self._order()

    def _order(self) -> None:
        tokens = (form for _, forms in self._tokens.values() for form in forms)
        self._ordered = tuple(sorted({*self._static, *tokens}, key=len, reverse=True))

    def scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._ordered:
                if secret in value:
                    value = value.replace(secret, MASK)
            return value
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        # Anything else the renderers write as its repr (JSON's fallback, the console's): an
        # exception, bytes, an object holding a secret. Written here, masked before the cut.
        if isinstance(value, BaseException):
            return describe(value, self.scrub)
        if isinstance(value, bytes | bytearray | memoryview):
            return masked(bytes(value), OTHER_VALUE_CHARS, self.scrub)
        try:
            text = repr(value)
        except Exception:  # a __repr__ that fails on what it holds
            text = f"<{type(value).__name__}>"
        return masked(text, OTHER_VALUE_CHARS, self.scrub)

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event_dict.items():
            event_dict[key] = self.scrub(value)
        return event_dict


REDACTOR = Redactor()
scrub_with(REDACTOR.scrub)  # describe() masks before it cuts, wherever it is called

CONSOLE_VALUE_CHARS = 2000  # of one value on a terminal: enough for any message of ours
_MULTILINE = ("exception", "stack")  # tracebacks: kept on their lines, each line escaped


def escape_for_console(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Every value as one bounded line with its control, C1 and bidi characters escaped
    (:func:`~consumer.core.printable.printable`): frame ids, close reasons and errors come
    from the wire, and written raw to a terminal they would be obeyed (retitle it, clear it).
    The console renderer writes strings as they are and anything else as its ``repr``."""
    return {printable(key, 100): _console_value(key, v) for key, v in event_dict.items()}


def _console_value(key: str, value: Any) -> Any:
    if isinstance(value, str) and key in _MULTILINE:
        return "\n".join(printable(line, CONSOLE_VALUE_CHARS) for line in value.split("\n"))
    if isinstance(value, str):
        return printable(value, CONSOLE_VALUE_CHARS)
    if isinstance(value, int | float | bool | None):
        return value
    return printable(repr(value), CONSOLE_VALUE_CHARS)


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
    # JSON escapes every control and non-ASCII character itself; a terminal needs us to.
    render: list[Any] = (  # colours only for a terminal: escapes in a file are noise
        [escape_for_console, structlog.dev.ConsoleRenderer(colors=out.isatty())]
        if console
        else [structlog.processors.JSONRenderer()]
    )
    # Tracebacks as plain text, never with local variables (they may hold tokens); then scrub.
    final: list[Any] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.format_exc_info,
        REDACTOR,
        *render,
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
