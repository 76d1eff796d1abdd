"""Where the daemon keeps its state: the :class:`StateStore` interface, its two backends
(SQLite, the default; PostgreSQL), and the lease that keeps a second daemon off it.

The PostgreSQL backend needs asyncpg (the ``postgres`` extra): it is imported when it is
configured, never for the SQLite one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import StateSettings
from ..errors import ConfigError
from .base import StateStore
from .lease import Held, Lease, acquire, acquire_replay, current_holder, holder
from .sqlite import SqliteStore

if TYPE_CHECKING:
    from .postgres import PostgresStore
else:

    def __getattr__(name: str) -> Any:
        if name == "PostgresStore":
            from .postgres import PostgresStore  # noqa: PLC0415  # asyncpg: an extra

            return PostgresStore
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Held",
    "Lease",
    "PostgresStore",
    "SqliteStore",
    "StateStore",
    "acquire",
    "acquire_replay",
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
        from .postgres import PostgresStore  # noqa: PLC0415  # asyncpg: an extra

        return await PostgresStore.open(
            settings.dsn.get_secret_value(),
            schema=settings.schema_,
            pool_min=settings.pool_min,
            pool_max=settings.pool_max,
            timeout_s=settings.timeout_s,
            create=create,
        )
    return await SqliteStore.open(settings.path, synchronous=settings.synchronous, create=create)
