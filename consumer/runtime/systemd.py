"""sd_notify without libsystemd: one datagram per notification to ``$NOTIFY_SOCKET``.

The protocol is stable and tiny (``KEY=VALUE`` lines; a name starting with ``@`` is an abstract
socket). Outside systemd (no ``$NOTIFY_SOCKET``, e.g. Docker) every call is a no-op.
"""

from __future__ import annotations

import os
import socket

# systemd reads a notification into a PIPE_BUF (4096 byte) buffer and ignores a longer one
# whole, READY=1 or WATCHDOG=1 in it too: a status goes alone, and well short of that.
STATUS_MAX_BYTES = 2048


def notify(*assignments: str) -> bool:
    """Send e.g. ``notify("READY=1")`` (a status: :func:`status`); best effort, never blocks
    or raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        return False  # vsock and others: not for a service on the host
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.setblocking(False)
        try:
            s.connect(address)
            s.send("\n".join(assignments).encode())
        except OSError:
            return False
    return True


def status(text: str) -> bool:
    """``STATUS=text`` in a datagram of its own, cut to ``STATUS_MAX_BYTES`` of UTF-8."""
    data = text.encode()
    if len(data) > STATUS_MAX_BYTES:
        text = data[: STATUS_MAX_BYTES - 3].decode(errors="ignore") + "…"
    return notify(f"STATUS={text}")


def extend_timeout(seconds: float) -> bool:
    """``EXTEND_TIMEOUT_USEC``: systemd (236 and later) waits ``seconds`` more for our next
    word or our exit in the state we are in (starting, stopping), past its configured timeout;
    it only ever lengthens its timeout by this, never shortens it."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1e6))}")


def watchdog_period() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec``), or None when unset."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
