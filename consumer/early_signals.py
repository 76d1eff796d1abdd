"""Signals that come before the daemon's event loop handles them.

``opera-consumer run`` spends its first second or so importing its dependencies and reading the
configuration; a SIGTERM, SIGINT or SIGHUP then would take its default action (killed by the
signal, which systemd takes for a clean exit after SIGHUP, so ``Restart=on-failure`` would not
start it again). :func:`hold` is the command line's first step: from then on such a signal is
noted and the daemon, once started, stops as for one taken while it starts (0, or 1 for
SIGHUP); a second one exits at once (130). Only the interpreter's own start-up, before our
code runs, is left to the default action. Standard library only: this runs before the rest is
imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType
from typing import Any

# SIGHUP too: a hang-up must not kill us undrained (exit 129 looks clean to systemd); it drains
# and exits 1, so Restart=on-failure starts us again with the config re-read.
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_INTERRUPTED = 130  # errors.ExitCode.INTERRUPTED, without importing more than the stdlib

_noted: list[signal.Signals] = []
_before: dict[signal.Signals, Any] = {}  # the handlers hold() replaced


def hold() -> None:
    """Note the signals from now on instead of dying of them (in the main thread only, where
    Python runs signal handlers; the command line called from a worker thread leaves them)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _noted.clear()
    for sig in SIGNALS:
        _before.setdefault(sig, signal.getsignal(sig))
        signal.signal(sig, _note)


def take() -> signal.Signals | None:
    """The first signal noted since :func:`hold`, if any; it is the caller's from then on."""
    return _noted.pop(0) if _noted else None


def release(*, deliver: bool = True) -> None:
    """The handlers :func:`hold` replaced, back. A signal noted meanwhile and not taken is
    acted on now, as it would have been (a command other than ``run``), unless ``deliver`` is
    false (a daemon that stopped, or never started: its exit status says what happened)."""
    for sig, handler in _before.items():  # None: one not set from Python, i.e. the default
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    _before.clear()
    noted = take()
    _noted.clear()
    if noted is not None and deliver:
        signal.raise_signal(noted)


def _note(signum: int, frame: FrameType | None) -> None:
    if _noted:
        with contextlib.suppress(OSError):  # nobody reading our stderr: exit all the same
            os.write(2, b"opera-consumer: a second signal while starting: exiting now\n")
        os._exit(_INTERRUPTED)
    _noted.append(signal.Signals(signum))
