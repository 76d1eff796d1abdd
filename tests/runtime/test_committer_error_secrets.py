"""A commit that fails with a message repeating a secret (a sink's or store's error quoting a
password the server echoed): neither the "commit failed; retrying" line nor the last error the
views show (/readyz, STATUS=, ``status``) may hold a piece of it. Cut before it was masked, the
whole copies shrank to "***" and the copy at the cut was left as its prefix. Real Committer and
SqliteStore; the sink's sync fails."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from log_capture import captured_logs

from consumer.core.events import Event
from consumer.core.watermark import Position
from consumer.errors import TransientSinkError
from consumer.logs import REDACTOR
from consumer.runtime.committer import Committer
from consumer.runtime.daemon import for_a_person
from consumer.sinks.base import PlainSink
from consumer.state.sqlite import SqliteStore

SECRET = "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"  # 64 characters
SAID = "the server said: " + (SECRET + " ") * 100


class FailingSink(PlainSink):
    name = "failing"

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        return None

    async def sync(self, position: str | None) -> None:
        raise TransientSinkError(SAID)


def pieces_in(text: str) -> list[str]:
    return [SECRET[i : i + 8] for i in range(len(SECRET) - 7) if SECRET[i : i + 8] in text]


async def test_a_failed_commit_shows_no_piece_of_a_secret_its_error_repeats(
    tmp_path: Path,
) -> None:
    REDACTOR.add(SECRET)  # as register_secrets does for a configured one
    store = await SqliteStore.open(tmp_path / "state.db")
    committer = Committer(store, FailingSink(), max_events=1, interval_s=0.01)
    try:
        seq = committer.arrived("main", Position("000001", "u1"))
        committer.processed("main", ["u1"], [seq])
        with captured_logs() as logs:
            task = asyncio.create_task(committer.run())
            try:
                async with asyncio.timeout(10):
                    while "commit failed; retrying" not in logs.getvalue():
                        await asyncio.sleep(0.01)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        line = next(x for x in logs.getvalue().splitlines() if "commit failed; retrying" in x)
        assert "the server said: *** ***" in line, line
        assert not pieces_in(line), line
        shown = for_a_person(committer.last_error)  # as /readyz, STATUS= and `status` show it
        assert shown.startswith("the server said: *** ***"), shown
        assert not pieces_in(shown), shown
        assert not pieces_in(committer.last_error)
    finally:
        await store.close()
