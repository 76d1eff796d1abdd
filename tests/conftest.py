"""Fixtures: a clean environment and the sandbox gateway on loopback."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from pg import postgres_dsn, postgres_server  # noqa: F401  # fixtures: a PostgreSQL server

from consumer.sandbox import SandboxGateway, SandboxOptions


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("OPERA_CONSUMER_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)


@pytest.fixture
async def sandbox_factory() -> AsyncIterator[Callable[..., Awaitable[SandboxGateway]]]:
    started: list[SandboxGateway] = []

    async def start(**options: Any) -> SandboxGateway:
        options.setdefault("ping_interval_s", 0.5)
        gw = SandboxGateway(SandboxOptions(**options))
        await gw.start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await gw.close()
