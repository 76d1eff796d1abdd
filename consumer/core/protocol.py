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

import orjson

from .events import SELECTION, Event

SUBPROTOCOL: Final = "graphql-transport-ws"

# Input patterns and lengths from StreamingGraphQLSchema.json (NewEventInput). The offset's
# scalar says 20 characters and its description says 10: accept the larger.
_PATTERNS: Final[dict[str, tuple[re.Pattern[str], int]]] = {
    "chainCode": (re.compile(r"[A-Za-z0-9 _%#$&-]+"), 20),
    "offset": (re.compile(r"[0-9]+"), 20),
    "hotelCode": (re.compile(r"[A-Za-z0-9 _%#$&,-]+"), 50),
}


class InvalidInput(ValueError):
    """A subscription argument does not match the schema; the message names the field."""


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
        raise InvalidInput(f"gateway URL must be http(s)://host[/path], got {gateway_url!r}")
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


@dataclass(frozen=True, slots=True)
class Next:
    id: str
    event: Event


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    id: str
    errors: list[Any]


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
    """A frame we cannot use. ``raw`` is the frame text as received (bytes decoded lossily)."""

    raw: str
    reason: str


Message = ConnectionAck | Next | ErrorMessage | Complete | Ping | Pong | DecodeError

_PING = Ping()
_PONG = Pong()


def decode(frame: str | bytes, max_size: int | None = None) -> Message:
    """Turn one WebSocket text frame into a message. Never raises.

    A frame longer than ``max_size`` bytes (characters for ``str``) is a DecodeError unread.
    """
    if max_size is not None and len(frame) > max_size:
        return DecodeError(
            _text_of(frame), f"frame of {len(frame)} bytes exceeds max_frame_bytes ({max_size})"
        )
    try:
        msg = orjson.loads(frame)  # the hot path: several times faster than json
    except (ValueError, RecursionError) as exc:
        return DecodeError(_text_of(frame), f"invalid JSON: {exc}")
    if type(msg) is dict and msg.get("type") == "next":
        return _decode_next(frame, msg)
    return _decode_other(frame, msg)


def _text_of(frame: str | bytes) -> str:
    return frame if isinstance(frame, str) else frame.decode("utf-8", "replace")


def _decode_other(frame: str | bytes, msg: object) -> Message:
    raw = _text_of(frame)
    if not isinstance(msg, dict):
        return DecodeError(raw, "frame is not a JSON object")
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
        return ErrorMessage(_id(msg), errors if isinstance(errors, list) else [errors])
    if kind == "complete":
        return Complete(_id(msg))
    # Never repr() or str() a value from the wire: a deeply nested one would overflow.
    shown = repr(kind[:50]) if isinstance(kind, str) else f"of JSON type {type(kind).__name__}"
    return DecodeError(raw, f"unknown message type {shown}")


def _decode_next(frame: str | bytes, msg: dict[str, Any]) -> Message:
    try:  # the usual, well-formed case first: plain indexing is the cheapest check
        event = event_from_raw(msg["payload"]["data"]["newEvent"])
    except (KeyError, TypeError):
        event = None
    if event is None:
        return _malformed_next(frame, msg)
    return Next(_id(msg), event)


def event_from_raw(ev: Any) -> Event | None:
    """The :class:`Event` of a ``newEvent`` object, or None when it lacks usable metadata."""
    try:
        meta = ev["metadata"]
        offset = meta["offset"]
        event_id = meta["uniqueEventId"]
    except (KeyError, TypeError):
        return None
    if type(offset) is not str or type(event_id) is not str or not offset or not event_id:
        return None
    primary_key = ev.get("primaryKey")
    hotel_id = ev.get("hotelId")
    timestamp = ev.get("timestamp")
    return Event(
        offset=offset,
        unique_event_id=event_id,
        event_name=_text(ev.get("eventName")),
        module_name=_text(ev.get("moduleName")),
        # Events without a primary key still need a partition: their id keeps them apart.
        primary_key=primary_key if type(primary_key) is str and primary_key else event_id,
        hotel_id=hotel_id if type(hotel_id) is str else None,
        timestamp=timestamp if type(timestamp) is str else None,
        raw=ev,
    )


def _malformed_next(frame: str | bytes, msg: dict[str, Any]) -> DecodeError:
    """Say precisely what is wrong with a ``next`` frame that is not a usable event."""
    payload = msg.get("payload")
    data = payload.get("data") if isinstance(payload, dict) else None
    ev = data.get("newEvent") if isinstance(data, dict) else None
    if not isinstance(ev, dict):
        return DecodeError(_text_of(frame), "next frame without payload.data.newEvent object")
    meta = ev.get("metadata")
    if not isinstance(meta, dict):
        return DecodeError(_text_of(frame), "event without metadata")
    offset = meta.get("offset")
    event_id = meta.get("uniqueEventId")
    if not isinstance(offset, str) or not offset:
        return DecodeError(_text_of(frame), "event without a string metadata.offset")
    if not isinstance(event_id, str) or not event_id:
        return DecodeError(_text_of(frame), "event without a string metadata.uniqueEventId")
    return DecodeError(_text_of(frame), "unusable next frame")


def _id(msg: dict[str, Any]) -> str:
    """The message id as text; a container (never ours) becomes "" rather than str() of it."""
    value = msg.get("id")
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, int) else ""


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
