"""Fixtures: a clean environment and the sandbox gateway on loopback. And the hypothesis
profile every test runs under: no per-example deadline and no "too slow" health check, since
the machine may be loaded (issue #9 item 12); a test may still ask for more examples."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pysink
import pytest
import structlog
import uvloop
from hypothesis import HealthCheck, settings
from nats_server import nats_factory, nats_server  # noqa: F401  # fixtures: NATS
from pg import pg_proxy, postgres_dsn, postgres_server, schema  # noqa: F401  # PostgreSQL
from redis_server import redis_factory_fixture, redis_server_fixture  # noqa: F401  # Redis

import consumer.config.loading as config_loading
import consumer.config.settings as config_settings
import consumer.logs
from consumer.sandbox import SandboxGateway, SandboxOptions

settings.register_profile(
    "loaded-machine", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("loaded-machine")

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
BOTH_LOOPS = {**LOOPS, "uvloop": uvloop.new_event_loop}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """A test marked ``both_loops`` runs on asyncio's event loop and on uvloop's, which the
    daemon runs on with the webhook sink (consumer.event_loop); the others on asyncio's."""
    return BOTH_LOOPS if item.get_closest_marker("both_loops") else LOOPS


@pytest.fixture(autouse=True)
def _root_logging() -> Iterator[None]:
    """The root logger as it was before the test: ``consumer.logs.configure`` points it at
    the test's ``sys.stderr`` (capsys's, closed after the test), and every later test's
    records then printed a "--- Logging error ---" dump into its own stderr."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("OPERA_CONSUMER_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)


@pytest.fixture
def hermetic_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Config loading that sees only what the test writes: no secret directories, no
    /etc/opera-consumer, and tmp_path as the working directory (the environment is already
    clean, see _clean_env)."""
    monkeypatch.setattr(config_settings, "SECRET_DIRS", ())
    monkeypatch.setattr(config_loading, "DEFAULT_CONFIG_PATHS", (Path("config.toml"),))
    monkeypatch.chdir(tmp_path)


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


@pytest.fixture
def fresh_pysink() -> Iterator[None]:
    """An empty tests/pysink.py record (the Python sink target) before and after the test."""
    pysink.reset()
    yield
    pysink.reset()


@pytest.fixture
def contained_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For tests that run the commands in-process (tests/operator_support.py ``cli``): the
    commands configure logging for the whole process: JSON on stderr (stdout stays for
    their output), and no structlog logger cached for good. Pytest's own handlers are kept,
    and everything is put back afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    root_level = root.level
    ours: list[logging.Handler] = []
    real = consumer.logs.configure

    def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
        others = [h for h in root.handlers if h not in ours]
        real(level, "json", stream)  # replaces every handler of the root logger with its own
        ours.extend(root.handlers)
        root.handlers[:] = [*others, *root.handlers]
        structlog.configure(cache_logger_on_first_use=False)

    monkeypatch.setattr(consumer.logs, "configure", configure)
    configure("warning")
    yield
    for handler in ours:
        root.removeHandler(handler)
    root.setLevel(root_level)
    structlog.configure(**saved)
