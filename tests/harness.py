"""The real daemon, with its jsonl sink behind a switch: while OUTAGE_FILE exists, every write
fails transiently (a sink that is down). Run as a process so that the chaos test can kill -9 it.

    python tests/harness.py CONFIG OUTAGE_FILE

The positive conditions that tests wait for (``committed``, ``sink_failures``...) are in
tests/support.py.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from consumer.config import load_settings
from consumer.core.events import Event
from consumer.errors import TransientSinkError
from consumer.logs import configure
from consumer.runtime.daemon import Daemon, register_secrets
from consumer.sinks.jsonl import JsonlSink


class SwitchableSink(JsonlSink):
    def __init__(self, path: Path, outage: Path) -> None:
        super().__init__(path)
        self.outage = outage

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        if self.outage.exists():
            raise TransientSinkError("sink down (chaos)")
        await super().write(stream, events)


async def main(config: Path, outage: Path) -> int:
    settings = load_settings(config)
    configure(settings.log.level, settings.log.format)
    register_secrets(settings)
    daemon = await Daemon.create(settings, sink=SwitchableSink(settings.sink.path, outage))
    return await daemon.run()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]))))
