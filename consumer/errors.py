"""Exceptions of opera-consumer.

OperaConsumerError
├── ConfigError          bad configuration; exit status 78 (EX_CONFIG) so systemd won't loop
├── AuthError            the token endpoint refused us
│   └── (retriable=False for 400/401/403, True for exhausted transient failures)
├── StreamStopped        a stream ended for good (4400, 4403, HTTP 400, repeated 4401)
├── StoreError           the state store cannot be used (the message names the path and fix)
│   └── SchemaTooNew     written by a newer opera-consumer
└── SinkError
    ├── TransientSinkError   retried with backoff; intake pauses meanwhile
    ├── PermanentSinkError   this event cannot be delivered: dead-letter it
    └── SinkUnusable         the sink's own data is not what was committed (a file truncated,
                             replaced or unknown to the state store): stop, exit 78
"""

from __future__ import annotations


class OperaConsumerError(Exception):
    retriable = False


class ConfigError(OperaConsumerError):
    pass


class AuthError(OperaConsumerError):
    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class StreamStopped(OperaConsumerError):
    pass


class StoreError(OperaConsumerError):
    """``retriable``: may clear by itself (disk full, locked, I/O error), so a supervisor's
    restart can help; otherwise an operator must act (corrupt file, permissions, schema)."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class SchemaTooNew(StoreError):
    pass


class SinkError(OperaConsumerError):
    pass


class TransientSinkError(SinkError):
    """``retry_after``: seconds the far end asked us to wait (``Retry-After``), if it did."""

    retriable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentSinkError(SinkError):
    """``unique_event_id`` names the event at fault when the sink knows it."""

    def __init__(self, message: str, *, unique_event_id: str | None = None) -> None:
        super().__init__(message)
        self.unique_event_id = unique_event_id


class SinkUnusable(SinkError):
    """Writing on would lose or corrupt data: an operator must look (exit status 78)."""
