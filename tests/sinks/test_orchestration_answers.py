"""How orchestration takes the REST API's answers that are neither a resource nor an outage:
redirects, a resource gone, no content, 401 and 403 (a real loopback HTTP server)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from bus_events import event
from log_capture import log_records
from receiver import Received, Receiver, Reply
from support import make_settings, serving

from consumer.config import OrchestrationSettings
from consumer.errors import PermanentSinkError, TransientSinkError
from consumer.sinks.orchestration import Orchestrator

RESOURCES = {"Reservation": "/rsv/v1/hotels/{hotelId}/reservations/{primaryKey}"}
JSON = {"Content-Type": "application/json"}


class Tokens:
    """A new token after each invalidate: tok-0000-0, tok-0000-1..."""

    def __init__(self) -> None:
        self.n = 0
        self.invalidated = 0

    async def access_token(self) -> str:
        return f"tok-0000-{self.n}"

    def invalidate(self, rejected: str | None = None) -> None:
        if rejected in (None, f"tok-0000-{self.n}"):
            self.invalidated += 1
            self.n += 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def orchestrator(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    rx: Receiver,
    tokens: Tokens | None = None,
    clock: Clock | None = None,
    **over: Any,
) -> Orchestrator:
    settings = make_settings(tmp_path, "http://127.0.0.1:9")
    kw: dict[str, Any] = {
        "enabled": True,
        "resources": RESOURCES,
        "coalesce_ms": 0.0,
        "base_url": f"http://127.0.0.1:{rx.port}",
        "max_attempts": 1,
        "rate_per_s": 1000,
        "burst": 1000,
        "retry_max_s": 0.01,
    }
    orch = OrchestrationSettings(**{**kw, **over})
    streams = {"main": (settings.streams["main"], tokens or Tokens())}
    return Orchestrator(orch, http, streams, clock=clock or Clock())


async def outcomes(orch: Orchestrator, n: int) -> list[str]:
    """Each of ``n`` events alone, as the pipeline does after a batch failed."""
    out = []
    for i in range(1, n + 1):
        try:
            await orch.enrich("main", [event(i, key=f"k{i}")])
            out.append("ok")
        except PermanentSinkError as exc:
            out.append(f"dead-letter: {exc}")
        except TransientSinkError:
            out.append("retried")
    return out


# --- 3xx --------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_no_fault_of_the_event(tmp_path: Path, status: int) -> None:
    """A gateway in maintenance sending every GET to a status page, or a base_url pointing at
    the wrong place: not followed (the token would go along), retried, and the message says
    where it pointed with the host alone, masked and bounded."""
    location = "https://user:pa55word@status.example/outage-page?token=abc123"
    with Receiver(lambda r: Reply(status, {"Location": location})) as rx:
        async with aiohttp.ClientSession() as http:
            orch = orchestrator(tmp_path, http, rx, max_attempts=2)
            with log_records() as logs:
                assert await outcomes(orch, 3) == ["retried"] * 3
                with pytest.raises(TransientSinkError) as info:
                    await orch.enrich("main", [event(9)])
    text = str(info.value)
    assert f"HTTP {status}" in text and "status.example" in text
    warned = [e for e in logs if e["event"] == "orchestration GET failed; retrying"]
    assert warned and all("status.example" in e["error"] for e in warned)
    for shown in [text, *(e["error"] for e in warned)]:
        assert "pa55word" not in shown and "abc123" not in shown and "outage-page" not in shown
    assert len(rx.requests) == 8  # two attempts each, none followed


async def test_a_redirects_location_is_bounded_and_printable(tmp_path: Path) -> None:
    location = "https://" + "a" * 5000 + "\x1b[31m.example/"
    with Receiver(lambda r: Reply(302, {"Location": location})) as rx:
        async with aiohttp.ClientSession() as http:
            orch = orchestrator(tmp_path, http, rx)
            with pytest.raises(TransientSinkError) as info:
                await orch.enrich("main", [event(1)])
    assert len(str(info.value)) < 600 and "\x1b" not in str(info.value)


# --- 410, 204 -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [410, 204])
@pytest.mark.parametrize("mode", ["attach-null", "dead-letter"])
async def test_gone_or_no_content_is_decided_by_on_not_found(
    tmp_path: Path, status: int, mode: str
) -> None:
    """410 Gone is 404's case (dead-lettered as "other 4xx" whatever on_not_found said); a 204
    has nothing to attach (it was "not JSON": retried for ever, the stream stuck)."""
    with Receiver(
        lambda r: Reply(status, body=b"" if status == 204 else b'{"title": "Gone"}')
    ) as rx:
        async with aiohttp.ClientSession() as http:
            orch = orchestrator(tmp_path, http, rx, on_not_found=mode, max_attempts=3)
            if mode == "attach-null":
                [ev] = await orch.enrich("main", [event(1)])
                assert ev.fetched and ev.resource is None
            else:
                with pytest.raises(PermanentSinkError, match=f"HTTP {status}") as info:
                    await orch.enrich("main", [event(1)])
                assert info.value.unique_event_id == "u00001"
    assert len(rx.requests) == 1


# --- 401 --------------------------------------------------------------------------------------


async def test_a_401_drops_the_token_once_not_at_every_attempt(tmp_path: Path) -> None:
    """A REST API answering 401 for this resource (a hotel outside the token's scope) had the
    token dropped, and a new one fetched, at every attempt of every retry of the batch."""
    tokens, clock = Tokens(), Clock()
    with Receiver(lambda r: Reply(401)) as rx:
        async with aiohttp.ClientSession() as http:
            orch = orchestrator(tmp_path, http, rx, tokens, clock, max_attempts=6)
            for _ in range(3):  # the pipeline's retries of the batch
                with pytest.raises(TransientSinkError, match="401"):
                    await orch.enrich("main", [event(1)])
            assert tokens.invalidated == 1
            # The old token, then the new one; then the new one once per retry of the batch.
            auth = [r.header("Authorization") for r in rx.requests]
            assert auth == ["Bearer tok-0000-0"] + ["Bearer tok-0000-1"] * 3
            clock.now += 3600  # an hour later: it may have been revoked since
            with pytest.raises(TransientSinkError, match="401"):
                await orch.enrich("main", [event(1)])
            assert tokens.invalidated == 2


async def test_a_401_of_a_stale_token_is_mended_by_one_new_token(tmp_path: Path) -> None:
    """GETs in flight together, all refused with the old token: one new token, and every
    one of them gets its resource."""
    tokens = Tokens()

    def answer(r: Received) -> Reply:
        if r.header("Authorization") == "Bearer tok-0000-0":
            return Reply(401)
        return Reply(200, JSON, json.dumps({"path": r.path}).encode())

    with Receiver(answer) as rx:
        async with aiohttp.ClientSession() as http:
            orch = orchestrator(tmp_path, http, rx, tokens, max_attempts=3)
            got = await orch.enrich("main", [event(i, key=f"k{i}") for i in range(1, 6)])
    assert [e.resource["path"].rsplit("/", 1)[1] for e in got] == [f"k{i}" for i in range(1, 6)]
    assert tokens.invalidated == 1


async def test_a_401_of_a_token_issued_again_is_not_retried_at_once(tmp_path: Path) -> None:
    """A token endpoint handing out the same token again after a 401: no use asking it for
    another at each attempt, nor sending the same refused GET max_attempts times."""
    tokens = Tokens()
    tokens.invalidate = lambda rejected=None: setattr(  # type: ignore[method-assign]
        tokens, "invalidated", tokens.invalidated + 1
    )
    with Receiver(lambda r: Reply(401)) as rx:
        async with aiohttp.ClientSession() as http:
            orch = orchestrator(tmp_path, http, rx, tokens, max_attempts=6)
            for _ in range(3):
                with pytest.raises(TransientSinkError, match="401"):
                    await orch.enrich("main", [event(1)])
    assert tokens.invalidated == 1
    assert len(rx.requests) == 4  # the first write: the token, then the same one again


# --- 403 --------------------------------------------------------------------------------------


async def test_a_403_dead_letters_the_event_and_the_stream_goes_on(tmp_path: Path) -> None:
    """OHIP's 403: the application is not entitled to this API or hotel. Waiting for a human
    would stall every hotel of the stream behind one, maybe past OHIP's 7 days of retention:
    the event is dead-lettered with why (``dlq replay`` once the portal is fixed), after one
    GET (no other attempt can mend it)."""
    with Receiver(lambda r: Reply(403, JSON, b'{"title": "Forbidden"}')) as rx:
        async with aiohttp.ClientSession() as http:
            orch = orchestrator(tmp_path, http, rx, max_attempts=6)
            with pytest.raises(PermanentSinkError, match=r"HTTP 403.*developer portal.*dlq replay"):
                await orch.enrich("main", [event(1)])
    assert len(rx.requests) == 1


# --- an answer whose body is cut short ---------------------------------------------------------


class _Port:
    def __init__(self, port: int) -> None:
        self.port = port


@pytest.mark.parametrize("status", [403, 400])
async def test_a_refusal_whose_body_is_cut_short_is_still_a_refusal(
    tmp_path: Path, status: int
) -> None:
    """403 or 400, then the connection closes before the body's Content-Length: the status is
    the server's word, dead-lettered after one GET. Before, the transport error made it
    transient: retried for good, the stream held behind it."""
    gets = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal gets
        try:
            await reader.readuntil(b"\r\n\r\n")
            gets += 1
            writer.write(f"HTTP/1.1 {status} Refused\r\nContent-Length: 100\r\n\r\n".encode())
            writer.write(b'{"title": "Refus')
            await writer.drain()
        finally:
            writer.close()

    async with serving(handle) as port, aiohttp.ClientSession() as http:
        orch = orchestrator(tmp_path, http, _Port(port), max_attempts=6)  # type: ignore[arg-type]
        with pytest.raises(PermanentSinkError, match=f"HTTP {status}") as info:
            await orch.enrich("main", [event(1)])
    if status == 400:
        assert str(info.value).endswith("(its body cut short: RemoteProtocolError)"), info.value
    assert gets == 1
