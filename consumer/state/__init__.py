"""Where the daemon keeps its state: the :class:`StateStore` interface, the SQLite store, and
the lease that keeps a second daemon off it."""

from __future__ import annotations

from ..config import StateSettings
from .base import StateStore
from .lease import Lease, holder
from .sqlite import SqliteStore

__all__ = ["Lease", "SqliteStore", "StateStore", "holder", "open_store"]


async def open_store(settings: StateSettings, *, create: bool = True) -> SqliteStore:
    """The configured state store (SQLite: the one backend so far)."""
    return await SqliteStore.open(settings.path, synchronous=settings.synchronous, create=create)
