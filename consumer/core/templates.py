"""Destination templates: literal text with ``{token}`` fields, and token values made safe.

The NATS sink's ``subject`` and the Redis sink's ``stream_key`` are both such templates. This
module is what they share, and what the configuration checks at load time (``check-config``
refuses a bad template before anything connects):

* :class:`Template`: parsed with :class:`string.Formatter`; the fields are :data:`TOKENS`, a
  literal brace is written ``{{`` or ``}}``; a lone brace, another field, a conversion
  (``!r``) or a format spec (``:>5``) is a :class:`TemplateError`;
* :func:`sanitise`: a value as one token, characters the destination cannot hold replaced
  (each sink passes its own :class:`UnsafeChars`), a long value cut and ended with a hash;
* the shape rules of each destination that need nothing but the text: :func:`check_subject`
  and :func:`check_stream_name` (NATS), :func:`check_key` and :func:`hash_tag` (Redis).

Pure: the standard library only, nothing of asyncio or of a client library.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

TOKENS: Final = ("chainCode", "hotelId", "eventName", "moduleName", "stream")
# Tokens known only once an event arrives: a destination made with them differs per event.
EVENT_TOKENS: Final = frozenset({"hotelId", "eventName", "moduleName"})
TOKEN_MAX_CHARS: Final = 128  # a longer value: cut, with a hash of the whole at its end
HASH_CHARS: Final = 16
_SHOWN_CHARS: Final = 200
_TOKEN_LIST: Final = ", ".join("{" + t + "}" for t in TOKENS)


class TemplateError(ValueError):
    """A template (or a name) a destination cannot use: what is wrong and how to fix it."""

    def __init__(self, what: str, fix: str) -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what} -> {fix}")

    def at(self, key: str, text: str) -> str:
        """The message naming the configuration key, e.g. ``sink.subject``."""
        return f"{key} {text[:_SHOWN_CHARS]!r}: {self.what} -> {self.fix}"


class Template:
    """A template parsed once: ``parts`` are (literal text, token or None). ``allowed``: the
    tokens it may hold (:data:`TOKENS` unless given, e.g. orchestration's URL placeholders)."""

    __slots__ = ("parts", "text", "tokens")

    def __init__(self, text: str, allowed: tuple[str, ...] = TOKENS) -> None:
        listed = _TOKEN_LIST if allowed is TOKENS else ", ".join("{" + t + "}" for t in allowed)
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:  # a lone "{" or "}"
            raise TemplateError(
                str(exc), f"write a literal brace as {{{{ or }}}}, a token as one of {listed}"
            ) from None
        parts: list[tuple[str, str | None]] = []
        for literal, field, spec, conversion in parsed:
            if field is not None and (field not in allowed or spec or conversion):
                written = field + (f"!{conversion}" if conversion else "")
                written += f":{spec}" if spec else ""
                raise TemplateError(
                    f"unknown token {{{written[:40]}}}",
                    f"use {listed} (no conversion or format); a literal brace is {{{{ or }}}}",
                )
            parts.append((literal, field))
        self.text = text
        self.parts: tuple[tuple[str, str | None], ...] = tuple(parts)
        self.tokens = frozenset(f for _, f in parts if f is not None)

    def render(self, values: Mapping[str, str]) -> str:
        """The text with each token replaced by its (already sanitised) value."""
        return "".join(lit + (values[f] if f is not None else "") for lit, f in self.parts)

    def sample(self) -> str:
        """Rendered with ``x`` for every token: the literal text's shape."""
        return self.render(dict.fromkeys(self.tokens, "x"))


# --- token values ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnsafeChars:
    """The characters a destination cannot hold in a token: ``chars``, whitespace, control
    characters (C0, DEL, C1) and lone surrogates (not encodable as UTF-8); with
    ``unprintable``, every other character :meth:`str.isprintable` refuses too. Never ``_``,
    ``~`` or a hex digit: :func:`sanitise` writes those."""

    chars: str
    unprintable: bool = False

    def __contains__(self, c: object) -> bool:
        if not isinstance(c, str):
            return False
        code = ord(c)
        return (
            c in self.chars
            or c.isspace()
            or code < 0x20
            or 0x7F <= code <= 0x9F
            or 0xD800 <= code <= 0xDFFF
            or (self.unprintable and not c.isprintable())
        )


SUBJECT_UNSAFE: Final = UnsafeChars(".*>")  # NATS: token separator and wildcards
KEY_UNSAFE: Final = UnsafeChars("{}", unprintable=True)  # Redis: no value adds a hash tag


def replace_unsafe(value: str, unsafe: UnsafeChars) -> str:
    """``value`` with each character in ``unsafe`` replaced by ``_``."""
    if value.isprintable() and " " not in value and not any(c in value for c in unsafe.chars):
        return value  # the common case: nothing to replace (printable: no control, no space)
    return "".join("_" if c in unsafe else c for c in value)


def cut(value: str) -> str:
    """``value`` when at most :data:`TOKEN_MAX_CHARS` long; else its start, ``~`` and a hash
    of the whole: :data:`TOKEN_MAX_CHARS` characters, and distinct values stay distinct."""
    if len(value) <= TOKEN_MAX_CHARS:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{value[: TOKEN_MAX_CHARS - HASH_CHARS - 1]}~{digest[:HASH_CHARS]}"


def sanitise(value: str | None, unsafe: UnsafeChars, *, hash_raw: bool) -> str:
    """``value`` as one token: empty or None is ``_``; the ``unsafe`` characters become ``_``;
    a long value is :func:`cut`. The hash is of the value as given (``hash_raw``: NATS) or
    once its characters are replaced (Redis): each sink as it always did, since the
    destinations already written depend on it."""
    if not value:
        return "_"
    if hash_raw:
        return replace_unsafe(cut(value), unsafe)  # "~" and hex digits are never unsafe
    return cut(replace_unsafe(value, unsafe))


# --- NATS -----------------------------------------------------------------------------------

_STREAM_NAME_FORBIDDEN: Final = frozenset(">*. /\\\t\r\n")


def check_subject(template: Template) -> None:
    """A NATS subject template: its literal text must make a valid subject (no empty token,
    no wildcard, no whitespace or control character)."""
    sample = template.sample()
    example = "e.g. opera.{chainCode}.{hotelId}.{eventName}"
    if any(not token for token in sample.split(".")):
        raise TemplateError(
            "an empty subject token (a leading, trailing or doubled '.')",
            f"separate tokens by one '.', {example}",
        )
    if any(c in SUBJECT_UNSAFE for c in sample.replace(".", "")):
        raise TemplateError(
            "'*', '>', whitespace or a control character in the literal text",
            f"a subject is visible characters and tokens separated by '.', {example}",
        )


def check_stream_name(name: str) -> None:
    """A JetStream stream name: not empty, none of ``.``, ``*``, ``>``, ``/``, ``\\`` or
    whitespace."""
    if not name or any(c in _STREAM_NAME_FORBIDDEN for c in name):
        raise TemplateError(
            "not a JetStream stream name",
            "use no '.', '*', '>', '/', '\\' or whitespace, e.g. OPERA",
        )


# --- Redis ----------------------------------------------------------------------------------


def key_token(value: str | None) -> str:
    """A token's value as it goes into a Redis key: whitespace, control characters and braces
    become ``_`` (no value can add or move a hash tag); empty or missing is ``_``; longer than
    TOKEN_MAX_CHARS, it is cut and ends with a hash of the whole (two values stay apart)."""
    return sanitise(value, KEY_UNSAFE, hash_raw=False)


# The Redis sink's guard keys (consumer/sinks/redis.py): a stream key K with a hash tag guards
# event U as ``K:guard:U``, U as it is when it is made of GUARD_ID's characters, else ``~`` and
# its SHA-256. A stream key (with a hash tag) never ends so: :func:`ends_as_guard`.
GUARD_ID: Final = re.compile(r"[0-9A-Za-z._-]+")
_GUARD_END: Final = re.compile(r"[0-9A-Za-z._-]+|~[0-9a-f]{64}")


def ends_as_guard(key: str) -> bool:
    """Whether ``key`` ends as the guard of an event in a stream key with a hash tag does:
    ``:guard:`` and a uniqueEventId as the guard writes it. (Its last ``:guard:`` is the one:
    what follows holds no ``:``.)"""
    _, separator, last = key.rpartition(":guard:")
    return bool(separator) and _GUARD_END.fullmatch(last) is not None


def always_ends_as_guard(template: Template, constants: Mapping[str, str]) -> bool:
    """Whether every key of ``template`` (with a hash tag) ends as a guard key does, whatever
    the event: its text after the last event token, with the stream's own tokens
    (``constants``, as they go into a key), holds a ``:guard:`` and ends as a guard does. (The
    key's last ``:guard:`` is then that text's: one begun before it would begin earlier.)"""
    if hash_tag(template.sample()) is None:
        return False
    parts = template.parts
    last = max((i for i, (_, f) in enumerate(parts) if f in EVENT_TOKENS), default=-1)
    tail = "".join(lit + (constants[f] if f is not None else "") for lit, f in parts[last + 1 :])
    return ends_as_guard(tail)


def hash_tag(key: str) -> str | None:
    """The Redis Cluster hash tag of ``key``: what is between its first ``{`` and the next
    ``}`` when that is not empty; None when the whole key is hashed."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end < 0 or end == start + 1:
        return None
    return key[start + 1 : end]


def check_key(template: Template) -> None:
    """A Redis stream key template: not empty, its braces (values hold none, so every key's
    braces are the template's) either none or a hash tag, for the guard keys; with a hash tag,
    not one whose keys of plain values end as a guard key does (:func:`ends_as_guard`)."""
    if not template.text:
        raise TemplateError("empty", 'e.g. stream_key = "opera:{chainCode}"')
    sample = template.sample()
    if hash_tag(sample) is None and ("{" in sample or "}" in sample):
        raise TemplateError(
            "its braces make no Redis Cluster hash tag (a non-empty {...} first in the key), "
            "so an event's guard could not share the stream's slot",
            'use no braces, or one hash tag such as "opera:{{{chainCode}}}" '
            "(which makes opera:{DEMO})",
        )
    if hash_tag(sample) is not None and ends_as_guard(sample):
        raise TemplateError(
            "it ends as the guard keys do (':guard:' and an id or a token), so each stream "
            "key could be another event's guard",
            'end it otherwise, e.g. "opera:{{{chainCode}}}:{hotelId}"',
        )
