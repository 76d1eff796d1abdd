"""Fleet mode: this member's side of sharing the streams with identical daemons.

Once per ``renew_interval_s`` the member ticks: one statement heartbeats and renews every
lease it holds (:meth:`FleetTable.tick`); a stream missing from the answer was taken by
another member after its lease ran out, so it stops at once (its late commits are refused by
the epoch anyway). Then it reads the fleet (members, leases) and follows
:func:`consumer.core.assignment.plan`: takes free streams up to its fair share, hands its
surplus over gracefully (``complete``, drain, commit, release) when others need them.

Self-fencing: a lease lasts ``lease_ttl_s`` from the renewal that set it. A member that has
not renewed for ``lease_ttl_s - 2 x renew_interval_s`` (measured on its own monotonic clock
from the *start* of its last successful renewal) stops every stream before anyone may take
them over: two members never consume one stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from ..config import Settings
from ..core.assignment import Member, plan
from ..core.evidence import describe
from ..core.records import Fence
from ..errors import StoreError

log = structlog.get_logger(__name__)

StartStream = Callable[[str], Awaitable[None]]
StopStream = Callable[[str, bool], Awaitable[None]]  # (stream, lost)


def member_name(configured: str) -> str:
    return configured or f"{socket.gethostname()}:{os.getpid()}"


@dataclass(slots=True)
class FleetCounters:
    takeovers: int = 0  # leases taken from another member (expired, or handed over)
    lost: int = 0  # found taken by another member at a renewal
    self_fenced: int = 0  # times every stream was stopped for want of a renewal


class Fleet:
    def __init__(
        self,
        settings: Settings,
        *,
        start_stream: StartStream,
        stop_stream: StopStream,
        spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
    ) -> None:
        from ..state.fleet import FleetTable  # noqa: PLC0415  # asyncpg: an extra

        f = settings.fleet
        self.settings = f
        self.member = member_name(f.member)
        self.table = FleetTable(
            settings.state,
            self.member,
            host=socket.gethostname(),
            pid=os.getpid(),
            weight=f.weight,
            started_at=time.time(),
            lease_ttl_s=f.lease_ttl_s,
        )
        self.streams = sorted(settings.streams)
        self.epochs: dict[str, int] = {}  # streams held (running or starting) -> epoch
        self._moving: set[str] = set()  # being stopped (released or lost)
        self._start, self._stop_stream, self._spawn = start_stream, stop_stream, spawn
        self.counters = FleetCounters()
        self.members_live = 0
        self._renewed_at: float | None = None  # monotonic start of the last good renewal
        self._joined_at: float | None = None
        self._closing = False

    def fence(self) -> Fence:
        return Fence(self.member, dict(self.epochs))

    @property
    def leases_held(self) -> int:
        return len(self.epochs)

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        f = self.settings
        while True:  # cancelled by the daemon's shutdown, after the drain: renewing till then
            started = time.monotonic()
            try:
                await self._tick(started)
            except StoreError as exc:
                log.warning("fleet tick failed; retrying", error=describe(exc))
            except Exception:  # a bug: the leases must keep being renewed or fenced
                log.exception("fleet tick failed unexpectedly; retrying")
            self._self_fence_if_due(time.monotonic())
            await asyncio.sleep(max(0.0, f.renew_interval_s - (time.monotonic() - started)))

    async def _tick(self, started: float) -> None:
        f = self.settings
        timeout = f.renew_interval_s
        if self._joined_at is None:
            await self.table.join(self.streams, timeout)
        held = {s: e for s, e in self.epochs.items() if s not in self._moving}
        renewal = await self.table.tick(held, timeout)
        self._renewed_at = started
        if self._joined_at is None:
            self._joined_at = started
            log.info("joined the fleet", member=self.member, streams=len(self.streams))
        for stream in sorted(set(held) - renewal.renewed):
            self.counters.lost += 1
            log.error(
                "lease lost: another member took this stream; stopping it here",
                stream=stream,
                epoch=held[stream],
            )
            self._move(stream, lost=True)
        if self._closing:
            return  # draining for shutdown: keep the leases, take and move nothing
        view = await self.table.view(timeout)
        live = [m.as_member() for m in view.live()]
        self.members_live = len(live)
        if time.monotonic() - self._joined_at < f.renew_interval_s and not self.epochs:
            return  # one tick to see who else is starting with us, then take a share
        me = Member(self.member, f.weight, renewal.draining)
        decision = plan(
            me,
            [m for m in live if m.id != self.member],
            view.leases,
            self.streams,
            held=[s for s in self.epochs if s not in self._moving],
            now=view.now,
        )
        for stream in decision.release:
            log.info("handing a stream over", stream=stream, share=decision.share)
            self._move(stream, lost=False)
        wanted = [s for s in decision.acquire if s not in self._moving]  # not until stopped
        if wanted:
            got = await self.table.acquire(wanted, timeout)
            for a in got:
                self.epochs[a.stream] = a.epoch
                if a.previous is not None and a.previous != self.member:
                    self.counters.takeovers += 1
                log.info("lease taken", stream=a.stream, epoch=a.epoch, previous=a.previous or "-")
                try:
                    await self._start(a.stream)
                except Exception as exc:  # e.g. the store failed: give the lease back
                    log.warning("starting a stream failed", stream=a.stream, error=describe(exc))
                    self.epochs.pop(a.stream, None)
                    with contextlib.suppress(StoreError):
                        await self.table.release({a.stream: a.epoch}, timeout)

    def _self_fence_if_due(self, now: float) -> None:
        f = self.settings
        since = self._renewed_at
        if since is None or not self.epochs or now - since < f.self_fence_after_s:
            return
        running = [s for s in self.epochs if s not in self._moving]
        if not running:
            return
        self.counters.self_fenced += 1
        log.error(
            "cannot renew leases: stopping every stream before the leases can expire",
            streams=len(running),
            since_s=round(now - since, 1),
        )
        for stream in running:
            self._move(stream, lost=True)

    def lost(self, streams: frozenset[str]) -> None:
        """The store refused a commit for these streams (their epoch is old): stop them."""
        for stream in sorted(streams):
            if stream in self.epochs and stream not in self._moving:
                self.counters.lost += 1
                self._move(stream, lost=True)

    def _move(self, stream: str, *, lost: bool) -> None:
        self._moving.add(stream)
        self._spawn(self._moved(stream, lost), f"fleet-{'lose' if lost else 'release'}-{stream}")

    async def _moved(self, stream: str, lost: bool) -> None:
        try:
            await self._stop_stream(stream, lost)
            epoch = self.epochs.get(stream)
            if not lost and epoch is not None:
                try:
                    await self.table.release({stream: epoch}, self.settings.renew_interval_s)
                except StoreError as exc:  # it expires by itself
                    log.warning("releasing a lease failed", stream=stream, error=describe(exc))
        finally:
            self.epochs.pop(stream, None)
            self._moving.discard(stream)

    # --- shutdown -----------------------------------------------------------------------------

    def stop_acquiring(self) -> None:
        """Shutdown: keep renewing what is held (the drain may take a while), move nothing."""
        self._closing = True

    async def hand_over(self) -> None:
        """After the daemon stopped and committed every stream: release what is still ours
        (the next members take it at their next tick) and leave the fleet."""
        timeout = self.settings.renew_interval_s
        with contextlib.suppress(StoreError):
            await self.table.release(dict(self.epochs), timeout)
            self.epochs.clear()
        with contextlib.suppress(StoreError):
            await self.table.leave(timeout)
        await self.table.close()
