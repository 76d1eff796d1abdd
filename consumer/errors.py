"""Exceptions of opera-consumer, and the one table of exit statuses.

OperaConsumerError
├── ConfigError          bad configuration: exit 78 (EX_CONFIG), so systemd won't loop
├── InvalidInput         a subscription argument the schema refuses (also a ValueError)
├── AuthError            the token endpoint refused us
│                        (retriable=False for 400/401/403, True for exhausted transient failures)
├── StreamStopped        a stream ended for good (4400, 4403, HTTP 400, repeated 4401)
├── SessionError         a graphql-transport-ws call out of order (a bug of ours)
├── LeaseHeld            another process holds the state store: exit 78
├── StoreError           the state store cannot be used (the message names the path and fix)
│   ├── SchemaTooNew     written by a newer opera-consumer
│   └── StagedRowRefused a commit failed on a row a sink staged in it, for that row's data:
│                        the committer writes those rows through the sink's own path instead
├── OperatorRefused      an operator command that would do harm now: exit 1
│   ├── OffsetRefused    `offset set/reset` (unknown stream, bad offset, a daemon holds it)
│   └── ReplayRefused    `dlq replay` (the jsonl sink's one writer is running)
└── SinkError
    ├── TransientSinkError   retried with backoff; intake pauses meanwhile
    ├── PermanentSinkError   this event cannot be delivered: dead-letter it
    ├── SinkUnusable         the sink's own data is not what was committed (a file truncated,
    │                        replaced or unknown to the state store): stop, exit 78
    └── SinkLost             bytes handed to the OS cannot be proven on disk nor written again
                             (a failed fsync): stop, exit 1; the restart replays them

Errors of the libraries underneath (``sqlite3``, ``asyncpg``, ``aiohttp``, ``websockets``) are
translated into these where they enter: the state store, the sinks, the token provider.
"""

from __future__ import annotations

import enum
from typing import Any


class ExitCode(enum.IntEnum):
    """What the process's exit status means (README "Commands and exit status")."""

    OK = 0  # stopped on request, drained and checkpointed
    RUNTIME = 1  # a failure a restart may cure; a failed check or a refused operator command
    USAGE = 2  # command-line usage
    SOFTWARE = 70  # EX_SOFTWARE: an unexpected error (a bug); safe to restart
    CONFIG = 78  # EX_CONFIG: only an operator can fix it; systemd: RestartPreventExitStatus=78
    INTERRUPTED = 130  # a second signal cut the drain short (state still consistent)


class OperaConsumerError(Exception):
    retriable = False


class ConfigError(OperaConsumerError):
    pass


class InvalidInput(OperaConsumerError, ValueError):
    """A subscription argument does not match the schema; the message names the field."""


class AuthError(OperaConsumerError):
    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class StreamStopped(OperaConsumerError):
    pass


class SessionError(OperaConsumerError):
    """A graphql-transport-ws call the session's state does not allow (a bug of ours, not
    the server's)."""


class LeaseHeld(OperaConsumerError):
    """``where``: the state store as the operator knows it (a file, or a schema on a server)."""

    def __init__(self, where: str, holder: dict[str, Any] | None) -> None:
        who = "another process"
        if holder and holder.get("member"):
            who = f"fleet member {holder['member']}"
        elif holder:
            who = f"pid {holder.get('pid')}"
            if holder.get("host"):
                who += f" on {holder['host']}"
        super().__init__(
            f"{who} holds the state store {where}: stop that opera-consumer first, or give "
            "this one its own state store ([state] path, or schema)"
        )
        self.holder = holder


class Fenced(OperaConsumerError):
    """A fleet commit (or ``what`` else: an anchor) refused: another member holds these
    streams' leases now (a newer epoch), so this member's work on them since its last commit
    must not become durable."""

    def __init__(self, streams: frozenset[str], what: str = "commit") -> None:
        super().__init__(f"lease lost for {', '.join(sorted(streams))}: {what} refused")
        self.streams = streams


class StoreError(OperaConsumerError):
    """``retriable``: may clear by itself (disk full, locked, I/O error), so a supervisor's
    restart can help; otherwise an operator must act (corrupt file, permissions, schema)."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class SchemaTooNew(StoreError):
    pass


class StagedRowRefused(StoreError):
    """The commit failed on a row a sink staged in it (:class:`~consumer.core.records.Staged`),
    for that row's data: a constraint, a trigger's RAISE or an expression of its failing on
    the row, at its statement or, a deferred constraint's, at COMMIT (which names no row).
    Nothing was committed. Not what every event meets (a connection lost, a privilege,
    a table dropped): those are plain :class:`StoreError`. The message is bounded and never
    quotes the row (a violation's DETAIL, a cast's value)."""


class OperatorRefused(OperaConsumerError):
    """An operator command refused because doing it now would do harm; says why."""


class OffsetRefused(OperatorRefused):
    pass


class ReplayRefused(OperatorRefused):
    pass


class SinkError(OperaConsumerError):
    pass


class TransientSinkError(SinkError):
    """``retry_after``: seconds the far end asked us to wait (``Retry-After``), if it did.
    ``delivered``: how many of the write's first events the sink took before it failed (a
    webhook's chunks already answered 2xx): the retry writes only the rest."""

    retriable = True

    def __init__(
        self, message: str, *, retry_after: float | None = None, delivered: int = 0
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.delivered = delivered


class PermanentSinkError(SinkError):
    """``unique_event_id`` names the event at fault when the sink knows it. ``delivered``: as
    for :class:`TransientSinkError`: those events are done, never written again."""

    def __init__(
        self, message: str, *, unique_event_id: str | None = None, delivered: int = 0
    ) -> None:
        super().__init__(message)
        self.unique_event_id = unique_event_id
        self.delivered = delivered


class SinkUnusable(SinkError):
    """Writing on could lose or corrupt data: an operator must look (exit status 78)."""


class SinkLost(SinkError):
    """Writes since the last commit can be neither proven durable nor done again in this
    process (a failed fsync): only a restart, which replays them from the checkpoint, goes on
    (exit status 1)."""


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit status for an error that ends a command or the daemon."""
    if isinstance(exc, ConfigError | LeaseHeld | SinkUnusable | InvalidInput):
        return ExitCode.CONFIG
    if isinstance(exc, StoreError):
        return ExitCode.RUNTIME if exc.retriable else ExitCode.CONFIG
    if isinstance(exc, OperatorRefused | SinkError | AuthError):
        return ExitCode.RUNTIME
    return ExitCode.SOFTWARE
