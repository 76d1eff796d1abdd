"""The sans-I/O protocol module: no sockets, no event loop."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.core import protocol
from consumer.core.protocol import (
    Complete,
    ConnectionAck,
    DecodeError,
    ErrorMessage,
    InvalidInput,
    Next,
    Ping,
    Pong,
    SubscribeInput,
)


def next_frame(event: Any, sub_id: str = "s1") -> str:
    return json.dumps({"id": sub_id, "type": "next", "payload": {"data": {"newEvent": event}}})


EVENT = {
    "metadata": {"offset": "0007", "uniqueEventId": "u-1"},
    "moduleName": "Reservation",
    "eventName": "UPDATE RESERVATION",
    "primaryKey": "987654",
    "timestamp": "28-APR-24 06.18.59.028027 AM",
    "hotelId": "HOTEL1",
    "detail": [{"elementName": "First Name", "oldValue": "", "newValue": "Ann"}],
}


def test_key_hash_is_lowercase_sha256_of_the_raw_key_without_newline():
    # echo -n ABC-123 | sha256sum
    assert protocol.key_hash("ABC-123") == (
        "4d156d7bc9c38c000aa1e5b06e46e1f40cafe651f3cabfae9bad48803baf17bf"
    )


@pytest.mark.parametrize(
    ("gateway", "expected"),
    [
        ("https://gw.example.com", "wss://gw.example.com/subscriptions"),
        ("https://gw.example.com/", "wss://gw.example.com/subscriptions"),
        ("https://gw.example.com/subscriptions", "wss://gw.example.com/subscriptions"),
        ("http://127.0.0.1:8765", "ws://127.0.0.1:8765/subscriptions"),
        ("https://gw.example.com/prefix", "wss://gw.example.com/prefix/subscriptions"),
    ],
)
def test_subscription_url(gateway: str, expected: str):
    assert protocol.subscription_url(gateway, "k") == f"{expected}?key={protocol.key_hash('k')}"


def test_subscription_url_rejects_other_schemes():
    with pytest.raises(InvalidInput):
        protocol.subscription_url("ftp://x", "k")


def test_connection_init_carries_the_raw_key_and_bearer_token():
    msg = json.loads(protocol.connection_init("tok", "raw-key"))
    assert msg == {
        "type": "connection_init",
        "payload": {"Authorization": "Bearer tok", "x-app-key": "raw-key"},
    }


def test_subscribe_writes_arguments_inline_and_selects_every_field():
    sub = SubscribeInput(chain_code="CHAIN 1", offset="193", delta=True, hotel_codes=("H1", "H2"))
    msg = json.loads(protocol.subscribe("id-1", sub))
    assert msg["id"] == "id-1" and msg["type"] == "subscribe"
    query = msg["payload"]["query"]
    assert (
        'newEvent(input: { chainCode: "CHAIN 1" offset: "193" delta: true hotelCode: "H1,H2" })'
        in query
    )
    for field in ("offset", "uniqueEventId", "primaryKey", "hotelId", "scopeTo", "elementRole"):
        assert field in query
    assert msg["payload"]["variables"] == {"input": {"chainCode": "CHAIN 1"}}


def test_highest_replaces_the_offset():
    sub = SubscribeInput(chain_code="C", offset="5", highest=True)
    query = json.loads(protocol.subscribe("i", sub))["payload"]["query"]
    assert 'offsetType: "highest"' in query and "offset:" not in query


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"chain_code": 'C"}) { injected }'}, "chainCode"),
        ({"chain_code": ""}, "chainCode"),
        ({"chain_code": "C" * 21}, "chainCode"),
        ({"chain_code": "C", "offset": "12a"}, "offset"),
        ({"chain_code": "C", "offset": "1" * 21}, "offset"),
        ({"chain_code": "C", "hotel_codes": ("H\\1",)}, "hotelCode"),
    ],
)
def test_inputs_outside_the_schema_patterns_are_refused(kwargs: dict[str, Any], field: str):
    with pytest.raises(InvalidInput, match=field):
        protocol.subscribe("i", SubscribeInput(**kwargs))


def test_simple_messages():
    assert json.loads(protocol.PING) == {"type": "ping"}
    assert json.loads(protocol.PONG) == {"type": "pong"}
    assert json.loads(protocol.complete("g")) == {"id": "g", "type": "complete"}


def test_decode_next_keeps_the_event_as_received():
    msg = protocol.decode(next_frame(EVENT))
    assert isinstance(msg, Next) and msg.id == "s1"
    ev = msg.event
    assert (ev.offset, ev.unique_event_id) == ("0007", "u-1")  # opaque: leading zeros stay
    assert (ev.event_name, ev.module_name, ev.primary_key, ev.hotel_id) == (
        "UPDATE RESERVATION",
        "Reservation",
        "987654",
        "HOTEL1",
    )
    assert ev.raw == EVENT


def test_decode_accepts_bytes():
    msg = protocol.decode(next_frame(EVENT).encode())
    assert isinstance(msg, Next) and msg.event.raw == EVENT


def test_an_event_without_primary_key_is_partitioned_by_its_id():
    ev = {"metadata": {"offset": "1", "uniqueEventId": "u-9"}}
    msg = protocol.decode(next_frame(ev))
    assert isinstance(msg, Next) and msg.event.primary_key == "u-9"


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"type": "surprise"}', "unknown message type"),
        ('{"type": "next", "id": "s", "payload": {}}', "newEvent"),
        (next_frame({"moduleName": "X"}), "metadata"),
        (next_frame({"metadata": {"uniqueEventId": "u"}}), "offset"),
        (next_frame({"metadata": {"offset": 12, "uniqueEventId": "u"}}), "offset"),
        (next_frame({"metadata": {"offset": "12"}}), "uniqueEventId"),
        (next_frame({"metadata": {"offset": "12", "uniqueEventId": ""}}), "uniqueEventId"),
        (next_frame(["not", "an", "object"]), "newEvent"),
    ],
)
def test_unusable_frames_become_decode_errors_with_the_raw_text(frame: str, reason: str):
    msg = protocol.decode(frame)
    assert isinstance(msg, DecodeError)
    assert msg.raw == frame
    assert reason in msg.reason


def test_invalid_utf8_bytes_are_kept_lossily():
    msg = protocol.decode(b'{"type":"next","x":"\xff"}')
    assert isinstance(msg, DecodeError) and "\ufffd" in msg.raw


def test_control_messages():
    assert isinstance(protocol.decode('{"type":"ping"}'), Ping)
    assert isinstance(protocol.decode('{"type":"pong","payload":{}}'), Pong)
    ack = protocol.decode('{"type":"connection_ack","payload":{"applicationName":"x"}}')
    assert ack == ConnectionAck({"applicationName": "x"})
    err = protocol.decode('{"type":"error","id":"s1","payload":[{"message":"bad"}]}')
    assert err == ErrorMessage("s1", [{"message": "bad"}])
    assert protocol.decode('{"type":"complete","id":"s1"}') == Complete("s1")


@given(st.text())
def test_decode_never_raises_on_any_text(text: str):
    assert protocol.decode(text) is not None


@given(st.binary())
def test_decode_never_raises_on_any_bytes(data: bytes):
    assert protocol.decode(data) is not None


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(JSON)
def test_decode_never_raises_on_any_json_in_a_next_frame(value: Any):
    msg = protocol.decode(next_frame(value))
    assert isinstance(msg, Next | DecodeError)


@given(
    offset=st.text(alphabet="0123456789", min_size=1, max_size=20),
    event_id=st.text(min_size=1),
    extra=st.dictionaries(st.sampled_from(["eventName", "hotelId", "x"]), JSON, max_size=3),
)
def test_valid_events_keep_offset_and_id_verbatim(
    offset: str, event_id: str, extra: dict[str, Any]
):
    ev = {**extra, "metadata": {"offset": offset, "uniqueEventId": event_id}}
    msg = protocol.decode(next_frame(ev))
    assert isinstance(msg, Next)
    assert (msg.event.offset, msg.event.unique_event_id) == (offset, event_id)


def test_frames_over_the_size_limit_are_decode_errors_unread():
    frame = next_frame(EVENT)
    assert isinstance(protocol.decode(frame, max_size=len(frame)), Next)
    msg = protocol.decode(frame.encode(), max_size=len(frame) - 1)
    assert isinstance(msg, DecodeError) and "exceeds max_frame_bytes" in msg.reason
    assert msg.raw == frame
