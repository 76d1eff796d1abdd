"""What the file-based parts (the jsonl and sqlite sinks, the SQLite state store and its lease
file) share about the file system: which errors a restart may cure."""

from __future__ import annotations

import errno

# A full disk or quota, a failing device, a resource busy for now: may clear by itself (space
# freed, the device back), so a supervisor's restart helps (exit 1, not 78, which systemd's
# RestartPreventExitStatus=78 never restarts). Anything else (EACCES, EROFS, EISDIR, ELOOP,
# ENOTDIR...) is the configuration's, for an operator.
_MAY_CLEAR = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN})
DISK_FIX = "free disk space or fix the device"


def may_clear(exc: OSError) -> bool:
    """Whether ``exc`` is the disk's or the device's, not the configuration's."""
    return exc.errno in _MAY_CLEAR
