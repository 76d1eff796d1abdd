"""What the CLI prints: aligned tables for people, JSON for scripts, UTC timestamps.

A table shows each value as it is (``CHECK OUT``, not ``CHECK_OUT``), its columns aligned;
values come from the wire, so each cell is bounded and its control characters escaped (a
terminal escape sequence in an event name must not reach the operator's terminal). Scripts
read ``--json``, which keeps every value whole.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ..config import Settings
from ..core.printable import printable
from ..state.sqlite import store_error

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
CELL_LIMIT = 80  # characters of one value in a table (--json has them all)


def emit(rows: Sequence[dict[str, Any]], cols: Sequence[str], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(list(rows), indent=2))
        return
    table = [list(cols)] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def cell(value: Any) -> str:
    """A value for a table: "-" for none, "" quoted (it would otherwise be invisible)."""
    if value is None:
        return "-"
    if value == "":
        return '""'
    return printable(value, CELL_LIMIT)


def escaped(text: str) -> str:
    """Whole ``text`` for a terminal, line by line: every character but the line breaks that
    :func:`printable` would escape is escaped (a dead letter's payload is the wire's text)."""
    return "\n".join(printable(line, len(line)) for line in text.split("\n"))


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def parse_when(text: str, *, now: float | None = None) -> float:
    """``2026-11-30``, ``2026-11-30T10:00:00`` (UTC unless it says otherwise) or an age like
    ``30m``, ``6h``, ``7d`` (that long ago). ValueError with the accepted forms."""
    now = time.time() if now is None else now
    m = _DURATION.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r}: use an ISO date/time (2026-11-30T10:00:00, UTC by default) "
            "or an age (30m, 6h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def no_store(settings: Settings) -> bool:
    """True (and says so) when the daemon has never created its SQLite state store. (A
    PostgreSQL one is opened without creating it; a missing schema is reported there.)"""
    if settings.state.backend != "sqlite":
        return False
    try:
        if settings.state.path.exists():
            return False
    except OSError as exc:  # a directory this user cannot enter: name it and the fix
        raise store_error(settings.state.path, exc) from None
    print(f"no state store at {settings.state.path} yet: the daemon has not run", file=sys.stderr)
    return True
