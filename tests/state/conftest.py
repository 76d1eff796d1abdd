"""Fixtures of the state-store tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from pg import DATABASE, PostgresServer
from store_backends import PostgresBackend


@pytest.fixture
async def pg_backend(postgres_server: PostgresServer) -> AsyncIterator[PostgresBackend]:
    """A fresh schema on the test PostgreSQL server, dropped afterwards."""
    b = PostgresBackend(
        postgres_server.dsn(), f"{postgres_server.host}:{postgres_server.port}/{DATABASE}"
    )
    try:
        yield b
    finally:
        await b.drop()
