"""`dlq replay` when a sink raises a BaseException: `_one` caught Exception only, so a
SystemExit or a library's own BaseException ended the replay with a traceback (the rows after
it never tried), and a handler's KeyboardInterrupt (a ^C, or what a handler raised) printed a
traceback instead of saying what became of the rows. Now, as in the daemon's pipeline, the
row at fault fails and stays in the DLQ and the rest go on; a KeyboardInterrupt or ^C stops
the replay with a message and 130, what was delivered recorded, the rest still in the DLQ."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from support import cli, dead_letter, replayed

from consumer.commands import dlq
from consumer.config import StateSettings, load_settings
from consumer.core.events import Event
from consumer.core.records import CommitBatch
from consumer.errors import ExitCode
from consumer.sinks.base import PlainSink
from consumer.state import open_store

REPO = Path(__file__).resolve().parents[2]

# A python sink target beside the config (where the sink looks for its module): it appends
# each delivered uniqueEventId to delivered.txt, and raises for uid-2.
HANDLERS = '''
from pathlib import Path

OUT = Path(__file__).with_name("delivered.txt")


class LibraryExit(BaseException):
    """Like a library's own BaseException: not an Exception."""


async def _deliver(events, fault):
    for ev in events:
        if ev.unique_event_id == "uid-2":
            raise fault
    with OUT.open("a") as f:
        f.writelines(ev.unique_event_id + "\\n" for ev in events)


async def base_exception(stream, events):
    await _deliver(events, LibraryExit("the library gave up on uid-2"))


async def keyboard_interrupt(stream, events):
    await _deliver(events, KeyboardInterrupt())
'''


def installed(tmp_path: Path, target: str) -> Path:
    (tmp_path / "faultsink.py").write_text(HANDLERS)
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[streams.main]
gateway_url = "https://gw.example.com"
chain_code = "CHAIN1"
app_key = "app-key-0001"

[streams.main.auth]
client_id = "cid"
client_secret = "client-secret-0001"
enterprise_id = "ENT1"

[state]
path = "{tmp_path / "state.db"}"

[sink]
type = "python"
target = "faultsink:{target}"
"""
    )
    return config


async def seed(state: StateSettings, n: int) -> None:
    store = await open_store(state)
    try:
        await store.commit(CommitBatch(dead_letters=[dead_letter(i) for i in range(1, n + 1)]))
    finally:
        await store.close()


async def left_and_seen(state: StateSettings, ids: list[str]) -> tuple[list[str], set[str]]:
    store = await open_store(state)
    try:
        left = [str(r.unique_event_id) for r in await store.dead_letters()]
        return left, await store.seen("main", ids)
    finally:
        await store.close()


def env() -> dict[str, str]:
    keep = {
        k: v
        for k, v in os.environ.items()
        if k != "CREDENTIALS_DIRECTORY" and not k.upper().startswith("OPERA_CONSUMER_")
    }
    return {**keep, "PYTHONPATH": str(REPO)}


def delivered(tmp_path: Path) -> list[str]:
    out = tmp_path / "delivered.txt"
    return out.read_text().split() if out.exists() else []


async def test_a_handlers_base_exception_fails_its_row_and_the_replay_goes_on(
    tmp_path: Path,
) -> None:
    config = installed(tmp_path, "base_exception")
    state = StateSettings(path=tmp_path / "state.db")
    await seed(state, 3)
    done = await asyncio.to_thread(
        cli, "dlq", "replay", "--all", "--json", "--config", str(config), env=env()
    )
    assert done.returncode == ExitCode.RUNTIME, done.stderr  # a row left in the DLQ
    outcomes = json.loads(done.stdout)
    assert [(o["unique_event_id"], o["result"]) for o in outcomes] == [
        ("uid-1", "delivered"),
        ("uid-2", "failed"),
        ("uid-3", "delivered"),
    ]
    assert "LibraryExit" in outcomes[1]["detail"] and "gave up on uid-2" in outcomes[1]["detail"]
    assert "Traceback" not in done.stderr
    assert delivered(tmp_path) == ["uid-1", "uid-3"]
    assert await left_and_seen(state, ["uid-1", "uid-2", "uid-3"]) == (
        ["uid-2"],
        {"uid-1", "uid-3"},
    )


async def test_a_handlers_keyboard_interrupt_stops_the_replay_with_a_message(
    tmp_path: Path,
) -> None:
    """KeyboardInterrupt is how a second ^C reaches a replay: it stops (the python sink lets
    it through for that), cleanly: 130 and what became of the rows, not a traceback."""
    config = installed(tmp_path, "keyboard_interrupt")
    state = StateSettings(path=tmp_path / "state.db")
    await seed(state, 3)
    done = await asyncio.to_thread(
        cli, "dlq", "replay", "--all", "--config", str(config), env=env()
    )
    assert done.returncode == ExitCode.INTERRUPTED, done.stderr
    assert "interrupted" in done.stderr and "stay in it" in done.stderr
    assert "Traceback" not in done.stderr
    assert delivered(tmp_path) == ["uid-1"]
    assert await left_and_seen(state, ["uid-1", "uid-2", "uid-3"]) == (
        ["uid-2", "uid-3"],
        {"uid-1"},
    )
    again = await asyncio.to_thread(
        cli, "dlq", "list", "--json", "--config", str(config), env=env()
    )
    assert [row["unique_event_id"] for row in json.loads(again.stdout)] == ["uid-2", "uid-3"]


class LibraryExit(BaseException):
    """A sink library's own BaseException (not an Exception)."""


class LibrarySink(PlainSink):
    """A sink (not the python sink, which converts a handler's BaseException itself) whose
    library raises a BaseException for uid-2."""

    name = "library"

    def __init__(self) -> None:
        self.written: list[str] = []

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        for ev in events:
            if ev.unique_event_id == "uid-2":
                raise LibraryExit("connection state lost for uid-2")
        self.written += [ev.unique_event_id for ev in events]


@pytest.mark.usefixtures("hermetic_config", "contained_logging")
async def test_a_sinks_own_base_exception_fails_its_row_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = installed(tmp_path, "base_exception")
    settings = load_settings(config)
    await seed(settings.state, 3)
    sink = LibrarySink()
    monkeypatch.setattr(dlq, "build_sink", lambda *_: sink)
    outcomes = await replayed(settings)
    assert [(o.unique_event_id, o.result) for o in outcomes] == [
        ("uid-1", "delivered"),
        ("uid-2", "failed"),
        ("uid-3", "delivered"),
    ]
    assert outcomes[1].detail.startswith("LibraryExit: connection state lost for uid-2")
    assert sink.written == ["uid-1", "uid-3"]
    assert await left_and_seen(settings.state, ["uid-1", "uid-2", "uid-3"]) == (
        ["uid-2"],
        {"uid-1", "uid-3"},
    )
