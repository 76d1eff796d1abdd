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
from typing import Any, Final, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import msgspec
import orjson
from msgspec import UNSET, UnsetType

from ..errors import InvalidInput
from .events import SELECTION, Event
from .evidence import SHOWN_LIMIT, Evidence, Scrub, evidence, masked, quoted

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


def connection_init(token: str, app_key: str, enterprise_id: str | None = None) -> str:
    # The raw key goes here; only the URL carries its hash. enterpriseId: as Oracle's sample
    # sends it (whether OHIP reads it is unconfirmed; Oracle's GraphiQL tool does not).
    payload = {"Authorization": f"Bearer {token}", "x-app-key": app_key}
    if enterprise_id is not None:
        payload["enterpriseId"] = enterprise_id
    return json.dumps({"type": "connection_init", "payload": payload})


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
    # Refused before any parse (too large, or too many values): nothing may parse it later.
    unread: bool = False

    @property
    def raw(self) -> str:
        """The start of the frame text as received (bytes decoded lossily)."""
        return self.evidence.text


Message = ConnectionAck | Next | ErrorMessage | Complete | Ping | Pong | DecodeError

_PING = Ping()
_PONG = Pong()


def decode(frame: str | bytes, max_size: int | None = None, scrub: Scrub | None = None) -> Message:
    """Turn one WebSocket text frame into a message. Never raises.

    A frame longer than ``max_size`` bytes (characters for ``str``), or holding more values
    than :func:`marks_budget` lets one be parsed with, is a DecodeError unread.
    What a message keeps of the frame's text (a DecodeError's evidence and reason, an
    ErrorMessage's text) is masked by ``scrub`` (the log redactor's) before it is cut: a
    gateway may echo the app key or the token.
    """
    if max_size is not None and len(frame) > max_size:
        what = f"frame of {len(frame)} bytes exceeds max_frame_bytes ({max_size})"
        return _bad(frame, what, scrub, unread=True)
    # A frame no longer than any budget cannot hold more marks than bytes: not counted (the
    # usual event, a few KB, costs this length check).
    if len(frame) > MIN_MARKS_BUDGET and len(frame) > (budget := marks_budget(max_size)):
        marks = _marks(frame, budget)
        if marks > budget:
            what = (
                f"frame of {len(frame)} bytes holds over {budget} JSON values (their marks "
                f'"[", "{{", "," and ":", at most one per {_BYTES_PER_MARK} bytes of '
                "max_frame_bytes): too many to parse in bounded memory"
            )
            return _bad(frame, what, scrub, unread=True)
    encoded = None
    if type(frame) is bytes:
        fast = _fast_next(frame)
        if type(fast) is Next:
            return fast
        encoded = fast if isinstance(fast, bytes) else None
    try:
        # The hot path: several times faster than json. In a list that _decode_next empties,
        # so that no frame here holds the tree while it parses the frame again.
        tree = [orjson.loads(frame)]
    except (ValueError, RecursionError) as exc:
        return _bad(frame, f"invalid JSON: {masked(str(exc), SHOWN_LIMIT, scrub)}", scrub)
    if type(tree[0]) is dict and tree[0].get("type") == "next":
        return _decode_next(frame, tree, scrub, encoded)
    return _decode_other(frame, tree[0], scrub)


# --- the structure budget: how many values a frame may hold ---------------------------------
# Parsed, a frame's values cost far more than its text: `[],` is 3 bytes of it and a 56-byte
# list plus its 8-byte slot, `{"a":0},` a 184-byte dict. A frame under max_frame_bytes made of
# millions of them took 470-880 MB to decode (the typed structs, orjson's tree, Python json's
# pairs, a split's pieces): one gateway frame, replayed at every resume, had the daemon killed
# for good. So before any parse its values are bounded through the marks that open them: every
# value but the frame's own object follows a "[", "," or ":" (a string too, key or value: no
# quote needs counting) and every object adds its "{" (a dict is the largest value). Counted in
# the whole text, strings included, the count is an upper bound; a frame no longer than the
# budget holds no more marks than bytes and is not counted (an OHIP event, a few KB, costs a
# length check). OHIP's events take one mark per 9-11 bytes (a detail element of its eight
# fields, some 150 bytes, 17): at the default 16 MiB, 2**19 marks let an event of about 5 MB
# through (some 30,000 detail elements; OHIP's hold a few, large ones thousands) and keep what
# decoding any frame takes to some 5 times the limit (84 MB measured for the worst shape found:
# a 16 MiB frame of 29-character strings, parsed by orjson, by Python json for a key twice,
# then copied).
_MARKS: Final = b",:[{"
_BYTES_PER_MARK: Final = 32
MIN_MARKS_BUDGET: Final = 1 << 19  # what the default max_frame_bytes (16 MiB) allows
_PIECE: Final = 1 << 16


def marks_budget(max_size: int | None) -> int:
    """How many value marks ("[", "{", "," and ":") a frame may hold under ``max_size`` (None:
    no size limit, the default's budget): one per 32 bytes of it, at least 2**19."""
    if max_size is None:
        return MIN_MARKS_BUDGET
    return max(MIN_MARKS_BUDGET, max_size // _BYTES_PER_MARK)


def _marks(frame: str | bytes, budget: int) -> int:
    """The marks in ``frame``, counted until past ``budget``: 64 KiB at a time, as the bytes a
    translate deletes (a third of the time of four counts: 0.6 ms a megabyte)."""
    if isinstance(frame, str):
        return sum(frame.count(mark) for mark in _MARKS.decode())
    total = 0
    for at in range(0, len(frame), _PIECE):
        piece = frame[at : at + _PIECE]
        total += len(piece) - len(piece.translate(None, _MARKS))
        if total > budget:
            break
    return total


# --- the fast path: a ``next`` frame exactly as OHIP writes it ------------------------------
# Typed decoding of every field OHIP sends (the subscription's selection, all strings), then
# the frame is compared with what an encoder writes of what was decoded: equal, it holds
# nothing the types did not see. No key twice (the stored text would keep both, and readers
# disagree on which counts), no number (msgspec skips numbers unchecked: 1e400 passed, which
# orjson refuses), no whitespace or line break (a JSONL line), no nesting past the types
# (the depth limit of skipped values follows Python's recursion limit), valid UTF-8 (checked
# in every string; outside them only JSON syntax). The newEvent's text is then the frame's as
# received, sliced from it: no tree of dicts to build and free, nothing to re-serialize.
# Anything else (another message, another key order, escapes written otherwise, a field left
# out or added) goes the general way below, which says what is wrong or keeps what is right.


_Text: TypeAlias = str | UnsetType | None  # UNSET: the key is absent (it stays so encoded)


class _Detail(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    elementName: _Text = UNSET
    elementType: _Text = UNSET
    elementSequence: _Text = UNSET
    elementRole: _Text = UNSET
    newValue: _Text = UNSET
    oldValue: _Text = UNSET
    scopeFrom: _Text = UNSET
    scopeTo: _Text = UNSET


class _Metadata(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    offset: str
    uniqueEventId: str


class _NewEvent(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    # SELECTION's order, which GraphQL keeps in its answer.
    metadata: _Metadata
    moduleName: _Text = UNSET
    eventName: _Text = UNSET
    primaryKey: _Text = UNSET
    timestamp: _Text = UNSET
    hotelId: _Text = UNSET
    publisherId: _Text = UNSET
    actionInstanceId: _Text = UNSET
    detail: list[_Detail | None] | UnsetType | None = UNSET


class _Data(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    newEvent: _NewEvent


class _Payload(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    data: _Data


class _Frame(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    id: str
    type: str
    payload: _Payload


_new_tuple: Final = tuple.__new__
_FRAME: Final = msgspec.json.Decoder(_Frame)
_encode: Final = msgspec.json.Encoder().encode


def _fast_next(frame: bytes) -> Next | bytes | None:
    """The :class:`Next` of a ``next`` frame written exactly as its fields encode, else what
    its fields encode to when they are typed (the general way then knows it holds no number)
    or None: decode it the general way."""
    try:
        msg = _FRAME.decode(frame)
    except msgspec.MsgspecError:
        return None
    if msg.type != "next":
        return None
    encoded = _encode(msg)
    sub_id, ev = msg.id, msg.payload.data.newEvent
    meta, listed = ev.metadata, bool(ev.detail)
    offset, event_id = meta.offset, meta.uniqueEventId
    name, module = ev.eventName or "", ev.moduleName or ""
    key = ev.primaryKey or event_id
    hotel = None if ev.hotelId is UNSET else ev.hotelId
    timestamp = None if ev.timestamp is UNSET else ev.timestamp
    del msg, ev, meta  # the typed tree: freed before the text is copied out of the frame
    if encoded == frame:
        del encoded
        # The newEvent's text runs from its key (the first: an earlier one would be inside
        # the id, a string, where a quote is escaped) to the frame's last three braces; its
        # detail's (absent, null or [] is "[]") from the last key, which no string holds.
        raw = frame[frame.find(b'"newEvent":') + 11 : -3]
        detail_text = raw[raw.find(b',"detail":[') + 10 : -1] if listed else b"[]"
    elif len(encoded) == len(frame):
        del encoded
        # As short as its encoding, so the same keys once each, no space, no longer escape
        # (each adds bytes): only their order differs. Sliced where msgspec finds them.
        received = _received(frame, listed)
        if received is None:
            return None
        raw, detail_text = received[0], received[1] or b"[]"
    else:
        return encoded
    # _short skipped for an event text of at most MAX_FIELD_BYTES bytes: no field in it can be
    # longer (a string's UTF-8 is never longer than its JSON text: an escape is longer than
    # what it stands for).
    if (
        not (len(offset) <= 20 and offset.isdigit() and offset.isascii())  # valid_offset
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
        offset, event_id, name, module, key, hotel, timestamp, None, b"", None, False, raw,
        detail_text,
    )  # fmt: skip
    return Next(sub_id, _new_tuple(Event, fields))


def _bad(
    frame: str | bytes, reason: str, scrub: Scrub | None, *, unread: bool = False
) -> DecodeError:
    return DecodeError(evidence(frame, scrub=scrub), reason, unread)


def _decode_other(frame: str | bytes, msg: object, scrub: Scrub | None) -> Message:
    if not isinstance(msg, dict):
        return _bad(frame, "frame is not a JSON object", scrub)
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
            _id(msg), errors if isinstance(errors, list) else [errors], masked(frame, 500, scrub)
        )
    if kind == "complete":
        return Complete(_id(msg))
    # Never repr() or str() a value from the wire: a deeply nested one would overflow.
    if isinstance(kind, str):
        what = quoted(kind, 50, scrub)
    else:
        what = f"of JSON type {type(kind).__name__}"
    return _bad(frame, f"unknown message type {what}", scrub)


def _decode_next(
    frame: str | bytes, tree: list[Any], scrub: Scrub | None, encoded: bytes | None
) -> Message:
    """``tree``: the frame parsed, alone in a list this empties (so that only this function
    holds it, and can free it)."""
    msg: dict[str, Any] = tree.pop()
    event = _event_of(msg)
    if event is None:
        return _bad(frame, _what_is_wrong(msg, scrub), scrub)
    data = frame if isinstance(frame, bytes) else frame.encode("utf-8", "surrogatepass")
    # Known to hold no key twice: its text may be kept as received. Else it is kept only if it
    # holds as many keys as its object written anew (_texts): a key twice in a detail element
    # or any other object, which the text must not keep twice (SQLite's json_extract reads the
    # first, orjson and PostgreSQL the last). A header key twice is refused here.
    once = False
    if encoded is None:
        problem = _long_number(data)
        check = not problem
    elif 92 in data:
        problem, check = "", True  # typed by the fast way: strings, so no number
    elif _unspaced(data) != _unspaced(encoded):
        # No escape: a key twice is all that makes it longer than its encoding, spaces out.
        problem, check = "", True
    else:
        problem, check, once = "", False, True
    if check and _maybe_repeated(data):
        # Parsed again pair by pair: orjson's tree is freed first, then parsed anew (the same
        # event) when the pairs are freed, so that the two trees are never held at once.
        del msg, event
        problem = _repeated_key(data)
        if not problem:
            msg = orjson.loads(frame)
            event = _event_of(msg)
            assert event is not None  # as it was the first time
    if problem:
        return _bad(frame, problem, scrub)
    sub_id, ev = _id(msg), event.parsed
    assert ev is not None
    try:
        written = orjson.dumps(ev)  # also the check that the text can be written at all
    except TypeError:  # nested deeper than orjson writes: no sink can store it
        return Next(sub_id, event._replace(parsed=None, frame=frame))  # kept for its dead letter
    detail = ev.get("detail")
    listed, null = type(detail) is list, detail is None
    head = event[:7]  # offset .. timestamp: all but the tree
    del msg, ev, detail, event  # the tree: freed before the texts are copied
    text, detail_text = _texts(frame, once, written, listed=listed, null=null)
    return Next(sub_id, Event(*head, None, text=text, detail_text=detail_text))


def _event_of(msg: dict[str, Any]) -> Event | None:
    try:  # the usual, well-formed case first: plain indexing is the cheapest check
        return event_from_raw(msg["payload"]["data"]["newEvent"])
    except (KeyError, TypeError):
        return None


def _unspaced(text: bytes) -> int:
    """The length of ``text`` without JSON's whitespace (and the strings' spaces with it)."""
    return len(text.translate(None, b" \t\n\r"))


# A number no double holds as written: 20 digits in a row (an integer past 64 bits, a fraction
# past a double's 17 digits) or a 3-digit exponent (1e400 is none, 1e-400 is 0.0). orjson
# refuses some (the frame is malformed) and rewrites others (a float for a big integer, 0.0),
# a text kept as received would keep them (PostgreSQL refuses 1e-16384 in jsonb, failing every
# commit holding it), and the fast way takes no number at all. No OHIP field is a number: such
# an event is refused, one answer however its frame was written. Looked for in the frame with
# its digits as 0, E as e and - as +: bytes operations (a regex over the frame took 40 µs).
_DIGIT_CLASSES: Final = bytes.maketrans(b"0123456789E-", b"0000000000e+")
_LONG_NUMBERS: Final = (b"0" * 20, b"0e000", b"0e+000")  # JSON's e comes after a digit


def _long_number(frame: bytes) -> str:
    """Why ``frame`` (valid JSON) is refused for one of its numbers, or ""."""
    classes = frame.translate(_DIGIT_CLASSES)
    found = [p for p in _LONG_NUMBERS if p in classes]
    if not found:
        return ""
    if 92 in frame:  # \: escapes out (inside strings only), then every quote is a string's
        frame = frame.replace(b"\\\\", b"").replace(b'\\"', b"")
        classes = frame.translate(_DIGIT_CLASSES)
    if not any(_outside_strings(frame, classes, p) for p in found):
        return ""
    return "a number with 20 digits in a row or a 3-digit exponent: no double holds it"


def _outside_strings(frame: bytes, classes: bytes, pattern: bytes) -> bool:
    """Whether ``pattern`` is in ``classes`` (``frame`` translated) outside the strings of
    ``frame``, JSON without a backslash: an even number of quotes before it. Each string it is
    in is skipped whole, and quotes counted once (linear, whatever the frame; no piece of it
    made: a split made an object per quote)."""
    at, counted, quotes = classes.find(pattern), 0, 0
    while at >= 0:
        quotes += frame.count(b'"', counted, at)
        if quotes % 2 == 0:
            return True
        counted = frame.find(b'"', at) + 1  # past the string's end
        quotes += 1
        at = classes.find(pattern, counted)
    return False


# The keys of the objects that say what an event is. Twice in one of them, the readers of the
# stored text disagree on which counts (SQLite's json_extract takes the first, orjson and
# PostgreSQL the last): the event would be deduplicated, checkpointed and partitioned by one
# and stored as both. Written otherwise, one has an escaped letter: \u0041 to \u007a.
_HEADER_KEYS: Final = frozenset(
    {"id", "type", "payload", "data", "newEvent", "metadata", "offset", "uniqueEventId"}
    | {"moduleName", "eventName", "primaryKey", "timestamp", "hotelId", "publisherId"}
    | {"actionInstanceId", "detail"}
)
_ESCAPED_LETTERS: Final = (b"\\u004", b"\\u005", b"\\u006", b"\\u007")
_HEADER_KEY: Final = re.compile(rb'"(' + "|".join(sorted(_HEADER_KEYS)).encode() + rb')"')


def _maybe_repeated(frame: bytes) -> bool:
    """Whether ``frame`` may hold one of those keys twice in one of the objects that say what
    the event is: one of those names is twice in it (as a key or a string anywhere) or a letter
    is escaped. Only then is it parsed again (:func:`_repeated_key`)."""
    seen: set[bytes] = set()
    for name in _HEADER_KEY.finditer(frame):  # stops at the first seen again: bounded memory
        if name[1] in seen:
            return True
        seen.add(name[1])
    return any(e in frame for e in _ESCAPED_LETTERS)


def _repeated_key(frame: bytes) -> str:
    """Why ``frame`` (valid JSON) is refused for one of those keys found twice in the frame's
    object, its payload, data, newEvent or metadata, or "". Parsed again, pair by pair."""
    try:
        obj: Any = json.loads(frame, object_pairs_hook=tuple)  # objects as (key, value) pairs
    except RecursionError:
        # orjson (1,024 levels) and msgspec read deeper than Python's json: passed unchecked,
        # uniqueEventId twice was deduplicated by the last and stored with both.
        return "nested deeper than can be checked for keys twice"
    except ValueError:  # orjson took it: never seen, but never passed unchecked either
        return "not read by the check for keys twice"
    for where in ("frame", "payload", "data", "newEvent", "metadata"):
        if where != "frame":
            obj = dict(obj).get(where)  # no key twice in the parent: checked
        if type(obj) is not tuple:
            return ""
        keys = [key for key, _ in obj if key in _HEADER_KEYS]
        if len(set(keys)) != len(keys):
            twice = next(k for i, k in enumerate(keys) if k in keys[:i])
            return f"{twice} twice in the {where} object: readers disagree on which counts"
    return ""


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


def _texts(
    frame: str | bytes, once: bool, written: bytes, *, listed: bool, null: bool
) -> tuple[bytes, bytes | None]:
    """An event's newEvent as JSON text and its detail's, which it holds instead of the tree of
    objects (some 20 times the bytes of the text; the pipeline counts the text). ``written``:
    orjson's text of that tree, whose ``detail`` is a list (``listed``), null or absent
    (``null``). As received when the frame is one line of bytes and holds no key twice
    (``once``: known; else its text holds as many keys as written anew); written anew
    otherwise (the last of a key twice, as the pipeline reads it)."""
    received = _received(frame, listed)
    if received is not None and not once and _keys_twice(received[0], written):
        received = None
    if received is not None:
        text, detail_text = received
    else:  # its detail's text out of orjson's (a key once each): what orjson writes of it
        text = _exact(written)
        detail_text = bytes(_RAW_DETAIL.decode(written).detail) if listed else None
    return text, b"[]" if null else detail_text


def _keys_twice(received: bytes, written: bytes) -> bool:
    """Whether the JSON text ``received`` holds a key twice in one of its objects: more keys
    than ``written``, orjson's of what was parsed from it (the last of a key twice). Its colons
    are its keys' and its strings', which ``written`` holds too unless a key twice dropped one
    (and its value's), orjson writing a string's colon as ":" however it came."""
    return _colons(received) != written.count(b":")


def _colons(text: bytes) -> int:
    """The colons of the JSON ``text``, a string's written \\u003a too (escaped backslashes
    out first: "\\\\u003a" is no colon). Bytes operations: no piece of it made, however many
    strings it holds."""
    colons = text.count(b":")
    if b"\\u003" in text:
        text = text.replace(b"\\\\", b"")
        colons += text.count(b"\\u003a") + text.count(b"\\u003A")
    return colons


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


def _what_is_wrong(msg: dict[str, Any], scrub: Scrub | None) -> str:
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
            f"metadata.offset {quoted(offset, 40, scrub)} is not 1-20 digits: the subscription "
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
