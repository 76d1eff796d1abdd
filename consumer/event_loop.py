"""The event loop ``run`` runs the daemon on: asyncio's own, or uvloop's (libuv).

uvloop makes each of the event loop's steps cheaper: a socket write, a timer, a callback. That
pays where the loop's thread does little else: one webhook POST per event, where the HTTP
client's steps are most of the daemon's CPU (measured, issue #12: 11-12% more POSTs a second
with 4 workers, interleaved with asyncio's runs). With the jsonl sink it gained nothing beyond
the noise and cost 3-4 MB of resident memory (its goal is 60 MB), so ``auto`` keeps asyncio's
loop for every other sink. The other commands run on asyncio's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .config.settings import EventLoop


def chosen(setting: EventLoop, sink_type: str) -> Literal["asyncio", "uvloop"]:
    """The loop the ``event_loop`` setting means for a daemon with this sink."""
    if setting != "auto":
        return setting
    return "uvloop" if sink_type == "webhook" else "asyncio"


def factory(name: Literal["asyncio", "uvloop"]) -> Callable[[], asyncio.AbstractEventLoop]:
    """What :class:`asyncio.Runner` makes its loop with (uvloop imported only when chosen)."""
    if name == "asyncio":
        return asyncio.new_event_loop
    import uvloop  # noqa: PLC0415  # only where chosen: 3-4 MB of resident memory

    return uvloop.new_event_loop


def running() -> str:
    """The running loop's kind, as the daemon logs it: ``uvloop`` or ``asyncio``."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]
