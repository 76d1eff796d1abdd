"""Signals that come before the daemon's event loop handles them.

``opera-consumer run`` spends its first second or so importing its dependencies and reading the
configuration; a SIGTERM, SIGINT or SIGHUP then would take its default action (killed by the
signal, which systemd takes for a clean exit after SIGHUP, so ``Restart=on-failure`` would not
start it again). :func:`hold` is the command line's first step: from then on such a signal is
noted and the daemon, once started, stops as for one taken while it starts (0, or 1 for
SIGHUP); a second one exits at once (130). Only the interpreter's own start-up, before our
code runs, is left to the default action. ``dlq replay`` keeps SIGTERM and SIGHUP held and then
has them cancel its task (:func:`cancelling`), as asyncio.run does for ^C: what it delivered is
recorded before it exits. Standard library only: this runs before the rest is imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Collection, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import asyncio

# SIGHUP too: a hang-up must not kill us undrained (exit 129 looks clean to systemd); it drains
# and exits 1, so Restart=on-failure starts us again with the config re-read.
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# What stops a `dlq replay` as ^C does (a replay under systemd-run, or over ssh dropped).
REPLAY_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
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


def release(*, deliver: bool = True, keep: Collection[signal.Signals] = ()) -> None:
    """The handlers :func:`hold` replaced, back. A signal noted meanwhile and not taken is
    acted on now, as it would have been (a command other than ``run``), unless ``deliver`` is
    false (a daemon that stopped, or never started: its exit status says what happened).
    ``keep``: those stay held, and one of them noted stays for :func:`take` (a command that
    takes them over once its event loop runs: :func:`cancelling`)."""
    for sig in [s for s in _before if s not in keep]:
        handler = _before.pop(sig)  # None: one not set from Python, i.e. the default
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    if _noted and _noted[0] in keep:
        return
    noted = take()
    _noted.clear()
    if noted is not None and deliver:
        signal.raise_signal(noted)


@contextlib.contextmanager
def cancelling(
    task: asyncio.Task[Any], signals: Collection[signal.Signals]
) -> Iterator[list[signal.Signals]]:
    """Within: one of ``signals`` cancels ``task`` (noted before, it does so now), as
    asyncio.run does for ^C, so its ``finally`` clauses run; a second one exits at once (130).
    Yields the signals taken (the first is the one that cancelled). In the main thread only,
    where the event loop can handle signals; elsewhere nothing changes."""
    taken: list[signal.Signals] = []
    if threading.current_thread() is not threading.main_thread():
        yield taken
        return
    loop = task.get_loop()

    def on_signal(sig: signal.Signals) -> None:
        if taken:
            _exit_now(b"opera-consumer: a second signal: exiting now\n")
        taken.append(sig)
        task.cancel()

    before = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        if _noted and _noted[0] in signals:  # one before the loop handled them
            on_signal(_noted.pop(0))
        yield taken
    finally:
        for sig, handler in before.items():  # held by the command line till its end, as before
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _exit_now(said: bytes) -> NoReturn:
    with contextlib.suppress(OSError):  # nobody reading our stderr: exit all the same
        os.write(2, said)
    os._exit(_INTERRUPTED)


def _note(signum: int, frame: FrameType | None) -> None:
    if _noted:
        _exit_now(b"opera-consumer: a second signal while starting: exiting now\n")
    _noted.append(signal.Signals(signum))
