"""consumer.core.protocol.decode's structure budget: a frame under max_frame_bytes made of
millions of tiny JSON values (``[]``, ``{}``, ``""``) took 470-880 MB to decode, 29-47 times
the frame (msgspec's typed structs, orjson's tree, Python json's pairs beside it, a split's
piece per quote): one gateway frame, replayed at every resume, had the daemon OOM-killed for
good. Such a frame is now refused unread (a malformed dead letter, a bounded copy of it), a
frame within the budget is decoded holding one tree at a time, and real events, however many
their detail elements, still decode.

Memory is measured as it matters, in a fresh interpreter: its peak RSS growth while decoding.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from consumer.core.evidence import PAYLOAD_LIMIT
from consumer.core.protocol import (
    MIN_MARKS_BUDGET,
    DecodeError,
    Next,
    decode,
    marks_budget,
)

MAX_FRAME = 16 * 1024 * 1024  # [connection] max_frame_bytes' default
SUB = "0f2c5a9e-3b1d-4c7a-9e21-5d6f7a8b9c0d"

# A ``next`` frame whose event holds ``extra`` then a ``field`` array of ``count`` ``unit``s
# (or as many as fit in ``size`` bytes). "primaryKey":"id" puts a header key's name twice in
# the frame: it is parsed again pair by pair, for a key twice, whichever way it is decoded.
_BUILD = r"""
import sys
field, unit, extra = (a.encode() for a in sys.argv[1:4])
count, size = int(sys.argv[4]), int(sys.argv[5])
head = (b'{"id":"SUB","type":"next","payload":{"data":{"newEvent":{"metadata":'
        b'{"offset":"1","uniqueEventId":"absurd-1"},"primaryKey":"id","publisherId":"p",'
        + extra + b'"' + field + b'":[')
tail = b"]}}}}"
count = min(count, (size - len(head) - len(tail)) // len(unit))
frame = head + (unit * count)[:-1] + tail
""".replace("SUB", SUB)

_PROBE = (
    _BUILD
    + r"""
import gc
import orjson
from consumer.core.protocol import DecodeError, decode

def peak():  # VmHWM: ru_maxrss starts at the parent's RSS when it forked (pytest's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

gc.collect()
before = peak()
out = orjson.loads(frame) if sys.argv[6] == "orjson" else decode(frame, 16 * 1024 * 1024)
grown = peak() - before
kind = type(out).__name__
print(kind, len(frame), grown)
if isinstance(out, DecodeError):
    print(out.unread, len(out.evidence.text), out.evidence.size)
    print(out.reason)
"""
)


def probe(
    field: str, unit: str, extra: str = "", *, count: int = 10**9, how: str = "decode"
) -> tuple[str, int, int, list[str]]:
    """What decoding (or orjson.loads, ``how``) the frame makes: its type, the frame's size,
    the peak RSS growth, and (a DecodeError) its unread flag, evidence length and size, and
    reason."""
    args = [field, unit, extra, str(count), str(MAX_FRAME - 64), how]
    lines = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    kind, size, grown = lines[0].split()
    return kind, int(size), int(grown), lines[1:]


@pytest.mark.parametrize(
    ("field", "unit", "extra"),
    [
        ("detail", "{},", ""),  # the fast way: msgspec's typed structs
        ("x", "[],", ""),  # orjson's tree, then Python json's pairs (a key's name twice)
        ("x", '{"a":0},', ""),
        ("x", '"",', '"n":1e000,"e":"\\n",'),  # a long number's check split at every quote
        ("x", '"ab",', ""),
        ("x", "1000,", ""),
        ("x", "[[]],", ""),
    ],
    ids=[
        "detail-of-empty-objects",
        "lists",
        "objects",
        "strings-a-long-number",
        "strings",
        "numbers",
        "nested-lists",
    ],
)
def test_a_frame_of_millions_of_tiny_values_is_refused_unread(
    field: str, unit: str, extra: str
) -> None:
    """A frame just under max_frame_bytes made of tiny values was decoded (an event, or a
    malformed frame found so only after its trees were built) growing peak RSS by 470-880 MB.
    Now its values are counted before any parse, by the marks that open them: past the budget
    it is a malformed frame, with a bounded copy of its text, and nothing is parsed."""
    kind, size, grown, rest = probe(field, unit, extra)
    assert size <= MAX_FRAME
    assert kind == "DecodeError", f"{kind}, peak RSS grew by {grown / 2**20:.0f} MiB"
    unread, shown, whole = rest[0].split()
    assert (unread, int(shown), int(whole)) == ("True", PAYLOAD_LIMIT, size)
    assert f"holds over {MIN_MARKS_BUDGET} JSON values" in rest[1]
    assert grown <= MAX_FRAME // 2, f"peak RSS grew by {grown / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    ("unit", "extra"),
    [
        ("[[]],", '"e":"\\u003a\\n 1e000",'),  # a backslash, an escaped colon, a long number
        ('{"":[]},', ""),
        ('"ab",', '"e":"\\u003a\\n 1e000",'),
    ],
    ids=["nested-lists", "objects-of-lists", "strings"],
)
def test_a_frame_within_the_budget_is_decoded_holding_one_tree_at_a_time(
    unit: str, extra: str
) -> None:
    """A frame of tiny values within the budget (2**19 of their marks at the default
    max_frame_bytes), with a header key's name twice (parsed again, pair by pair, for a key
    twice), a backslash and an escaped colon (keys counted outside strings) and what looks like
    a long number in a string: its Python json pairs were built while orjson's tree was alive,
    and its strings split into a piece per quote. Now decoding it takes about what orjson's
    tree of it takes, and the event's two copies of text."""
    marks = {"[[]],": 3, '{"":[]},': 4, '"ab",': 1}[unit]
    count = (MIN_MARKS_BUDGET - 64) // marks
    kind, size, tree, _ = probe("x", unit, extra, count=count, how="orjson")
    assert kind == "dict"
    kind, size, grown, rest = probe("x", unit, extra, count=count)
    assert kind == "Next", rest
    bound = tree + 2 * size + 4 * 2**20
    assert grown <= bound, (
        f"decoding a {size}-byte frame grew peak RSS by {grown / 2**20:.1f} MiB, orjson's "
        f"tree of it {tree / 2**20:.1f} MiB: bound {bound / 2**20:.1f} MiB"
    )


def detail_element(i: int) -> dict[str, Any]:
    """One of OHIP's detail elements, its eight fields in the subscription's order."""
    return {
        "elementName": f"Reservation Field {i}",
        "elementType": "FIELD",
        "elementSequence": str(i),
        "elementRole": None,
        "newValue": f"Smith, John: room {i}",  # a comma and a colon, counted as marks too
        "oldValue": "",
        "scopeFrom": "2024-04-28",
        "scopeTo": None,
    }


def ohip_frame(elements: int, *, spaced: bool = False) -> bytes:
    event = {
        "metadata": {"offset": "194", "uniqueEventId": "uid-194"},
        "moduleName": "Reservation",
        "eventName": "UPDATE RESERVATION",
        "primaryKey": "987654",
        "timestamp": "28-APR-24 06.18.59.028027 AM",
        "hotelId": "HOTEL1",
        "publisherId": "OPERA-HOTEL1",
        "actionInstanceId": "7837964036",
        "detail": [detail_element(i) for i in range(elements)],
    }
    message = {"id": SUB, "type": "next", "payload": {"data": {"newEvent": event}}}
    return json.dumps(message, separators=(", ", ": ") if spaced else (",", ":")).encode()


@pytest.mark.parametrize("spaced", [False, True], ids=["as-ohip-writes-it", "spaced"])
@pytest.mark.parametrize("elements", [5_000, 25_000])
def test_large_real_events_still_decode(elements: int, spaced: bool) -> None:
    """The budget never refuses a real event: OHIP's hold a few detail elements, large ones
    thousands. One of 25,000 elements of all eight fields (about 4 MB, a comma and a colon in
    every value) is an event at the default max_frame_bytes, the fast way or the general."""
    frame = ohip_frame(elements, spaced=spaced)
    msg = decode(frame, MAX_FRAME)
    assert isinstance(msg, Next), msg
    assert msg.event.text is not None and msg.event.detail_text is not None
    detail = json.loads(msg.event.detail_text)
    assert len(detail) == elements and detail[-1] == detail_element(elements - 1)


def test_the_budget_grows_with_max_frame_bytes() -> None:
    """One mark per 32 bytes of max_frame_bytes, at least 2**19 (the default's): an event past
    the default's budget is refused with it, and taken when max_frame_bytes is raised; a lower
    max_frame_bytes keeps the floor, so it never refuses a frame the limit lets in for being
    dense."""
    assert marks_budget(None) == marks_budget(1024) == marks_budget(MAX_FRAME) == 1 << 19
    assert marks_budget(64 * MAX_FRAME) == 32 * 2**20
    frame = ohip_frame(40_000)  # some 680,000 marks in 6.6 MB
    assert len(frame) < MAX_FRAME
    refused = decode(frame, MAX_FRAME)
    assert isinstance(refused, DecodeError) and refused.unread
    assert "JSON values" in refused.reason
    assert isinstance(decode(frame, 2 * MAX_FRAME), Next)


def test_a_text_frame_is_counted_as_a_bytes_frame() -> None:
    """decode takes text too (characters then, not bytes): the same budget, the same answer."""
    frame = b'{"type":"ping","x":[' + b"[]," * MIN_MARKS_BUDGET + b"[]]}"
    for same in (frame, frame.decode()):
        msg = decode(same, MAX_FRAME)
        assert isinstance(msg, DecodeError) and msg.unread, msg
    assert decode(b'{"type":"ping","x":[' + b"[]," * 1000 + b"[]]}", MAX_FRAME) == decode(
        b'{"type":"ping"}'
    )
