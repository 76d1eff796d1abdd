"""The redis sink in-process against a real redis-server (tests/redis_server.py): the entries
it adds, deduplication of a replay by the guards, trimming, per-key order seen from the
stream, the atomicity of an entry and its guard when a batch fails midway, how each failure
is classified, and preflight."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from bus_events import event as make_event
from bus_events import opening, write_until_through
from redis.crc import key_slot
from redis.exceptions import ResponseError
from redis_server import RedisServer, event_ids
from support import wait_until

from consumer.config import RedisSinkSettings
from consumer.core.events import Event
from consumer.errors import ConfigError, PermanentSinkError, SinkUnusable, TransientSinkError
from consumer.sinks.redis import (
    TOKEN_MAX_CHARS,
    KeyTemplate,
    RedisSink,
    barrier_key,
    ends_as_guard,
    guard_key,
    hash_tag,
    token_value,
)

CHAINS = {"main": "DEMO"}
KEY = "opera:DEMO"
PASSWORD = "redis-Pw-3d9a-very-secret"
WRONG = "redis-Wrong-61fe-also-secret"
# Every right the sink needs, nothing more, on the sink's keys.
SINK_RULES = "~opera:* -@all +ping +script|load +evalsha +exists +type +xadd +set +xlen"
TIMESTAMP = "2026-01-02T03:04:05.000Z"


def event(i: int, **fields: Any) -> Event:
    """tests/bus_events.py's event, with a timestamp (the sink adds it as a field)."""
    return make_event(i, timestamp=TIMESTAMP, **fields)


def settings(url: str, **overrides: Any) -> RedisSinkSettings:
    values: dict[str, Any] = {"type": "redis", "url": url, "timeout_s": 2.0}
    values.update(overrides)
    return RedisSinkSettings.model_validate(values)


@pytest.fixture
async def opened(redis_server: RedisServer) -> AsyncIterator[Callable[..., Any]]:
    """``await open_sink(server=None, **overrides)``: an open RedisSink on the test's server,
    closed at the end."""

    def make(server: RedisServer | None = None, **overrides: Any) -> RedisSink:
        url = overrides.pop("url", None) or (server or redis_server).url()
        return RedisSink(settings(url, **overrides), CHAINS)

    async with opening(make) as open_sink:
        yield open_sink


async def guards(server: RedisServer, pattern: str = "*:guard:*") -> dict[str, str]:
    """Every guard key -> its value (the id of its entry)."""
    async with server.client() as r:
        found = {}
        async for k in r.scan_iter(match=pattern, count=1000):
            value = await r.get(k)
            if value is not None:
                found[k.decode()] = value.decode()
        return found


async def assert_every_guard_has_its_entry(server: RedisServer) -> int:
    """No guard without the entry it names, in its own stream; returns how many guards."""
    found = await guards(server)
    async with server.client() as r:
        for guard, entry_id in found.items():
            stream = guard.split(":guard:", 1)[0]
            entry = await r.xrange(stream, entry_id, entry_id)
            assert len(entry) == 1, f"guard {guard} names no entry {entry_id} in {stream}"
            uid = entry[0][1][b"uniqueEventId"].decode()
            assert guard_key(stream, uid) == guard, f"guard {guard} is not {uid}'s"
    return len(found)


# --- keys, guards and templates -------------------------------------------------------------


def test_token_values_are_sanitised() -> None:
    assert token_value("HOTEL1") == "HOTEL1"
    assert token_value("a b\tc\nd{e}f") == "a_b_c_d_e_f"
    assert token_value("") == token_value(None) == "_"
    assert token_value("Zoë:1") == "Zoë:1"  # letters and colons are kept
    assert token_value("x\x00\x7f\u0085\u2003\ud800y") == "x_____y"
    long_a, long_b = "H" * 300, "H" * 299 + "I"
    assert len(token_value(long_a)) == TOKEN_MAX_CHARS
    assert token_value(long_a) != token_value(long_b)  # cut, but kept apart by a hash


def test_guards_share_the_slot_and_the_prefix_of_their_stream() -> None:
    assert hash_tag("opera:DEMO") is None
    assert hash_tag("opera:{DEMO}:x") == "DEMO"
    assert hash_tag("a{}b{c}") is None  # an empty first tag: the whole key is hashed
    for stream_key in ("opera:DEMO", "opera:{DEMO}", "{opera}:DEMO:H1", "x:{a:b}:{c}"):
        for uid in ("u1", "a{b}c", "}{", "with space"):
            guard = guard_key(stream_key, uid)
            assert key_slot(guard.encode()) == key_slot(stream_key.encode()), (stream_key, uid)
            assert guard.startswith(stream_key + ":guard:")
    assert guard_key("opera:DEMO", "u1") == "opera:DEMO:guard:{opera:DEMO}:u1"
    assert guard_key("opera:{DEMO}", "u1") == "opera:{DEMO}:guard:u1"


def test_no_two_events_share_a_guard_and_none_is_the_barrier() -> None:
    """Ids other than a UUID's characters are hashed in their guard: one with ``:guard:`` in
    it met another event's of a hotel with ``:guard:`` in its id, and ``{wait}`` met the
    barrier's (found by a review)."""
    uid = "3f1c2a9e-8b7d-4c6e-9a5f-1e2d3c4b5a69"
    assert guard_key("opera:{DEMO}", uid) == f"opera:{{DEMO}}:guard:{uid}"  # as before
    a = guard_key("opera:{DEMO}:H1", "x:guard:y")  # hotel H1
    b = guard_key("opera:{DEMO}:H1:guard:x", "y")  # hotel "H1:guard:x"
    assert a != b and a.startswith("opera:{DEMO}:H1:guard:~")
    for ident in (uid, "x:guard:y", "{wait}", "u1", ""):  # and no stream key ends so
        assert ends_as_guard(guard_key("opera:{DEMO}:H1", ident))
    assert not ends_as_guard("opera:{DEMO}:H1:guard:x~") and not ends_as_guard("a:guard:")
    for key in ("opera:DEMO", "opera:{DEMO}"):
        assert guard_key(key, "{wait}") != barrier_key(key)
        assert key_slot(barrier_key(key).encode()) == key_slot(key.encode())


@pytest.mark.parametrize("uid", ["3f1c2a9e-8b7d-4c6e-9a5f-1e2d3c4b5a69", "id: not a UUID"])
async def test_no_stream_key_is_a_guard_key(
    redis_server: RedisServer, opened: Callable[..., Any], uid: str
) -> None:
    """A hotelId of ``H1:guard:<id>`` made its event's stream key the guard of event ``<id>``
    of hotel H1 (a uniqueEventId but a UUID's characters as ``~`` and its hash), with a hash
    tag (found by a review): written first, that event was then skipped as written (lost);
    written after it, the guard stood where a stream goes (WRONGTYPE: the sink stopped). A
    stream key that ends as a guard does is refused: that event is dead-lettered, the others
    written; colons in a value are kept."""
    sink = await opened(stream_key="opera:{{{chainCode}}}:{hotelId}")
    hotel_key = "opera:{DEMO}:H1"

    def hostile(i: int, victim: str) -> Event:
        guard = guard_key(hotel_key, victim)
        return event(i, hotel=guard.removeprefix("opera:{DEMO}:"), uid=f"u{i}")

    # The hostile event first: its key would be the victim's guard.
    first = hostile(1, uid)
    with pytest.raises(PermanentSinkError) as caught:
        await sink.write("main", [first])
    assert caught.value.unique_event_id == first.unique_event_id
    await sink.write("main", [event(2, uid=uid, hotel="H1")])
    assert event_ids(redis_server.entries(hotel_key)) == [uid]

    # The victim first: the hostile key is its guard (a string), the write is refused alike.
    victim = f"{uid}2"
    await sink.write("main", [event(3, uid=victim, hotel="H1")])
    second = hostile(4, victim)
    with pytest.raises(PermanentSinkError) as caught:
        await sink.write("main", [event(5, hotel="H2:x"), second])
    assert caught.value.unique_event_id == second.unique_event_id
    await sink.write("main", [event(5, hotel="H2:x")])  # the pipeline writes around it
    assert event_ids(redis_server.entries(hotel_key)) == [uid, victim]
    assert event_ids(redis_server.entries("opera:{DEMO}:H2:x")) == ["u00005"]
    async with redis_server.client() as r:
        streams = {k.decode() async for k in r.scan_iter(match="opera:*", _type="stream")}
        strings = {k.decode() async for k in r.scan_iter(match="opera:*", _type="string")}
    assert streams == {hotel_key, "opera:{DEMO}:H2:x"}
    assert len(strings) == 3 and not streams & strings
    assert await assert_every_guard_has_its_entry(redis_server) == 3
    assert sink.counters()["redis_duplicates"] == 0


def test_templates_are_checked_when_the_sink_is_built(redis_server: RedisServer) -> None:
    t = KeyTemplate("opera:{{{chainCode}}}:{hotelId}")
    assert t.render({"chainCode": "DEMO", "hotelId": "H1"}) == "opera:{DEMO}:H1"
    assert t.per_event
    assert not KeyTemplate("opera:{chainCode}:{stream}").per_event
    for bad in ("opera:{unknown}", "opera:{hotelId!r}", "opera:{hotelId:>5}", "opera:{",
                "opera:}", "opera:{}", "opera:{{}}{chainCode}", "}}x{chainCode}",
                "opera:{{x", "", "opera:{{{chainCode}}}:guard:{hotelId}"):  # fmt: skip
        with pytest.raises(ConfigError, match=r"sink\.stream_key"):
            RedisSink(settings(redis_server.url(), stream_key=bad), CHAINS)
    with pytest.raises(ConfigError, match=r"sink\.url"):
        RedisSink(settings("http://127.0.0.1:6379/0"), CHAINS)
    with pytest.raises(ConfigError, match=r"sink\.url: query option\(s\) ssl_cert_reqs"):
        RedisSink(settings("redis://127.0.0.1:6379/0?ssl_cert_reqs=none"), CHAINS)
    with pytest.raises(ConfigError, match=r"sink\.tls_ca_file"):
        RedisSink(settings("redis://127.0.0.1:6379/0", tls_ca_file="/etc/ssl/ca.pem"), CHAINS)
    sink = RedisSink(settings(f"rediss://u:{PASSWORD}@example.net:6390/3"), CHAINS)
    assert sink.where == "example.net:6390/3 (TLS)"
    assert PASSWORD not in repr(sink)


# --- adding -----------------------------------------------------------------------------------


async def test_adds_entries_with_the_document_and_fields_and_a_replay_adds_nothing(
    redis_server: RedisServer, opened: Callable[..., Any]
) -> None:
    sink = await opened(guard_ttl_s=3600.0)
    events = [event(i) for i in range(30)]
    events[3] = event(3, hotel=None)
    await sink.write("main", events)
    entries = redis_server.entries(KEY)
    assert event_ids(entries) == [e.unique_event_id for e in events]
    for (entry_id, fields), ev in zip(entries, events, strict=True):
        assert fields["event"] == orjson.dumps(ev.document())  # as the other sinks store it
        assert fields["uniqueEventId"] == ev.unique_event_id.encode()
        assert fields["offset"] == ev.offset.encode()
        assert fields["stream"] == b"main"
        assert fields["chainCode"] == b"DEMO"
        assert fields["hotelId"] == (ev.hotel_id or "").encode()
        assert fields["eventName"] == b"UPDATE RESERVATION"
        assert fields["moduleName"] == b"Reservation"
        assert fields["primaryKey"] == ev.primary_key.encode()
        assert fields["timestamp"] == TIMESTAMP.encode()
        async with redis_server.client() as r:
            guard = guard_key(KEY, ev.unique_event_id)
            assert (await r.get(guard)) == entry_id.encode()  # the guard names its entry
            assert 3_590_000 < await r.pttl(guard) <= 3_600_000
    assert sink.counters() == {"redis_added": 30, "redis_duplicates": 0, "redis_wait_refused": 0}

    # A replay (a crash before the checkpoint, say): nothing added, counted as duplicates.
    await sink.write("main", [*events[10:], event(30)])
    assert redis_server.length(KEY) == 31
    assert sink.counters() == {"redis_added": 31, "redis_duplicates": 20, "redis_wait_refused": 0}
    # ... nor by another sink instance (a restarted daemon).
    again = await opened()
    await again.write("main", events)
    assert redis_server.length(KEY) == 31
    assert again.counters() == {"redis_added": 0, "redis_duplicates": 30, "redis_wait_refused": 0}
    assert await assert_every_guard_has_its_entry(redis_server) == 31


async def test_keys_from_the_template(
    redis_server: RedisServer, opened: Callable[..., Any]
) -> None:
    sink = await opened(
        stream_key="opera:{{{chainCode}}}:{stream}:{moduleName}:{hotelId}:{eventName}"
    )
    await sink.write("main", [event(1), event(2, hotel=None), event(3, hotel="H 2", name="")])
    async with redis_server.client() as r:
        keys = sorted([k.decode() async for k in r.scan_iter(match="opera:*", _type="stream")])
    assert keys == [
        "opera:{DEMO}:main:Reservation:HOTEL1:UPDATE_RESERVATION",
        "opera:{DEMO}:main:Reservation:H_2:_",
        "opera:{DEMO}:main:Reservation:_:UPDATE_RESERVATION",
    ]
    assert await assert_every_guard_has_its_entry(redis_server) == 3


async def test_maxlen_trims_and_a_trimmed_event_is_still_guarded(
    redis_server: RedisServer, opened: Callable[..., Any]
) -> None:
    async with redis_server.client() as r:
        await r.config_set("stream-node-max-entries", 5)  # ~ trims whole nodes of 5
    sink = await opened(maxlen=20)
    events = [event(i) for i in range(300)]
    for start in range(0, 300, 50):
        await sink.write("main", events[start : start + 50])
    length = redis_server.length(KEY)
    assert 20 <= length < 30  # "~": at least maxlen, at most a node more
    assert event_ids(redis_server.entries(KEY)) == [e.unique_event_id for e in events][-length:]
    await sink.write("main", events[:100])  # trimmed long ago, but their guards live on
    assert redis_server.length(KEY) == length
    assert sink.counters()["redis_duplicates"] == 100


async def test_per_key_order_in_the_stream_with_many_keys_interleaved(
    redis_server: RedisServer, opened: Callable[..., Any]
) -> None:
    """As the pipeline writes: each primaryKey on one worker, batches in order; several
    workers at once on the same stream key."""
    sink = await opened()
    rng = random.Random(7)
    keys = [f"pk{k}" for k in range(40)]
    events = [event(i, key=rng.choice(keys)) for i in range(2000)]
    workers = 4
    queues: list[list[Event]] = [[] for _ in range(workers)]
    for ev in events:
        queues[hash(ev.primary_key) % workers].append(ev)

    async def worker(mine: list[Event]) -> None:
        at = 0
        while at < len(mine):
            size = rng.randint(1, 60)
            await sink.write("main", mine[at : at + size])
            at += size

    await asyncio.gather(*(worker(q) for q in queues))
    entries = redis_server.entries(KEY)
    assert sorted(event_ids(entries)) == sorted(e.unique_event_id for e in events)
    written: dict[str, list[str]] = {}
    for ev in events:
        written.setdefault(ev.primary_key, []).append(ev.unique_event_id)
    seen: dict[str, list[str]] = {}
    for _, fields in entries:
        seen.setdefault(fields["primaryKey"].decode(), []).append(fields["uniqueEventId"].decode())
    assert seen == written


# --- atomicity of an entry and its guard ----------------------------------------------------


async def test_a_wrongtype_key_midway_leaves_no_guard_without_its_entry(
    redis_server: RedisServer, opened: Callable[..., Any]
) -> None:
    sink = await opened(stream_key="opera:{chainCode}:{hotelId}")
    async with redis_server.client() as r:
        await r.set("opera:DEMO:H3", "not a stream")  # someone else's key
    events = [event(i, hotel=f"H{i % 5}") for i in range(50)]
    with pytest.raises(SinkUnusable) as caught:
        await sink.write("main", events)
    message = str(caught.value)
    assert "'opera:DEMO:H3'" in message and "WRONGTYPE" in message
    assert "rename or delete it" in message
    # Every call of the batch ran: the others were added, each with its guard, and the
    # refused ones have neither.
    assert await assert_every_guard_has_its_entry(redis_server) == 40
    assert await guards(redis_server, "opera:DEMO:H3:guard:*") == {}
    # The operator moves the key aside; the replay adds exactly what is missing.
    async with redis_server.client() as r:
        await r.rename("opera:DEMO:H3", "elsewhere")
    await sink.write("main", events)
    for hotel in range(5):
        ids = event_ids(redis_server.entries(f"opera:DEMO:H{hotel}"))
        assert ids == [e.unique_event_id for e in events if e.hotel_id == f"H{hotel}"]
    assert sink.counters() == {"redis_added": 50, "redis_duplicates": 40, "redis_wait_refused": 0}


async def test_the_server_killed_midway_through_a_batch_leaves_no_guard_without_its_entry(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """SIGKILL while a batch (several round trips) is being added; with an AOF written at
    every command, what survives is what the server did: whole scripts only."""
    server = redis_factory(appendonly=True)
    sink = RedisSink(settings(server.url(), timeout_s=5.0), CHAINS)
    await sink.open(None)
    try:
        body = [{"elementName": "Comment", "newValue": "x" * 6000}]
        events = [event(i, detail=body) for i in range(4000)]  # 3 round trips of 8 MiB
        task = asyncio.create_task(sink.write("main", events))
        async with asyncio.timeout(60):
            while server.length(KEY) == 0 and not task.done():
                await asyncio.sleep(0.001)
        server.kill()
        with pytest.raises(TransientSinkError):
            await task
        server.start()
        survived = server.length(KEY)
        assert 0 < survived < len(events), "the kill did not land midway; make the batch larger"
        assert await assert_every_guard_has_its_entry(server) == survived
        async with server.client() as r:
            await r.config_set("appendfsync", "no")  # the rest is not killed: faster
        await write_until_through(sink, events, pause=0.05)  # the pipeline's retry
        assert event_ids(server.entries(KEY)) == [e.unique_event_id for e in events]
        assert sink.counters()["redis_duplicates"] >= survived
    finally:
        await sink.close()


# --- per-key order when part of a pipeline is refused -------------------------------------


def order_by_key(server: RedisServer, key: str = KEY) -> dict[str, list[str]]:
    """primaryKey -> its events' uniqueEventIds in stream order."""
    seen: dict[str, list[str]] = {}
    for _, fields in server.entries(key):
        seen.setdefault(fields["primaryKey"].decode(), []).append(fields["uniqueEventId"].decode())
    return seen


def arrival_by_key(events: list[Event]) -> dict[str, list[str]]:
    wanted: dict[str, list[str]] = {}
    for ev in events:
        wanted.setdefault(ev.primary_key, []).append(ev.unique_event_id)
    return wanted


async def test_a_refused_event_holds_back_the_later_events_of_its_key(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """The ACL lets the user read every key but not write u00002's guard: that call fails
    (NOPERM) while the rest of the pipeline runs. The later events of its key must not go
    ahead of it: after the fix, the replay adds it, and the stream has each key in arrival
    order. Other keys are not held back."""
    rules = SINK_RULES.replace(
        "~opera:*", "%R~opera:* %RW~opera:DEMO %RW~opera:DEMO:guard:*[^2]"
    )  # Redis 7 selectors: the guard of u00002 (only) is read-only
    server = redis_factory(users={"opera": (PASSWORD, rules)})
    sink = RedisSink(settings(server.url(), username="opera", password=PASSWORD), CHAINS)
    await sink.open(None)
    try:
        events = [event(i, key="AB"[i in (1, 4, 7)]) for i in range(9)]
        with pytest.raises(SinkUnusable, match="ACL refuses"):
            await sink.write("main", events)
        # Key A: u00000 only (u00002 refused, the rest held back); key B whole.
        assert order_by_key(server) == {"A": ["u00000"], "B": ["u00001", "u00004", "u00007"]}
        assert await assert_every_guard_has_its_entry(server) == 4
        async with server.client() as admin:  # the operator's fix
            await admin.acl_setuser("opera", keys=["~opera:*"], reset_keys=True)
        await sink.write("main", events)  # the replay after the restart
        assert order_by_key(server) == arrival_by_key(events)
        assert sink.counters() == {"redis_added": 9, "redis_duplicates": 4, "redis_wait_refused": 0}
    finally:
        await sink.close()


def whole_commands(data: bytes | bytearray) -> list[int]:
    """Where each whole RESP command (an array of bulk strings, as redis-py sends them) at the
    start of ``data`` ends."""
    ends: list[int] = []
    at = 0
    while data[at : at + 1] == b"*":
        line = data.find(b"\r\n", at)
        if line < 0:
            break
        count, at = int(data[at + 1 : line]), line + 2
        for _ in range(count):
            head = data.find(b"\r\n", at)
            if head < 0:
                return ends
            at = head + 2 + int(data[at + 1 : head]) + 2
        if at > len(data):
            break
        ends.append(at)
    return ends


class GatedProxy:
    """A TCP proxy to a Redis server that can hold a client's commands back: after
    :meth:`hold_after` ``(n)`` it forwards the next ``n`` whole commands and keeps the rest
    until :meth:`release`. It counts the ``-BUSY`` replies coming back."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.target = host, port
        self.allowance: int | None = None  # None: forward everything
        self.released = asyncio.Event()
        self.busy_replies = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> GatedProxy:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.released.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def hold_after(self, commands: int) -> None:
        self.allowance = commands

    def release(self) -> None:
        self.released.set()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.target)
        for pump in (self._commands(reader, up_writer), self._replies(up_reader, writer)):
            task = asyncio.create_task(pump)
            self._tasks.add(task)

    async def _commands(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending = bytearray()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                pending += data
                if self.allowance is None or self.released.is_set():
                    writer.write(pending)
                    pending.clear()
                else:
                    ends = whole_commands(pending)[: self.allowance]
                    if ends:
                        writer.write(pending[: ends[-1]])
                        del pending[: ends[-1]]
                        self.allowance -= len(ends)
                    if self.allowance == 0:  # the rest waits for release()
                        await self.released.wait()
                        writer.write(pending)
                        pending.clear()
                await writer.drain()
        writer.close()

    async def _replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                self.busy_replies += data.count(b"-BUSY ")
                writer.write(data)
                await writer.drain()
        writer.close()


async def test_busy_replies_to_part_of_a_pipeline_keep_each_keys_order(
    redis_server: RedisServer,
) -> None:
    """Another client's slow script: Redis answers BUSY to the first commands of the
    pipeline, and runs the ones that arrive once the script is over. Those later events
    must be held back, so that the retry adds every key's events in arrival order."""
    async with redis_server.client() as admin:
        await admin.config_set("busy-reply-threshold", 10)  # ms; the default is 5 s
    events = [event(i, key="AB"[i % 2]) for i in range(40)]
    async with GatedProxy(redis_server.host, redis_server.port) as proxy:
        sink = RedisSink(settings(f"redis://127.0.0.1:{proxy.port}/0", timeout_s=30.0), CHAINS)
        await sink.open(None)
        spinner, watcher = redis_server.client(), redis_server.client()
        try:
            await watcher.ping()  # connected before the server is busy
            spin = asyncio.create_task(spinner.eval("while true do end", 0))

            async def busy() -> bool:
                try:
                    await watcher.exists("x")
                except ResponseError as exc:
                    return "BUSY" in str(exc)
                return False

            async with asyncio.timeout(30):
                while not await busy():
                    await asyncio.sleep(0.01)
            proxy.hold_after(10)  # of the pipeline: 10 calls (5 of each key) meet BUSY
            write = asyncio.create_task(sink.write("main", events))
            await wait_until(lambda: proxy.busy_replies >= 10)
            await watcher.script_kill()  # the script has written nothing: it may be killed
            with pytest.raises(ResponseError, match="killed"):
                await spin
            proxy.release()  # the other 30 calls arrive at a server that runs them
            with pytest.raises(TransientSinkError, match="BUSY"):
                await write
            assert redis_server.length(KEY) == 0  # all held back behind the refused ones
            await write_until_through(sink, events)
        finally:
            await sink.close()
            await spinner.aclose()
            await watcher.aclose()
    assert order_by_key(redis_server) == arrival_by_key(events)
    assert sink.counters() == {"redis_added": 40, "redis_duplicates": 0, "redis_wait_refused": 0}


# --- failures -------------------------------------------------------------------------------


async def test_wrong_password_is_unusable_and_names_no_secret(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(users={"opera": (PASSWORD, SINK_RULES)})
    where = f"127.0.0.1:{server.port}/0"
    for url, fields in (
        (server.url(user="opera", password=WRONG), {}),
        (server.url(), {"username": "opera", "password": WRONG}),
        (server.url(), {}),  # no credentials at all (NOAUTH)
        (server.url(user="opera", password=PASSWORD), {"password": WRONG}),  # fields win
    ):
        sink = RedisSink(settings(url, **fields), CHAINS)
        with pytest.raises(SinkUnusable) as caught:
            await sink.open(None)
        message = str(caught.value)
        assert where in message, message
        assert "sink.password" in message
        assert WRONG not in message and PASSWORD not in message
        assert "@" not in message  # no user information of the URL
        assert WRONG not in repr(caught.value) and PASSWORD not in repr(caught.value)
    sink = RedisSink(settings(server.url(), username="opera", password=PASSWORD), CHAINS)
    await sink.open(None)
    try:
        await sink.write("main", [event(1)])
    finally:
        await sink.close()
    assert server.length(KEY) == 1


async def test_unreachable_server_at_open_is_transient(redis_server: RedisServer) -> None:
    redis_server.stop()
    url = redis_server.url(user="opera", password=PASSWORD)
    sink = RedisSink(settings(url, timeout_s=1.0), CHAINS)
    with pytest.raises(TransientSinkError, match=rf"127\.0\.0\.1:{redis_server.port}/0") as caught:
        await sink.open(None)
    assert PASSWORD not in str(caught.value)


async def test_tls_with_the_servers_ca_and_an_untrusted_certificate(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(tls=True)
    assert server.url().startswith("rediss://")
    untrusted = RedisSink(settings(server.url()), CHAINS)  # the system's CAs only
    with pytest.raises(SinkUnusable, match=r"TLS certificate is not trusted.*sink\.tls_ca_file"):
        await untrusted.open(None)
    sink = RedisSink(settings(server.url(), tls_ca_file=str(server.ca_file)), CHAINS)
    assert sink.where == f"127.0.0.1:{server.port}/0 (TLS)"
    await sink.open(None)
    try:
        await sink.write("main", [event(i) for i in range(5)])
    finally:
        await sink.close()
    assert event_ids(server.entries(KEY)) == [f"u{i:05d}" for i in range(5)]
    assert "(TLS)" in await sink.preflight()


async def test_server_stopped_is_transient_and_writes_resume_after_it_returns(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(appendonly=True)
    sink = RedisSink(settings(server.url(), timeout_s=1.0), CHAINS)
    await sink.open(None)
    try:
        await sink.write("main", [event(i) for i in range(10)])
        server.stop()
        with pytest.raises(TransientSinkError, match=rf"127\.0\.0\.1:{server.port}/0"):
            await sink.write("main", [event(i) for i in range(10, 20)])
        server.start()  # same port, same data
        assert await write_until_through(sink, [event(i) for i in range(5, 20)], pause=0.05) == 0
        assert event_ids(server.entries(KEY)) == [f"u{i:05d}" for i in range(20)]
    finally:
        await sink.close()


async def test_out_of_memory_is_transient_and_adds_nothing(
    redis_server: RedisServer, opened: Callable[..., Any]
) -> None:
    sink = await opened()
    await sink.write("main", [event(0)])
    async with redis_server.client() as r:
        await r.config_set("maxmemory", 1)  # below what is used: every write refused
        with pytest.raises(TransientSinkError, match="maxmemory"):
            await sink.write("main", [event(i) for i in range(1, 20)])
        assert await r.xlen(KEY) == 1
        await r.config_set("maxmemory", 0)
    assert await assert_every_guard_has_its_entry(redis_server) == 1
    await sink.write("main", [event(i) for i in range(20)])
    assert redis_server.length(KEY) == 20


async def test_a_lost_script_is_loaded_again(
    redis_server: RedisServer, opened: Callable[..., Any]
) -> None:
    sink = await opened()
    await sink.write("main", [event(0)])
    async with redis_server.client() as r:
        await r.script_flush()
    await sink.write("main", [event(i) for i in range(10)])
    assert event_ids(redis_server.entries(KEY)) == [f"u{i:05d}" for i in range(10)]
    assert sink.counters() == {"redis_added": 10, "redis_duplicates": 1, "redis_wait_refused": 0}


async def test_an_event_too_large_is_dead_lettered_alone(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(options=["--proto-max-bulk-len", "1mb"])
    sink = RedisSink(settings(server.url()), CHAINS)
    await sink.open(None)
    try:
        big = event(2, detail=[{"elementName": "Comment", "newValue": "x" * 1_100_000}])
        with pytest.raises(PermanentSinkError) as caught:
            await sink.write("main", [event(0), event(1), big, event(3)])
        assert caught.value.unique_event_id == big.unique_event_id
        assert "proto-max-bulk-len 1048576" in str(caught.value)
        assert server.length(KEY) == 0  # nothing of the batch was sent
        # The pipeline then writes around it, and the connection is still fine.
        await sink.write("main", [event(0), event(1)])
        await sink.write("main", [event(3)])
        assert event_ids(server.entries(KEY)) == ["u00000", "u00001", "u00003"]
    finally:
        await sink.close()


async def test_an_event_that_is_not_json_is_dead_lettered(
    redis_server: RedisServer, opened: Callable[..., Any]
) -> None:
    sink = await opened()
    bad = event(1, detail=[{"newValue": 1 << 70}])  # beyond 64 bits: orjson refuses it
    with pytest.raises(PermanentSinkError) as caught:
        await sink.write("main", [event(0), bad])
    assert caught.value.unique_event_id == bad.unique_event_id
    assert redis_server.length(KEY) == 0


async def test_acl_refusals_are_unusable_and_write_nothing(
    redis_factory: Callable[..., RedisServer],
) -> None:
    no_set = SINK_RULES.replace(" +set", "")
    server = redis_factory(
        users={
            "noset": (PASSWORD, no_set),
            "otherkeys": (PASSWORD, SINK_RULES.replace("~opera:*", "~other:*")),
        }
    )
    # Keys known at open (no event token): checked there.
    for user, what in (("noset", "SET"), ("otherkeys", "keys")):
        sink = RedisSink(settings(server.url(), username=user, password=PASSWORD), CHAINS)
        with pytest.raises(SinkUnusable, match=r"ACL refuses") as caught:
            await sink.open(None)
        assert "+set" in str(caught.value) and "~opera:*" in str(caught.value), what
        assert PASSWORD not in str(caught.value)
    # Keys made per event: refused at the first write, before anything is added (the script
    # checks that it may SET the guard before it adds the entry).
    sink = RedisSink(
        settings(server.url(), username="noset", password=PASSWORD, stream_key="opera:{hotelId}"),
        CHAINS,
    )
    await sink.open(None)
    try:
        with pytest.raises(SinkUnusable, match="ACL refuses"):
            await sink.write("main", [event(i) for i in range(5)])
    finally:
        await sink.close()
    assert server.length("opera:HOTEL1") == 0


# --- preflight --------------------------------------------------------------------------------


async def _snapshot(server: RedisServer) -> tuple[int, list[bytes], int]:
    async with server.client() as r:
        return int(await r.dbsize()), sorted([k async for k in r.scan_iter()]), await r.xlen(KEY)


async def test_preflight_passes_without_writing(redis_server: RedisServer) -> None:
    sink = RedisSink(settings(redis_server.url()), CHAINS)
    before = await _snapshot(redis_server)
    line = await sink.preflight()
    assert f"at 127.0.0.1:{redis_server.port}/0" in line
    assert "as default" in line and "may XADD to opera:DEMO (new)" in line
    assert await _snapshot(redis_server) == before == (0, [], 0)

    opened = RedisSink(settings(redis_server.url()), CHAINS)
    await opened.open(None)
    await opened.write("main", [event(i) for i in range(3)])
    await opened.close()
    before = await _snapshot(redis_server)
    line = await RedisSink(settings(redis_server.url(), stream_key="opera:{chainCode}:{hotelId}"),
                           CHAINS).preflight()  # fmt: skip
    assert "opera:DEMO:_ (new) (tokens from events as _)" in line
    assert "opera:DEMO (3 entries)" in await sink.preflight()
    assert await _snapshot(redis_server) == before


async def test_preflight_fails_with_the_reason_without_writing(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(
        users={
            "opera": (PASSWORD, SINK_RULES),
            "noset": (PASSWORD, SINK_RULES.replace(" +set", "")),
            "watcher": (PASSWORD, SINK_RULES + " +info +acl|whoami"),
        }
    )
    wrong = RedisSink(settings(server.url(user="opera", password=WRONG)), CHAINS)
    with pytest.raises(SinkUnusable, match="refused our credentials") as caught:
        await wrong.preflight()
    assert WRONG not in str(caught.value)

    noset = RedisSink(settings(server.url(), username="noset", password=PASSWORD), CHAINS)
    with pytest.raises(SinkUnusable, match=r"ACL refuses SET on 'opera:DEMO'"):
        await noset.preflight()

    async with server.client() as r:
        await r.set(KEY, "a string")
        await r.set("other", "x")
    before = await _snapshot_all(server)
    good = RedisSink(settings(server.url(), username="opera", password=PASSWORD), CHAINS)
    with pytest.raises(SinkUnusable, match=r"'opera:DEMO' holds a string, not a stream"):
        await good.preflight()
    # A user allowed INFO too: the memory policy is checked.
    watcher = RedisSink(settings(server.url(), username="watcher", password=PASSWORD), CHAINS)
    async with server.client() as r:
        await r.delete(KEY)
        line = await good.preflight()
        assert "as opera: may XADD to opera:DEMO (new)" in line
        assert "maxmemory-policy unknown" in line  # opera may not run INFO
        await r.config_set("maxmemory", 1)
        with pytest.raises(SinkUnusable, match="refused now: OOM"):
            await good.preflight()
        await r.config_set("maxmemory", 100_000_000)  # (before an evicting policy)
        await r.config_set("maxmemory-policy", "allkeys-lru")
        with pytest.raises(SinkUnusable, match="allkeys-lru may evict"):
            await watcher.preflight()
        await r.config_set("maxmemory-policy", "volatile-lru")
        line = await watcher.preflight()
        assert line.startswith("redis 7.") or line.startswith("redis 6.")
        assert "as watcher:" in line and "guards may be evicted" in line
        await r.config_set("maxmemory-policy", "noeviction")
        line = await watcher.preflight()
        assert "; maxmemory 100000000 (noeviction)" in line
        assert "may be evicted" not in line and "may evict" not in line
        assert "snapshots only (its save rules unknown), appendonly no" in line  # INFO tells
        await r.config_set("maxmemory", 0)
    after = await _snapshot_all(server)
    assert after == {k: v for k, v in before.items() if k != KEY.encode()}
    assert list(after) == [b"other"]


async def _snapshot_all(server: RedisServer) -> dict[bytes, bytes]:
    """Every key and its serialized value (DUMP)."""
    async with server.client() as r:
        return {k: (await r.dump(k)) or b"" async for k in r.scan_iter()}
