"""Frames that arrive before the daemon has subscribed (around connection_ack and the
connection status query): malformed ones are dead-lettered as later ones are, and none of
them ends the session."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from operator_support import dead_letters
from support import count_lines, make_settings, running, wait_until

from consumer.core.evidence import PAYLOAD_LIMIT
from consumer.runtime.assembly import register_secrets
from consumer.sandbox.options import SandboxOptions

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


async def test_a_frame_that_echoes_the_app_key_is_dead_lettered_masked(
    sandbox_factory, tmp_path: Path
):
    """A gateway's error that quotes the request (subscriptions-transport-ws' connection_error
    does) went to the DLQ whole, key and all; one longer than the 64 KiB kept had the key cut
    across the end. Masked, with the size and SHA-256 of the frame as received."""
    gw = await sandbox_factory(backlog=5)
    key = SandboxOptions().app_key
    echo = json.dumps({"type": "connection_error", "payload": {"message": f"bad key {key}"}})
    head = '{"type":"connection_error","payload":"'
    across = head + "x" * (PAYLOAD_LIMIT - len(head) - 5) + key + '"}'
    gw.greet_with([echo, across])
    settings = make_settings(tmp_path, gw.url)
    register_secrets(settings)  # as daemon.run does
    async with running(settings) as daemon:
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 5)
        await wait_until(lambda: daemon.pipelines["main"].dead_lettered >= 2)
    rows = {r.payload_size: r for r in await dead_letters(tmp_path / "state.db")}
    for frame in (echo, across):
        row = rows[len(frame)]
        assert row.payload_sha256 == hashlib.sha256(frame.encode()).hexdigest()
        assert "***" in row.payload
        assert not any(key[i : i + 4] in row.payload for i in range(len(key) - 3))
