"""The webhook sink's tests run on both event loops the daemon may give it: asyncio's and
uvloop's, its default (consumer.event_loop). The other sinks' on asyncio's, as they run."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop

ASYNCIO = {"asyncio": asyncio.new_event_loop}
BOTH = {**ASYNCIO, "uvloop": uvloop.new_event_loop}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return BOTH if item.path.name.startswith("test_webhook_") else ASYNCIO
