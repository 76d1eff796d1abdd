"""Fault injection: the chaos options and the failures the tests queue.

:class:`Chaos` owns the seeded generator every chaos decision draws from (so a ``chaos_seed``
replays the same faults): malformed and oversized frames grown into the log
(``malformed_every``, ``oversized_bytes``), the points where a stream drops its TCP connection
or closes (``drop_every``, ``close_every``, ``close_codes``), redelivery on resume
(``redeliver``), and the queued failures of upgrades, token requests, REST requests and
``connection_init`` / ``subscribe`` messages. :class:`PongPolicy` is a session's answer to
pings (``ignore_pings``, ``defer_pongs``). Silencing a connection is
:meth:`~consumer.sandbox.websocket.WsSession.silence`.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import h11

from ..http11 import respond
from .eventlog import ChainLog
from .options import SandboxOptions, SandboxStats
from .problem import problem


class FailureQueue:
    """HTTP failures (status, Retry-After) answered to the next requests, before anything
    else is checked."""

    def __init__(self) -> None:
        self._queue: list[tuple[int, float | None]] = []

    def extend(self, statuses: list[int], retry_after: float | None) -> None:
        self._queue.extend((s, retry_after) for s in statuses)

    def __len__(self) -> int:
        return len(self._queue)

    def clear(self) -> None:
        self._queue.clear()

    def answer(self, conn: h11.Connection, writer: asyncio.StreamWriter) -> bool:
        """Answer with the next injected failure, if one is queued."""
        if not self._queue:
            return False
        status, retry_after = self._queue.pop(0)
        extra = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        respond(conn, writer, status, problem(status, "injected failure"), extra=extra)
        return True


class Chaos:
    def __init__(self, options: SandboxOptions) -> None:
        self._options = options
        self._rng = random.Random(options.chaos_seed)
        self.malformed: dict[str, list[str]] = {c: [] for c in options.chains}
        self.token_failures = FailureQueue()
        self.rest_failures = FailureQueue()
        self._upgrade_failures: list[int] = []
        self._close_on: dict[str, list[int]] = {}
        self.greetings: list[str] = []  # sent before every answer that precedes a subscription

    def grow(self, log: ChainLog, n: int, *, decoded: bool = True) -> list[dict[str, Any]]:
        """Generate ``n`` events, with a malformed frame every ``malformed_every`` if asked
        (not ``decoded``: a templated log need not return them)."""
        every = self._options.malformed_every
        if not every:
            return log.generate(n, decoded=decoded)
        malformed = self.malformed[log.chain]
        made: list[dict[str, Any]] = []
        done = 0
        while done < n:
            step = min(n - done, every - log.count % every)
            made += log.generate(step, decoded=decoded)
            done += step
            if log.count % every == 0:
                raw = malformed_frame(len(malformed), self._rng, self._options.oversized_bytes)
                malformed.append(raw)
                log.append_malformed(raw)
        return made

    def fault_point(self, every: int) -> float:
        """About ``every`` events from now (seeded jitter), or never."""
        return self._rng.randint(max(1, every // 2), every * 3 // 2) if every else math.inf

    def close_code(self) -> int:
        """The code of a chaos close, one of ``close_codes``."""
        return self._rng.choice(self._options.close_codes)

    def rewind(self, start: int) -> int:
        """Where a resume from an offset really starts: ``redeliver`` entries earlier, so the
        consumer has duplicates to deduplicate."""
        return max(0, start - self._options.redeliver)

    def fail_upgrades(self, statuses: list[int]) -> None:
        self._upgrade_failures.extend(statuses)

    def upgrade_failure(self) -> int | None:
        """The HTTP status to refuse this upgrade with, if one is queued."""
        return self._upgrade_failures.pop(0) if self._upgrade_failures else None

    def close_on(self, message: str, codes: list[int]) -> None:
        self._close_on.setdefault(message, []).extend(codes)

    def close_for(self, message: str) -> int | None:
        """The close code queued for this type of client message, if any."""
        codes = self._close_on.get(message)
        return codes.pop(0) if codes else None


class PongPolicy:
    """A session's answer to a client's ping: a pong now, none (``ignore_pings``), or one
    held until the backlog is sent (``defer_pongs``, as OHIP in burst mode)."""

    def __init__(self, options: SandboxOptions, stats: SandboxStats) -> None:
        self._ignore = options.ignore_pings
        self._defer = options.defer_pongs
        self._stats = stats
        self._deferred = 0

    def answer_now(self, *, bursting: bool) -> bool:
        """A ping came in: True if it is answered at once."""
        if self._ignore:
            return False
        if bursting and self._defer:
            self._deferred += 1
            self._stats.max_deferred_pongs = max(self._stats.max_deferred_pongs, self._deferred)
            return False
        return True

    def release(self) -> int:
        """The backlog is sent: how many held pongs to send now."""
        held, self._deferred = self._deferred, 0
        return held


def malformed_frame(n: int, rng: random.Random, oversized: int = 0) -> str:
    """The n-th malformed frame: each kind a consumer must survive, each text unique."""
    if oversized and n % 6 == 5:
        padding = "x" * oversized
        return (
            '{"id":"x","type":"next","payload":{"data":{"newEvent":{"metadata":{"offset":"1",'
            f'"uniqueEventId":"big-{n}"}},"detail":[{{"elementName":"Notes","newValue":"{padding}"'
            "}]}}}}"
        )
    kinds = (
        '{"id":"x","type":"next","payload":{"data":{"newEvent":{"metadata":{"offset":"',  # cut
        '{"id":"x","type":"next","payload":{"data":{"newEvent":{"eventName":"NO METADATA %d"}}}}',
        '{"id":"x","type":"next","payload":{"data":{"newEvent":{"metadata":'
        '{"offset":%d,"uniqueEventId":null}}}}}',  # wrong types
        '[%d, "not an object"]',
        '{"type":"surprise","n":%d}',
    )
    kind = kinds[n % len(kinds)]
    return (kind % n if "%d" in kind else kind + str(n)) + " " * rng.randrange(3)
