"""Orchestration's URLs and resources against a real loopback HTTP server: what the wire's
values may make of the URL, which hotel's view an event gets, whose resource object it is,
and what is held once the coalescing window has passed."""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from bus_events import event
from receiver import Received, Receiver, Reply
from support import make_settings, wait_until

from consumer.config import OrchestrationSettings
from consumer.core.events import Event
from consumer.errors import PermanentSinkError, TransientSinkError
from consumer.sinks import orchestration
from consumer.sinks.base import PlainSink
from consumer.sinks.orchestration import OrchestratingSink, Orchestrator

RESOURCES = {
    "Reservation": "/rsv/v1/hotels/{hotelId}/reservations/{primaryKey}",
    "Profile": "/crm/v1/profiles/{primaryKey}",
}


class Tokens:
    async def access_token(self) -> str:
        return "tok-0000"

    def invalidate(self, rejected: str | None = None) -> None:
        pass


def orchestrator(
    tmp_path: Path, http: aiohttp.ClientSession, rx: Receiver, **over: Any
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
    }
    orch = OrchestrationSettings(**{**kw, **over})
    return Orchestrator(orch, http, {"main": (settings.streams["main"], Tokens())})


def echo(request: Received) -> Reply:
    """The resource: the path it was asked at and the hotel it was asked as."""
    body = {"path": request.path, "hotel": request.header("x-hotelid"), "rooms": [{"no": 1}]}
    return Reply(200, {"Content-Type": "application/json"}, json.dumps(body).encode())


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver(echo) as receiver:
        yield receiver


# --- values from the wire that would change the URL ------------------------------------------


@pytest.mark.parametrize(
    ("key", "hotel"),
    [("..", "HOTEL1"), (".", "HOTEL1"), ("5", ".."), ("5", "."), ("a/../b", "H"), ("..\\x", "H")],
)  # fmt: skip
async def test_a_dot_segment_from_the_wire_is_that_events_dead_letter(
    tmp_path: Path, rx: Receiver, key: str, hotel: str
) -> None:
    """quote(safe="") leaves "." and "..": /hotels/HOTEL1/reservations/.. is resolved by any
    server to /hotels/HOTEL1/, another resource attached to the event. Refused (not sent as
    %2E, which URL normalisers, yarl included, decode back into a dot segment)."""
    async with aiohttp.ClientSession() as http:
        orch = orchestrator(tmp_path, http, rx)
        with pytest.raises(PermanentSinkError, match="dot segment") as info:
            await orch.enrich("main", [event(1), event(2, key=key, hotel=hotel)])
    assert info.value.unique_event_id == "u00002"
    assert rx.requests == []


@pytest.mark.parametrize("key", ["...", ".a", "a.", "%2E%2E", "a/b"])
async def test_values_with_dots_that_are_no_dot_segment_name_their_resource(
    tmp_path: Path, rx: Receiver, key: str
) -> None:
    async with aiohttp.ClientSession() as http:
        orch = orchestrator(tmp_path, http, rx)
        [ev] = await orch.enrich("main", [event(1, key=key)])
    [request] = rx.requests
    assert request.path.split("/")[:6] == ["", "rsv", "v1", "hotels", "HOTEL1", "reservations"]
    assert request.path.count("/") == 6  # the key is one segment, percent-encoded
    assert ev.resource["path"] == request.path


@pytest.mark.parametrize("hotel", [None, ""])
async def test_an_empty_value_is_that_events_dead_letter_naming_it(
    tmp_path: Path, rx: Receiver, hotel: str | None
) -> None:
    """No hotelId rendered /hotels//reservations/5: a slash-merging server's other resource,
    or a 404 that on_not_found="attach-null" quietly made resource=null."""
    async with aiohttp.ClientSession() as http:
        orch = orchestrator(tmp_path, http, rx, on_not_found="attach-null")
        with pytest.raises(PermanentSinkError, match="no hotelId") as info:
            await orch.enrich("main", [event(1), event(2, key="5", hotel=hotel)])
    assert info.value.unique_event_id == "u00002"
    assert rx.requests == []


async def test_a_template_without_the_missing_value_is_fetched(
    tmp_path: Path, rx: Receiver
) -> None:
    """Only the template's own placeholders must have a value: a profile needs no hotel."""
    async with aiohttp.ClientSession() as http:
        orch = orchestrator(tmp_path, http, rx, resources={"Reservation": RESOURCES["Profile"]})
        [ev] = await orch.enrich("main", [event(1, key="P1", hotel=None)])
    assert ev.resource["path"] == "/crm/v1/profiles/P1"
    assert ev.resource["hotel"] is None  # no x-hotelid header


# --- the hotel context of a GET ---------------------------------------------------------------


async def test_each_event_gets_the_resource_as_its_own_hotel_sees_it(
    tmp_path: Path, rx: Receiver
) -> None:
    """One profile URL, two hotels: the GET goes with x-hotelid, so its answer is that
    hotel's view (or its 403). Coalescing by URL alone gave hotel H1's event H2's answer."""
    async with aiohttp.ClientSession() as http:
        orch = orchestrator(
            tmp_path, http, rx, resources={"Reservation": RESOURCES["Profile"]}, coalesce_ms=60e3
        )
        batch = [event(1, key="P1", hotel="H1"), event(2, key="P1", hotel="H2")]
        batch.append(event(3, key="P1", hotel="H1"))  # the same as event 1: one GET
        got = await orch.enrich("main", batch)
        later = await orch.enrich("main", [event(4, key="P1", hotel="H2")])  # within the window
    assert [e.resource["hotel"] for e in got + later] == ["H1", "H2", "H1", "H2"]
    assert sorted(r.header("x-hotelid") or "" for r in rx.requests) == ["H1", "H2"]
    assert orch.coalesced == 1


# --- each event's own resource ----------------------------------------------------------------


async def test_a_handler_changing_one_events_resource_changes_no_other(
    tmp_path: Path, rx: Receiver
) -> None:
    """Events of one reservation in a batch, and later ones within coalesce_ms, were handed
    the very same dict: one handler's change was every other event's resource."""
    async with aiohttp.ClientSession() as http:
        orch = orchestrator(tmp_path, http, rx, coalesce_ms=60e3)
        ea, eb = await orch.enrich("main", [event(1, key="R1"), event(2, key="R1")])
        ea.resource.pop("rooms")
        ea.resource["path"] = "changed"
        [ec] = await orch.enrich("main", [event(3, key="R1")])  # a later batch, coalesced
    assert len(rx.requests) == 1
    assert eb.resource == ec.resource == json.loads(echo(rx.requests[0]).body)


class _Reshaping(PlainSink):
    """A handler that reshapes each resource in place, then fails once (a timeout)."""

    name = "python"

    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        for ev in events:
            self.seen.append(json.dumps(ev.resource))
            rooms = ev.resource.pop("rooms")  # a KeyError when it is not there
            ev.resource["room_count"] = len(rooms)
        if len(self.seen) == len(events):
            raise TransientSinkError("downstream timed out")


async def test_a_retried_write_gets_the_resource_as_it_was_fetched(
    tmp_path: Path, rx: Receiver
) -> None:
    """The failed write's events were kept and sent again as they were: the objects the
    handler had changed. Its retry met a resource without "rooms" (KeyError: unprocessable,
    a dead letter for an event nothing was wrong with)."""
    async with aiohttp.ClientSession() as http:
        inner = _Reshaping()
        sink = OrchestratingSink(inner, orchestrator(tmp_path, http, rx))
        events = [event(1, key="R1"), event(2, key="R1")]
        with pytest.raises(TransientSinkError):
            await sink.write("main", events)
        await sink.write("main", events)  # the pipeline's retry
        await sink.close()
    assert len(inner.seen) == 4
    assert inner.seen[:2] == inner.seen[2:]  # the same bodies, as fetched
    assert len(rx.requests) == 1  # not fetched again


# --- what is held past the coalescing window --------------------------------------------------

BIG = json.dumps({"reservationId": "x", "comments": ["a" * 100] * 2000}).encode()  # ~200 KB


def big(request: Received) -> Reply:
    return Reply(200, {"Content-Type": "application/json"}, BIG)


async def test_resources_past_the_coalescing_window_are_let_go(tmp_path: Path) -> None:
    """Expired answers were only forgotten once 1,024 URLs were kept: below that, every
    resource ever fetched stayed for the life of the process (up to 1,023 x 16 MiB)."""
    with Receiver(big) as rx:
        async with aiohttp.ClientSession() as http:
            orch = orchestrator(tmp_path, http, rx, coalesce_ms=50.0)
            gc.collect()
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                for i in range(0, 60, 20):  # 12 MB of answers, if they were kept
                    await orch.enrich("main", [event(j, key=f"R{j}") for j in range(i, i + 20)])
                # No fetch comes after these: a timer lets the last ones go.
                await wait_until(lambda: not orch._recent, timeout=10)
                gc.collect()
                held = tracemalloc.get_traced_memory()[0] - base
            finally:
                tracemalloc.stop()
    assert orch._recent_bytes == 0
    assert held < 3_000_000, f"{held / 1e6:.0f} MB held once the window had passed"


async def test_the_answers_kept_are_bounded_in_count_and_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within a long window: the newest answers, at most CACHE_MAX_ENTRIES of them holding at
    most CACHE_MAX_BYTES; an older one is fetched again."""
    monkeypatch.setattr(orchestration, "CACHE_MAX_ENTRIES", 5)
    monkeypatch.setattr(orchestration, "CACHE_MAX_BYTES", 3 * len(BIG))
    with Receiver(big) as rx:
        async with aiohttp.ClientSession() as http:
            orch = orchestrator(tmp_path, http, rx, coalesce_ms=60e3)
            await orch.enrich("main", [event(j, key=f"R{j}") for j in range(10)])
            assert len(orch._recent) <= 2  # by bytes (each answer a little over len(BIG))
            assert orch._recent_bytes <= 3 * len(BIG)
            await orch.enrich("main", [event(0, key="R0")])  # let go: fetched again
            assert len(rx.requests) == 11
            await orch.enrich("main", [event(0, key="R0")])  # kept: reused
            assert len(rx.requests) == 11
            monkeypatch.setattr(orchestration, "CACHE_MAX_BYTES", 10**9)
            await orch.enrich("main", [event(j, key=f"S{j}") for j in range(10)])
            assert len(orch._recent) == 5  # by count
            orch.close()
            assert not orch._recent
