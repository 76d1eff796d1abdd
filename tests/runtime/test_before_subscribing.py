"""Frames that arrive before the daemon has subscribed (around connection_ack and the
connection status query): malformed ones are dead-lettered as later ones are, and none of
them ends the session."""

from __future__ import annotations

from pathlib import Path

from operator_support import dead_letters
from support import count_lines, make_settings, running, wait_until

GREETINGS = [
    "{oops",
    # a `next` whose id is a list: not hashable, so it must not reach the lookup of our
    # queries' ids (it raised TypeError there while the status query waited)
    '{"type":"next","id":["q"],"payload":{"data":{"connection":{"status":"Active"}}}}',
]


async def test_frames_before_the_subscription_are_dead_lettered_and_the_stream_goes_on(
    sandbox_factory, tmp_path: Path
):
    gw = await sandbox_factory(backlog=20)
    gw.greet_with(GREETINGS)  # before the ack, and again before the status query's answer
    settings = make_settings(tmp_path, gw.url, connection={"status_check": "on"})
    async with running(settings) as daemon:
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 20)
        await wait_until(lambda: daemon.pipelines["main"].dead_lettered >= 4)
        runner = daemon.runners["main"]
        assert runner.stats.malformed == 4
        assert runner.stats.connections == 1  # one session, never ended by them
    rows = await dead_letters(tmp_path / "state.db")
    assert sorted((r.reason, r.payload, r.attempts) for r in rows) == sorted(
        ("malformed", frame, 2) for frame in GREETINGS
    )
