"""The nats sink in-process against a real nats-server with JetStream (tests/nats_server.py):
the stream it creates, what it publishes, deduplication of a replay, per-key order seen from
the bus, and how each failure is classified."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from bus_events import event, opening, write_until_through
from nats_server import NatsServer, event_ids, make_certificates, order_by_key, subscribed

from consumer.config import NatsSinkSettings
from consumer.core.events import Event
from consumer.errors import ConfigError, PermanentSinkError, SinkUnusable, TransientSinkError
from consumer.sinks.nats import (
    TOKEN_MAX_CHARS,
    NatsSink,
    SubjectTemplate,
    covers,
    msg_id,
    overlaps,
    subject_token,
)

CHAINS = {"main": "DEMO"}
PASSWORD = "nats-Pw-8c1e-very-secret"
WRONG = "nats-Wrong-77d2-also-secret"


def settings(server: NatsServer, **overrides: Any) -> NatsSinkSettings:
    values: dict[str, Any] = {
        "type": "nats",
        "servers": [server.url],
        "duplicate_window_s": 3600.0,
        "timeout_s": 5.0,  # generous: a loaded machine must not fail a publish that works
    }
    values.update(overrides)
    return NatsSinkSettings.model_validate(values)


@pytest.fixture
async def opened(nats_server: NatsServer) -> AsyncIterator[Callable[..., Any]]:
    """``await open_sink(**overrides)``: an open NatsSink on the test's server, closed at
    the end."""

    def make(server: NatsServer | None = None, **overrides: Any) -> NatsSink:
        return NatsSink(settings(server or nats_server, **overrides), CHAINS)

    async with opening(make) as open_sink:
        yield open_sink


# --- subjects, ids and templates ------------------------------------------------------------


def test_a_servers_subject_list_is_bounded_in_the_refusal(nats_server: NatsServer) -> None:
    """The stream's subjects come from the server: thousands of them (or a hostile reply) must
    not make a message of any length, nor carry a terminal escape to the operator's screen."""
    sink = NatsSink(settings(nats_server), CHAINS)
    subjects = [f"other.\x1b[2J{i:05d}" for i in range(5_000)]
    with pytest.raises(SinkUnusable) as refused:
        sink._check_subjects(subjects, "the stream's subjects")
    text = str(refused.value)
    assert len(text) < 1_000 and "\x1b" not in text and "capture none" in text


def test_subject_tokens_are_sanitised() -> None:
    assert subject_token("HOTEL1") == "HOTEL1"
    assert subject_token("a.b*c>d e\tf\ng") == "a_b_c_d_e_f_g"
    assert subject_token("") == subject_token(None) == "_"
    assert subject_token("Zoë") == "Zoë"  # a letter is kept
    assert subject_token("x\x00\x7f\u0085\u2003\ud800y") == "x_____y"
    long_a, long_b = "H" * 300, "H" * 299 + "I"
    assert len(subject_token(long_a)) == TOKEN_MAX_CHARS
    assert subject_token(long_a) != subject_token(long_b)  # cut, but kept apart by a hash
    assert "." not in subject_token("." * 500)


def test_message_ids() -> None:
    assert msg_id("u-123:abc") == "u-123:abc"
    hashed = msg_id("with space\r\nand newline")
    assert hashed.startswith("sha256:") and hashed == msg_id("with space\r\nand newline")


def test_templates_are_checked_when_the_sink_is_built() -> None:
    def at(**overrides: Any) -> NatsSinkSettings:
        return NatsSinkSettings.model_validate({"type": "nats", **overrides})

    t = SubjectTemplate("opera.{chainCode}.{hotelId}.{eventName}")
    assert t.pattern({"chainCode": "DEMO"}) == "opera.DEMO.*.*"
    assert SubjectTemplate("x.{chainCode}-{stream}.y").pattern({"chainCode": "C"}) == "x.*.y"
    for bad in ("opera.{unknown}", "opera..{hotelId}", "opera.{hotelId}.", "opera.*.{hotelId}",
                "opera.>", "opera.{hotelId!r}", "opera {hotelId}", "opera.{", ""):  # fmt: skip
        with pytest.raises(ConfigError, match=r"sink\.subject"):
            NatsSink(at(subject=bad), CHAINS)
    with pytest.raises(ConfigError, match=r"sink\.stream"):
        NatsSink(at(stream="A.B"), CHAINS)
    with pytest.raises(ConfigError, match=r"sink\.servers\[0\]"):
        NatsSink(at(servers=["http://127.0.0.1:4222"]), CHAINS)
    with pytest.raises(ConfigError, match=r"sink\.servers\[1\]"):
        NatsSink(at(servers=["nats://127.0.0.1:4222", "nats://user:pw-1@host:port"]), CHAINS)
    NatsSink(at(servers=["127.0.0.1:4222", "tls://[::1]:4443"]), CHAINS)


def test_subject_filters() -> None:
    assert covers("opera.>", "opera.DEMO.*.*")
    assert covers("opera.*.*.*", "opera.DEMO.*.*")
    assert not covers("opera.DEMO.H1.>", "opera.DEMO.*.*")
    assert overlaps("opera.DEMO.H1.>", "opera.DEMO.*.*")
    assert not overlaps("other.>", "opera.DEMO.*.*")
    assert not covers("opera.*", "opera.DEMO.*.*")
    assert not overlaps("opera.*.*", "opera.DEMO.*.*")
    assert not covers("opera.DEMO.>", "opera.DEMO")  # '>' needs one token at least


# --- publishing -----------------------------------------------------------------------------


async def test_creates_the_stream_with_the_duplicate_window(
    nats_server: NatsServer, opened: Callable[..., Any]
) -> None:
    await opened(duplicate_window_s=5400.0)
    info = await nats_server.stream_info("OPERA")
    assert info.config.subjects == ["opera.>"]
    assert info.config.duplicate_window == pytest.approx(5400.0)
    assert info.state.messages == 0


async def test_publishes_subjects_headers_and_bodies_and_a_replay_adds_nothing(
    nats_server: NatsServer, opened: Callable[..., Any]
) -> None:
    sink = await opened()
    events = [event(i) for i in range(30)]
    await sink.write("main", events)
    messages = await nats_server.stream_messages()
    assert len(messages) == 30
    by_id = {e.unique_event_id: e for e in events}
    for m in messages:
        doc = orjson.loads(m.data or b"")
        ev = by_id[doc["metadata"]["uniqueEventId"]]
        assert m.data == orjson.dumps(ev.document())  # the document, as the other sinks write
        assert m.subject == "opera.DEMO.HOTEL1.UPDATE_RESERVATION"
        assert m.headers is not None
        assert m.headers["Nats-Msg-Id"] == ev.unique_event_id
        assert m.headers["Opera-Stream"] == "main"
    assert sink.counters() == {
        "nats_published": 30.0,
        "nats_duplicates": 0.0,
        "nats_reconnects": 0.0,
    }

    # A replay (a crash before the checkpoint, say): acknowledged, stored no second time.
    await sink.write("main", [*events[10:], event(30)])
    assert (await nats_server.stream_info()).state.messages == 31
    assert sink.counters()["nats_duplicates"] == 20.0
    assert sink.counters()["nats_published"] == 31.0
    # ... nor by another sink instance (a restarted daemon).
    again = await opened()
    await again.write("main", events)
    assert (await nats_server.stream_info()).state.messages == 31
    assert again.counters()["nats_duplicates"] == 30.0


async def test_subject_tokens_on_the_bus(
    nats_server: NatsServer, opened: Callable[..., Any]
) -> None:
    sink = await opened(subject="opera.{chainCode}.{stream}.{moduleName}.{hotelId}.{eventName}")
    await sink.write(
        "main",
        [
            event(1, hotel="H.1 *>", name="CHECK IN"),
            event(2, hotel=None, name=""),
            event(3, hotel="Zoë\tX", name="A" * 500),
        ],
    )
    subjects = [m.subject for m in await nats_server.stream_messages()]
    assert subjects[:2] == [
        "opera.DEMO.main.Reservation.H_1___.CHECK_IN",
        "opera.DEMO.main.Reservation._._",
    ]
    assert subjects[2].startswith("opera.DEMO.main.Reservation.Zoë_X.AAAA")
    assert len(subjects[2].split(".")[-1]) == TOKEN_MAX_CHARS


async def test_per_key_order_on_the_bus_with_many_keys_interleaved(
    nats_server: NatsServer, opened: Callable[..., Any]
) -> None:
    sink = await opened()
    keys, per_key = 40, 25
    # Key after key in the batch: published one at a time, the bus would hold this order.
    blocks = [event(k * per_key + j, key=f"key{k}") for k in range(keys) for j in range(per_key)]
    await sink.write("main", blocks)
    # Shuffled across keys, each key's events still in order.
    rng = random.Random(7)
    queues = [
        [event(10_000 + k * per_key + j, key=f"key{k}") for j in range(per_key)]
        for k in range(keys)
    ]
    mixed: list[Event] = []
    while any(queues):
        mixed.append(rng.choice([q for q in queues if q]).pop(0))
    for start in range(0, len(mixed), 200):  # in batches, as the pipeline writes
        await sink.write("main", mixed[start : start + 200])

    messages = await nats_server.stream_messages()
    assert len(messages) == 2 * keys * per_key
    written: dict[str, list[str]] = {}
    for ev in blocks + mixed:
        written.setdefault(ev.primary_key, []).append(ev.unique_event_id)
    assert order_by_key(messages) == written
    # The keys really were in flight together: the first messages are the keys' first events.
    first = event_ids(messages[:keys])
    assert sorted(first) == sorted(e.unique_event_id for e in blocks[::per_key])


# --- failures -------------------------------------------------------------------------------


async def test_must_exist_without_the_stream_is_unusable(nats_server: NatsServer) -> None:
    sink = NatsSink(settings(nats_server, on_start="must-exist"), CHAINS)
    with pytest.raises(SinkUnusable) as caught:
        await sink.open(None)
    text = str(caught.value)
    assert "'OPERA' does not exist" in text and "must-exist" in text
    assert "nats stream add OPERA" in text and 'on_start = "create"' in text
    with pytest.raises(SinkUnusable):
        await sink.preflight()
    # ... and with it, it opens (and does not touch the stream's configuration).
    await nats_server.add_stream("OPERA", ["opera.>"], duplicate_window=7200)
    await sink.open(None)
    await sink.close()
    assert (await nats_server.stream_info()).config.duplicate_window == pytest.approx(7200)


def auth_errors(server: NatsServer) -> int:
    """The connections the server refused for their credentials, by its log (it logs each
    before it answers -ERR, so a refusal the client saw is there)."""
    return server.logfile.read_text(errors="replace").count("authentication error")


async def test_wrong_password_is_unusable_and_names_no_secret(
    nats_factory: Callable[..., NatsServer],
) -> None:
    server = nats_factory(users={"opera": PASSWORD})
    sink = NatsSink(settings(server, user="opera", password=WRONG, timeout_s=10.0), CHAINS)
    with pytest.raises(SinkUnusable) as caught:
        await sink.open(None)
    # Refused at once: one attempt. Waiting out the connect timeout instead, nats-py would
    # try again every reconnect wait, each refused in the server's log.
    assert auth_errors(server) == 1, server.log_tail()
    text = str(caught.value)
    assert server.url in text and "refused the credentials" in text
    assert "sink.password" in text
    assert WRONG not in text and PASSWORD not in text
    for missing in ({"user": "opera"}, {}):  # no password at all: refused as well
        with pytest.raises(SinkUnusable, match="refused the credentials"):
            await NatsSink(settings(server, **missing), CHAINS).open(None)
    # The right one works.
    good = NatsSink(settings(server, user="opera", password=PASSWORD), CHAINS)
    await good.open(None)
    await good.write("main", [event(1)])
    await good.close()
    assert await server.message_count() == 1


async def test_no_jetstream_is_unusable(nats_factory: Callable[..., NatsServer]) -> None:
    server = nats_factory(jetstream=False)
    with pytest.raises(SinkUnusable, match="enable JetStream"):
        await NatsSink(settings(server), CHAINS).open(None)


async def test_tls_with_a_client_certificate(
    nats_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    certs = make_certificates(tmp_path)
    server = nats_factory(tls=certs)
    assert server.url.startswith("tls://")
    tls = {
        "tls_ca_file": str(certs.ca),
        "tls_cert_file": str(certs.client_cert),
        "tls_key_file": str(certs.client_key),
    }
    sink = NatsSink(settings(server, **tls), CHAINS)
    await sink.open(None)
    try:
        await sink.write("main", [event(1)])
    finally:
        await sink.close()
    assert event_ids(await server.stream_messages()) == ["u00001"]
    assert "stream 'OPERA' exists (1 messages" in await sink.preflight()
    # A CA file that is not there: the operator's to fix.
    missing = {**tls, "tls_ca_file": str(tmp_path / "nope.pem")}
    with pytest.raises(SinkUnusable, match=r"sink\.tls_ca_file .*nope\.pem"):
        await NatsSink(settings(server, **missing), CHAINS).open(None)


async def test_unreachable_server_at_open_is_transient() -> None:
    from consumer.sandbox.launcher import free_port

    s = NatsSinkSettings.model_validate(
        {"type": "nats", "servers": [f"nats://127.0.0.1:{free_port()}"], "timeout_s": 0.5}
    )
    with pytest.raises(TransientSinkError, match="cannot connect"):
        await NatsSink(s, CHAINS).open(None)


async def test_server_stopped_is_transient_and_writes_resume_after_it_returns(
    nats_server: NatsServer, opened: Callable[..., Any]
) -> None:
    sink = await opened(timeout_s=1.0)
    await sink.write("main", [event(i) for i in range(10)])
    nats_server.stop()
    with pytest.raises(TransientSinkError):
        await sink.write("main", [event(i) for i in range(10, 20)])
    nats_server.start()  # same port, same store
    # The whole batch again, as the pipeline retries it: nothing lost, nothing twice.
    await write_until_through(sink, [event(i) for i in range(10, 20)])
    ids = event_ids(await nats_server.stream_messages())
    assert sorted(ids) == [f"u{i:05d}" for i in range(20)]
    assert sink.counters()["nats_reconnects"] >= 1


async def test_a_subject_the_stream_does_not_capture(
    nats_server: NatsServer, opened: Callable[..., Any]
) -> None:
    # None of the template's subjects: refused at open.
    await nats_server.add_stream("OPERA", ["other.>"], duplicate_window=86400)
    with pytest.raises(SinkUnusable, match=r"capture none of the subjects opera\.DEMO"):
        await opened()
    # Only some: it opens (with a warning); an event outside them stops the daemon rather
    # than being dead-lettered ("no responders": no stream listens there).
    with pytest.raises(SinkUnusable, match="capture none"):
        await opened(stream="ELSE", stream_subjects=["else.>"])
    await nats_server.add_stream("PART", ["opera.DEMO.HOTEL1.>"], duplicate_window=86400)
    sink = await opened(stream="PART")
    await sink.write("main", [event(1)])
    with pytest.raises(SinkUnusable, match=r"does not capture subject opera\.DEMO\.HOTEL2"):
        await sink.write("main", [event(2, hotel="HOTEL2")])
    # A subject another stream captures: refused by the expected-stream header.
    await nats_server.add_stream("THEIRS", ["opera.DEMO.HOTEL3.>"], duplicate_window=86400)
    sink = await opened(stream="PART")
    with pytest.raises(SinkUnusable, match="captured by another stream"):
        await sink.write("main", [event(3, hotel="HOTEL3")])
    assert await nats_server.message_count("THEIRS") == 0


@pytest.mark.parametrize(
    "reply",
    [
        b'{"stream": "SOMEONE_ELSE", "seq": 1}',
        b'{"stream": "OPERA", "seq": "abc"}',
        b'{"stream": "OPERA", "seq": true}',
        b'{"stream": "OPERA", "seq": 0}',
        b'{"stream": "OPERA", "seq": null, "duplicate": true}',
        b'{"stream": null, "seq": 1}',
        b'{"stream": "OPERA"}',
    ],
)
async def test_an_answer_that_is_not_our_streams_acknowledgement_is_unusable(
    nats_server: NatsServer, opened: Callable[..., Any], reply: bytes
) -> None:
    """Something else answers on a subject our stream does not capture: its reply is no proof
    that the event is stored, and returning would checkpoint an event that is nowhere."""
    import nats

    await nats_server.add_stream("OPERA", ["opera.DEMO.HOTEL1.>"], duplicate_window=86400)
    sink = await opened()
    impostor = await nats.connect(nats_server.url)
    try:

        async def answer(msg: Any) -> None:
            await msg.respond(reply)

        await impostor.subscribe("opera.DEMO.HOTEL2.>", cb=answer)
        await subscribed(impostor)
        with pytest.raises(SinkUnusable, match="answer requests on that subject") as caught:
            await sink.write("main", [event(1, hotel="HOTEL2")])
    finally:
        await impostor.close()
    assert "'OPERA'" in str(caught.value)
    assert sink.counters()["nats_published"] == 0
    assert sink.counters()["nats_duplicates"] == 0


async def test_the_stream_deleted_while_running_is_unusable(
    nats_server: NatsServer, opened: Callable[..., Any]
) -> None:
    import nats

    sink = await opened()
    await sink.write("main", [event(1)])
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().delete_stream("OPERA")
    await nc.close()
    with pytest.raises(SinkUnusable, match="no longer exists"):
        await sink.write("main", [event(2)])


async def test_a_message_too_large_is_dead_lettered_alone(
    nats_factory: Callable[..., NatsServer],
) -> None:
    server = nats_factory(max_payload=4096)
    sink = NatsSink(settings(server), CHAINS)
    await sink.open(None)
    try:
        big = event(2, key="other", detail=[{"elementName": "x", "newValue": "y" * 5000}])
        with pytest.raises(PermanentSinkError) as caught:
            await sink.write("main", [event(1), big, event(3)])
        assert caught.value.unique_event_id == big.unique_event_id
        assert "max_payload of 4096" in str(caught.value)
        assert await server.message_count() == 0  # found before anything was published
        # The stream's own limit (max_msg_size): refused by JetStream, for that event.
        await server.add_stream("SMALL", ["small.>"], max_msg_size=600)
        small = NatsSink(settings(server, stream="SMALL", subject="small.{hotelId}"), CHAINS)
        await small.open(None)
        try:
            medium = event(5, key="k2", detail=[{"elementName": "x", "newValue": "y" * 800}])
            with pytest.raises(PermanentSinkError) as caught:
                await small.write("main", [event(4, key="k1"), medium, event(6, key="k3")])
            assert caught.value.unique_event_id == medium.unique_event_id
            assert "message size exceeds maximum" in str(caught.value)
            assert await server.message_count("SMALL") == 2  # the other keys went through
        finally:
            await small.close()
    finally:
        await sink.close()


async def test_a_publish_permission_denied_is_unusable(
    nats_factory: Callable[..., NatsServer],
) -> None:
    server = nats_factory(
        users={"admin": PASSWORD, "limited": "limited-pw"},
        permissions={
            "limited": {
                "publish": {"allow": ["$JS.API.>", "opera.DEMO.HOTEL1.>"]},
                "subscribe": {"allow": ["_INBOX.>"]},
            }
        },
    )
    # The denied publish is told by its missing acknowledgement: timeout_s is waited out.
    limited = settings(server, user="limited", password="limited-pw", timeout_s=1.5)
    sink = NatsSink(limited, CHAINS)
    await sink.open(None)
    try:
        await sink.write("main", [event(1)])
        with pytest.raises(SinkUnusable, match="permission denied") as caught:
            await sink.write("main", [event(2, hotel="HOTEL2")])
        assert "opera.DEMO.HOTEL2" in str(caught.value)
        assert "publish permission" in str(caught.value)
    finally:
        await sink.close()
    no_api = "no-api-pw"
    server2 = nats_factory(
        users={"noapi": no_api},
        permissions={"noapi": {"publish": {"deny": ["$JS.API.>"]}}},
    )
    with pytest.raises(SinkUnusable, match=r"permission denied.*\$JS\.API"):
        await NatsSink(
            settings(server2, user="noapi", password=no_api, timeout_s=1.0), CHAINS
        ).open(None)


async def test_a_failing_key_stops_only_its_own_later_events(
    nats_server: NatsServer, opened: Callable[..., Any]
) -> None:
    """A permanent failure of one key's event: the other keys are published whole, that key's
    events after it are not (the pipeline re-delivers them after dead-lettering it)."""
    sink = await opened()
    bad = event(2, key="A", detail=[{"v": 2**70}])  # not serializable: found before publishing
    with pytest.raises(PermanentSinkError) as caught:
        await sink.write("main", [event(1, key="A"), bad, event(3, key="A"), event(4, key="B")])
    assert caught.value.unique_event_id == bad.unique_event_id
    assert await nats_server.message_count() == 0


# --- preflight ------------------------------------------------------------------------------


async def test_preflight_passes_without_publishing(
    nats_server: NatsServer, opened: Callable[..., Any]
) -> None:
    # No stream yet, on_start = create: said so, and not created by the preflight.
    line = await NatsSink(settings(nats_server), CHAINS).preflight()
    assert "does not exist yet and is created at start" in line
    assert "opera.DEMO.*.*" in line
    assert await nats_server.message_count() == 0
    with pytest.raises(Exception, match="not found"):
        await nats_server.stream_info()

    sink = await opened()
    await sink.write("main", [event(i) for i in range(5)])
    line = await NatsSink(settings(nats_server), CHAINS).preflight()
    assert nats_server.url in line and "stream 'OPERA' exists (5 messages" in line
    assert "WARNING" not in line
    assert await nats_server.message_count() == 5  # nothing published
    # A shorter duplicate window than configured: a warning in the line.
    line = await NatsSink(settings(nats_server, duplicate_window_s=86400.0 * 2), CHAINS).preflight()
    assert "WARNING" in line and "duplicate window (1 h)" in line


async def test_preflight_fails_with_the_reason(nats_factory: Callable[..., NatsServer]) -> None:
    server = nats_factory(users={"opera": PASSWORD})
    with pytest.raises(SinkUnusable, match="refused the credentials") as caught:
        await NatsSink(settings(server, user="opera", password=WRONG), CHAINS).preflight()
    assert WRONG not in str(caught.value)
    ok = settings(server, user="opera", password=PASSWORD, on_start="must-exist")
    with pytest.raises(SinkUnusable, match="does not exist"):
        await NatsSink(ok, CHAINS).preflight()
    server.stop()
    with pytest.raises(SinkUnusable, match="cannot connect"):
        await NatsSink(settings(server, timeout_s=0.5), CHAINS).preflight()
