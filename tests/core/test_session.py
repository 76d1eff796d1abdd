"""The sans-I/O graphql-transport-ws client session: bytes in, outcomes out (issue #10).

As websockets tests its protocol: no socket, the frames a gateway would send are fed to
``receive`` and what the session asks to send is compared byte for byte."""

from __future__ import annotations

import gc
import hashlib
import json
import tracemalloc
from itertools import count

import pytest

from consumer.core.protocol import DecodeError, Next, SubscribeInput
from consumer.core.session import (
    CONNECTION_QUERY,
    Acknowledged,
    ClientSession,
    ConnectionStatus,
    Ended,
    Ignored,
    PongReceived,
    Reply,
    SessionError,
    SessionState,
)
from consumer.logs import Redactor

EVENT = {"metadata": {"offset": "10", "uniqueEventId": "u10"}, "primaryKey": "pk"}


def ids() -> ClientSession:
    n = count(1)
    return ClientSession(max_frame_bytes=1 << 20, new_id=lambda: f"id-{next(n)}")


def next_frame(sub_id: object, event: object = EVENT) -> bytes:
    return json.dumps(
        {"id": sub_id, "type": "next", "payload": {"data": {"newEvent": event}}}
    ).encode()


def subscribed() -> ClientSession:
    s = ids()
    s.connection_init("tok", "key")
    assert s.receive(b'{"type":"connection_ack"}') == Acknowledged()
    s.subscribe(SubscribeInput(chain_code="CH", offset="10"))
    return s


def test_handshake_then_subscribe_bytes() -> None:
    s = ids()
    init = json.loads(s.connection_init("tok", "raw-key"))
    assert init == {
        "type": "connection_init",
        "payload": {"Authorization": "Bearer tok", "x-app-key": "raw-key"},
    }
    assert s.state is SessionState.INITIALIZING
    assert s.receive(b'{"type":"ping"}') == Reply('{"type":"pong"}')
    assert s.receive(b'{"type":"connection_ack","payload":{}}') == Acknowledged()
    assert s.state is SessionState.READY
    sub = json.loads(s.subscribe(SubscribeInput(chain_code="CH", offset="10")))
    assert sub["id"] == "id-1" and sub["type"] == "subscribe"
    assert 'offset: "10"' in sub["payload"]["query"]
    assert s.state is SessionState.SUBSCRIBED and s.subscription_id == "id-1"


def test_our_events_are_delivered_others_ignored() -> None:
    s = subscribed()
    out = s.receive(next_frame("id-1"))
    assert isinstance(out, Next) and out.event.unique_event_id == "u10"
    assert s.receive(next_frame("someone-else")) == Ignored("next", "someone-else")
    assert s.receive(next_frame(7)) == Ignored("next", "")


def test_error_or_complete_for_another_id_never_ends_our_session() -> None:
    s = subscribed()
    assert s.receive(b'{"id":"x","type":"complete"}') == Ignored("complete", "x")
    assert s.receive(b'{"id":"x","type":"error","payload":[]}') == Ignored("error", "x")
    assert s.state is SessionState.SUBSCRIBED


def test_a_deeply_nested_error_for_us_ends_the_session_bounded() -> None:
    s = subscribed()
    frame = '{"id":"id-1","type":"error","payload":' + "[" * 1000 + "]" * 1000 + "}"
    out = s.receive(frame.encode())
    assert isinstance(out, Ended) and len(out.reason) <= 500
    assert s.state is SessionState.ENDED


def test_complete_is_sent_once_and_in_flight_events_still_count() -> None:
    s = subscribed()
    assert json.loads(s.complete() or "") == {"id": "id-1", "type": "complete"}
    assert s.complete() is None
    assert isinstance(s.receive(next_frame("id-1")), Next)
    assert s.receive(b'{"id":"id-1","type":"complete"}') == Ended("complete")


def test_malformed_frames_come_out_as_decode_errors() -> None:
    s = subscribed()
    out = s.receive(b"\xff\xfe not json")
    assert isinstance(out, DecodeError) and out.evidence.size == 11
    bad_offset = next_frame("id-1", {"metadata": {"offset": "abc", "uniqueEventId": "u"}})
    out = s.receive(bad_offset)
    assert isinstance(out, DecodeError) and "1-20 digits" in out.reason


def test_pong_and_stray_ack() -> None:
    s = subscribed()
    assert s.receive(b'{"type":"pong"}') == PongReceived()
    assert s.receive(b'{"type":"connection_ack"}') == Ignored("connection_ack", "")


def test_connection_query_answered_active_or_inactive() -> None:
    s = ids()
    s.connection_init("tok", "key")
    s.receive(b'{"type":"connection_ack"}')
    q = json.loads(s.query_connection())
    assert q == {"id": "id-1", "type": "subscribe", "payload": {"query": CONNECTION_QUERY}}
    answer = {
        "id": "id-1",
        "type": "next",
        "payload": {"data": {"connection": {"id": "c9", "status": "Active"}}},
    }
    assert s.receive(json.dumps(answer).encode()) == ConnectionStatus("Active", "c9")
    s.query_connection()
    out = s.receive(b'{"id":"id-2","type":"error","payload":[{"message":"no"}]}')
    assert isinstance(out, ConnectionStatus) and out.status is None and "no" in out.problem
    # Still free to subscribe afterwards.
    s.subscribe(SubscribeInput(chain_code="CH"))
    assert s.subscription_id == "id-3"


def test_a_query_answer_without_status_is_a_problem_not_a_crash() -> None:
    s = ids()
    s.connection_init("tok", "key")
    s.receive(b'{"type":"connection_ack"}')
    s.query_connection()
    deep = '{"id":"id-1","type":"next","payload":{"data":' + "[" * 900 + "]" * 900 + "}}"
    out = s.receive(deep.encode())
    assert isinstance(out, ConnectionStatus) and out.status is None
    assert len(out.problem) < 300


@pytest.mark.parametrize("bad_id", [["id-1"], {"id": "id-1"}, 1, None, True, 1.5])
def test_a_next_with_an_id_of_another_json_type_while_a_query_waits(bad_id: object) -> None:
    """receive never raises: a list or an object is not hashable, so it must not reach the
    lookup of our queries' ids. The frame is malformed; the query is still answered."""
    s = ids()
    s.connection_init("tok", "key")
    s.receive(b'{"type":"connection_ack"}')
    s.query_connection()
    out = s.receive(next_frame(bad_id, {"connection": {"status": "Active"}}))
    assert isinstance(out, DecodeError)
    answer = {"id": "id-1", "type": "next", "payload": {"data": {"connection": {"status": "X"}}}}
    assert s.receive(json.dumps(answer).encode()) == ConnectionStatus("X", None)


@pytest.mark.parametrize(
    ("max_frame_bytes", "values"),
    [(1 << 20, 1_000_000), (16 << 20, 1_000_000)],
    ids=["over-max-frame-bytes", "too-many-values"],
)
def test_a_frame_refused_unread_is_not_parsed_for_a_query_that_waits(
    max_frame_bytes: int, values: int
) -> None:
    """A frame decode refuses unread (over max_frame_bytes, or holding more values than the
    structure budget lets it parse) was parsed whole all the same while a query waited, in
    case it was the query's answer (orjson's tree of it: some 25 times the frame), and an
    oversized frame answered the query. It stays a malformed frame; the query waits."""
    s = ClientSession(max_frame_bytes=max_frame_bytes, new_id=lambda: "id-1")
    s.connection_init("tok", "key")
    s.receive(b'{"type":"connection_ack"}')
    s.query_connection()
    frame = (
        b'{"id":"id-1","type":"next","payload":{"data":{"connection":{"status":"Active"},'
        b'"x":[' + b"[]," * (values - 1) + b"[]]}}}"
    )
    gc.collect()
    tracemalloc.start()
    try:
        out = s.receive(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(out, DecodeError) and out.unread, out
    assert peak <= len(frame), f"{peak} bytes allocated for a {len(frame)}-byte frame"
    answer = {"id": "id-1", "type": "next", "payload": {"data": {"connection": {"status": "X"}}}}
    assert s.receive(json.dumps(answer).encode()) == ConnectionStatus("X", None)


def test_out_of_order_calls_are_our_bugs() -> None:
    s = ids()
    with pytest.raises(SessionError):
        s.subscribe(SubscribeInput(chain_code="CH"))
    s.connection_init("t", "k")
    with pytest.raises(SessionError):
        s.connection_init("t", "k")


# --- secrets a gateway echoes: masked before any cut ------------------------------------------

KEY = "ak-" + "0123456789abcdef" * 4  # an app key, 67 characters


def masking(key: str = KEY) -> ClientSession:
    redactor = Redactor()
    redactor.add(key)
    n = count(1)
    s = ClientSession(max_frame_bytes=1 << 20, new_id=lambda: f"id-{next(n)}", scrub=redactor.scrub)
    s.connection_init("tok", key)
    assert s.receive(b'{"type":"connection_ack"}') == Acknowledged()
    return s


def straddling(before: bytes, cut: int, after: bytes = b'"}]}') -> bytes:
    """``before``, padding, then the key across character ``cut`` of the frame."""
    pad = b"x" * (cut - len(before) - 20)
    return before + pad + KEY.encode() + after


def leaked(text: str) -> bool:
    """Whether some 6 characters of the key (past its "ak-") show in ``text``."""
    return any(KEY[i : i + 6] in text for i in range(3, len(KEY) - 5))


def test_an_error_that_ends_the_session_is_masked_before_it_is_cut() -> None:
    """Its first 500 characters go to the log line, STATUS= and /readyz: masked there after
    the cut, a key across it left its first characters."""
    s = masking()
    s.subscribe(SubscribeInput(chain_code="CH"))
    out = s.receive(straddling(b'{"id":"id-1","type":"error","payload":[{"message":"', 500))
    assert isinstance(out, Ended) and len(out.reason) <= 500
    assert not leaked(out.reason) and "***" in out.reason


def test_ids_and_query_problems_are_masked_before_they_are_cut() -> None:
    s = masking()
    frame = straddling(b'{"id":"', 64, b'","type":"complete"}')
    out = s.receive(frame)
    assert isinstance(out, Ignored) and not leaked(out.id) and "***" in out.id
    query_id = json.loads(s.query_connection())["id"]
    answer = {"data": {"connection": {"id": "c" * 80 + KEY, "status": "s" * 30 + KEY}}}
    out = s.receive(
        next_frame(query_id, None).replace(
            b'{"data": {"newEvent": null}}', json.dumps(answer).encode()
        )
    )
    assert isinstance(out, ConnectionStatus)
    assert out.status is not None and out.connection_id is not None
    assert not leaked(out.status) and not leaked(out.connection_id)
    query_id = json.loads(s.query_connection())["id"]
    frame = straddling(b'{"id":"' + query_id.encode() + b'","type":"error","payload":[{"m":"', 190)
    out = s.receive(frame)
    assert isinstance(out, ConnectionStatus) and not leaked(out.problem)
    query_id = json.loads(s.query_connection())["id"]
    no_status = {"data": {"connection": {"note": "n" * 170 + KEY}}}
    out = s.receive(
        next_frame(query_id, None).replace(
            b'{"data": {"newEvent": null}}', json.dumps(no_status).encode()
        )
    )
    assert isinstance(out, ConnectionStatus) and out.status is None
    assert not leaked(out.problem) and "***" in out.problem


def test_a_malformed_frame_is_masked_whole_in_its_dead_letter() -> None:
    """The frame's copy goes to the DLQ (the first 64 KiB): a gateway's error that echoes the
    key, say subscriptions-transport-ws' connection_error. Its size and SHA-256 are still the
    frame's as received: a repeat of it counts as one more attempt."""
    s = masking()
    for frame in (
        json.dumps({"type": "connection_error", "payload": {"message": f"bad key {KEY}"}}).encode(),
        straddling(b'{"type":"connection_error","payload":"', 65536, b'"}'),
    ):
        out = s.receive(frame)
        assert isinstance(out, DecodeError)
        assert not leaked(out.evidence.text) and "***" in out.evidence.text
        assert out.evidence.size == len(frame)
        assert out.evidence.sha256 == hashlib.sha256(frame).hexdigest()
    for reasoned in (  # the reason quotes a wire value: cut too (50, 40 characters)
        straddling(b'{"type":"', 50, b'"}'),
        next_frame("id-9", {"metadata": {"offset": "o" * 20 + KEY, "uniqueEventId": "u"}}),
    ):
        out = s.receive(reasoned)
        assert isinstance(out, DecodeError) and not leaked(out.reason)
