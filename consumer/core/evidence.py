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
# How far past a cut the text is masked: more than any secret's length (a JWT access token
# is 1-2 KB), so that one across the cut is in what is masked whole.
SCRUB_MARGIN: Final = 8192

Scrub = Callable[[str], str]  # the log redactor's: masks every registered secret in a text


@dataclass(frozen=True, slots=True)
class Evidence:
    """A bounded prefix of a payload, with the size and hash of the whole."""

    text: str  # at most PAYLOAD_LIMIT characters (bytes decoded lossily)
    size: int  # bytes of the complete original
    sha256: str  # hex digest of the complete original bytes


def to_bytes(data: bytes | str) -> bytes:
    return data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")


def evidence(data: bytes | str, limit: int = PAYLOAD_LIMIT, scrub: Scrub | None = None) -> Evidence:
    """The text masked by ``scrub`` then cut (:func:`masked`); the size and SHA-256 of the
    original bytes, which tell the frame received (and a repeat of it) apart."""
    raw = to_bytes(data)
    return Evidence(masked(raw, limit, scrub), len(raw), hashlib.sha256(raw).hexdigest())


def prefix(data: bytes | str, limit: int = SHOWN_LIMIT) -> str:
    """At most ``limit`` characters of ``data``; bytes are decoded lossily, cut first."""
    if isinstance(data, str):
        return data[:limit]
    # A cut may split a UTF-8 sequence: "replace" turns its remains into one U+FFFD.
    return data[: limit * 4].decode("utf-8", "replace")[:limit]


def masked(data: bytes | str, limit: int, scrub: Scrub | None, *, cut: bool = False) -> str:
    """At most ``limit`` characters of ``data`` (bytes decoded lossily), masked by ``scrub``
    before the cut: a secret across it is masked whole, never cut to a visible prefix. Only
    the start of the text is masked, as long as it leaves SCRUB_MARGIN characters past the
    cut: a secret the end of that start cuts in two is then beyond the cut, however much
    masking shortened what comes before it. ``cut``: ``data`` is itself the start of a longer
    text (a body read up to a limit): the secret its end may cut in two is never shown either
    (the last SCRUB_MARGIN characters of the masked text are not)."""
    if scrub is None:
        return prefix(data, limit)
    size = limit + SCRUB_MARGIN
    while True:
        window = prefix(data, size)
        clean = scrub(window)
        whole = len(window) < size  # all of the text
        if len(clean) >= limit + SCRUB_MARGIN or (whole and not cut):
            return clean[:limit]
        if whole:
            return clean[: max(0, min(limit, len(clean) - SCRUB_MARGIN))]
        size *= 2  # masking took much out (the text repeats a secret): mask more of it


def quoted(text: str, limit: int, scrub: Scrub | None = None) -> str:
    """``text`` masked and cut (:func:`masked`) as its repr, itself cut to at most ``limit``
    + 2 characters: repr writes a character it cannot print in up to ten ("\\U000e0001")."""
    written = repr(masked(text, limit, scrub))
    return written if len(written) <= limit + 2 else written[: limit + 1] + "…"


def shown(value: object, limit: int = SHOWN_LIMIT, scrub: Scrub | None = None) -> str:
    """A short, safe rendering of any decoded JSON value for a log line or an error text,
    masked by ``scrub`` before it is cut."""
    if isinstance(value, str):
        return masked(value, limit, scrub)
    try:
        return masked(orjson.dumps(value), limit, scrub)
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
    # masked: a bounded window of a message that may quote a whole frame is scrubbed, not all.
    return masked(f"{type(exc).__name__}: {text}", 1000, scrub or _scrub[0])


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
