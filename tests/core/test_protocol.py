"""Unit tests for consumer.core.protocol: URL/key helpers, input validation, encoders, decode."""

from __future__ import annotations

import gc
import json
import re
import sqlite3
import sys
import tracemalloc
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.core.events import SELECTION, Event
from consumer.core.evidence import event_evidence
from consumer.core.protocol import (
    PING,
    PONG,
    Complete,
    ConnectionAck,
    DecodeError,
    ErrorMessage,
    InvalidInput,
    Message,
    Next,
    Ping,
    Pong,
    SubscribeInput,
    _fast_next,
    _keys_twice,
    complete,
    connection_init,
    decode,
    key_hash,
    subscribe,
    subscription_url,
)

MESSAGE_TYPES = (ConnectionAck, Next, ErrorMessage, Complete, Ping, Pong, DecodeError)

# Known SHA-256 test vectors (FIPS 180-2), independent of the implementation.
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
SHA256_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
SHA256_ABC_NEWLINE = "edeaaff3f1774ad2888673770c6d64097e391bc362d7d6fb34982ddf0efd18cb"


def next_message(event: Any, sub_id: Any = "sub-1") -> dict[str, Any]:
    return {"id": sub_id, "type": "next", "payload": {"data": {"newEvent": event}}}


def next_frame(event: Any, sub_id: Any = "sub-1", *, compact: bool = False) -> str:
    separators = (",", ":") if compact else None
    return json.dumps(next_message(event, sub_id), separators=separators)


def full_event(offset: str = "194", uid: str = "uid-194") -> dict[str, Any]:
    return {
        "metadata": {"offset": offset, "uniqueEventId": uid},
        "moduleName": "Reservation",
        "eventName": "UPDATE RESERVATION",
        "primaryKey": "987654",
        "timestamp": "28-APR-24 06.18.59.028027 AM",
        "hotelId": "HOTEL1",
        "publisherId": "pub",
        "actionInstanceId": "act",
        "detail": [
            {  # in the order the subscription asks for them: what OHIP sends
                "elementName": "First Name",
                "elementType": None,
                "elementSequence": None,
                "elementRole": None,
                "newValue": "New",
                "oldValue": "Old",
                "scopeFrom": None,
                "scopeTo": None,
            },
            None,
        ],
    }


# --- key_hash / subscription_url ---------------------------------------------------------------


def test_key_hash_matches_known_sha256_vectors() -> None:
    assert key_hash("abc") == SHA256_ABC
    assert key_hash("") == SHA256_EMPTY
    # `echo -n`: no trailing newline is hashed
    assert key_hash("abc") != SHA256_ABC_NEWLINE
    assert key_hash("abc\n") == SHA256_ABC_NEWLINE


def test_key_hash_is_64_lowercase_hex_characters() -> None:
    h = key_hash("ABC-123-ÄÖÜ")
    assert re.fullmatch(r"[0-9a-f]{64}", h)


@pytest.mark.parametrize(
    ("gateway", "expected_base"),
    [
        ("https://gw.example.com", "wss://gw.example.com/subscriptions"),
        ("https://gw.example.com/", "wss://gw.example.com/subscriptions"),
        ("https://gw.example.com/subscriptions", "wss://gw.example.com/subscriptions"),
        ("https://gw.example.com/subscriptions/", "wss://gw.example.com/subscriptions"),
        ("https://gw.example.com/ohip", "wss://gw.example.com/ohip/subscriptions"),
        ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/subscriptions"),
        ("wss://gw.example.com", "wss://gw.example.com/subscriptions"),
        ("ws://localhost:1234/", "ws://localhost:1234/subscriptions"),
    ],
)
def test_subscription_url_rewrites_scheme_and_appends_hashed_key(
    gateway: str, expected_base: str
) -> None:
    url = subscription_url(gateway, "abc")
    assert url == f"{expected_base}?key={SHA256_ABC}"


def test_subscription_url_never_carries_the_raw_key() -> None:
    url = subscription_url("https://gw.example.com", "MY-RAW-APP-KEY")
    assert "MY-RAW-APP-KEY" not in url
    assert url.endswith("key=" + key_hash("MY-RAW-APP-KEY"))


@pytest.mark.parametrize(
    "gateway", ["ftp://gw.example.com", "gw.example.com", "https://", "", "file:///etc/x"]
)
def test_subscription_url_rejects_bad_gateways(gateway: str) -> None:
    with pytest.raises(InvalidInput, match="gateway URL"):
        subscription_url(gateway, "abc")


# --- SubscribeInput ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chain_code": "CHAIN1"},
        {"chain_code": "A" * 20},
        {"chain_code": "a Z_0%#$&-"},
        {"chain_code": "C", "offset": "0"},
        {"chain_code": "C", "offset": "0007"},
        {"chain_code": "C", "offset": "9" * 20},
        {"chain_code": "C", "hotel_codes": ("H1", "H 2", "H-3")},
        {"chain_code": "C", "hotel_codes": ("H" * 50,)},
        {"chain_code": "C", "hotel_codes": ("A,B",)},
        {"chain_code": "C", "highest": True, "delta": True},
    ],
)
def test_valid_inputs_pass_validation(kwargs: dict[str, Any]) -> None:
    SubscribeInput(**kwargs).validate()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"chain_code": ""}, "chainCode"),
        ({"chain_code": "A" * 21}, "chainCode"),
        ({"chain_code": "CH!"}, "chainCode"),
        ({"chain_code": "A,B"}, "chainCode"),  # the comma is only allowed in hotelCode
        ({"chain_code": 'C" offsetType: "highest'}, "chainCode"),
        ({"chain_code": "C\n"}, "chainCode"),
        ({"chain_code": "C", "offset": ""}, "offset"),
        ({"chain_code": "C", "offset": "12a"}, "offset"),
        ({"chain_code": "C", "offset": "-1"}, "offset"),
        ({"chain_code": "C", "offset": " 1"}, "offset"),
        ({"chain_code": "C", "offset": "1" * 21}, "offset"),
        ({"chain_code": "C", "offset": "１２"}, "offset"),  # fullwidth digits  # noqa: RUF001
        ({"chain_code": "C", "hotel_codes": ("H;1",)}, "hotelCode"),
        ({"chain_code": "C", "hotel_codes": ("",)}, "hotelCode"),
        ({"chain_code": "C", "hotel_codes": ("H" * 26, "H" * 25)}, "hotelCode"),  # 52 joined
        ({"chain_code": "C", "hotel_codes": ('H"',)}, "hotelCode"),
    ],
)
def test_inputs_outside_the_schema_are_rejected_naming_the_field(
    kwargs: dict[str, Any], field: str
) -> None:
    sub = SubscribeInput(**kwargs)
    with pytest.raises(InvalidInput) as info:
        sub.validate()
    assert str(info.value).startswith(field)
    # arguments() validates too: an invalid value is never written into a query
    with pytest.raises(InvalidInput):
        sub.arguments()
    with pytest.raises(InvalidInput):
        subscribe("id", sub)


def test_invalid_input_is_a_value_error() -> None:
    assert issubclass(InvalidInput, ValueError)


def test_arguments_chain_only() -> None:
    assert SubscribeInput(chain_code="CHAIN1").arguments() == '{ chainCode: "CHAIN1" }'


def test_arguments_offset_is_written_as_a_string_verbatim() -> None:
    args = SubscribeInput(chain_code="C", offset="0007").arguments()
    assert args == '{ chainCode: "C" offset: "0007" }'


def test_arguments_highest_replaces_the_offset() -> None:
    args = SubscribeInput(chain_code="C", offset="5", highest=True).arguments()
    assert args == '{ chainCode: "C" offsetType: "highest" }'
    assert "offset:" not in args


def test_arguments_delta_and_hotel_codes() -> None:
    args = SubscribeInput(
        chain_code="C", offset="1", delta=True, hotel_codes=("H1", "H2")
    ).arguments()
    assert args == '{ chainCode: "C" offset: "1" delta: true hotelCode: "H1,H2" }'


def test_arguments_without_delta_do_not_mention_it() -> None:
    assert "delta" not in SubscribeInput(chain_code="C").arguments()


@pytest.mark.parametrize("chain", ["A B", "a%b#c$d&e-f_g", "X&Y", "1 2 3"])
def test_arguments_quote_special_characters_as_graphql_strings(chain: str) -> None:
    args = SubscribeInput(chain_code=chain).arguments()
    m = re.fullmatch(r'\{ chainCode: ("(?:[^"\\]|\\.)*") \}', args)
    assert m is not None, args
    assert json.loads(m.group(1)) == chain


def test_subscribe_input_is_immutable() -> None:
    sub = SubscribeInput(chain_code="C")
    with pytest.raises(AttributeError):
        sub.chain_code = "D"  # type: ignore[misc]


# --- encoders ----------------------------------------------------------------------------------


def test_connection_init_carries_bearer_token_and_raw_key() -> None:
    msg = json.loads(connection_init("tok.en", "RAW-KEY"))
    assert msg == {
        "type": "connection_init",
        "payload": {"Authorization": "Bearer tok.en", "x-app-key": "RAW-KEY"},
    }
    assert key_hash("RAW-KEY") not in json.dumps(msg)


def test_connection_init_may_carry_the_enterprise_id() -> None:
    """As Oracle's sample sends it (whether OHIP reads it is unconfirmed)."""
    msg = json.loads(connection_init("tok.en", "RAW-KEY", "ENT1"))
    assert msg["payload"] == {
        "Authorization": "Bearer tok.en",
        "x-app-key": "RAW-KEY",
        "enterpriseId": "ENT1",
    }


def test_subscribe_message_shape() -> None:
    sub = SubscribeInput(chain_code="CHAIN1", offset="0042", delta=True)
    msg = json.loads(subscribe("sub-42", sub))
    assert set(msg) == {"id", "type", "payload"}
    assert msg["id"] == "sub-42"
    assert msg["type"] == "subscribe"
    payload = msg["payload"]
    assert payload["variables"] == {"input": {"chainCode": "CHAIN1"}}
    assert payload["extensions"] == {}
    assert payload["operationName"] is None
    query = payload["query"]
    assert query == (f"subscription {{ newEvent(input: {sub.arguments()}) {{ {SELECTION} }} }}")
    assert 'offset: "0042"' in query
    for field in ("metadata { offset uniqueEventId }", "primaryKey", "eventName", "detail {"):
        assert field in query


def test_subscribe_query_braces_are_balanced() -> None:
    sub = SubscribeInput(chain_code="C", hotel_codes=("H1",))
    query = json.loads(subscribe("x", sub))["payload"]["query"]
    depth = 0
    for ch in query:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0


def test_complete_ping_pong() -> None:
    assert json.loads(complete("sub-9")) == {"id": "sub-9", "type": "complete"}
    assert json.loads(PING) == {"type": "ping"}
    assert json.loads(PONG) == {"type": "pong"}


def test_encoded_ping_and_pong_decode_back() -> None:
    assert isinstance(decode(PING), Ping)
    assert isinstance(decode(PONG), Pong)


# --- decode: control messages ------------------------------------------------------------------


def test_decode_ping_and_pong_ignore_extra_fields() -> None:
    assert decode('{"type":"ping","payload":{"x":1}}') == Ping()
    assert decode('{"type":"pong"}') == Pong()


def test_decode_connection_ack() -> None:
    assert decode('{"type":"connection_ack"}') == ConnectionAck(None)
    ack = decode('{"type":"connection_ack","payload":{"applicationName":"app"}}')
    assert ack == ConnectionAck({"applicationName": "app"})
    assert decode('{"type":"connection_ack","payload":[1]}') == ConnectionAck(None)
    assert decode('{"type":"connection_ack","payload":"x"}') == ConnectionAck(None)


def test_decode_error_message() -> None:
    msg = decode('{"id":"s1","type":"error","payload":[{"message":"bad"},{"message":"worse"}]}')
    assert msg == ErrorMessage("s1", [{"message": "bad"}, {"message": "worse"}], msg.text)
    assert msg.text.startswith('{"id":"s1","type":"error"')
    single = decode('{"id":"s1","type":"error","payload":{"message":"bad"}}')
    assert isinstance(single, ErrorMessage) and single.errors == [{"message": "bad"}]


def test_decode_complete() -> None:
    assert decode('{"id":"s1","type":"complete"}') == Complete("s1")
    # Not a string: never our subscription's id (and never str() of a value from the wire).
    assert decode('{"id":7,"type":"complete"}') == Complete("")


# --- decode: next ------------------------------------------------------------------------------


def test_decode_next_builds_the_event() -> None:
    ev = full_event()
    frame = next_frame(ev)
    msg = decode(frame)
    assert isinstance(msg, Next)
    assert msg.id == "sub-1"
    assert msg.event == Event(
        offset="194",
        unique_event_id="uid-194",
        event_name="UPDATE RESERVATION",
        module_name="Reservation",
        primary_key="987654",
        hotel_id="HOTEL1",
        timestamp="28-APR-24 06.18.59.028027 AM",
        parsed=None,  # text only: what the pipeline counts is what the event holds
        text=orjson.dumps(ev),  # a str frame: written anew
        detail_text=orjson.dumps(ev["detail"]),
    )
    assert msg.event.raw == ev  # the newEvent object as received, unknown fields included


def test_decode_next_from_compact_bytes_keeps_the_text_as_received() -> None:
    # What the daemon reads (bytes): the header fields typed, the newEvent as its own text,
    # escapes and all, with nothing to build or re-serialize.
    ev = full_event(uid="ü-id") | {"hotelId": "HÖTEL"}
    text = json.dumps(ev, separators=(",", ":"), ensure_ascii=False).encode()
    text = text.replace("HÖTEL".encode(), b"H\\u00d6TEL")  # escaped in the text itself
    assert b"\\u00d6" in text
    frame = b'{"id":"sub-1","type":"next","payload":{"data":{"newEvent":' + text + b"}}}"
    msg = decode(frame)
    assert isinstance(msg, Next)
    assert msg.id == "sub-1"
    assert msg.event.parsed is None
    assert msg.event.text == text
    assert msg.event.raw == json.loads(text)
    assert msg.event.detail_text is not None
    assert json.loads(msg.event.detail_text) == ev["detail"]
    assert (msg.event.unique_event_id, msg.event.hotel_id) == ("ü-id", "HÖTEL")
    assert msg.event.document_json() == text


@pytest.mark.parametrize("detail", [None, "absent"])
def test_decode_next_fast_detail_text_of_no_detail_is_an_empty_list(detail: Any) -> None:
    ev: dict[str, Any] = {"metadata": {"offset": "1", "uniqueEventId": "u"}}
    if detail != "absent":
        ev["detail"] = detail
    msg = decode(next_frame(ev).encode())
    assert isinstance(msg, Next)
    assert msg.event.detail_text == b"[]"


@pytest.mark.parametrize("line_break", [b"\n", b"\r\n", b"\r"])
def test_decode_next_with_line_breaks_is_decoded_the_general_way(line_break: bytes) -> None:
    # A JSONL line cannot hold the text as received: the event is parsed and written anew.
    ev = full_event()
    frame = json.dumps(
        {"id": "sub-1", "type": "next", "payload": {"data": {"newEvent": ev}}}, indent=2
    ).encode()
    msg = decode(frame.replace(b"\n", line_break))
    assert isinstance(msg, Next)
    assert (msg.event.parsed, msg.event.frame) == (None, b"")
    assert msg.event.text == orjson.dumps(ev)
    assert msg.event.detail_text == orjson.dumps(ev["detail"])
    assert msg.event.raw == ev
    line = msg.event.document_json()
    assert b"\n" not in line and b"\r" not in line


@pytest.mark.parametrize("field", ["uniqueEventId", "primaryKey"])
def test_a_header_field_over_1024_bytes_of_utf8_is_refused_whatever_its_length(field: str) -> None:
    """400 CJK characters are 1,200 bytes: past what PostgreSQL takes in an index entry with
    the stream's name (2,704 bytes) if the limit counted characters. Refused like any absurd
    field: a dead letter of the frame, not a commit that fails for ever."""
    ev = full_event()
    if field == "uniqueEventId":
        ev["metadata"] = {**ev["metadata"], "uniqueEventId": "猫" * 400}
    else:
        ev["primaryKey"] = "猫" * 400
    escaped = next_frame(ev)  # "\\u732b": six bytes a character on the wire
    raw = json.dumps(json.loads(escaped), ensure_ascii=False, separators=(",", ":"))
    for frame in (escaped.encode(), raw.encode()):
        msg = decode(frame)
        assert isinstance(msg, DecodeError), frame[:80]
        assert "1200 bytes long in UTF-8 (at most 1024)" in msg.reason
    ev = full_event() | {"primaryKey": "猫" * 341}  # 1,023 bytes: kept
    assert isinstance(decode(next_frame(ev).encode()), Next)


@pytest.mark.parametrize("compact", [True, False])
def test_decode_next_with_many_detail_elements_keeps_the_text_as_received(compact: bool) -> None:
    ev = full_event() | {"detail": [{"elementName": f"e{i}"} for i in range(1000)]}
    msg = decode(next_frame(ev, compact=compact).encode())
    assert isinstance(msg, Next)
    assert msg.event.parsed is None and msg.event.raw == ev
    separators = (",", ":") if compact else None
    assert msg.event.text == json.dumps(ev, separators=separators).encode()


def _held_by(frame: bytes) -> tuple[Next, int]:
    """The message ``frame`` decodes to, and the bytes it holds (allocated by decode and
    alive after it)."""
    gc.collect()
    tracemalloc.start()
    try:
        msg = decode(frame, 16 * 1024 * 1024)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(msg, Next)
    return msg, held


@pytest.mark.parametrize("shape", ["line-breaks", "many-brackets", "spaced"])
def test_an_event_decoded_the_general_way_holds_about_what_the_pipeline_counts(shape: str) -> None:
    """The pipeline bounds its memory by the event's text (or frame): the tree of objects parsed
    from 2 MiB of small detail elements held some 48 MiB. Whatever sent the frame the general
    way, the event keeps its text (and its detail's), not the tree nor the frame."""
    ev = {
        "metadata": {"offset": "1", "uniqueEventId": "u1"},
        "detail": [{"elementName": "n", "newValue": None}] * 60_000,
    }
    sep = {"line-breaks": (",\n", ":"), "many-brackets": (",", ":"), "spaced": (", ", ": ")}
    frame = json.dumps(next_message(ev), separators=sep[shape]).encode()
    assert len(frame) > 2_000_000
    msg, held = _held_by(frame)
    event = msg.event
    assert (event.parsed, event.frame) == (None, b"")
    counted = len(event.text or event.frame)  # its text (Event.held_bytes adds the detail's)
    assert counted >= len(frame) * 0.9
    assert held <= 2.5 * counted, f"holds {held / counted:.1f} times what is counted"
    assert event.raw == ev
    assert event.detail_text is not None and orjson.loads(event.detail_text) == ev["detail"]


def test_an_event_too_deep_to_write_back_out_keeps_only_its_frame() -> None:
    """No sink can write it (orjson writes 254 levels): a dead letter by id, whose payload is
    the frame. That frame is all it holds; its object is parsed from it when asked."""
    ev = full_event() | {"publisherId": "p" * 100_000, "detail": "@@"}
    frame = next_frame(ev, compact=True).encode().replace(b'"@@"', b"[" * 300 + b"]" * 300)
    msg, held = _held_by(frame)
    event = msg.event
    assert (event.parsed, event.text, event.frame) == (None, None, frame)
    assert held <= 0.2 * len(frame)  # the frame is the caller's: nothing else is kept
    assert event.raw["metadata"] == ev["metadata"]
    assert event_evidence(event).text == frame.decode()


@pytest.mark.parametrize("detail", [{"a": 1}, "x", 7])
def test_a_detail_that_is_no_list_keeps_no_detail_text(detail: Any) -> None:
    """Off the schema: the SQL sinks take it from the object (``raw``), as it is."""
    ev = full_event() | {"detail": detail}
    msg = decode(next_frame(ev, compact=True).encode())
    assert isinstance(msg, Next)
    assert msg.event.parsed is None and msg.event.detail_text is None
    assert msg.event.text == json.dumps(ev, separators=(",", ":")).encode()
    assert msg.event.raw["detail"] == detail


def test_decode_depth_limit_does_not_follow_the_recursion_limit() -> None:
    # The typed decoder would go as deep as Python's recursion limit allows: a frame deeper
    # than the general way reads is refused whatever that limit is.
    ev = full_event() | {"detail": "@@"}
    frame = next_frame(ev).encode().replace(b'"@@"', b"[" * 1100 + b"]" * 1100)
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        msg = decode(frame)
    finally:
        sys.setrecursionlimit(before)
    assert isinstance(msg, DecodeError)
    assert "depth" in msg.reason


def test_decode_next_with_invalid_utf8_in_a_skipped_string_is_a_decode_error() -> None:
    # The typed decoder only checks the syntax of what it skips: UTF-8 is checked first.
    frame = next_frame(full_event()).encode().replace(b"New", b"N\xffw")
    msg = decode(frame)
    assert isinstance(msg, DecodeError)
    assert "UTF-8" in msg.reason


def _ways(frame: bytes) -> tuple[Message, Message]:
    """What ``frame`` decodes to, and the same message with a line break in it (the fast way
    never takes one)."""
    assert frame.startswith(b'{"id":"sub-1",')
    return decode(frame), decode(frame.replace(b'{"id":"sub-1",', b'{"id":"sub-1",\n', 1))


def test_the_fast_way_takes_a_frame_as_ohip_writes_it_however_many_its_detail_elements() -> None:
    """Typed to the last field, the fast way has no depth to fear: no more bracket count (the
    frames of events with over 60 detail elements went the general way)."""
    ev = full_event()
    ev["detail"] = ev["detail"] * 300
    frame = next_frame(ev, compact=True).encode()
    msg = _fast_next(frame)
    assert isinstance(msg, Next)
    assert msg.event.text == json.dumps(ev, separators=(",", ":")).encode()
    assert msg.event.detail_text == json.dumps(ev["detail"], separators=(",", ":")).encode()
    # Its keys in another order (a server that writes type first, say): kept as received.
    ev = dict(reversed(ev.items())) | {"metadata": {"uniqueEventId": "uid-194", "offset": "194"}}
    ev["detail"] = [dict(reversed(e.items())) if e else e for e in ev["detail"]]
    frame = orjson.dumps({"payload": {"data": {"newEvent": ev}}, "type": "next", "id": "sub-1"})
    msg = _fast_next(frame)
    assert isinstance(msg, Next)
    assert (msg.event.offset, msg.event.unique_event_id) == ("194", "uid-194")
    assert msg.event.text == orjson.dumps(ev)
    assert msg.event.detail_text == orjson.dumps(ev["detail"])


@pytest.mark.parametrize(
    "number",
    [
        b"1e400",  # orjson: no double, the frame was malformed; msgspec skipped it unchecked
        b"-1E+400",
        b"1" + b"0" * 400,
        b"1e99999999999999999999",
        b"1e-400",  # orjson: 0.0
        b"1e-16384",  # PostgreSQL's jsonb: out of range, every commit holding it failed
        b"0." + b"1" * 17000,
        b"18446744073709551616",  # 2**64: orjson, a float
        b"-123456789012345678901234567890",
    ],
)
@pytest.mark.parametrize("where", ["publisherId", "detail", "envelope"])
def test_a_number_no_double_holds_is_refused_however_the_frame_is_written(
    number: bytes, where: str
) -> None:
    """One answer for one event: the fast way took such numbers as text and the general way
    refused or rewrote them (2**64 a float, 1e-400 0.0) when the frame had a line break."""
    ev = full_event() | {"publisherId": "@@"} if where == "publisherId" else full_event()
    if where == "detail":
        ev["detail"][0]["newValue"] = "@@"
    extra = {"marker": "@@"} if where == "envelope" else {}
    message = next_message(ev) | extra
    template = json.dumps(message, separators=(",", ":")).encode()
    escaped = template.replace(b'"HOTEL1"', b'"HOTEL\\"1"')  # a backslash in the frame
    for frame in (template.replace(b'"@@"', number), escaped.replace(b'"@@"', number)):
        compact, broken = _ways(frame)
        assert isinstance(compact, DecodeError) and isinstance(broken, DecodeError)
        if not compact.reason.startswith("invalid JSON"):  # else orjson's, with a position
            assert compact.reason == broken.reason
            assert "20 digits in a row or a 3-digit exponent" in compact.reason
    # In a string it is no number: kept (with or without a backslash in the frame).
    for text in (b'"' + number + b'"', b'"\\"' + number + b'\\\\"'):
        compact, broken = _ways(template.replace(b'"@@"', text))
        assert isinstance(compact, Next) and isinstance(broken, Next)
    # What a double holds is kept, however written (a text as received when it is one line).
    held = b"-1234567890123456789.5e-99"
    compact, broken = _ways(template.replace(b'"@@"', held))
    assert isinstance(compact, Next) and isinstance(broken, Next)
    assert compact.event.raw == broken.event.raw
    assert (held in (compact.event.text or b"")) is (where != "envelope")


@pytest.mark.parametrize(
    ("where", "twice"),
    [
        ("newEvent", b'"metadata":{"offset":"2","uniqueEventId":"u2"},'),
        ("metadata", b'"offset":"2",'),
        ("metadata", b'"uniqueEventId":"u2",'),
        ("newEvent", b'"primaryKey":"other",'),
        ("newEvent", b'"\\u0070rimaryKey":"other",'),  # escaped: the same key to a reader
        ("newEvent", b'"detail":[],'),
        ("newEvent", b'"eventName":"DELETE",'),
        ("data", b'"newEvent":{"metadata":{"offset":"3","uniqueEventId":"u3"}},'),
        ("payload", b'"data":null,'),
        ("frame", b'"type":"complete",'),
        ("frame", b'"id":"sub-2",'),
    ],
)
def test_a_key_twice_in_an_object_that_says_what_the_event_is_is_refused(
    where: str, twice: bytes
) -> None:
    """Both parsers took the last: the event was deduplicated, checkpointed and partitioned by
    it, and stored with both (SQLite's json_extract reads the first)."""
    frame = next_frame(full_event(), compact=True).encode()
    opening = {
        "metadata": b'"metadata":{',
        "newEvent": b'"newEvent":{',
        "data": b'"data":{',
        "payload": b'"payload":{',
        "frame": b'{"id":"sub-1",',
    }[where]
    compact, broken = _ways(frame.replace(opening, opening + twice, 1))
    assert isinstance(compact, DecodeError) and isinstance(broken, DecodeError)
    assert compact.reason == broken.reason
    assert f"twice in the {where} object" in compact.reason
    # Twice in a detail element (what OHIP says changed, no header of the event), or in any
    # other object of the event (a name OHIP does not send): accepted, and the text holds it
    # once, the last (see the tests below).
    doubled = frame.replace(b'"elementName":"First Name"', b'"newValue":"a","elementName":"b"')
    msg = decode(doubled)
    assert isinstance(msg, Next) and (msg.event.detail_text or b"").count(b'"newValue"') == 1
    other = frame.replace(
        b'"newEvent":{', b'"newEvent":{"dataValueMapping":1,"dataValueMapping":2,'
    )
    msg = decode(other)
    assert isinstance(msg, Next) and (msg.event.text or b"").count(b'"dataValueMapping"') == 1
    assert orjson.loads(msg.event.text or b"")["dataValueMapping"] == 2


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_text = st.text(max_size=8)
_header = st.none() | st.text(max_size=8) | st.integers() | st.just("x" * 1025) | json_values


def _event_dicts(offset: Any, uid: Any, header: Any, detail: Any) -> Any:
    return st.fixed_dictionaries(
        {"metadata": st.fixed_dictionaries({"offset": offset, "uniqueEventId": uid})},
        optional={
            **{
                f: header for f in ("eventName", "moduleName", "primaryKey", "hotelId", "timestamp")
            },
            "detail": detail,
            "publisherId": json_values,
        },
    )


# Half well-formed events (the fast way's), half anything (mostly the general way's).
_events = _event_dicts(
    st.from_regex(r"[0-9]{1,20}", fullmatch=True),
    st.text(min_size=1, max_size=8),
    st.none() | _text,
    st.none() | st.lists(st.dictionaries(_text, st.none() | _text, max_size=4), max_size=3),
) | _event_dicts(
    st.from_regex(r"[0-9]{1,21}", fullmatch=True) | _header,
    _text | _header,
    _header,
    st.none() | st.lists(json_values, max_size=3) | json_values,
)


@settings(max_examples=300, deadline=None)
@given(
    ev=_events,
    sub_id=st.text(max_size=4) | st.just(1),
    ascii_only=st.booleans(),
    compact=st.booleans(),
)
def test_decode_fast_and_general_ways_agree(
    ev: dict[str, Any], sub_id: Any, ascii_only: bool, compact: bool
) -> None:
    # The typed (bytes) and general (str) ways give the same message for any event.
    message = {"id": sub_id, "type": "next", "payload": {"data": {"newEvent": ev}}}
    separators = (",", ":") if compact else (", ", ": ")
    text = json.dumps(message, ensure_ascii=ascii_only, separators=separators)
    fast, general = decode(text.encode()), decode(text)
    assert type(fast) is type(general)
    if isinstance(general, DecodeError):
        assert isinstance(fast, DecodeError)
        assert fast.reason == general.reason
        return
    assert isinstance(fast, Next) and isinstance(general, Next)
    assert fast.id == general.id
    assert fast.event[:7] == general.event[:7]  # offset .. timestamp
    assert fast.event.raw == general.event.raw == ev
    assert orjson.loads(fast.event.document_json()) == ev
    if fast.event.detail_text is not None:
        assert orjson.loads(fast.event.detail_text) == (ev.get("detail") or [])


def test_decode_next_keeps_unknown_fields_in_raw() -> None:
    ev = {"metadata": {"offset": "1", "uniqueEventId": "u"}, "dataValueMapping": {"a": [1]}}
    msg = decode(next_frame(ev))
    assert isinstance(msg, Next)
    assert msg.event.raw["dataValueMapping"] == {"a": [1]}


def test_decode_next_from_bytes() -> None:
    ev = full_event(offset="0007", uid="ü-id")
    frame = next_frame(ev).encode()
    msg = decode(frame)
    assert isinstance(msg, Next)
    assert msg.event.offset == "0007"
    assert msg.event.unique_event_id == "ü-id"
    assert msg.event.raw == ev


def test_decode_next_minimal_event_defaults() -> None:
    msg = decode(next_frame({"metadata": {"offset": "5", "uniqueEventId": "e5"}}))
    assert isinstance(msg, Next)
    ev = msg.event
    assert (ev.event_name, ev.module_name, ev.hotel_id, ev.timestamp) == ("", "", None, None)
    # without primaryKey the event is partitioned by its own id
    assert ev.primary_key == "e5"


@pytest.mark.parametrize("pk", [None, "", 17, ["x"]])
def test_decode_next_unusable_primary_key_falls_back_to_the_event_id(pk: Any) -> None:
    msg = decode(next_frame({"metadata": {"offset": "5", "uniqueEventId": "e5"}, "primaryKey": pk}))
    assert isinstance(msg, Next)
    assert msg.event.primary_key == "e5"


def test_decode_next_non_string_optional_fields_become_none_or_empty() -> None:
    ev = {
        "metadata": {"offset": "5", "uniqueEventId": "e5"},
        "hotelId": 12,
        "timestamp": 99,
        "eventName": None,
        "moduleName": ["m"],
    }
    msg = decode(next_frame(ev))
    assert isinstance(msg, Next)
    assert msg.event.hotel_id is None
    assert msg.event.timestamp is None
    assert msg.event.event_name == ""
    assert msg.event.module_name == ""


@pytest.mark.parametrize(
    ("frame", "reason_part"),
    [
        ('{"type":"next"}', "newEvent"),
        ('{"type":"next","payload":null}', "newEvent"),
        ('{"type":"next","payload":{}}', "newEvent"),
        ('{"type":"next","payload":{"data":null}}', "newEvent"),
        ('{"type":"next","payload":{"data":{}}}', "newEvent"),
        ('{"type":"next","payload":{"data":{"newEvent":null}}}', "newEvent"),
        ('{"type":"next","payload":{"data":{"newEvent":[]}}}', "newEvent"),
        ('{"type":"next","payload":{"data":{"newEvent":"x"}}}', "newEvent"),
        ('{"type":"next","payload":[1,2]}', "newEvent"),
        ('{"type":"next","payload":{"data":{"newEvent":{}}}}', "metadata"),
        ('{"type":"next","payload":{"data":{"newEvent":{"metadata":null}}}}', "metadata"),
        ('{"type":"next","payload":{"data":{"newEvent":{"metadata":"m"}}}}', "metadata"),
        ('{"type":"next","payload":{"data":{"newEvent":{"metadata":[1]}}}}', "metadata"),
        (
            '{"type":"next","payload":{"data":{"newEvent":{"metadata":{"uniqueEventId":"u"}}}}}',
            "offset",
        ),
        (
            '{"type":"next","payload":{"data":{"newEvent":{"metadata":'
            '{"offset":194,"uniqueEventId":"u"}}}}}',
            "offset",
        ),
        (
            '{"type":"next","payload":{"data":{"newEvent":{"metadata":'
            '{"offset":"","uniqueEventId":"u"}}}}}',
            "offset",
        ),
        (
            '{"type":"next","payload":{"data":{"newEvent":{"metadata":'
            '{"offset":null,"uniqueEventId":"u"}}}}}',
            "offset",
        ),
        (
            '{"type":"next","payload":{"data":{"newEvent":{"metadata":{"offset":"1"}}}}}',
            "uniqueEventId",
        ),
        (
            '{"type":"next","payload":{"data":{"newEvent":{"metadata":'
            '{"offset":"1","uniqueEventId":5}}}}}',
            "uniqueEventId",
        ),
        (
            '{"type":"next","payload":{"data":{"newEvent":{"metadata":'
            '{"offset":"1","uniqueEventId":""}}}}}',
            "uniqueEventId",
        ),
        (
            '{"type":"next","payload":{"data":{"newEvent":{"metadata":'
            '{"offset":"1","uniqueEventId":{"a":1}}}}}}',
            "uniqueEventId",
        ),
    ],
)
def test_unusable_next_frames_are_decode_errors_with_raw_text(frame: str, reason_part: str) -> None:
    msg = decode(frame)
    assert isinstance(msg, DecodeError)
    assert msg.raw == frame
    assert reason_part in msg.reason
    as_bytes = decode(frame.encode())
    assert isinstance(as_bytes, DecodeError)
    assert as_bytes.raw == frame
    assert as_bytes.reason == msg.reason


# --- decode: other errors ----------------------------------------------------------------------


@pytest.mark.parametrize("frame", ["", "{", "nul", "{'type':'ping'}", '{"type":"ping"', "NaN"])
def test_invalid_json_is_a_decode_error_with_raw_text(frame: str) -> None:
    msg = decode(frame)
    assert isinstance(msg, DecodeError)
    assert msg.raw == frame
    assert msg.reason.startswith("invalid JSON")


@pytest.mark.parametrize("frame", ["[]", "[1,2]", "1", '"ping"', "null", "true", "1.5"])
def test_non_object_json_is_a_decode_error(frame: str) -> None:
    msg = decode(frame)
    assert isinstance(msg, DecodeError)
    assert (msg.raw, msg.reason) == (frame, "frame is not a JSON object")


@pytest.mark.parametrize(
    "frame", ['{"type":"subscribe"}', '{"type":"PING"}', '{"type":null}', "{}", '{"type":1}']
)
def test_unknown_or_missing_type_is_a_decode_error(frame: str) -> None:
    msg = decode(frame)
    assert isinstance(msg, DecodeError)
    assert msg.raw == frame
    assert "unknown message type" in msg.reason


@pytest.mark.parametrize("char", ["\U000e0001", "\x00", "\u202e", "\u200b"])
@pytest.mark.parametrize("where", ["type", "offset"])
def test_a_reason_quoting_a_wire_value_stays_short_whatever_its_characters(
    char: str, where: str
) -> None:
    """repr writes a character it cannot print in up to ten: 50 of them made a reason of 523
    characters, past what a log line or a dead letter's error is meant to hold (300)."""
    value = char * 60
    if where == "type":
        frame = json.dumps({"type": value})
    else:
        frame = next_frame({"metadata": {"offset": value, "uniqueEventId": "u"}})
    msg = decode(frame)
    assert isinstance(msg, DecodeError)
    assert len(msg.reason) <= 160, len(msg.reason)
    assert repr(value)[:10] in msg.reason


def test_invalid_utf8_bytes_are_decoded_lossily_into_raw() -> None:
    frame = b'{"type":"ping","x":"\xff\xfe"}'
    msg = decode(frame)
    assert isinstance(msg, DecodeError)
    assert msg.raw == frame.decode("utf-8", "replace")
    assert "\ufffd" in msg.raw


def test_bytes_non_object_keeps_text() -> None:
    msg = decode(b"[1]")
    assert isinstance(msg, DecodeError)
    assert (msg.raw, msg.reason) == ("[1]", "frame is not a JSON object")


def test_nesting_beyond_the_parser_limit_is_a_decode_error() -> None:
    frame = '{"type":"next","payload":' + "[" * 5000 + "]" * 5000 + "}"
    msg = decode(frame)
    assert isinstance(msg, DecodeError)
    assert msg.raw == frame


def test_decode_never_raises_on_deeply_nested_type() -> None:
    depth = 1000  # parseable by orjson (its limit is 1024), too deep for repr()
    frame = '{"type":' + "[" * depth + "]" * depth + "}"
    msg = decode(frame)
    assert isinstance(msg, DecodeError)
    assert msg.raw == frame


def test_decode_never_raises_on_deeply_nested_id() -> None:
    depth = 1000
    nested = "[" * depth + "]" * depth
    frame = '{"type":"complete","id":' + nested + "}"
    msg = decode(frame)
    assert isinstance(msg, (Complete, DecodeError))


# --- properties --------------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.text())
def test_decode_never_raises_on_arbitrary_text(text: str) -> None:
    msg = decode(text)
    assert isinstance(msg, MESSAGE_TYPES)
    if isinstance(msg, DecodeError):
        assert msg.raw == text


@given(st.binary())
def test_decode_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    msg = decode(data)
    assert isinstance(msg, MESSAGE_TYPES)
    if isinstance(msg, DecodeError):
        assert msg.raw == data.decode("utf-8", "replace")


@settings(max_examples=300)
@given(
    value=json_values,
    where=st.sampled_from(["payload", "data", "newEvent", "metadata", "offset", "id", "uid"]),
)
def test_decode_never_raises_on_any_json_in_a_next_frame(value: Any, where: str) -> None:
    meta: Any = {"offset": "1", "uniqueEventId": "u"}
    if where == "offset":
        meta["offset"] = value
    elif where == "uid":
        meta["uniqueEventId"] = value
    elif where == "metadata":
        meta = value
    event: Any = value if where == "newEvent" else {"metadata": meta}
    data: Any = value if where == "data" else {"newEvent": event}
    payload: Any = value if where == "payload" else {"data": data}
    msg_id: Any = value if where == "id" else "s"
    frame = json.dumps({"id": msg_id, "type": "next", "payload": payload})
    for f in (frame, frame.encode()):
        msg = decode(f)
        assert isinstance(msg, (Next, DecodeError))
        if isinstance(msg, DecodeError):
            assert msg.raw == frame


@given(value=json_values)
def test_decode_never_raises_on_any_json_value_as_frame(value: Any) -> None:
    frame = json.dumps(value)
    msg = decode(frame)
    assert isinstance(msg, MESSAGE_TYPES)


safe_text = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40)


@settings(max_examples=300)
@given(
    offset=st.from_regex(r"[0-9]{1,20}", fullmatch=True),
    uid=safe_text,
    extra=st.dictionaries(
        st.sampled_from(["moduleName", "eventName", "primaryKey", "hotelId", "x"]),
        st.none() | safe_text,
    ),
    as_bytes=st.booleans(),
)
def test_valid_events_decode_to_next_with_ids_verbatim(
    offset: str, uid: str, extra: dict[str, Any], as_bytes: bool
) -> None:
    event = {"metadata": {"offset": offset, "uniqueEventId": uid}, **extra}
    frame = next_frame(event)
    msg = decode(frame.encode() if as_bytes else frame)
    assert isinstance(msg, Next)
    assert msg.event.offset == offset  # opaque: "0007" stays "0007"
    assert msg.event.unique_event_id == uid
    assert msg.event.raw == event
    pk = extra.get("primaryKey")
    assert msg.event.primary_key == (pk if pk else uid)


def test_leading_zero_offsets_are_not_normalised() -> None:
    for offset in ("0007", "0", "00", "0000000000000000000001"[:20]):
        msg = decode(next_frame({"metadata": {"offset": offset, "uniqueEventId": "u"}}))
        assert isinstance(msg, Next)
        assert msg.event.offset == offset


def test_frames_over_the_size_limit_are_decode_errors_unread() -> None:
    frame = next_frame({"metadata": {"offset": "1", "uniqueEventId": "u"}})
    assert isinstance(decode(frame, max_size=len(frame)), Next)
    msg = decode(frame.encode(), max_size=len(frame) - 1)
    assert isinstance(msg, DecodeError) and "exceeds max_frame_bytes" in msg.reason
    assert msg.raw == frame


def test_a_key_twice_in_a_detail_element_is_stored_once_however_the_frame_is_written() -> None:
    """Readers of the stored text disagree on a repeated key (SQLite's json_extract takes the
    first, orjson and PostgreSQL the last): the text holds it once, the last, whether the
    frame came on one line (kept as received before) or not (written anew)."""
    one = (
        b'{"id":"1","type":"next","payload":{"data":{"newEvent":{"metadata":{"offset":"5",'
        b'"uniqueEventId":"u1"},"detail":[{"elementName":"rate","newValue":"100",'
        b'"newValue":"999"}]}}}}'
    )
    texts = []
    for frame in (one, one.replace(b'"detail":', b'\n"detail":')):
        msg = decode(frame)
        assert isinstance(msg, Next), msg
        assert msg.event.text is not None and msg.event.detail_text is not None
        assert (
            msg.event.text.count(b'"newValue"') == msg.event.detail_text.count(b'"newValue"') == 1
        )
        assert msg.event.raw["detail"][0]["newValue"] == "999"
        texts.append(msg.event.text)
    assert texts[0] == texts[1]


_DETAIL = (
    b'{"id":"s1","type":"next","payload":{"data":{"newEvent":{"metadata":{"offset":"5",'
    b'"uniqueEventId":"E1"},"moduleName":"M","eventName":"NAME","primaryKey":"K","detail":['
    b"@@]}}}}"
)


def _first_read(text: bytes, path: str) -> Any:
    """What SQLite's json_extract reads at ``path`` of ``text`` (the first of a key twice)."""
    with sqlite3.connect(":memory:") as db:
        return db.execute("SELECT json_extract(?, ?)", (text.decode(), path)).fetchone()[0]


@pytest.mark.parametrize(
    "written",
    [
        pytest.param(lambda f: f, id="plain"),
        pytest.param(lambda f: f.replace(b'"NAME"', b'"N\\/AME"'), id="an-escaped-slash"),
        pytest.param(lambda f: f.replace(b'"NAME"', b'"N\\u00c9"'), id="a-unicode-escape"),
        pytest.param(lambda f: f.replace(b'"NAME"', b'"N\\"A:ME"'), id="an-escaped-quote"),
        pytest.param(lambda f: f.replace(b'"NAME"', b'"N\\u003aA:ME"'), id="an-escaped-colon"),
        pytest.param(lambda f: f.replace(b'"type":"next"', b'"type":"next","x":1'), id="extra"),
        pytest.param(lambda f: f.replace(b'"K"', b'"K","n":1.5'), id="a-number"),
    ],
)
@pytest.mark.parametrize(
    ("twice", "once", "path"),
    [
        (
            b'{"elementName":"rate","newValue":"100","newValue":"999"}',
            b'{"elementName":"rate","oldValue":"100","newValue":"999"}',
            "$[0].newValue",
        ),
        (
            b'{"elementName":"rate","o":{"a":"100","b":{"a":"x"},"a":"999"}}',
            b'{"elementName":"rate","o":{"c":"100","b":{"a":"x"},"a":"999"}}',
            "$[0].o.a",
        ),
        (
            b'{"elementName":"rate","n\\u0065wValue":"100","newValue":"999"}',
            b'{"elementName":"rate","\\u006fldValue":"100","newValue":"999"}',
            "$[0].newValue",
        ),
    ],
    ids=["in-a-detail-element", "in-an-object-of-it", "written-otherwise"],
)
def test_a_key_twice_in_any_object_of_the_event_is_stored_once_however_the_frame_is_written(
    written: Any, twice: bytes, once: bytes, path: str
) -> None:
    """A frame whose detail element (or any other object of its newEvent) held a key twice was
    written anew only when it had no backslash and only known fields: with an escaped "/" or
    an accented letter written \\u00c9, or a field the fast way does not know, its text was
    kept as received, both keys in the jsonl line, the SQL sinks' detail column, the bodies.
    SQLite's json_extract read the first value, orjson and PostgreSQL the last: one event, two
    values. Now it is written anew however it came, the last value once; the same frame with
    each key once is still kept as received."""
    frame = written(_DETAIL.replace(b"@@", twice))
    msg = decode(frame)
    assert isinstance(msg, Next), msg
    text, detail = msg.event.text, msg.event.detail_text
    assert text is not None and detail is not None
    assert _first_read(detail, path) == "999", detail
    assert _first_read(text, "$.detail" + path[1:]) == "999", text
    assert text == orjson.dumps(msg.event.raw)  # written anew: each key once
    assert detail == orjson.dumps(msg.event.raw["detail"])
    frame = written(_DETAIL.replace(b"@@", once))
    msg = decode(frame)
    assert isinstance(msg, Next), msg
    assert msg.event.text is not None and msg.event.text in frame
    assert msg.event.detail_text == b"[" + once + b"]"


def _written(value: Any, *, ascii_only: bool, spaced: bool, colons: bool, twice: bool) -> str:
    """``value`` as JSON text: a string's colons written \\u003a (``colons``), the first
    pair of the first non-empty object written twice (``twice``)."""
    done: list[bool] = []

    def enc(v: Any) -> str:
        if isinstance(v, dict):
            pairs = [f"{enc(k)}:{' ' * spaced}{enc(x)}" for k, x in v.items()]
            if twice and pairs and not done:
                done.append(True)
                pairs.insert(0, pairs[0])
            return "{" + f",{' ' * spaced}".join(pairs) + "}"
        if isinstance(v, list):
            return "[" + f",{' ' * spaced}".join(enc(x) for x in v) + "]"
        text = json.dumps(v, ensure_ascii=ascii_only)
        # A colon is never part of an escape: each one in a string's text is the string's.
        return text.replace(":", "\\u003a") if colons and isinstance(v, str) else text

    return enc(value)


@settings(max_examples=300)
@given(
    value=json_values,
    ascii_only=st.booleans(),
    spaced=st.booleans(),
    colons=st.booleans(),
    twice=st.booleans(),
)
def test_a_key_twice_in_a_json_text_is_told_whatever_its_strings_hold(
    value: Any, ascii_only: bool, spaced: bool, colons: bool, twice: bool
) -> None:
    """What tells a key twice in an event's text (when the frame's own text may be kept):
    its colons, a string's written \\u003a too, against its object's written anew. Counted
    with bytes operations: the split at every quote it replaces made an object per string."""
    text = _written(value, ascii_only=ascii_only, spaced=spaced, colons=colons, twice=twice)
    parsed = json.loads(text)
    assert parsed == value
    has_pair = any(isinstance(v, dict) and v for v in _containers(value))
    assert _keys_twice(text.encode(), orjson.dumps(parsed)) == (twice and has_pair)


def _containers(value: Any) -> Any:
    yield value
    children = (
        value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    )
    for child in children:
        yield from _containers(child)


def _header_key_twice(depth: int) -> bytes:
    """A ``next`` frame whose metadata holds uniqueEventId twice, beside a value nested
    ``depth`` levels deep."""
    deep = b"[" * depth + b"]" * depth
    return (
        b'{"id":"s1","type":"next","x":' + deep + b',"payload":{"data":{"newEvent":'
        b'{"metadata":{"offset":"5","uniqueEventId":"A","uniqueEventId":"B"},'
        b'"eventName":"N","primaryKey":"K"}}}}'
    )


def test_a_uniqueeventid_twice_is_refused_at_every_nesting_depth() -> None:
    """The check for a header key twice parses the frame again with Python's json, and passed
    it ("") on a RecursionError: orjson reads 1,024 levels, Python's json fewer (its recursion
    limit, less the stack in use). A frame with uniqueEventId "A" then "B" was refused shallow,
    but with an unrelated value nested some 950 levels deep beside its payload it became an
    event deduplicated and checkpointed as "B", its text (as received) holding both: SQLite's
    json_extract read "A" from the stored line. Now it is refused at every depth: too deep for
    the check is malformed too."""
    reasons = set()
    for depth in (10, *range(850, 1030)):
        msg = decode(_header_key_twice(depth))
        assert isinstance(msg, DecodeError), (depth, msg)
        reasons.add(msg.reason.split(":")[0])
    assert reasons == {
        "uniqueEventId twice in the metadata object",
        "nested deeper than can be checked for keys twice",
        "invalid JSON",
    }
