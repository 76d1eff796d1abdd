"""What PostgreSQL text can hold: any Unicode character but NUL (U+0000), and only valid Unicode
(asyncpg sends UTF-8, which has no lone surrogate). Shared by the PostgreSQL sink and state store.

The sink refuses a value it cannot hold (:func:`unstorable_char`): its row is the user's data,
kept as received or dead-lettered. The state store must keep whatever came from the wire (a dead
letter's payload, an event's id, its name or key, an error quoting them), or a malformed frame
would stop the stream for good; it stores such a value escaped (:func:`to_text`) and reads it
back as it was (:func:`from_text`):

* a value that holds a NUL or a lone surrogate, or that begins with U+0001 (the marker), is
  stored as U+0001 followed by the value with ``\\`` written ``\\\\``, NUL ``\\0`` and a lone
  surrogate ``\\uXXXX`` (lower-case hex);
* every other value is stored as it is.

The mapping is injective (an escaped value begins with the marker and no verbatim one does; the
escape writes every backslash), so two different ids stay two ids and a duplicate stays one;
it is lossless (:func:`from_text` reverses it). Values stored before it existed read back
unchanged: none held a NUL, and none from the wire begins with U+0001.
"""

from __future__ import annotations

import re
from typing import Final

MARKER: Final = "\x01"
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPE = re.compile("[\\\\\x00\ud800-\udfff]")
_ESCAPED = re.compile(r"\\(?:(\\)|(0)|u([0-9a-f]{4}))")


def unstorable_char(value: str) -> str | None:
    """Why PostgreSQL text cannot hold ``value`` as it is, or None."""
    if "\x00" in value:
        return "a NUL character (PostgreSQL text cannot hold one)"
    if not value.isascii() and _SURROGATE.search(value):
        return "not valid Unicode (a lone surrogate)"
    return None


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    if char == "\x00":
        return "\\0"
    return f"\\u{ord(char):04x}"


def _unescape(match: re.Match[str]) -> str:
    if match.group(1):
        return "\\"
    if match.group(2):
        return "\x00"
    return chr(int(match.group(3), 16))


def to_text(value: str) -> str:
    """``value`` as the state store keeps it in a text column (see the module doc)."""
    if value.startswith(MARKER) or unstorable_char(value) is not None:
        return MARKER + _ESCAPE.sub(_escape, value)
    return value


def from_text(value: str) -> str:
    """The value :func:`to_text` stored as ``value``."""
    if not value.startswith(MARKER):
        return value
    return _ESCAPED.sub(_unescape, value[1:])


def to_text_or_none(value: str | None) -> str | None:
    return None if value is None else to_text(value)


def from_text_or_none(value: str | None) -> str | None:
    return None if value is None else from_text(value)
