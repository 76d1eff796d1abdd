"""Text from outside made safe for one line a person reads: a table cell, an error message,
systemd's ``STATUS=`` (where a newline would start another assignment)."""

from __future__ import annotations

from .evidence import SHOWN_LIMIT


def printable(value: object, limit: int = SHOWN_LIMIT) -> str:
    """At most ``limit`` characters of ``value`` (then "…"), each character that
    :meth:`str.isprintable` refuses (controls, line separators, bidi overrides, lone
    surrogates) written as its escape (``\\x1b``, ``\\n``, ``\\u202e``). Never raises."""
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:  # a __str__ that fails on what it holds
        text = f"<{type(value).__name__}>"
    cut = text[:limit]
    if not cut.isprintable():
        cut = "".join(
            c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode()
            for c in cut
        )
    return cut + "…" if len(text) > limit else cut
