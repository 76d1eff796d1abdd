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
import textwrap
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from ..config import Settings
from ..core.printable import printable
from ..state.sqlite import store_error

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
CELL_LIMIT = 80  # characters of one value in a table (--json has them all)


def emit(rows: Sequence[dict[str, Any]], cols: Sequence[str], *, as_json: bool) -> None:
    with Printer(cols, as_json=as_json, settle=None) as out:
        for row in rows:
            out.row(row)


class Printer:
    """Rows printed as they come (a command may go through more than it could hold): the
    JSON array element by element (the same text as one ``json.dumps(rows, indent=2)``, and
    closed however the command ends), the table line by line. The table's column widths are
    the header's, ``widths``' and those of the first ``settle`` rows (None: every row, held
    until the end); a later, longer cell widens its own line only."""

    def __init__(
        self,
        cols: Sequence[str],
        *,
        as_json: bool,
        widths: Mapping[str, int] | None = None,
        settle: int | None = 0,
    ) -> None:
        self._cols = list(cols)
        self._json = as_json
        self._least = [max(len(c), (widths or {}).get(c, 0)) for c in self._cols]
        self._settle = settle
        self._held: list[list[str]] = []
        self._widths: list[int] | None = None
        self._count = 0
        self._closed = False

    def __enter__(self) -> Printer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def count(self) -> int:
        """Rows printed (or held) so far."""
        return self._count

    def row(self, row: dict[str, Any]) -> None:
        self._count += 1
        if self._json:
            element = textwrap.indent(json.dumps(row, indent=2), "  ")
            print("[\n" + element if self._count == 1 else ",\n" + element, end="", flush=True)
            return
        cells = [cell(row.get(c)) for c in self._cols]
        if self._widths is None:
            self._held.append(cells)
            if self._settle is not None and len(self._held) >= self._settle:
                self._flush()
            return
        self._line(cells, self._widths)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._json:
            print("[]" if self._count == 0 else "\n]", flush=True)
        elif self._widths is None:
            self._flush()

    def _flush(self) -> None:
        table = [self._cols, *self._held]
        self._widths = [
            max(least, *(len(line[i]) for line in table)) for i, least in enumerate(self._least)
        ]
        for line in table:
            self._line(line, self._widths)
        self._held = []

    def _line(self, cells: Sequence[str], widths: Sequence[int]) -> None:
        print(
            "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip(), flush=True
        )


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
    """UTC, to the second; a time no calendar holds (1e300, NaN: a row anyone may write) as
    the number it is."""
    if ts is None:
        return None
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    except (OverflowError, ValueError, OSError):
        return printable(ts, 40)


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
