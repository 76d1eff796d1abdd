"""graphql-transport-ws as OHIP speaks it: encode client messages, decode server frames.

Pure functions and value types, no I/O. :func:`decode` never raises: anything it cannot turn
into a known message comes back as a :class:`DecodeError` carrying the raw text, so the
caller can dead-letter it and carry on with the stream.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import msgspec
import orjson

from ..errors import InvalidInput
from .events import SELECTION, Event
from .evidence import Evidence, evidence, prefix, shown

SUBPROTOCOL: Final = "graphql-transport-ws"

# Input patterns and lengths from StreamingGraphQLSchema.json (NewEventInput). The offset's
# scalar says 20 characters and its description says 10: accept the larger.
_PATTERNS: Final[dict[str, tuple[re.Pattern[str], int]]] = {
    "chainCode": (re.compile(r"[A-Za-z0-9 _%#$&-]+"), 20),
    "offset": (re.compile(r"[0-9]+"), 20),
    "hotelCode": (re.compile(r"[A-Za-z0-9 _%#$&,-]+"), 50),
}


def key_hash(app_key: str) -> str:
    """Lowercase hex SHA-256 of the raw application key, as the ``key`` URL parameter wants."""
    return hashlib.sha256(app_key.encode()).hexdigest()


def subscription_url(gateway_url: str, app_key: str) -> str:
    """``wss://<gateway>/subscriptions?key=<hash>`` from the portal's gateway URL.

    ``https`` becomes ``wss`` and ``http`` becomes ``ws`` (the latter only for the sandbox).
    The result carries the key hash: never log it.
    """
    parts = urlsplit(gateway_url)
    scheme = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise InvalidInput("gateway URL must be http(s)://host[/path]")
    path = parts.path.rstrip("/")
    path = path.removesuffix("/subscriptions")
    return urlunsplit(
        (scheme, parts.netloc, f"{path}/subscriptions", f"key={key_hash(app_key)}", "")
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscribeInput:
    """The ``newEvent`` input. ``offset`` is replayed inclusively; ``highest`` ignores it."""

    chain_code: str
    offset: str | None = None
    highest: bool = False
    delta: bool = False
    hotel_codes: tuple[str, ...] = ()

    def validate(self) -> None:
        _check("chainCode", self.chain_code)
        if self.offset is not None:
            _check("offset", self.offset)
        if self.hotel_codes:
            _check("hotelCode", ",".join(self.hotel_codes))

    def arguments(self) -> str:
        """The input object literal, written inline as every Oracle example does."""
        self.validate()
        args = [f"chainCode: {json.dumps(self.chain_code)}"]
        if self.highest:
            args.append('offsetType: "highest"')
        elif self.offset is not None:
            args.append(f"offset: {json.dumps(self.offset)}")
        if self.delta:
            args.append("delta: true")
        if self.hotel_codes:
            args.append(f"hotelCode: {json.dumps(','.join(self.hotel_codes))}")
        return "{ " + " ".join(args) + " }"


def _check(name: str, value: str) -> None:
    pattern, max_len = _PATTERNS[name]
    if not value or len(value) > max_len or not pattern.fullmatch(value):
        raise InvalidInput(
            f"{name} {value!r} is invalid: expected 1-{max_len} characters matching "
            f"^{pattern.pattern}$"
        )


# --- encoding -------------------------------------------------------------------------------


def connection_init(token: str, app_key: str) -> str:
    # The raw key goes here; only the URL carries its hash.
    return json.dumps(
        {
            "type": "connection_init",
            "payload": {"Authorization": f"Bearer {token}", "x-app-key": app_key},
        }
    )


def subscribe(subscription_id: str, sub: SubscribeInput) -> str:
    query = f"subscription {{ newEvent(input: {sub.arguments()}) {{ {SELECTION} }} }}"
    return json.dumps(
        {
            "id": subscription_id,
            "type": "subscribe",
            "payload": {
                "variables": {"input": {"chainCode": sub.chain_code}},
                "extensions": {},
                "operationName": None,
                "query": query,
            },
        }
    )


PING: Final = '{"type":"ping"}'
PONG: Final = '{"type":"pong"}'


def complete(subscription_id: str) -> str:
    return json.dumps({"id": subscription_id, "type": "complete"})


# --- decoding -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionAck:
    payload: dict[str, Any] | None


@dataclass(slots=True)  # not frozen: built once per event, and frozen costs 3x to build
class Next:
    id: str
    event: Event


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    id: str
    errors: list[Any]
    text: str = ""  # the start of the frame, for a log line (never show ``errors`` whole)


@dataclass(frozen=True, slots=True)
class Complete:
    id: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class DecodeError:
    """A frame we cannot use: a bounded copy of it (``evidence``) and why."""

    evidence: Evidence
    reason: str

    @property
    def raw(self) -> str:
        """The start of the frame text as received (bytes decoded lossily)."""
        return self.evidence.text


Message = ConnectionAck | Next | ErrorMessage | Complete | Ping | Pong | DecodeError

_PING = Ping()
_PONG = Pong()


def decode(frame: str | bytes, max_size: int | None = None) -> Message:
    """Turn one WebSocket text frame into a message. Never raises.

    A frame longer than ``max_size`` bytes (characters for ``str``) is a DecodeError unread.
    """
    if max_size is not None and len(frame) > max_size:
        return _bad(frame, f"frame of {len(frame)} bytes exceeds max_frame_bytes ({max_size})")
    if type(frame) is bytes:
        fast = _fast_next(frame)
        if fast is not None:
            return fast
    try:
        msg = orjson.loads(frame)  # the hot path: several times faster than json
    except (ValueError, RecursionError) as exc:
        return _bad(frame, f"invalid JSON: {prefix(str(exc))}")
    if type(msg) is dict and msg.get("type") == "next":
        return _decode_next(frame, msg)
    return _decode_other(frame, msg)


# --- the fast path: a well-formed ``next`` frame ------------------------------------------
# Typed decoding builds only the header fields and keeps the newEvent's text as received
# (``msgspec.Raw``): no tree of dicts to build and free, and nothing to re-serialize for the
# sinks that store the event unchanged. Whatever these types do not take (another message
# type, a field of an unexpected type, a frame that is not JSON) goes the general way below,
# which says what is wrong.


class _Metadata(msgspec.Struct):
    offset: str
    uniqueEventId: str


class _NewEvent(msgspec.Struct):
    metadata: _Metadata
    eventName: str | None = None
    moduleName: str | None = None
    primaryKey: str | None = None
    hotelId: str | None = None
    timestamp: str | None = None
    detail: msgspec.Raw = msgspec.Raw(b"null")


class _Data(msgspec.Struct):
    newEvent: msgspec.Raw


class _Payload(msgspec.Struct):
    data: _Data


class _Frame(msgspec.Struct):
    id: str
    type: str
    payload: _Payload


MAX_FAST_BRACKETS: Final = 250  # below the nesting orjson writes back out (254)
_new_tuple: Final = tuple.__new__
_FRAME: Final = msgspec.json.Decoder(_Frame)
_NEW_EVENT: Final = msgspec.json.Decoder(_NewEvent)


def _fast_next(frame: bytes) -> Next | None:
    """The :class:`Next` of a well-formed, compact ``next`` frame, or None: decode it the
    general way. Skipped values are checked for JSON syntax only, so the frame is checked to
    be UTF-8 here; a line break (JSON whitespace, never inside a string) keeps the text from
    being one JSONL line, so such frames take the general way too."""
    # By byte value: memchr. A bytes operand is tried as an int first, and the TypeError
    # raised and cleared on the way costs ten times the search (0.15 against 0.02 µs).
    if 10 in frame or 13 in frame:  # \n, \r
        return None
    # The typed decoder's depth limit follows Python's recursion limit: a frame with few
    # brackets cannot be deep, whatever that limit is. The others (an event with hundreds of
    # detail elements, say) go the general way, whose limits are fixed.
    if frame.count(b"[") + frame.count(b"{") > MAX_FAST_BRACKETS:
        return None
    if not frame.isascii():
        try:
            frame.decode()
        except UnicodeDecodeError:
            return None
    try:
        msg = _FRAME.decode(frame)
        if msg.type != "next":
            return None
        text = msg.payload.data.newEvent
        ev = _NEW_EVENT.decode(text)
    except (msgspec.MsgspecError, RecursionError):
        return None
    meta = ev.metadata
    offset, event_id = meta.offset, meta.uniqueEventId
    detail = bytes(ev.detail)
    if detail == b"null":
        detail = b"[]"
    elif detail[:1] != b"[":
        return None  # off the schema: the general way keeps it as it is
    name, module = ev.eventName or "", ev.moduleName or ""
    key, hotel, timestamp = ev.primaryKey or event_id, ev.hotelId, ev.timestamp
    raw = bytes(text)
    # _short skipped for an event text of at most MAX_FIELD_BYTES bytes: no field in it can be
    # longer (a string's UTF-8 is never longer than its JSON text: an escape is longer than
    # what it stands for).
    if (
        not valid_offset(offset)
        or not event_id
        or (
            len(raw) > MAX_FIELD_BYTES
            and not _short(event_id, name, module, key, hotel=hotel, timestamp=timestamp)
        )
    ):
        return None
    # Every field in Event's order (offset .. timestamp, parsed, frame, resource, fetched,
    # text, detail_text), through tuple.__new__: the NamedTuple's own __new__ is a Python
    # function around the same call (0.43 against 0.17 µs an event).
    fields = (
        offset, event_id, name, module, key, hotel, timestamp, None, b"", None, False, raw, detail
    )  # fmt: skip
    return Next(msg.id, _new_tuple(Event, fields))


def _bad(frame: str | bytes, reason: str) -> DecodeError:
    return DecodeError(evidence(frame), reason)


def _decode_other(frame: str | bytes, msg: object) -> Message:
    if not isinstance(msg, dict):
        return _bad(frame, "frame is not a JSON object")
    kind = msg.get("type")
    if kind == "ping":
        return _PING
    if kind == "pong":
        return _PONG
    if kind == "connection_ack":
        payload = msg.get("payload")
        return ConnectionAck(payload if isinstance(payload, dict) else None)
    if kind == "error":
        errors = msg.get("payload")
        return ErrorMessage(
            _id(msg), errors if isinstance(errors, list) else [errors], prefix(frame, 500)
        )
    if kind == "complete":
        return Complete(_id(msg))
    # Never repr() or str() a value from the wire: a deeply nested one would overflow.
    what = repr(kind[:50]) if isinstance(kind, str) else f"of JSON type {type(kind).__name__}"
    return _bad(frame, f"unknown message type {what}")


def _decode_next(frame: str | bytes, msg: dict[str, Any]) -> Message:
    try:  # the usual, well-formed case first: plain indexing is the cheapest check
        event = event_from_raw(msg["payload"]["data"]["newEvent"])
    except (KeyError, TypeError):
        event = None
    if event is None:
        return _bad(frame, _what_is_wrong(msg))
    return Next(_id(msg), _as_text(event, frame))


class _RawData(msgspec.Struct):
    newEvent: msgspec.Raw


class _RawPayload(msgspec.Struct):
    data: _RawData


class _RawFrame(msgspec.Struct):
    payload: _RawPayload


class _RawDetail(msgspec.Struct):
    detail: msgspec.Raw = msgspec.Raw(b"null")


_RAW_FRAME: Final = msgspec.json.Decoder(_RawFrame)
_RAW_DETAIL: Final = msgspec.json.Decoder(_RawDetail)


def _as_text(event: Event, frame: str | bytes) -> Event:
    """``event`` (parsed) holding its newEvent as JSON text instead: the tree of objects holds
    some 20 times the bytes of the text, and the pipeline counts the text. As received when the
    frame is one line of bytes; written anew otherwise. One that no JSON writer takes (nested
    deeper than orjson writes: no sink can store it) keeps only the frame, for its dead letter.
    """
    ev = event.parsed
    assert ev is not None
    try:
        written = orjson.dumps(ev)  # also the check that the text can be written at all
    except TypeError:
        return event._replace(parsed=None, frame=frame)
    detail = ev.get("detail")
    listed = type(detail) is list
    received = _received(frame, listed)
    if received is not None:
        text, detail_text = received
    else:
        text, detail_text = _exact(written), _exact(orjson.dumps(detail)) if listed else None
    if detail is None:
        detail_text = b"[]"
    return event._replace(parsed=None, text=text, detail_text=detail_text)


def _exact(data: bytes) -> bytes:
    """A copy of ``data`` holding its length only: orjson's output keeps the buffer it grew, 12
    to 30 times its length (measured with tracemalloc, orjson 3.13)."""
    return bytes(memoryview(data))


def _received(frame: str | bytes, listed: bool) -> tuple[bytes, bytes | None] | None:
    """The newEvent's JSON text as received and, when ``listed``, its detail's; None unless
    the frame is one line of bytes (a JSONL line cannot hold a line break)."""
    if type(frame) is not bytes or 10 in frame or 13 in frame:  # \n, \r
        return None
    try:  # orjson wrote it: at most 254 levels deep, well within msgspec's recursion
        text = bytes(_RAW_FRAME.decode(frame).payload.data.newEvent)
        return text, bytes(_RAW_DETAIL.decode(text).detail) if listed else None
    except (msgspec.MsgspecError, RecursionError):
        return None


# Longest text accepted in an event's header fields, in UTF-8 bytes: OHIP's are ids, names and
# timestamps of a few dozen characters. A longer one is an absurd frame, not an event. Bytes,
# not characters: the id and the primary key are index keys in the state store, and 1,024
# characters of CJK text (3 bytes each) were past PostgreSQL's 2,704-byte index entry: every
# commit holding the event failed, and the stream stopped at it for good.
MAX_FIELD_BYTES: Final = 1024
_HEADER_FIELDS: Final = ("eventName", "moduleName", "primaryKey", "hotelId", "timestamp")


def valid_offset(offset: object) -> bool:
    """An offset the subscription input accepts back (``^[0-9]{1,20}$``, ASCII digits)."""
    return type(offset) is str and 0 < len(offset) <= 20 and offset.isascii() and offset.isdigit()


def event_from_raw(ev: Any) -> Event | None:
    """The :class:`Event` of a ``newEvent`` object, or None when it is not a usable event:
    metadata missing or of the wrong type, an offset the subscription would refuse as a resume
    point, or an absurdly long header field. (Once per event: written out flat, it costs less
    than half of a loop over the fields.)"""
    try:
        meta = ev["metadata"]
        offset = meta["offset"]
        event_id = meta["uniqueEventId"]
    except (KeyError, TypeError):
        return None
    if not valid_offset(offset) or type(event_id) is not str or not event_id:
        return None
    get = ev.get
    name, module, key = get("eventName"), get("moduleName"), get("primaryKey")
    hotel, timestamp = get("hotelId"), get("timestamp")
    name = name if type(name) is str else ""
    module = module if type(module) is str else ""
    # Events without a primary key still need a partition: their id keeps them apart.
    key = key if type(key) is str and key else event_id
    hotel = hotel if type(hotel) is str else None
    timestamp = timestamp if type(timestamp) is str else None
    if not _short(event_id, name, module, key, hotel=hotel, timestamp=timestamp):
        return None
    return Event(offset, event_id, name, module, key, hotel, timestamp, ev)


def _short(
    event_id: str, name: str, module: str, key: str, *, hotel: str | None, timestamp: str | None
) -> bool:
    """No header field over MAX_FIELD_BYTES (written out: once per event)."""
    return (
        _fits(event_id)
        and _fits(name)
        and _fits(module)
        and _fits(key)
        and (hotel is None or _fits(hotel))
        and (timestamp is None or _fits(timestamp))
    )


def _fits(text: str) -> bool:
    return len(text) <= MAX_FIELD_BYTES and (text.isascii() or _utf8_len(text) <= MAX_FIELD_BYTES)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _what_is_wrong(msg: dict[str, Any]) -> str:
    """Say precisely what is wrong with a ``next`` frame that is not a usable event."""
    payload = msg.get("payload")
    data = payload.get("data") if isinstance(payload, dict) else None
    ev = data.get("newEvent") if isinstance(data, dict) else None
    if not isinstance(ev, dict):
        return "next frame without payload.data.newEvent object"
    meta = ev.get("metadata")
    if not isinstance(meta, dict):
        return "event without metadata"
    offset = meta.get("offset")
    event_id = meta.get("uniqueEventId")
    if not isinstance(offset, str) or not offset:
        return "event without a string metadata.offset"
    if not valid_offset(offset):
        return (
            f"metadata.offset {shown(offset, 40)!r} is not 1-20 digits: the subscription "
            "could never resume from it"
        )
    if not isinstance(event_id, str) or not event_id:
        return "event without a string metadata.uniqueEventId"
    fields = [("metadata.uniqueEventId", event_id), *((f, ev.get(f)) for f in _HEADER_FIELDS)]
    for name, value in fields:
        if isinstance(value, str) and not _fits(value):
            return f"{name} is {_utf8_len(value)} bytes long in UTF-8 (at most {MAX_FIELD_BYTES})"
    return "unusable next frame"


def _id(msg: dict[str, Any]) -> str:
    """The message id as text; anything but a string (never ours) becomes ""."""
    value = msg.get("id")
    return value if isinstance(value, str) else ""
