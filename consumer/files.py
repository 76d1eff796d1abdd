"""What the file-based parts (the jsonl and sqlite sinks, the SQLite state store and its lease
file) share about the file system: the directories they create, which errors a restart may
cure, and which file a path names (a file removed or replaced underneath is written no more)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

# A full disk or quota, a failing device, a resource busy for now: may clear by itself (space
# freed, the device back), so a supervisor's restart helps (exit 1, not 78, which systemd's
# RestartPreventExitStatus=78 never restarts). Anything else (EACCES, EROFS, EISDIR, ELOOP,
# ENOTDIR...) is the configuration's, for an operator.
_MAY_CLEAR = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN})
DISK_FIX = "free disk space or fix the device"


def may_clear(exc: OSError) -> bool:
    """Whether ``exc`` is the disk's or the device's, not the configuration's."""
    return exc.errno in _MAY_CLEAR


def make_dirs(folder: Path, mode: int = 0o700) -> None:
    """Create ``folder`` and each missing directory above it with ``mode`` (the umask may
    narrow it, never widen it: under a umask of 000, ``mkdir(parents=True)`` would make them
    world-writable, and any local user could remove or replace the files in them). Directories
    already there are left as they are."""
    missing = []
    at = folder
    while not at.is_dir():
        missing.append(at)
        if at.parent == at:
            break
        at = at.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            if not d.is_dir():  # a file there: as mkdir(exist_ok=True) says
                raise


def identity(st: os.stat_result) -> tuple[int, int]:
    """Which file this is, whatever its name: (device, inode)."""
    return (st.st_dev, st.st_ino)


def identity_at(path: Path) -> tuple[int, int] | None:
    """:func:`identity` of the file ``path`` names now; None when it names none. Another
    OSError (a permission taken away, the device gone) is the caller's to word."""
    try:
        return identity(os.stat(path))
    except FileNotFoundError:
        return None
