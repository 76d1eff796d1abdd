"""The jsonl sink's rotated files: their names, when to start the next one, which to delete.

A rotated file is named by a strftime pattern formatted (in UTC) at the file's start, then
``.NNNNNN``, its sequence number (zero-padded to six digits), then the pattern's suffix:
``events-%Y%m%dT%H%M%SZ.jsonl`` gives ``events-20240101T120000Z.000042.jsonl``. The sink
gives each new file the next number, so the numbers order the files, and they are what
proves after a crash which files came after the committed one. The number is always the
last dot-separated part before the suffix, so no pattern can make it ambiguous.

With ``interval_s`` the files start on multiples of the interval since the Unix epoch (UTC:
a daily file starts at 00:00 UTC) and are named by that start; by size alone, by the time
they start. Retention picks whole files only, and only ones the checkpoint has gone past.

Pure: the standard library only, no file is touched here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import PurePath
from typing import Final

SEQ_DIGITS: Final = 6
# The strftime fields a pattern may use, as they can be read back from a name (exact digits:
# a file of someone else is not taken for one of ours). Locale-dependent ones are left out,
# and %s (glibc reads the time as local time).
_FIELDS: Final = {
    "Y": r"\d{4}",
    "G": r"\d{4}",
    "m": r"\d{2}",
    "d": r"\d{2}",
    "H": r"\d{2}",
    "M": r"\d{2}",
    "S": r"\d{2}",
    "y": r"\d{2}",
    "V": r"\d{2}",
    "j": r"\d{3}",
    "u": r"\d",
    "F": r"\d{4}-\d{2}-\d{2}",
    "T": r"\d{2}:\d{2}:\d{2}",
}
FIELDS_SHOWN: Final = " ".join("%" + f for f in _FIELDS)
_DIRECTIVE: Final = re.compile(r"%(.?)", re.DOTALL)
# Bucket starts the interval check formats: around a year's end and a leap day.
_PROBES: Final = (1_704_067_200, 1_709_164_800)  # 2024-01-01, 2024-02-29 (UTC)


class PatternError(ValueError):
    """A name pattern the sink cannot use: what is wrong and how to fix it."""

    def __init__(self, what: str, fix: str) -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what} -> {fix}")


def default_pattern(path: PurePath) -> str:
    """``events.jsonl`` -> ``events-%Y%m%dT%H%M%SZ.jsonl``: names sort in time order."""
    return f"{_escape(path.stem)}-%Y%m%dT%H%M%SZ{_escape(path.suffix)}"


def check_pattern(pattern: str) -> None:
    """Raise :class:`PatternError` unless ``pattern`` makes file names the sink can read back."""
    if not pattern:
        raise PatternError("is empty", "leave rotate_name out for the default, or give a name")
    if "/" in pattern or any(not c.isprintable() for c in pattern):
        raise PatternError(
            "is a file name in the directory of path: no '/' and no control characters",
            "give a name only (the files go beside path)",
        )
    for m in _DIRECTIVE.finditer(pattern):
        field = m.group(1)
        if field != "%" and field not in _FIELDS:
            shown = f"%{field}" if field.isprintable() and field else "a lone %"
            raise PatternError(
                f"uses {shown}, which the sink cannot read back from a file name",
                f"use only {FIELDS_SHOWN}, and %% for a literal %",
            )


def distinguishes(pattern: str, interval_s: int) -> bool:
    """Whether the names of successive intervals' files differ by more than their numbers."""
    stem, _ = _split(pattern)
    for probe in _PROBES:
        first = probe - probe % interval_s
        names = [_format(stem, first + k * interval_s) for k in range(-40, 41)]
        if any(a == b for a, b in pairwise(names)):
            return False
    return True


class Rotation:
    """When the sink starts a new file, what it is called, and which old ones go."""

    __slots__ = (
        "_regex",
        "_stem",
        "_suffix",
        "interval_s",
        "keep_days",
        "keep_files",
        "max_bytes",
        "pattern",
    )

    def __init__(
        self,
        pattern: str,
        *,
        max_bytes: int | None = None,
        interval_s: int | None = None,
        keep_files: int | None = None,
        keep_days: float | None = None,
    ) -> None:
        check_pattern(pattern)
        if max_bytes is None and interval_s is None:
            raise ValueError("a rotation needs max_bytes or interval_s")
        self.pattern = pattern
        self.max_bytes = max_bytes
        self.interval_s = interval_s
        self.keep_files = keep_files
        self.keep_days = keep_days
        self._stem, self._suffix = _split(pattern)
        self._regex = re.compile(_regex(self._stem), re.DOTALL)

    @property
    def suffix(self) -> str:
        """What every file name of the series ends with (``.jsonl``), after its number."""
        return self._suffix

    @property
    def retains(self) -> bool:
        return self.keep_files is not None or self.keep_days is not None

    def started_at(self, now: float) -> int:
        """Start time of a file begun at ``now``: its interval's start, or ``now``."""
        if self.interval_s is None:
            return int(now)
        return int(now // self.interval_s) * self.interval_s

    def due(self, size: int, adding: int, started: int, clock: Callable[[], float]) -> int | None:
        """Before appending ``adding`` bytes to a file of ``size`` begun at ``started``: the
        start of the next file if one is due now, else None. By size: before a batch would
        take a non-empty file past ``max_bytes`` (a single batch is never split). By time:
        at the first write after its interval ended (an idle stream makes no empty files)."""
        if self.max_bytes is not None and size and size + adding > self.max_bytes:
            return self.started_at(clock())
        if self.interval_s is not None:
            now = clock()
            if now // self.interval_s > started // self.interval_s:
                return self.started_at(now)
        return None

    def name(self, seq: int, started: int) -> str:
        return f"{_format(self._stem, started)}.{seq:0{SEQ_DIGITS}d}{self._suffix}"

    def seq_of(self, name: str) -> int | None:
        """The sequence number of one of our file names; None for any other name."""
        if not name.endswith(self._suffix):
            return None
        head = name[: len(name) - len(self._suffix)] if self._suffix else name
        stem, dot, digits = head.rpartition(".")
        if not dot or len(digits) < SEQ_DIGITS or not (digits.isascii() and digits.isdigit()):
            return None
        if self._regex.fullmatch(stem) is None:
            return None
        return int(digits)

    def expired(
        self, finished: Sequence[tuple[int, str, float]], committed_seq: int, now: float
    ) -> list[str]:
        """Which of the ``finished`` files ((seq, name, mtime) of those before the current
        one) retention deletes: past ``keep_files`` newest or ``keep_days`` old, whichever
        says so first, and only those before the committed one (fully committed)."""
        out: list[str] = []
        for rank, (seq, name, mtime) in enumerate(sorted(finished, reverse=True)):
            if seq >= committed_seq:
                continue
            too_many = self.keep_files is not None and rank >= self.keep_files
            too_old = self.keep_days is not None and now - mtime > self.keep_days * 86400
            if too_many or too_old:
                out.append(name)
        return out


def _escape(text: str) -> str:
    return text.replace("%", "%%")


def _split(pattern: str) -> tuple[str, str]:
    """(the part formatted by strftime, the literal suffix the number goes before)."""
    suffix = PurePath(pattern).suffix
    if "%" in suffix:
        return pattern, ""
    return pattern[: len(pattern) - len(suffix)], suffix


def _format(stem: str, started: int) -> str:
    return time.strftime(stem, time.gmtime(started))


def _regex(stem: str) -> str:
    out, at = [], 0
    for m in _DIRECTIVE.finditer(stem):
        out.append(re.escape(stem[at : m.start()]))
        field = m.group(1)
        out.append("%" if field == "%" else _FIELDS[field])
        at = m.end()
    out.append(re.escape(stem[at:]))
    return "".join(out)
