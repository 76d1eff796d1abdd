"""The GraphQL of a ``subscribe`` message, read as OHIP validates it: the inline
``newEvent(input: {...})`` arguments checked against the schema's patterns (else 4400), and
the ``connection`` query. :class:`Close` is how a session's checks end it with a close code."""

from __future__ import annotations

import json
import re
from typing import Any

_ARG = re.compile(r'\s*(\w+)\s*:\s*("(?:[^"\\]|\\.)*"|true|false|[0-9]+)\s*,?')
_CONNECTION_QUERY = re.compile(r"^\s*(query\b[^{]*)?\{\s*connection\s*\{")
_INPUT = re.compile(r"newEvent\s*\(\s*input\s*:\s*\{(?P<args>[^{}]*)\}\s*\)")
_RULES: dict[str, tuple[str, int]] = {
    "chainCode": (r"^[A-Za-z0-9 _%#$&-]+$", 20),
    "offset": (r"^[0-9]+$", 20),
    "offsetType": (r"^(highest)$", 8),
    "hotelCode": (r"^[A-Za-z0-9 _%#$&,-]+$", 50),
}


class Close(Exception):
    """Close the WebSocket with ``code`` and ``reason`` (cut to the 123 bytes a frame holds)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason.encode()[:123].decode(errors="ignore")


def is_connection_query(query: str) -> bool:
    """``Query.connection``: is a consumer subscribed?"""
    return _CONNECTION_QUERY.search(query) is not None


def parse_input(query: str) -> dict[str, Any]:
    """The inline ``newEvent(input: {...})`` arguments, validated like the schema's scalars."""
    m = _INPUT.search(query)
    if m is None:
        raise Close(4400, "Invalid GraphQL Subscription: newEvent(input: {...}) expected")
    text = m.group("args")
    args: dict[str, Any] = {}
    pos = 0
    while pos < len(text.rstrip()):
        a = _ARG.match(text, pos)
        if a is None:
            raise Close(4400, "Invalid GraphQL Subscription: cannot parse input")
        name, raw = a.group(1), a.group(2)
        pos = a.end()
        if name == "delta":
            if raw not in ("true", "false"):
                raise Close(4400, "Value for delta is invalid - Expected a Boolean")
            args[name] = raw == "true"
            continue
        if name not in _RULES:
            raise Close(4400, f"Field {name} is not defined by type NewEventInput")
        value = json.loads(raw) if raw.startswith('"') else raw
        pattern, max_len = _RULES[name]
        if not isinstance(value, str) or len(value) > max_len or not re.match(pattern, value):
            raise Close(
                4400,
                f"Value for {name} is invalid - Expected {raw[:20]} to match pattern {pattern}",
            )
        args[name] = value
    return args
