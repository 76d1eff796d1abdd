"""The webhook sink against a real HTTP/1.1 receiver on loopback (tests/receiver.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from receiver import Received, Receiver, Reply, refusing_port
from support import (
    as_received,
    committed,
    make_settings,
    newest_offset,
    running,
    serving,
    truth_ids,
    untrusted_tls_server,
    wait_until,
)
from trickle_server import trickling_server

from consumer.config import WebhookSinkSettings
from consumer.core.events import Event
from consumer.errors import PermanentSinkError, TransientSinkError
from consumer.logs import MASK, REDACTOR
from consumer.runtime.assembly import http_client
from consumer.sinks.base import taking
from consumer.sinks.webhook import WebhookSink, batch_idempotency_key
from consumer.state import SqliteStore as Store

# The daemon runs this sink on uvloop by default (consumer.event_loop).
pytestmark = pytest.mark.both_loops

TOKEN = "tok-Zx81-very-secret-bearer"
PASSWORD = "pw-Qq93-very-secret-basic"


def event(i: int, writer: int = 0) -> Event:
    uid = f"w{writer}-u{i}"
    raw = {
        "metadata": {"offset": f"{writer}:{i:05d}", "uniqueEventId": uid},
        "eventName": "UPDATE RESERVATION",
        "moduleName": "Reservation",
        "primaryKey": f"pk{i % 7}",
        "hotelId": "HOTEL1",
        "detail": [{"elementName": "Name", "newValue": f"Zoë «{i}»", "oldValue": None}],
    }
    return Event(
        f"{writer}:{i:05d}",
        uid,
        "UPDATE RESERVATION",
        "Reservation",
        f"pk{i % 7}",
        "HOTEL1",
        None,
        raw,
    )


def settings(url: str, **overrides: Any) -> WebhookSinkSettings:
    return WebhookSinkSettings.model_validate({"type": "webhook", "url": url, **overrides})


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver() as receiver:
        yield receiver


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[aiohttp.ClientSession]:
    # The daemon's one pooled client, as the default [http] settings make it.
    async with http_client(make_settings(tmp_path, "http://127.0.0.1:9")) as c:
        yield c


async def opened(cfg: WebhookSinkSettings, client: aiohttp.ClientSession) -> WebhookSink:
    sink = WebhookSink(cfg, client)
    await sink.open(None)
    return sink


# --- delivery -----------------------------------------------------------------------------------


async def test_a_thousand_single_event_writes_reuse_a_few_connections(
    rx: Receiver, client: aiohttp.ClientSession
):
    sink = await opened(settings(rx.url), client)
    writers, per_writer = 10, 100

    async def writer(w: int) -> None:
        for i in range(per_writer):
            await sink.write("main", [event(i, w)])

    async with asyncio.timeout(30):
        await asyncio.gather(*(writer(w) for w in range(writers)))

    requests = rx.requests
    assert len(requests) == writers * per_writer
    events = [event(i, w) for w in range(writers) for i in range(per_writer)]
    expected = {ev.unique_event_id: ev.document() for ev in events}
    keys = Counter(r.header("Idempotency-Key") for r in requests)
    assert keys == Counter(dict.fromkeys(expected, 1))
    for r in requests:
        assert r.method == "POST"
        assert r.path == "/hook"
        assert r.header("Content-Type") == "application/json"
        assert r.header("X-Opera-Stream") == "main"
        body = r.json()
        assert body == expected[r.header("Idempotency-Key")]
    # Each writer's events arrive in its order.
    bodies = [r.json()["metadata"] for r in requests]
    for w in range(writers):
        mine = [m["offset"] for m in bodies if m["uniqueEventId"].startswith(f"w{w}-")]
        assert mine == [f"{w}:{i:05d}" for i in range(per_writer)]
    print(f"\n{len(requests)} POSTs over {rx.connections} TCP connection(s)")
    assert rx.connections <= 20, f"{rx.connections} connections: the pool is not reused"
    await sink.close()
    assert not client.closed  # the shared client is not the sink's to close


async def test_batch_mode_posts_arrays_in_chunks_with_a_batch_key(
    rx: Receiver, client: aiohttp.ClientSession
):
    sink = await opened(settings(rx.url, batch_size=4), client)
    events = [event(i) for i in range(10)]
    await sink.write("orders", events)

    requests = rx.requests
    assert [len(r.json()) for r in requests] == [4, 4, 2]
    chunks = [events[0:4], events[4:8], events[8:10]]
    for r, chunk in zip(requests, chunks, strict=True):
        ids = [ev.unique_event_id for ev in chunk]
        assert r.json() == [ev.document() for ev in chunk]
        assert [d["metadata"]["uniqueEventId"] for d in r.json()] == ids
        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()
        assert r.header("Idempotency-Key") == f"batch-{digest}" == batch_idempotency_key(ids)
        assert r.header("Content-Type") == "application/json"
        assert r.header("X-Opera-Stream") == "orders"
    # A chunk of one is still an array (one format for the receiver).
    rx.clear()
    await sink.write("orders", [events[0]])
    (single,) = rx.requests
    assert single.json() == [events[0].document()]
    assert single.header("Idempotency-Key") == batch_idempotency_key([events[0].unique_event_id])


def test_no_two_batches_share_an_idempotency_key() -> None:
    """An id with a line break made a batch of one the key of a batch of two (the ids were
    joined by line breaks): a receiver honouring the key answered the second from the first,
    and its events were never processed (found by a review)."""
    plain = batch_idempotency_key(["a", "b"])
    assert plain == "batch-" + hashlib.sha256(b"a\nb").hexdigest()  # as it always was
    assert batch_idempotency_key(["a\nb"]) != plain
    assert batch_idempotency_key(["a\nb"]).startswith("batch-j-")
    assert batch_idempotency_key(["a\n", "b"]) != batch_idempotency_key(["a", "\nb"])


@pytest.mark.parametrize("batch_size", [1, 2])
async def test_each_request_answered_is_said_taken_at_once(
    rx: Receiver, client: aiohttp.ClientSession, batch_size: int
):
    """What the receiver answered 2xx is said taken (``took``) before the next request: a stop
    while a later one is unanswered leaves it recorded by the pipeline, never sent again (in
    batch mode under another chunk's Idempotency-Key)."""
    sink = await opened(settings(rx.url, batch_size=batch_size), client)
    rx.script(Reply(200), Reply(200), Reply(200, delay_s=30))  # one a request
    heard: list[int] = []

    async def write() -> None:
        taking(heard.append)  # as a pipeline's worker does for its write
        await sink.write("main", [event(i) for i in range(3 * batch_size)])

    task = asyncio.create_task(write())
    await wait_until(lambda: len(rx.requests) == 3, timeout=10)
    assert heard == [batch_size, 2 * batch_size]  # the third request, unanswered
    task.cancel()  # the stop
    with pytest.raises(asyncio.CancelledError):
        await task
    assert heard == [batch_size, 2 * batch_size]


@pytest.mark.parametrize("batch_size", [1, 2])
async def test_a_2xx_is_said_taken_before_its_body_is_read(
    client: aiohttp.ClientSession, batch_size: int
):
    """200 said, its body still coming when the stop comes: the receiver has the request, so
    it is said taken (and the pipeline records it at the stop, never sending it again)."""
    async with trickling_server(body=True) as port:
        url = f"http://127.0.0.1:{port}/hook"
        sink = await opened(settings(url, timeout_s=5, batch_size=batch_size), client)
        heard: list[int] = []

        async def write() -> None:
            taking(heard.append)  # as a pipeline's worker does for its write
            await sink.write("main", [event(i) for i in range(2 * batch_size)])

        task = asyncio.create_task(write())
        await wait_until(lambda: heard == [batch_size], timeout=10)
        task.cancel()  # the stop, while the first answer's body trickles
        with pytest.raises(asyncio.CancelledError):
            await task
    assert heard == [batch_size]


async def test_the_document_includes_a_fetched_resource(
    rx: Receiver, client: aiohttp.ClientSession
):
    sink = await opened(settings(rx.url), client)
    ev = event(1)._replace(resource={"reservationId": "R1", "guest": "Zoë"}, fetched=True)
    await sink.write("main", [ev])
    (r,) = rx.requests
    assert r.json() == {**ev.raw, "resource": {"reservationId": "R1", "guest": "Zoë"}}


async def test_bodies_are_the_event_text_as_received(rx: Receiver, client: aiohttp.ClientSession):
    # Escapes kept: the bytes the gateway sent, alone or in a batch's array.
    texts = [
        b'{"metadata":{"offset":"%d","uniqueEventId":"t%d"},"hotelId":"H\\u00d6TEL"}' % (i, i)
        for i in range(3)
    ]
    events = [as_received(t) for t in texts]
    await (await opened(settings(rx.url), client)).write("main", events[:1])
    await (await opened(settings(rx.url, batch_size=2), client)).write("main", events[1:])
    assert [r.body for r in rx.requests] == [texts[0], b"[" + texts[1] + b"," + texts[2] + b"]"]


# --- headers and auth ---------------------------------------------------------------------------


async def test_bearer_auth_and_custom_headers_arrive(rx: Receiver, client: aiohttp.ClientSession):
    cfg = settings(
        rx.url,
        auth="bearer",
        token=TOKEN,
        headers={"X-Tenant": "acme"},
    )
    sink = await opened(cfg, client)
    await sink.write("billing", [event(1)])
    (r,) = rx.requests
    assert r.header("Authorization") == f"Bearer {TOKEN}"
    assert r.header("X-Tenant") == "acme"
    assert r.header("X-Opera-Stream") == "billing"
    assert r.header("Content-Type") == "application/json"
    assert r.header("Idempotency-Key") == "w0-u1"
    # open() registered the token with the log redactor.
    assert REDACTOR.scrub(f"token is {TOKEN}") == f"token is {MASK}"


@pytest.mark.parametrize("uid", ["a\r\nX-Injected: 1", "a\x00b", "zoë-1", " padded "])
async def test_an_id_a_header_cannot_carry_is_keyed_by_its_hash(
    rx: Receiver, client: aiohttp.ClientSession, uid: str
):
    """A uniqueEventId with a control character made every POST fail in the HTTP client (the
    event dead-lettered, and `dlq replay` failed the same way); a non-ASCII one went as raw
    bytes, which strict receivers refuse. Such an id's key is its hash; the body keeps it."""
    ev = event(1)._replace(unique_event_id=uid)
    ev.raw["metadata"]["uniqueEventId"] = uid
    sink = await opened(settings(rx.url), client)
    await sink.write("main", [ev])
    (r,) = rx.requests
    digest = hashlib.sha256(uid.encode()).hexdigest()
    assert r.header("Idempotency-Key") == f"sha256:{digest}"
    assert r.header("X-Injected") is None
    assert json.loads(r.body)["metadata"]["uniqueEventId"] == uid


async def test_basic_auth_arrives(rx: Receiver, client: aiohttp.ClientSession):
    cfg = settings(rx.url, auth="basic", username="opera", password=PASSWORD)
    sink = await opened(cfg, client)
    await sink.write("main", [event(1)])
    (r,) = rx.requests
    expected = base64.b64encode(f"opera:{PASSWORD}".encode()).decode()
    assert r.header("Authorization") == f"Basic {expected}"
    assert REDACTOR.scrub(PASSWORD) == MASK


async def test_no_auth_sends_no_authorization_header(rx: Receiver, client: aiohttp.ClientSession):
    sink = await opened(settings(rx.url), client)
    await sink.write("main", [event(1)])
    (r,) = rx.requests
    assert r.header("Authorization") is None


# --- transient failures -------------------------------------------------------------------------


async def test_503_with_retry_after_is_transient_with_its_delay(
    rx: Receiver, client: aiohttp.ClientSession
):
    sink = await opened(settings(rx.url), client)
    rx.script(Reply(503, {"Retry-After": "2"}, b"down for maintenance"))
    with pytest.raises(TransientSinkError) as info:
        await sink.write("main", [event(1)])
    assert info.value.retry_after == 2.0
    assert "503" in str(info.value)
    # The retry (the pipeline's) goes through, with the same key.
    await sink.write("main", [event(1)])
    assert [r.header("Idempotency-Key") for r in rx.requests] == ["w0-u1", "w0-u1"]


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 502, 504, 507, 520, 599])
async def test_retryable_statuses_are_transient(
    rx: Receiver, client: aiohttp.ClientSession, status: int
):
    sink = await opened(settings(rx.url), client)
    rx.script(Reply(status))
    with pytest.raises(TransientSinkError) as info:
        await sink.write("main", [event(1)])
    assert f"HTTP {status}" in str(info.value)
    assert info.value.retry_after is None  # none was given


async def test_a_409_for_good_is_the_events_refusal_after_conflict_retry_s(
    rx: Receiver, client: aiohttp.ClientSession
):
    """A receiver that answers 409 for an event for good (its "conflict" is with the event
    itself, not a first try still under way) held the stream for ever: it was retried for
    ever. Now a key answered 409 for conflict_retry_s is the receiver's refusal, and
    forgotten: the dead letter's replay gets a window of its own."""
    window = 0.3
    sink = await opened(settings(rx.url, conflict_retry_s=window), client)
    rx.responder = lambda r: Reply(409, body=b'{"error": "conflict"}')
    first = time.monotonic()
    with pytest.raises(TransientSinkError):
        await sink.write("main", [event(1)])
    refusal: PermanentSinkError | None = None
    async with asyncio.timeout(30):  # the pipeline's retries, as often as its floor allows
        while refusal is None:
            await asyncio.sleep(0.05)
            try:
                await sink.write("main", [event(1)])
            except PermanentSinkError as exc:
                refusal = exc
            except TransientSinkError:
                pass
    assert time.monotonic() - first >= window
    assert refusal.unique_event_id == "w0-u1"
    assert "HTTP 409" in str(refusal) and "sink.conflict_retry_s" in str(refusal)
    assert '"conflict"' in str(refusal)  # the body's excerpt, as for any refusal
    with pytest.raises(TransientSinkError):  # replayed: a new window
        await sink.write("main", [event(1)])


async def test_a_2xx_ends_a_keys_409_window(rx: Receiver, client: aiohttp.ClientSession):
    """A 409 that clears (the receiver's first try ended) is forgotten: a later 409 for the
    same key (the event sent again after a restart, say) starts a window of its own."""
    window = 0.2
    sink = await opened(settings(rx.url, conflict_retry_s=window), client)
    rx.script(Reply(409))
    started = time.monotonic()
    with pytest.raises(TransientSinkError):
        await sink.write("main", [event(1)])
    await asyncio.sleep(window - (time.monotonic() - started) + 0.05)  # past the window
    await sink.write("main", [event(1)])  # 200: taken
    rx.script(Reply(409))
    with pytest.raises(TransientSinkError):  # not yet a refusal: its window starts anew
        await sink.write("main", [event(1)])
    assert [reply.status for _, reply in rx.exchanges] == [409, 200, 409]


async def test_a_failed_chunk_stops_the_write(rx: Receiver, client: aiohttp.ClientSession):
    sink = await opened(settings(rx.url, batch_size=2), client)
    rx.script(Reply(200), Reply(429, {"Retry-After": "1"}))
    with pytest.raises(TransientSinkError) as info:
        await sink.write("main", [event(i) for i in range(6)])
    assert info.value.retry_after == 1.0
    assert len(rx.requests) == 2  # the third chunk was not sent


async def test_connection_refused_is_transient(client: aiohttp.ClientSession):
    with refusing_port() as port:
        sink = await opened(settings(f"http://127.0.0.1:{port}/hook"), client)
        with pytest.raises(TransientSinkError) as info:
            await sink.write("main", [event(1)])
    assert "ConnectError" in str(info.value)


async def test_a_slow_receiver_times_out_transiently(rx: Receiver, client: aiohttp.ClientSession):
    """Issue #9 item 12: the receiver would answer after 30 s (with a 200, so a write that
    waited for it would succeed); the write gives up on its own timeout instead: one
    request, failed as a timeout."""
    sink = await opened(settings(rx.url, timeout_s=0.2), client)
    rx.script(Reply(200, delay_s=30.0))  # cut short when the receiver stops
    with pytest.raises(TransientSinkError) as info:
        await sink.write("main", [event(1)])
    assert "Timeout" in str(info.value)
    assert [r.header("Idempotency-Key") for r in rx.requests] == ["w0-u1"]  # one attempt
    # The pool recovers: the next write gets a fresh connection and goes through.
    await sink.write("main", [event(2)])
    assert [r.header("Idempotency-Key") for r in rx.requests] == ["w0-u1", "w0-u2"]


async def test_a_receiver_trickling_its_answer_meets_the_deadline(client: aiohttp.ClientSession):
    """A byte of the answer's head every 0.1 s never trips the read timeout (it bounds each
    silence): the whole request has 3 * timeout_s, after which the write fails transiently
    instead of holding the worker for ever."""
    async with trickling_server(body=False) as port:
        sink = await opened(settings(f"http://127.0.0.1:{port}/hook", timeout_s=0.5), client)
        with pytest.raises(TransientSinkError, match=r"no complete answer within 1\.5 s"):
            async with asyncio.timeout(30):  # the old behaviour: for ever
                await sink.write("main", [event(1)])


async def test_a_2xx_whose_body_trickles_is_delivered_by_the_deadline(
    client: aiohttp.ClientSession,
):
    """200 said, then a body without end: the receiver has the event (sent again, one that
    ignores Idempotency-Key would hold it twice). The write is done at the deadline."""
    async with trickling_server(body=True) as port:
        sink = await opened(settings(f"http://127.0.0.1:{port}/hook", timeout_s=0.5), client)
        async with asyncio.timeout(30):
            await sink.write("main", [event(1)])


# A slow link, made with small socket buffers on both sides (loopback's own grow to megabytes):
# what the receiver has not read yet is at most a few hundred KiB.
SMALL_BUFFER_BYTES = 32 * 1024


def _small_send_buffer(addr_info: Any) -> socket.socket:
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER_BYTES)
    return sock


@contextlib.asynccontextmanager
async def slow_reader(
    *, stall_after: int | None
) -> AsyncIterator[tuple[int, list[tuple[bytes, float]]]]:
    """A receiver taking each request's body 16 KiB every 10 ms (about 1.6 MB/s), then
    answering 200; with ``stall_after``, it stops reading after that many bytes. Yields its
    port and the bodies read whole, each with the seconds reading it took."""
    loop = asyncio.get_running_loop()
    bodies: list[tuple[bytes, float]] = []
    stop = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = bytearray()
        started = loop.time()
        while len(body) < length:
            if stall_after is not None and len(body) >= stall_after:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 30)
                writer.close()
                return
            chunk = await reader.read(16 * 1024)
            if not chunk:
                return
            body += chunk
            await asyncio.sleep(0.01)
        bodies.append((bytes(body), loop.time() - started))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER_BYTES)
    listening.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(handle, sock=listening)
    async with server:
        try:
            yield listening.getsockname()[1], bodies
        finally:
            stop.set()


async def read_post(reader: asyncio.StreamReader) -> bytes:
    """One request from a receiver's socket: its head, in lower case (its body read past)."""
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    await reader.readexactly(int(head.split(b"content-length:")[1].split(b"\r\n")[0]))
    return head


def big_events(count: int, each: int) -> list[Event]:
    return [event(i)._replace(text=b'{"big":"' + b"x" * each + b'"}') for i in range(count)]


async def test_a_big_batch_on_a_slow_link_takes_what_its_upload_takes():
    """4 MiB in one request, which the receiver reads for longer than the whole request's 3 *
    timeout_s, never silent for as long: delivered whole, once. Before, the deadline counted
    the upload too: every try failed and the batch held the stream for ever."""
    events = big_events(8, 512 * 1024)
    connector = aiohttp.TCPConnector(socket_factory=_small_send_buffer)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        slow_reader(stall_after=None) as (port, bodies),
    ):
        cfg = settings(f"http://127.0.0.1:{port}/hook", timeout_s=0.5, batch_size=8)
        sink = await opened(cfg, session)
        async with asyncio.timeout(60):
            await sink.write("main", events)
    assert len(bodies) == 1
    body, reading_s = bodies[0]
    assert reading_s > 1.5  # the case: longer than the deadline
    assert json.loads(body) == [{"big": "x" * 512 * 1024}] * 8


async def test_a_receiver_that_stops_reading_a_big_body_meets_the_deadline():
    """The receiver takes 1 MiB of a 4 MiB body and reads no more: the write fails
    transiently 3 * timeout_s after the upload's last progress, not for ever."""
    connector = aiohttp.TCPConnector(socket_factory=_small_send_buffer)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        slow_reader(stall_after=1024 * 1024) as (port, bodies),
    ):
        cfg = settings(f"http://127.0.0.1:{port}/hook", timeout_s=0.5, batch_size=8)
        sink = await opened(cfg, session)
        with pytest.raises(TransientSinkError, match=r"no complete answer within 1\.5 s"):
            async with asyncio.timeout(30):
                await sink.write("main", big_events(8, 512 * 1024))
    assert bodies == []


async def test_a_2xx_whose_body_is_cut_short_is_delivered_once(client: aiohttp.ClientSession):
    """200 with a Content-Length it does not send (the connection closed): delivered, one
    POST; it was retried for as long as the receiver did that, a duplicate each time."""
    posts = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal posts
        await read_post(reader)
        posts += 1
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"ok": true}')
        await writer.drain()
        writer.close()

    async with serving(handle) as port:
        sink = await opened(settings(f"http://127.0.0.1:{port}/hook", timeout_s=5), client)
        async with asyncio.timeout(30):
            await sink.write("main", [event(1)])
    assert posts == 1


async def test_an_answer_nobody_asked_for_is_never_taken_as_the_next_ones(
    client: aiohttp.ClientSession,
):
    """The receiver answers the first POST a second time once its connection is back in the
    pool, idle. The next event is POSTed (on another connection) and answered for itself.
    Before, aiohttp reused that connection and gave the next POST the stray 200 before sending
    it: the event was said delivered and never left."""
    keys: list[bytes] = []
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    idle = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await read_post(reader)
                keys.append(head.split(b"idempotency-key: ")[1].split(b"\r\n")[0])
                writer.write(ok)
                await writer.drain()
                if len(keys) == 1:
                    await idle.wait()  # the client has the connection back in its pool
                    writer.write(ok)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def stray_waiting() -> bool:  # the idle connection holds the second answer
        pooled = client.connector._conns.values() if client.connector else []
        return any(proto.should_close for conns in pooled for proto, _ in conns)

    async with serving(handle) as port:
        sink = await opened(settings(f"http://127.0.0.1:{port}/hook", timeout_s=5), client)
        async with asyncio.timeout(30):
            await sink.write("main", [event(1)])
            idle.set()
            await wait_until(stray_waiting)
            await sink.write("main", [event(2)])
    assert keys == [b"w0-u1", b"w0-u2"]


async def test_the_receivers_certificate_is_verified_by_default(
    tmp_path: Path, client: aiohttp.ClientSession
):
    """A receiver whose certificate no trusted CA signed gets nothing: the handshake fails,
    transiently, and the error says why."""
    async with untrusted_tls_server(tmp_path) as (port, requests):
        sink = await opened(settings(f"https://127.0.0.1:{port}/hook"), client)
        with pytest.raises(TransientSinkError) as info:
            await sink.write("main", [event(1)])
    assert "TLS error: certificate not accepted" in str(info.value), str(info.value)
    assert requests == []


# --- permanent failures -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 422])
async def test_client_errors_are_permanent_with_status_and_excerpt(
    rx: Receiver, client: aiohttp.ClientSession, status: int
):
    sink = await opened(settings(rx.url), client)
    body = ("reservation rejected: " + "é" * 400).encode()
    rx.script(Reply(status, {"Content-Type": "text/plain"}, body))
    with pytest.raises(PermanentSinkError) as info:
        await sink.write("main", [event(7)])
    text = str(info.value)
    assert f"HTTP {status}" in text
    excerpt = body.decode()[:300]
    assert text.endswith(excerpt)
    assert body.decode()[:301] not in text
    assert info.value.unique_event_id == "w0-u7"


@pytest.mark.parametrize("then", ["closes", "stalls"])
async def test_a_refusal_whose_body_is_cut_short_is_still_a_refusal(
    client: aiohttp.ClientSession, then: str
):
    """400, then its body cut (the connection closed) or stalled past timeout_s: permanent,
    with the status and why its body ends there; what came of the body may end inside an
    echoed secret, and is not shown. Before, it was transient: retried for as long as the
    receiver did that, the stream held for ever."""
    answered = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_post(reader)
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 100\r\n\r\n")
            writer.write(b"rejected: Bearer " + TOKEN[:12].encode())
            await writer.drain()
            if then == "stalls":
                await answered.wait()
        finally:
            writer.close()

    async with serving(handle) as port:
        url = f"http://127.0.0.1:{port}/hook"
        sink = await opened(settings(url, timeout_s=0.5, auth="bearer", token=TOKEN), client)
        with pytest.raises(PermanentSinkError) as info:
            async with asyncio.timeout(30):
                await sink.write("main", [event(3)])
        answered.set()
    text = str(info.value)
    failure = "ReadTimeout" if then == "stalls" else "RemoteProtocolError"
    assert text.endswith(f"HTTP 400 Bad Request (its body cut short: {failure})"), text
    assert TOKEN[:12] not in text
    assert info.value.unique_event_id == "w0-u3"


async def test_a_rejected_batch_names_no_single_culprit(
    rx: Receiver, client: aiohttp.ClientSession
):
    sink = await opened(settings(rx.url, batch_size=10), client)
    rx.script(Reply(400, body=b"bad item"))
    with pytest.raises(PermanentSinkError) as info:
        await sink.write("main", [event(i) for i in range(3)])
    assert info.value.unique_event_id is None
    rx.script(Reply(400, body=b"bad item"))
    with pytest.raises(PermanentSinkError) as info:
        await sink.write("main", [event(9)])  # a request of one event names it
    assert info.value.unique_event_id == "w0-u9"


async def test_a_redirect_is_not_followed_and_is_permanent(
    rx: Receiver, client: aiohttp.ClientSession
):
    sink = await opened(settings(rx.url), client)
    rx.script(Reply(307, {"Location": rx.url + "/elsewhere"}))
    with pytest.raises(PermanentSinkError) as info:
        await sink.write("main", [event(1)])
    assert "HTTP 307" in str(info.value)
    assert len(rx.requests) == 1


def _echo(request: Received) -> Reply:
    """A receiver that echoes the request's headers back in its error body."""
    echoed = "; ".join(f"{k}: {v}" for k, v in request.headers.items())
    return Reply(401, body=f"unauthorized, you sent {echoed}".encode())


@pytest.mark.parametrize("auth", ["bearer", "basic"])
async def test_no_secret_in_any_error_text(rx: Receiver, client: aiohttp.ClientSession, auth: str):
    cfg = settings(
        rx.url,
        auth=auth,
        token=TOKEN if auth == "bearer" else None,
        username="opera" if auth == "basic" else None,
        password=PASSWORD if auth == "basic" else None,
    )
    basic = base64.b64encode(f"opera:{PASSWORD}".encode()).decode()
    secrets = [TOKEN, PASSWORD, basic, "Bearer", "Basic "]
    sink = await opened(cfg, client)
    texts: list[str] = []
    rx.responder = _echo
    with pytest.raises(PermanentSinkError) as perm:
        await sink.write("main", [event(1)])
    texts.append(str(perm.value))
    assert "authorization: ***" in texts[0]  # the echo was there, masked
    rx.responder = lambda r: Reply(503, body=_echo(r).body)
    with pytest.raises(TransientSinkError) as trans:
        await sink.write("main", [event(1)])
    texts.append(str(trans.value))
    rx.responder = None
    rx.script(Reply(200, delay_s=2.0))
    slow = await opened(cfg.model_copy(update={"timeout_s": 0.2}), client)
    with pytest.raises(TransientSinkError) as timeout:
        await slow.write("main", [event(1)])
    texts.append(str(timeout.value))
    with refusing_port() as port:
        gone = await opened(cfg.model_copy(update={"url": f"http://127.0.0.1:{port}/"}), client)
        with pytest.raises(TransientSinkError) as refused:
            await gone.write("main", [event(1)])
    texts.append(str(refused.value))
    for text in texts:
        for secret in secrets:
            assert secret not in text, (secret, text)


async def test_credentials_in_the_url_stay_out_of_error_texts(
    rx: Receiver, client: aiohttp.ClientSession
):
    url = f"http://opera:{PASSWORD}@127.0.0.1:{rx.port}/hook?api_key=k-123456"
    sink = await opened(settings(url), client)
    rx.script(Reply(400, body=b"no"))
    with pytest.raises(PermanentSinkError) as info:
        await sink.write("main", [event(1)])
    assert PASSWORD not in str(info.value)
    assert "k-123456" not in str(info.value)
    assert f"127.0.0.1:{rx.port}/…:" in str(info.value) and "/hook" not in str(info.value)


async def test_a_credential_in_the_url_path_stays_out_of_errors_logs_and_check_config(
    rx: Receiver, client: aiohttp.ClientSession
):
    """Slack, Discord and Teams webhooks carry their credential in the path: it was in every
    sink error, so every log line and dead letter, and in check-config's output."""
    secret = "XoXb9Qk2mZ7rT4vW8yA1cE3g"
    url = f"http://127.0.0.1:{rx.port}/services/T0001/B0002/{secret}"
    cfg = settings(url)
    assert secret not in repr(cfg) and secret not in json.dumps(cfg.model_dump(mode="json"))
    assert cfg.model_dump(mode="json")["url"] == f"http://127.0.0.1:{rx.port}/***"
    sink = await opened(cfg, client)
    rx.script(Reply(404, body=f"no hook at /services/T0001/B0002/{secret}".encode()))
    with pytest.raises(PermanentSinkError) as info:
        await sink.write("main", [event(1)])
    assert secret not in REDACTOR.scrub(str(info.value))  # as the dead letter words it
    assert secret not in str(info.value).partition(": HTTP")[0]  # where it POSTed: no path
    assert REDACTOR.scrub(f"echoed {secret}") == f"echoed {MASK}"


# --- the daemon with a webhook sink ---------------------------------------------------------------


def _webhook_settings(tmp_path: Path, gw_url: str, rx: Receiver, **sink: Any) -> Any:
    s = make_settings(
        tmp_path,
        gw_url,
        sink={"type": "webhook", "url": rx.url, **sink},
        pipeline={"sink_retry_initial_s": 0.05, "sink_retry_max_s": 0.2},
    )
    assert isinstance(s.sink, WebhookSinkSettings)
    return s


def _ids_in(r: Received) -> list[str]:
    """The uniqueEventIds a request carries (one event, or an array of them)."""
    body = r.json()
    return [d["metadata"]["uniqueEventId"] for d in (body if isinstance(body, list) else [body])]


def _delivered_ids(rx: Receiver) -> list[str]:
    """The uniqueEventIds the receiver accepted (2xx), repeats included."""
    ids: list[str] = []
    for r, reply in rx.exchanges:
        if 200 <= reply.status < 300:
            ids += _ids_in(r)
    return ids


async def test_daemon_delivers_every_sandbox_event_exactly_once(
    sandbox_factory, tmp_path: Path, rx: Receiver, client: aiohttp.ClientSession
):
    gw = await sandbox_factory(backlog=300)
    s = _webhook_settings(tmp_path, gw.url, rx)
    truth = truth_ids(gw.events("DEMO"))
    async with running(s, sink=WebhookSink(s.sink, client)) as daemon:
        await wait_until(lambda: len(rx.requests) >= len(truth))
    assert daemon.exit_code == 0
    keys = [r.header("Idempotency-Key") for r in rx.requests]
    assert Counter(keys) == Counter(truth)
    assert all(v == 1 for v in Counter(keys).values())
    by_id = {e["metadata"]["uniqueEventId"]: e for e in gw.events("DEMO")}
    for r in rx.requests:
        assert r.json() == by_id[r.header("Idempotency-Key")]
        assert r.header("X-Opera-Stream") == "main"
    assert rx.connections <= 20
    assert not client.closed


async def test_daemon_in_batch_mode_delivers_every_event_once(
    sandbox_factory, tmp_path: Path, rx: Receiver, client: aiohttp.ClientSession
):
    gw = await sandbox_factory(backlog=300)
    s = _webhook_settings(tmp_path, gw.url, rx, batch_size=25)
    truth = truth_ids(gw.events("DEMO"))
    async with running(s, sink=WebhookSink(s.sink, client)):
        await wait_until(lambda: len(_delivered_ids(rx)) >= len(truth))
    assert Counter(_delivered_ids(rx)) == Counter(truth)
    for r in rx.requests:
        assert isinstance(r.json(), list)
        assert 1 <= len(r.json()) <= 25
        ids = [d["metadata"]["uniqueEventId"] for d in r.json()]
        assert r.header("Idempotency-Key") == batch_idempotency_key(ids)


@pytest.mark.parametrize("batch_size", [1, 20])
@pytest.mark.parametrize(
    "refusal",
    [
        (422, {}, ["HTTP 422"]),
        # A 409 for good (the receiver's conflict is with the event itself): a refusal after
        # conflict_retry_s, for its batch's key, then its own; retried for ever before.
        (409, {"conflict_retry_s": 0.3}, ["HTTP 409", "for 0.3 s (sink.conflict_retry_s)"]),
    ],
    ids=["422", "409-for-good"],
)
async def test_daemon_dead_letters_the_event_the_receiver_rejects(
    sandbox_factory,
    *,
    tmp_path: Path,
    rx: Receiver,
    client: aiohttp.ClientSession,
    batch_size: int,
    refusal: tuple[int, dict[str, Any], list[str]],
):
    """Issue #9 item 12: the dead-letter count is checked once the committed checkpoint is the
    gateway's newest event (every event done, none in flight), not after a sleep."""
    status, sink, said = refusal
    gw = await sandbox_factory(backlog=200)
    truth = truth_ids(gw.events("DEMO"))
    culprit = truth[137]

    def reject_culprit(r: Received) -> Reply:
        if culprit in _ids_in(r):
            return Reply(status, body=f'{{"error": "cannot store {culprit}"}}'.encode())
        return Reply(200)

    rx.responder = reject_culprit
    s = _webhook_settings(tmp_path, gw.url, rx, batch_size=batch_size, **sink)
    others = set(truth) - {culprit}
    async with running(s, sink=WebhookSink(s.sink, client)) as daemon:
        pipeline = daemon.pipelines["main"]
        await wait_until(lambda: pipeline.dead_lettered >= 1 and others <= set(_delivered_ids(rx)))
        newest = newest_offset(gw)
        # every event done and committed: nothing else can be rejected any more
        await wait_until(lambda: committed(tmp_path / "state.db", newest), timeout=60)
        assert pipeline.dead_lettered == 1
    # every other event arrived (each once), the culprit never did
    assert set(_accepted_once(rx)) == others
    store = await Store.open(tmp_path / "state.db")
    try:
        dead = await store.dead_letters()
    finally:
        await store.close()
    assert [d.unique_event_id for d in dead] == [culprit]
    assert dead[0].reason == "sink_rejected"
    assert all(words in dead[0].error for words in said), dead[0].error
    assert culprit in dead[0].error  # the body excerpt


# --- what the receiver took is never sent again --------------------------------------------------


def _accepted_once(rx: Receiver) -> Counter[str]:
    """Each uniqueEventId's count of 2xx answers: a receiver that deduplicates by
    Idempotency-Key alone takes an event once per key it came under."""
    counts = Counter(_delivered_ids(rx))
    twice = {uid: n for uid, n in counts.items() if n > 1}
    assert not twice, f"taken more than once: {sorted(twice)[:5]}"
    return counts


@pytest.mark.parametrize("batch_size", [1, 20])
async def test_the_events_taken_before_a_rejected_request_are_not_sent_again(
    sandbox_factory, tmp_path: Path, rx: Receiver, client: aiohttp.ClientSession, batch_size: int
):
    """A 422 for one request of a write: those the receiver answered 2xx before it are done.
    They were sent again (one by one, under their own keys) while the pipeline found the
    culprit: twice for a receiver keyed by Idempotency-Key."""
    gw = await sandbox_factory(backlog=200)
    truth = truth_ids(gw.events("DEMO"))
    culprit = truth[137]

    def reject_culprit(r: Received) -> Reply:
        if culprit in _ids_in(r):
            return Reply(422, body=b'{"error": "cannot store it"}')
        return Reply(200)

    rx.responder = reject_culprit
    s = _webhook_settings(tmp_path, gw.url, rx, batch_size=batch_size)
    async with running(s, sink=WebhookSink(s.sink, client)) as daemon:
        pipeline = daemon.pipelines["main"]
        await wait_until(lambda: committed(tmp_path / "state.db", newest_offset(gw)), timeout=60)
        assert pipeline.dead_lettered == 1
    assert set(_accepted_once(rx)) == set(truth) - {culprit}


@pytest.mark.parametrize("batch_size", [1, 20])
async def test_a_write_retried_after_a_503_sends_only_what_was_not_taken(
    sandbox_factory, tmp_path: Path, rx: Receiver, client: aiohttp.ClientSession, batch_size: int
):
    """A 503 for one request of a write: the retry starts at that request (the same chunks,
    so the same keys); the whole write was sent again."""
    gw = await sandbox_factory(backlog=200)
    truth = truth_ids(gw.events("DEMO"))
    flaky = truth[137]
    refused: list[str] = []

    def unavailable_once(r: Received) -> Reply:
        if not refused and flaky in _ids_in(r):
            refused.append(flaky)
            return Reply(503)
        return Reply(200)

    rx.responder = unavailable_once
    s = _webhook_settings(tmp_path, gw.url, rx, batch_size=batch_size)
    async with running(s, sink=WebhookSink(s.sink, client)):
        await wait_until(lambda: committed(tmp_path / "state.db", newest_offset(gw)), timeout=60)
    assert refused == [flaky]
    assert set(_accepted_once(rx)) == set(truth)
    keys = [r.header("Idempotency-Key") for r, reply in rx.exchanges if reply.status == 503]
    retried = [r.header("Idempotency-Key") for r, reply in rx.exchanges if reply.status == 200]
    assert keys[0] in retried  # the refused request again, under its own key
