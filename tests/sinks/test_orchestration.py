"""Orchestration against the sandbox's REST endpoints: the daemon GETs each event's resource
(token, x-app-key, x-hotelid checked by the sandbox), within a rate limit, coalescing GETs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from bus_events import event
from receiver import Receiver, Reply
from support import (
    cli,
    make_settings,
    read_sink,
    running,
    spawn_daemon,
    tail,
    toml_config,
    truth_ids,
    wait_exit,
    wait_until,
)
from trickle_server import trickling_server

from consumer.config import OrchestrationSettings, Settings
from consumer.core.events import Event
from consumer.core.protocol import key_hash
from consumer.errors import AuthError, PermanentSinkError, TransientSinkError
from consumer.runtime.assembly import http_client
from consumer.runtime.auth import TokenProvider
from consumer.sandbox import SandboxOptions
from consumer.sinks.base import PlainSink
from consumer.sinks.orchestration import OrchestratingSink, Orchestrator

RESOURCES = {
    "Reservation": "/rsv/v1/hotels/{hotelId}/reservations/{primaryKey}",
    "Profile": "/crm/v1/profiles/{primaryKey}",
}


def with_orchestration(settings: Settings, **overrides: Any) -> Settings:
    orch = OrchestrationSettings(
        enabled=True, **{"resources": RESOURCES, "coalesce_ms": 0.0, **overrides}
    )
    return settings.model_copy(update={"orchestration": orch})


async def test_each_event_carries_its_current_resource(sandbox_factory, tmp_path: Path) -> None:
    gw = await sandbox_factory(backlog=150)
    settings = with_orchestration(make_settings(tmp_path, gw.url), rate_per_s=1000, burst=100)
    sink = tmp_path / "events.jsonl"
    async with running(settings):
        await wait_until(lambda: len(read_sink(sink)) >= 150)
    lines = read_sink(sink)
    assert sorted(e["metadata"]["uniqueEventId"] for e in lines) == sorted(
        truth_ids(gw.events("DEMO"))
    )
    fetched = 0
    for e in lines:
        module = e["moduleName"]
        if module == "Reservation":
            assert e["resource"]["reservationId"] == e["primaryKey"]
            assert e["resource"]["hotelId"] == e["hotelId"]
            fetched += 1
        elif module == "Profile":
            assert e["resource"]["profileId"] == e["primaryKey"]
            fetched += 1
        else:  # no template for this module: delivered as received
            assert "resource" not in e
    assert fetched > 0
    assert gw.stats.rest_requests >= 1


async def test_the_rate_limit_and_429s_slow_it_down_without_loss(
    sandbox_factory, tmp_path: Path
) -> None:
    # The sandbox allows 10 GETs/s; the consumer is configured to ask faster, meets 429 +
    # Retry-After, holds its bucket, and still delivers every event with its resource. Its
    # bucket of 10: the first GETs (up to 16 at once) meet 429s even spread over 0.5 s by a
    # loaded machine, and few rounds of holding (a second or so each) are needed afterwards.
    gw = await sandbox_factory(backlog=60, rest_rate=10.0, rest_burst=10)
    settings = with_orchestration(
        make_settings(tmp_path, gw.url), rate_per_s=500, burst=50, max_attempts=20
    )
    sink = tmp_path / "events.jsonl"
    async with running(settings) as daemon:
        await wait_until(lambda: len(read_sink(sink)) >= 60, timeout=60)
        assert daemon.metrics_server is not None
        url = f"http://127.0.0.1:{daemon.metrics_server.port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            text = await response.text()
    lines = read_sink(sink)
    assert len(lines) == 60
    assert gw.stats.rest_throttled > 0
    # Every 429 the sandbox sent is counted by the consumer's metrics.
    assert f"opera_consumer_orchestration_throttled_total {gw.stats.rest_throttled:.1f}" in text
    assert "opera_consumer_orchestration_requests_total" in text
    assert all(e["resource"] is not None for e in lines if e["moduleName"] in RESOURCES)


async def test_the_configured_rate_keeps_under_the_servers_limit(
    sandbox_factory, tmp_path: Path
) -> None:
    """Issue #9 item 12: the server's bucket holds 3, so GETs the consumer spaced out but that
    arrive bunched (one late by up to 0.2 s on a loaded machine) are not refused; without the
    consumer's limit, the GETs of 60 events would still meet 429s at once."""
    # Configured at 10/s with no burst against a server allowing 20/s: not a single 429,
    # and one GET per resource (events of one reservation in a batch share it).
    gw = await sandbox_factory(backlog=60, rest_rate=20.0, rest_burst=3)
    settings = with_orchestration(
        make_settings(tmp_path, gw.url), rate_per_s=10, burst=1, coalesce_ms=60_000.0
    )
    sink = tmp_path / "events.jsonl"
    async with running(settings):
        await wait_until(lambda: len(read_sink(sink)) >= 60, timeout=60)
    lines = read_sink(sink)
    resources = {(e["moduleName"], e["primaryKey"]) for e in lines if e["moduleName"] in RESOURCES}
    assert gw.stats.rest_throttled == 0
    assert gw.stats.rest_requests == len(resources)
    assert sum(gw.stats.rest_paths.values()) == len(resources)


async def test_a_burst_for_one_resource_costs_one_get(sandbox_factory, tmp_path: Path) -> None:
    gw = await sandbox_factory(backlog=50)
    settings = with_orchestration(make_settings(tmp_path, gw.url), coalesce_ms=5000.0)
    ev = next(e for e in gw.events("DEMO") if e["moduleName"] == "Reservation")
    async with aiohttp.ClientSession() as http:
        stream = settings.streams["main"]
        orch = Orchestrator(
            settings.orchestration, http, {"main": (stream, TokenProvider(http, stream))}
        )
        url = f"{gw.url}/rsv/v1/hotels/{ev['hotelId']}/reservations/{ev['primaryKey']}"
        results = await asyncio.gather(*(orch.fetch("main", url, ev["hotelId"]) for _ in range(10)))
        again = await orch.fetch("main", url, ev["hotelId"])  # within the window: reused
    assert all(r == results[0] for r in results)
    assert again == results[0]
    assert orch.requests == 1
    assert orch.coalesced == 10
    assert sum(gw.stats.rest_paths.values()) == 1


async def test_transient_rest_failures_are_retried(sandbox_factory, tmp_path: Path) -> None:
    gw = await sandbox_factory(backlog=30)
    gw.fail_rest([503, 502, 429], retry_after=0.1)
    # Not the default 5 GETs/s: the retries are the point, not the rate.
    settings = with_orchestration(make_settings(tmp_path, gw.url), rate_per_s=1000, burst=100)
    sink = tmp_path / "events.jsonl"
    async with running(settings) as daemon:
        await wait_until(lambda: len(read_sink(sink)) >= 30)
        dead = await daemon.store.dead_letters()
    assert dead == []
    assert all(e["resource"] is not None for e in read_sink(sink) if e["moduleName"] in RESOURCES)


@pytest.mark.parametrize("mode", ["attach-null", "dead-letter"])
async def test_not_found_attaches_null_or_dead_letters(
    sandbox_factory, tmp_path: Path, mode: str
) -> None:
    gw = await sandbox_factory(backlog=60)
    wrong = {"Reservation": "/crm/v1/profiles/{primaryKey}"}  # no profile has that key: 404
    reservations = {
        e["metadata"]["uniqueEventId"]
        for e in gw.events("DEMO")
        if e["moduleName"] == "Reservation"
    }
    assert reservations
    settings = with_orchestration(
        make_settings(tmp_path, gw.url), resources=wrong, on_not_found=mode, rate_per_s=1000
    )
    sink = tmp_path / "events.jsonl"
    async with running(settings) as daemon:
        want = 60 if mode == "attach-null" else 60 - len(reservations)
        await wait_until(lambda: len(read_sink(sink)) >= want)
        await wait_until(lambda: daemon.pipelines["main"].in_flight == 0)
        await daemon.committer.flush()
        dead = await daemon.store.dead_letters()
    lines = read_sink(sink)
    if mode == "attach-null":
        assert dead == []
        got = {e["metadata"]["uniqueEventId"]: e for e in lines}
        assert all(got[i]["resource"] is None for i in reservations)
    else:
        assert {d.unique_event_id for d in dead} == reservations
        assert all("404" in d.error and d.reason == "sink_rejected" for d in dead)
        assert not {e["metadata"]["uniqueEventId"] for e in lines} & reservations


class _Tokens:
    """AccessTokens for the unit tests below: a fixed token, or the AuthError given."""

    def __init__(self, error: AuthError | None = None, token: str = "tok") -> None:
        self.error = error
        self.token = token
        self.calls = 0

    async def access_token(self) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.token

    def invalidate(self) -> None:
        pass


def _orchestrator(
    tmp_path: Path, http: aiohttp.ClientSession, tokens: _Tokens, base_url: str, attempts: int = 1
) -> Orchestrator:
    settings = make_settings(tmp_path, "http://127.0.0.1:9")
    orch = OrchestrationSettings(
        enabled=True,
        resources=RESOURCES,
        coalesce_ms=0.0,
        base_url=base_url,
        max_attempts=attempts,
        rate_per_s=1000,
    )
    return Orchestrator(orch, http, {"main": (settings.streams["main"], tokens)})


async def test_a_token_outage_is_transient_never_the_events_fault(tmp_path: Path) -> None:
    """Not asked again here either: the token provider retried for its own configured time,
    and the pipeline retries the write."""
    tokens = _Tokens(AuthError("token endpoint down", retriable=True))
    async with aiohttp.ClientSession() as http:
        orch = _orchestrator(tmp_path, http, tokens, "http://127.0.0.1:9", attempts=3)
        with pytest.raises(TransientSinkError, match="token endpoint down"):
            await orch.enrich("main", [event(1)])
    assert tokens.calls == 1


async def test_a_hotel_id_no_header_can_carry_is_that_events_dead_letter(tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as http:
        orch = _orchestrator(tmp_path, http, _Tokens(), "http://127.0.0.1:9")
        with pytest.raises(PermanentSinkError, match="hotelId") as info:
            await orch.enrich("main", [event(1), event(2, hotel="H\r\nX-Evil: 1")])
    assert info.value.unique_event_id == "u00002"
    assert orch.requests == 0


async def test_errors_name_the_resource_url_without_its_secrets(tmp_path: Path) -> None:
    """A dead letter's error keeps no password or query value of the configured base_url, and
    only the start of an error body is read: this one would not end before 4 GiB."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 400 Oops\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        with contextlib.suppress(ConnectionError):
            for _ in range(65536):  # until the client hangs up
                writer.write(chunk)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server, aiohttp.ClientSession() as http:
        port = server.sockets[0].getsockname()[1]
        base = f"http://user:s3cret@127.0.0.1:{port}/api?sig=k3y-value"
        orch = _orchestrator(tmp_path, http, _Tokens(), base)
        with pytest.raises(PermanentSinkError) as info:
            async with asyncio.timeout(60):
                await orch.enrich("main", [event(1)])
    text = str(info.value)
    assert "HTTP 400" in text and "***" in text
    assert "s3cret" not in text and "k3y" not in text
    assert len(text) < 1000


def pieces(secret: str, size: int = 12) -> list[str]:
    """Every ``size``-character piece of ``secret``: none may show, not even cut short."""
    return [secret[i : i + size] for i in range(len(secret) - size + 1)]


async def echo_server(seen: list[bytes], before: bytes = b"", after: bytes = b"") -> asyncio.Server:
    """A REST server that answers every request 400 and echoes its head (credentials and
    all) in the body, between ``before`` and ``after``; each head goes into ``seen``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head)
            body = before + b"you sent: " + head + after
            writer.write(b"HTTP/1.1 400 Bad\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_an_echoed_token_and_app_key_are_masked_even_where_the_excerpt_ends(
    tmp_path: Path,
) -> None:
    """A server that echoes the request: the error keeps neither the bearer token nor the
    x-app-key, not even a piece of a JWT longer than the excerpt (scrubbed, then cut)."""
    jwt = "eyJhbGciOiJSUzI1NiJ9." + "QUJD" * 500 + ".c2ln"  # about 2 KB, as OHIP's are
    seen: list[bytes] = []
    server = await echo_server(seen, before=b"x" * 150)
    async with server, aiohttp.ClientSession() as http:
        port = server.sockets[0].getsockname()[1]
        orch = _orchestrator(tmp_path, http, _Tokens(token=jwt), f"http://127.0.0.1:{port}")
        with pytest.raises(PermanentSinkError) as info:
            await orch.enrich("main", [event(1)])
    assert jwt.encode() in seen[0]  # it was sent, and echoed
    text = str(info.value)
    assert "HTTP 400" in text and "Bearer ***" in text
    app_key = SandboxOptions().app_key
    for piece in pieces(jwt) + pieces(app_key):
        assert piece not in text, text


async def test_an_echoing_rest_server_leaves_no_credential_in_the_dlq_or_the_log(
    sandbox_factory, tmp_path: Path
) -> None:
    """The daemon against the sandbox, orchestration against a server that answers 400 with
    the request head (and the app key's hash) in the body: the dead letter's error, ``dlq
    show`` and the daemon's log hold neither the access token, nor the app key, nor its hash."""
    app_key = SandboxOptions().app_key
    seen: list[bytes] = []
    server = await echo_server(seen, after=b" key=" + key_hash(app_key).encode())
    gw = await sandbox_factory(backlog=30)
    async with server:
        port = server.sockets[0].getsockname()[1]
        extra = (
            f'[orchestration]\nenabled = true\nbase_url = "http://127.0.0.1:{port}"\n'
            "max_attempts = 1\nrate_per_s = 1000\n"
            '[orchestration.resources]\nReservation = "/rsv/{primaryKey}"\n'
        )
        config = toml_config(tmp_path, gw.url, extra)
        state, log = tmp_path / "state.db", tmp_path / "daemon.log"

        def dead() -> list[tuple[int, str]]:
            if not state.exists():
                return []
            with contextlib.closing(sqlite3.connect(state, timeout=10)) as db:
                try:
                    return db.execute("SELECT id, error FROM dead_letters").fetchall()
                except sqlite3.OperationalError:  # the schema is not there yet
                    return []

        proc = spawn_daemon(config, log)
        try:
            await wait_until(lambda: bool(dead()) or proc.poll() is not None, timeout=60)
            assert proc.poll() is None, tail(log)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await wait_exit(proc) == 0, tail(log)
    rows = dead()
    assert rows and all("HTTP 400" in error for _, error in rows)
    shown = await asyncio.to_thread(cli, "dlq", "show", str(rows[0][0]), "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert "you sent" in shown.stdout  # the excerpt is there, masked
    tokens = {
        line.split(b" ", 2)[2].strip().decode()
        for head in seen
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"authorization: bearer ")
    }
    assert tokens
    texts = [error for _, error in rows] + [shown.stdout, shown.stderr, log.read_text()]
    for secret in [*tokens, app_key, key_hash(app_key)]:
        for piece in pieces(secret):
            for text in texts:
                assert piece not in text, (secret, text[-3000:])


# --- an outage is never the event's fault ---------------------------------------------------


@pytest.mark.parametrize("status", [501, 505, 507, 520, 524, 530, 599])
async def test_every_5xx_is_transient(tmp_path: Path, status: int) -> None:
    """A CDN or proxy in front of the REST API answers an outage with what it likes: taking
    507 or 520 as the event's fault would dead-letter every event of the outage."""
    with Receiver() as rx:
        rx.script(Reply(status, {"Retry-After": "1"}, b"<html>origin unreachable</html>"))
        async with aiohttp.ClientSession() as http:
            orch = _orchestrator(tmp_path, http, _Tokens(), rx.url)
            with pytest.raises(TransientSinkError, match=f"HTTP {status}") as info:
                await orch.enrich("main", [event(1)])
            assert info.value.retry_after == 1.0
            # The next attempt, once the outage is over, gets the resource.
            rx.script(Reply(200, body=b'{"reservation": 1}'))
            [done] = await orch.enrich("main", [event(1)])
    assert done.resource == {"reservation": 1}


@pytest.mark.parametrize("body", [b"<html>down for maintenance</html>", b""])
async def test_a_2xx_that_is_not_json_is_transient(tmp_path: Path, body: bytes) -> None:
    """A maintenance page served as 200 says the server is not itself, not that the event is
    wrong: retried within max_attempts, then the batch waits (nothing dead-lettered)."""
    with Receiver() as rx:
        rx.script(Reply(200, {"Content-Type": "text/html"}, body), Reply(200, body=b"[1, 2]"))
        async with aiohttp.ClientSession() as http:
            orch = _orchestrator(tmp_path, http, _Tokens(), rx.url, attempts=2)
            [done] = await orch.enrich("main", [event(1)])
            assert done.resource == [1, 2]
            assert orch.requests == 2
            rx.script(Reply(200, {"Content-Type": "text/html"}, body))
            orch = _orchestrator(tmp_path, http, _Tokens(), rx.url)
            with pytest.raises(TransientSinkError, match="not JSON"):
                await orch.enrich("main", [event(2)])


@pytest.mark.parametrize("body", [b'{"name": "Caf\xe9"}', b'{"a": 1}garbage'])
async def test_a_resource_whose_json_is_broken_is_that_events_problem(
    tmp_path: Path, body: bytes
) -> None:
    """Said to be JSON and not JSON: retrying cannot mend this resource (dead-lettered), where
    a maintenance page waits the outage out."""
    with Receiver() as rx:
        rx.script(Reply(200, {"Content-Type": "application/json"}, body))
        async with aiohttp.ClientSession() as http:
            orch = _orchestrator(tmp_path, http, _Tokens(), rx.url)
            with pytest.raises(PermanentSinkError, match="not valid JSON"):
                await orch.enrich("main", [event(3)])


async def test_a_5xx_outage_of_the_rest_api_dead_letters_nothing(
    sandbox_factory, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=30)
    gw.fail_rest([507, 520, 501, 530] * 3, retry_after=0.1)
    # Not the default 5 GETs/s: the outage is the point, not the rate.
    settings = with_orchestration(
        make_settings(tmp_path, gw.url), max_attempts=2, rate_per_s=1000, burst=100
    )
    sink = tmp_path / "events.jsonl"
    async with running(settings) as daemon:
        await wait_until(lambda: len(read_sink(sink)) >= 30)
        await daemon.committer.flush()
        dead = await daemon.store.dead_letters()
    assert dead == []
    assert all(e["resource"] is not None for e in read_sink(sink) if e["moduleName"] in RESOURCES)


@pytest.mark.parametrize("body", [False, True], ids=["header", "body"])
async def test_a_server_trickling_its_answer_meets_the_get_deadline(
    tmp_path: Path, body: bool
) -> None:
    """aiohttp's read timeout bounds each silence only: a server sending a byte every 0.1 s
    would hold the GET (and the stream) for ever. The GET's deadline is the client's connect
    bound plus twice its read bound ([http] connect_timeout_s + 3 * timeout_s)."""
    settings = make_settings(tmp_path, "http://127.0.0.1:9")
    fast = settings.http.model_copy(update={"timeout_s": 0.5, "connect_timeout_s": 0.5})
    async with (
        trickling_server(body=body) as port,
        http_client(settings.model_copy(update={"http": fast})) as http,
    ):
        orch = _orchestrator(tmp_path, http, _Tokens(), f"http://127.0.0.1:{port}")
        with pytest.raises(TransientSinkError, match=r"no complete answer within 2 s"):
            async with asyncio.timeout(30):  # the old behaviour: for ever
                await orch.enrich("main", [event(1)])


class _Changing:
    """An orchestrator whose resource changes at every fetch (the reservation edited)."""

    def __init__(self) -> None:
        self.fetches = 0

    async def part(
        self, stream: str, events: Sequence[Event], limit: int | None = None
    ) -> tuple[list[bytes | None], BaseException | None]:
        out: list[bytes | None] = []
        for _ in events:
            self.fetches += 1
            out.append(json.dumps({"version": self.fetches}).encode())
        return out, None

    def close(self) -> None:
        pass


class _FailingOnce(PlainSink):
    """A receiver that got the first POST but whose answer never came back (a timeout)."""

    name = "failing-once"

    def __init__(self) -> None:
        self.sent: list[list[Any]] = []

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        self.sent.append([ev.resource for ev in events])
        if len(self.sent) == 1:
            raise TransientSinkError("timed out waiting for the answer")


async def test_a_retried_write_sends_what_the_failed_one_sent() -> None:
    """Fetched anew for the retry, a resource edited meanwhile made it another request under
    the same Idempotency-Key (a receiver honouring the key refuses it: the event dead-lettered
    though delivered), or one the REST API no longer answers."""
    inner, orchestrator = _FailingOnce(), _Changing()
    sink = OrchestratingSink(inner, orchestrator)  # type: ignore[arg-type]
    events = [event(i) for i in (1, 2)]
    with pytest.raises(TransientSinkError):
        await sink.write("main", events)
    await sink.write("main", events)  # the pipeline's retry
    await sink.write("main", [event(3)])
    assert inner.sent == [
        [{"version": 1}, {"version": 2}],
        [{"version": 1}, {"version": 2}],  # as sent the first time, not fetched again
        [{"version": 3}],
    ]
    assert orchestrator.fetches == 3
