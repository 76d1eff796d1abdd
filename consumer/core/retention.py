"""Up to when processed ids may be pruned: the retention behind the wall clock, advancing no
faster than the monotonic clock while the daemon runs.

Processed ids are stamped with the wall clock, and pruning deletes those older than the
retention. A wall clock stepped forward by more than the retention (NTP correcting a host that
booted with a stale clock) would make every id look old, ids of events seconds old included:
their copies, sent again at the next inclusive resume, would be delivered twice. So after the
first cutoff, each one moves at most as far as the monotonic clock did since the one before.

The first cutoff of a run cannot lean on the monotonic clock: it is also held at the retention
behind the newest stamp in the store. A host that stamped ids with a clock days slow and
restarted once NTP had corrected it would otherwise delete those ids at once (they look old to
the corrected clock), the ids of the events just before the checkpoint among them. After a long
downtime that keeps more ids than needed, until the monotonic clock has caught up.
"""

from __future__ import annotations


class PruneCutoff:
    __slots__ = ("_cutoff", "_retention_s", "_since")

    def __init__(self, retention_s: float) -> None:
        self._retention_s = retention_s
        self._cutoff: float | None = None
        self._since = 0.0

    @property
    def first(self) -> bool:
        """No cutoff yet: the next is bounded by the store's newest stamp (``newest``)."""
        return self._cutoff is None

    def next(self, wall_now: float, monotonic_now: float, newest: float | None = None) -> float:
        """The cutoff (wall-clock seconds) for a prune now: ids stamped before it may go.
        ``newest``: the newest stamp in the store, which bounds the first cutoff."""
        wall = wall_now - self._retention_s
        if self._cutoff is None:
            cutoff = wall if newest is None else min(wall, newest - self._retention_s)
        else:
            cutoff = min(wall, self._cutoff + max(0.0, monotonic_now - self._since))
        self._cutoff, self._since = cutoff, monotonic_now
        return cutoff
