"""Where the daemon keeps its state: the :class:`StateStore` interface, its two backends
(SQLite, the default; PostgreSQL), and the lease that keeps a second daemon off it."""

from __future__ import annotations

from ..config import StateSettings
from ..errors import ConfigError
from .base import StateStore
from .lease import Held, Lease, acquire, current_holder, holder
from .postgres import PostgresStore
from .sqlite import SqliteStore

__all__ = [
    "Held",
    "Lease",
    "PostgresStore",
    "SqliteStore",
    "StateStore",
    "acquire",
    "current_holder",
    "holder",
    "open_store",
]


async def open_store(settings: StateSettings, *, create: bool = True) -> StateStore:
    """The configured state store (``[state] backend``: "sqlite" or "postgres").

    ``create=False``: refuse a store the daemon never created (a missing file, a database
    without the schema) instead of creating an empty one."""
    if settings.backend == "postgres":
        if settings.dsn is None:  # the settings refuse this; kept for a hand-built model
            raise ConfigError("state.dsn: backend = 'postgres' needs dsn (a secret)")
        return await PostgresStore.open(
            settings.dsn.get_secret_value(),
            schema=settings.schema_,
            pool_min=settings.pool_min,
            pool_max=settings.pool_max,
            timeout_s=settings.timeout_s,
            create=create,
        )
    return await SqliteStore.open(settings.path, synchronous=settings.synchronous, create=create)
