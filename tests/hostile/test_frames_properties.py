"""Issue #9, the pure layer: ``protocol.decode`` under hostile frames.

The frames come from the same generators as the end-to-end corpus (``hostile_frames``), drawn by
hypothesis. ``decode`` must never raise, whatever the frame (100,000 levels of nesting in any
field included); what it keeps of a frame it cannot use is bounded; an event it returns has a
usable offset and uniqueEventId; and it agrees with the contract's oracle on what each frame is.
"""

from __future__ import annotations

import json

from hostile_frames import (
    ENDER,
    EVENT,
    IGNORED,
    MALFORMED,
    OFFSET_RE,
    SAMPLE_SUB_ID,
    UNDELIVERABLE,
    Frame,
    bad_frames,
    nest,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.core.protocol import (
    Complete,
    ConnectionAck,
    DecodeError,
    ErrorMessage,
    Message,
    Next,
    Ping,
    Pong,
    decode,
)

MAX = 65536
RAW_MAX = 65536  # what a dead letter keeps of a frame: a bounded prefix, whatever the frame
REASON_MAX = 300
MESSAGE_TYPES = (ConnectionAck, Next, ErrorMessage, Complete, Ping, Pong, DecodeError)
SLOW_OK = settings(
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _decode_checked(data: bytes | str, max_size: int | None) -> Message:
    msg = decode(data, max_size)  # must not raise, whatever the frame
    assert isinstance(msg, MESSAGE_TYPES), type(msg)
    if isinstance(msg, DecodeError):
        assert isinstance(msg.reason, str) and msg.reason, "a DecodeError without a reason"
        assert len(msg.reason) <= REASON_MAX, f"reason of {len(msg.reason)} characters"
        assert isinstance(msg.raw, str)
        assert len(msg.raw) <= RAW_MAX, (
            f"raw text of {len(msg.raw)} characters kept of a frame of {len(data)}"
        )
    if isinstance(msg, Next):
        ev = msg.event
        assert type(ev.offset) is str and type(ev.unique_event_id) is str
        assert ev.unique_event_id, "an event with an empty uniqueEventId"
        assert OFFSET_RE.fullmatch(ev.offset), f"an event with offset {ev.offset[:30]!r}"
    return msg


@SLOW_OK
@given(bad_frames(MAX))
def test_decode_never_raises_and_keeps_little(frame: Frame) -> None:
    data = frame.render(SAMPLE_SUB_ID)
    for limit in (MAX, None):
        _decode_checked(data, limit)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return
    _decode_checked(text, MAX)


@SLOW_OK
@given(bad_frames(MAX))
def test_decode_agrees_with_the_contract(frame: Frame) -> None:
    """Text frames only: binary ones are told apart by the frame type, not by decode."""
    if frame.binary:
        return
    msg = _decode_checked(frame.render(SAMPLE_SUB_ID), MAX)
    label = frame.label
    if frame.expect in (EVENT, UNDELIVERABLE):
        assert isinstance(msg, Next), f"{label}: a usable event decoded as {type(msg).__name__}"
        assert msg.id == SAMPLE_SUB_ID
        assert msg.event.unique_event_id == frame.uid and msg.event.offset == frame.offset
    elif frame.expect == MALFORMED:
        assert isinstance(msg, DecodeError), f"{label}: decoded as {type(msg).__name__}"
    elif frame.expect == IGNORED:
        assert isinstance(msg, Next | Complete | ErrorMessage), f"{label}: {type(msg).__name__}"
        assert msg.id != SAMPLE_SUB_ID
    else:
        assert frame.expect == ENDER
        assert isinstance(msg, Complete | ErrorMessage), f"{label}: {type(msg).__name__}"
        assert msg.id == SAMPLE_SUB_ID


_FIELDS = (
    "frame",
    "id",
    "type",
    "payload",
    "data",
    "newEvent",
    "metadata",
    "offset",
    "uniqueEventId",
    "detail",
    "primaryKey",
    "error-payload",
    "error-payload-other-id",
    "complete-payload",
)


def _nested_in(where: str, inner: str) -> bytes:
    ev = {
        "metadata": {"offset": "1234", "uniqueEventId": "u-1"},
        "primaryKey": "k",
        "detail": [],
    }
    frame: dict[str, object] = {"id": SAMPLE_SUB_ID, "type": "next"}
    hole = '"@@HOLE@@"'
    if where == "frame":
        return inner.encode()
    if where in ("id", "type"):
        frame[where] = "@@HOLE@@"
        frame["payload"] = {"data": {"newEvent": ev}}
    elif where.startswith(("error", "complete")):
        frame["type"] = where.split("-", maxsplit=1)[0]
        frame["payload"] = "@@HOLE@@"
        if where.endswith("other-id"):
            frame["id"] = "someone-else"
    elif where == "payload":
        frame["payload"] = "@@HOLE@@"
    elif where == "data":
        frame["payload"] = {"data": "@@HOLE@@"}
    elif where == "newEvent":
        frame["payload"] = {"data": {"newEvent": "@@HOLE@@"}}
    else:
        target = ev["metadata"] if where in ("offset", "uniqueEventId") else ev
        target[where] = "@@HOLE@@"  # type: ignore[index]
        frame["payload"] = {"data": {"newEvent": ev}}
    return json.dumps(frame).replace(hole, inner).encode()


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    where=st.sampled_from(_FIELDS),
    depth=st.one_of(
        st.integers(100, 1100), st.integers(1100, 100_000), st.sampled_from([1000, 100_000])
    ),
    container=st.sampled_from(["array", "object"]),
)
def test_nesting_anywhere_up_to_100000_levels(where: str, depth: int, container: str) -> None:
    data = _nested_in(where, nest(depth, '"x"', container))
    _decode_checked(data, None)  # no size limit: the parser itself meets the depth
    _decode_checked(data, MAX)
    if where == "error-payload-other-id" and depth <= 1000:
        # Readable, so an error for another subscription: handled without str() of it.
        assert isinstance(decode(data, None), ErrorMessage)
