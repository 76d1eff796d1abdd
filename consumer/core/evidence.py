"""Bounded copies of bytes from the wire: what a dead letter or a log line may hold of them.

A value received from outside is never passed to ``str()``/``repr()`` or an f-string whole: a
deeply nested one overflows the interpreter's recursion limit, a huge one fills the disk.
Everything here is pure and bounded in time and size by its ``limit``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import orjson

from .events import Event

# The most of a malformed frame's text the DLQ keeps (an event is kept whole); its full length
# and SHA-256 go beside it, so an operator can still tell two large payloads apart.
PAYLOAD_LIMIT: Final = 65536
# The most of a wire value a log line or an error message shows.
SHOWN_LIMIT: Final = 200


@dataclass(frozen=True, slots=True)
class Evidence:
    """A bounded prefix of a payload, with the size and hash of the whole."""

    text: str  # at most PAYLOAD_LIMIT characters (bytes decoded lossily)
    size: int  # bytes of the complete original
    sha256: str  # hex digest of the complete original bytes


def to_bytes(data: bytes | str) -> bytes:
    return data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")


def evidence(data: bytes | str, limit: int = PAYLOAD_LIMIT) -> Evidence:
    raw = to_bytes(data)
    return Evidence(prefix(raw, limit), len(raw), hashlib.sha256(raw).hexdigest())


def prefix(data: bytes | str, limit: int = SHOWN_LIMIT) -> str:
    """At most ``limit`` characters of ``data``; bytes are decoded lossily, cut first."""
    if isinstance(data, str):
        return data[:limit]
    # A cut may split a UTF-8 sequence: "replace" turns its remains into one U+FFFD.
    return data[: limit * 4].decode("utf-8", "replace")[:limit]


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """A short, safe rendering of any decoded JSON value for a log line or an error text."""
    if isinstance(value, str):
        return value[:limit]
    try:
        return prefix(orjson.dumps(value), limit)
    except TypeError:  # orjson.JSONEncodeError
        # Nested deeper than orjson writes (254 levels), an integer beyond 64 bits, or not JSON.
        return f"<{type(value).__name__} too deeply nested to show>"


def describe(exc: BaseException | None, scrub: Callable[[str], str] | None = None) -> str:
    """``Type: message``, bounded, for a log line or a dead letter; never raises. ``scrub``
    (by default the one :func:`scrub_with` set: the log redactor's) runs before the cut, so
    no piece of a secret survives it (the log's own redaction, after the cut, would miss a
    secret the cut split)."""
    if exc is None:
        return ""
    try:
        text = str(exc)
    except Exception:  # a __str__ that fails (or recurses) on what it holds
        text = "<message unavailable>"
    return prefix(f"{type(exc).__name__}: {(scrub or _scrub[0])(text)}", 1000)


_scrub: list[Callable[[str], str]] = [lambda text: text]


def scrub_with(scrub: Callable[[str], str]) -> None:
    """What :func:`describe` masks by default (the process's redactor; consumer.logs sets it)."""
    _scrub[0] = scrub


def event_evidence(ev: Event) -> Evidence:
    """What a dead letter keeps of an event: all of it, so that ``dlq replay`` can deliver it
    (an event is at most ``max_frame_bytes``: a larger frame is a malformed one, cut). Its
    JSON, or, when it cannot be written back out (nested deeper than a JSON writer goes), the
    frame it came in."""
    if ev.text is not None:
        return _whole(ev.text)
    try:
        return _whole(orjson.dumps(ev.raw))
    except TypeError:
        return _whole(ev.frame or b"<event that cannot be serialized>")


def _whole(data: bytes | str) -> Evidence:
    return evidence(data, len(data))
