"""The sandbox's benchmark modes: ``fast_backlog`` (templated events, the backlog sent as
pre-encoded frames) and ``live_timestamps`` (the backlog ending at the start, new events
stamped with the wall clock; the default) or fixed ones (from 2024), driven
by a bare websockets client, and the daemon consuming a fast backlog."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from support import committed, make_settings, running, sandbox_token, sink_ids, wait_until
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from consumer.cli import _parser
from consumer.core import protocol
from consumer.core.events import event_time
from consumer.core.protocol import Next, SubscribeInput
from consumer.sandbox import SandboxGateway, SandboxOptions
from consumer.sandbox.eventlog import BACKLOG_STEP_US
from consumer.sandbox.templated import CHUNK, STEP_US

OPTS = SandboxOptions()
UTC = ZoneInfo("UTC")


@asynccontextmanager
async def ws(gw: SandboxGateway) -> AsyncIterator[ClientConnection]:
    url = protocol.subscription_url(gw.url, OPTS.app_key)
    async with connect(
        url,
        subprotocols=[protocol.SUBPROTOCOL],  # type: ignore[list-item]
        compression=None,
        max_size=2**24,
    ) as conn:
        await conn.send(protocol.connection_init(await sandbox_token(gw), OPTS.app_key))
        assert orjson.loads(await conn.recv())["type"] == "connection_ack"
        yield conn


async def receive(conn: ClientConnection, n: int, sub_id: str) -> list[Next]:
    """The next ``n`` events, each decoded as the daemon does (a DecodeError fails)."""
    got: list[Next] = []
    async with asyncio.timeout(60):
        while len(got) < n:
            msg = protocol.decode(await conn.recv())
            if isinstance(msg, (protocol.Ping, protocol.Pong)):
                continue
            assert isinstance(msg, Next), msg
            assert msg.id == sub_id
            got.append(msg)
    return got


def keys(events: list[Next]) -> list[tuple[str, str, str | None]]:
    return [(m.event.unique_event_id, m.event.offset, m.event.primary_key) for m in events]


async def test_fast_backlog_is_valid_in_order_and_the_ground_truth(sandbox_factory):
    n = 3 * CHUNK + 123  # several pre-encoded chunks and a partial one
    gw = await sandbox_factory(backlog=n, fast_backlog=True)
    truth = gw.event_keys("DEMO")
    assert len(truth) == n
    sub = str(uuid.uuid4())
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe(sub, SubscribeInput(chain_code="DEMO", offset="0")))
        got = await receive(conn, n, sub)
        assert keys(got) == truth
        offsets = [int(m.event.offset) for m in got]
        assert all(b > a for a, b in itertools.pairwise(offsets))
        assert any(b - a > 1 for a, b in itertools.pairwise(offsets))  # gaps
        assert len({m.event.unique_event_id for m in got}) == n
        assert len({m.event.primary_key for m in got}) < n  # keys get several events
        assert [m.event.raw for m in got] == gw.events("DEMO")
        for m in got[:50]:
            assert event_time(m.event.timestamp, UTC) is not None
            assert m.event.event_name and m.event.module_name and m.event.hotel_id
        # Events generated after the backlog continue it.
        new = gw.append("DEMO", 3)
        more = await receive(conn, 3, sub)
        assert [m.event.raw for m in more] == new
        assert int(more[0].event.offset) > offsets[-1]
        await conn.send(protocol.complete(sub))
    assert gw.stats.events_sent == n + 3


async def test_fast_backlog_replays_from_an_offset_highest_and_filters(sandbox_factory):
    gw = await sandbox_factory(backlog=2 * CHUNK, fast_backlog=True)
    truth = gw.event_keys("DEMO")
    start = CHUNK - 7  # inside the first chunk: the rest of it, then the next
    below = str(int(truth[start][1]) - 1)  # the previous event's offset, or a gap
    for sub_id, offset, expected in (
        ("a", truth[start][1], truth[start:]),
        # Ids of other lengths than a UUID's JSON too (their frames are built on demand).
        ("some-id", below, truth[start - 1 :] if truth[start - 1][1] == below else truth[start:]),
    ):
        async with ws(gw) as conn:
            await conn.send(
                protocol.subscribe(sub_id, SubscribeInput(chain_code="DEMO", offset=offset))
            )
            assert keys(await receive(conn, len(expected), sub_id)) == expected
            await conn.send(protocol.complete(sub_id))
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe("h", SubscribeInput(chain_code="DEMO", highest=True)))
        assert keys(await receive(conn, 1, "h")) == truth[-1:]
        await conn.send(protocol.complete("h"))
    wanted = [e for e in gw.events("DEMO") if e["hotelId"] == "HOTEL1"]
    async with ws(gw) as conn:
        sub = SubscribeInput(chain_code="DEMO", offset="0", delta=True, hotel_codes=("HOTEL1",))
        await conn.send(protocol.subscribe("d", sub))
        got = await receive(conn, len(wanted), "d")
        assert [m.event.raw["metadata"] for m in got] == [e["metadata"] for e in wanted]
        for m, w in zip(got, wanted, strict=True):
            assert m.event.raw["detail"] == [
                d for d in w["detail"] if d["oldValue"] != d["newValue"]
            ]
        await conn.send(protocol.complete("d"))


async def test_fast_backlog_stops_at_a_chaos_drop(sandbox_factory):
    gw = await sandbox_factory(backlog=4 * CHUNK, fast_backlog=True, drop_every=1000)
    truth = gw.event_keys("DEMO")
    got: list[Next] = []
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe("a", SubscribeInput(chain_code="DEMO", offset="0")))
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(30):
                while True:
                    msg = protocol.decode(await conn.recv())
                    if isinstance(msg, Next):
                        got.append(msg)
    assert gw.stats.chaos_drops == 1
    assert 500 <= len(got) <= 1500 and gw.stats.events_sent == len(got)
    assert keys(got) == truth[: len(got)]


async def test_fast_backlog_refuses_malformed_frames():
    with pytest.raises(ValueError, match="malformed"):
        SandboxGateway(SandboxOptions(fast_backlog=True, malformed_every=10))


@pytest.mark.parametrize("fast", [True, False])
async def test_live_timestamps_are_the_wall_clock(sandbox_factory, fast: bool):
    """The default: the backlog ends at the start, evenly spaced before it (a true lag); the
    events made later carry the wall clock."""
    started = time.time()
    gw = await sandbox_factory(backlog=100, rate=200.0, fast_backlog=fast)
    backlog = [event_time(e["timestamp"], UTC) for e in gw.events("DEMO")[:100]]
    assert None not in backlog
    times: list[float] = backlog  # type: ignore[assignment]
    step = (STEP_US if fast else BACKLOG_STEP_US) / 1e6
    assert started - 1.0 < times[-1] <= time.time()  # the start (a second's slack: rounding)
    assert all(b - a == pytest.approx(step, abs=1e-5) for a, b in itertools.pairwise(times))
    async with ws(gw) as conn:
        await conn.send(protocol.subscribe("a", SubscribeInput(chain_code="DEMO", highest=True)))
        await receive(conn, 1, "a")
        live = await receive(conn, 20, "a")
        now = time.time()
    offsets = [int(m.event.offset) for m in live]
    assert all(b > a for a, b in itertools.pairwise(offsets))
    stamps = [event_time(m.event.timestamp, UTC) for m in live]
    assert all(s is not None and abs(now - s) < 1.0 for s in stamps), (now, stamps)
    assert stamps == sorted(stamps)  # type: ignore[type-var]
    assert any(s % 1 != 0 for s in stamps if s is not None)  # sub-second precision


async def test_a_high_rate_is_kept(sandbox_factory):
    rate = 2000.0
    loop = asyncio.get_running_loop()
    # The generator's clock is the loop's: it starts after this reading.
    before_start = loop.time()
    gw = await sandbox_factory(backlog=0, rate=rate, fast_backlog=True)
    await wait_until(lambda: len(gw.event_keys("DEMO")) > 0)
    before = len(gw.event_keys("DEMO"))
    # The rate is reached (a positive condition, bounded; a loaded machine only delays it)...
    await wait_until(lambda: len(gw.event_keys("DEMO")) - before >= rate, timeout=10)
    # ...and never exceeded: every event made was due by the loop clock (rate x the time since
    # the generator started), whatever the machine's load: a late wake-up makes what is due,
    # never more.
    made, now = len(gw.event_keys("DEMO")), loop.time()
    assert made <= rate * (now - before_start), (made, now - before_start)


@pytest.mark.parametrize("fast", [True, False])
async def test_fixed_timestamps_come_from_2024(sandbox_factory, fast: bool):
    """The old behaviour, kept: every timestamp from the generator's clock, the same events at
    every start."""
    gw = await sandbox_factory(backlog=50, rate=200.0, live_timestamps=False, fast_backlog=fast)
    await wait_until(lambda: len(gw.event_keys("DEMO")) >= 60)
    stamps = [event_time(e["timestamp"], UTC) for e in gw.events("DEMO")]
    assert all(s is not None and s < time.time() - 86400 for s in stamps)
    again = await sandbox_factory(backlog=50, live_timestamps=False, fast_backlog=fast)
    assert again.events("DEMO") == gw.events("DEMO")[:50]


def test_the_sandbox_command_has_the_benchmark_flags():
    args = _parser().parse_args(["sandbox", "--fast-backlog", "--live-timestamps"])
    assert args.fast_backlog and args.live_timestamps
    args = _parser().parse_args(["sandbox"])
    assert not args.fast_backlog and args.live_timestamps  # live timestamps by default
    assert not _parser().parse_args(["sandbox", "--fixed-timestamps"]).live_timestamps


async def test_the_daemon_consumes_a_fast_backlog(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=2500, fast_backlog=True)
    truth: list[tuple[str, str, Any]] = gw.event_keys("DEMO")
    settings = make_settings(tmp_path, gw.url)
    async with running(settings):
        await wait_until(lambda: committed(tmp_path / "state.db", truth[-1][1]), timeout=60)
    # Each event once (workers run keys in parallel: the file is in order per key only).
    written = sink_ids(tmp_path / "events.jsonl")
    assert sorted(written) == sorted(k[0] for k in truth) and len(set(written)) == len(truth)
