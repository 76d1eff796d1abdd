"""Issue #9: hostile frames for the graphql-transport-ws reader, and what each one must become.

Every generator here takes a :class:`Draw` (where its randomness comes from) and returns a
:class:`Frame`: the bytes to send (with placeholders for the client's subscription id, which
the gateway only learns at ``subscribe`` time), whether it goes as a binary frame, and the
ground truth of what the daemon must do with it (:data:`EVENT`, :data:`UNDELIVERABLE`,
:data:`MALFORMED`, :data:`IGNORED`, :data:`ENDER`).

The same generators serve both layers of the suite:

* :func:`bad_frames` / :func:`script_frames` wrap them as hypothesis strategies (a
  :class:`HypothesisDraw` around ``draw``) for the property tests of ``protocol.decode``;
* :func:`build_script` drives them with a seeded :class:`RandomDraw` (``random.Random``) into a
  deterministic script for the end-to-end runs against :mod:`hostile_gateway`.

:func:`classify` is an independent oracle of the contract (it parses with orjson, as the daemon
does, and applies the rules: an offset is 1-20 ASCII digits, a ``next``/``error``/``complete``
for another id is ignored...). Every frame is checked against it when built, so a generator bug
fails loudly instead of producing a wrong expectation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import string
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import orjson
from hypothesis import strategies as st

T = TypeVar("T")

# --- what a frame must become ------------------------------------------------------------------

EVENT = "event"  # a usable event every sink can store: in the sink exactly once
UNDELIVERABLE = "undeliverable"  # usable metadata, but no JSON writer can serialize it: DLQ by id
MALFORMED = "malformed"  # not a usable message: DLQ, reason "malformed", sha256 of the bytes
IGNORED = "ignored"  # next/complete/error for an unknown subscription id: counted, nothing else
ENDER = "ender"  # error/complete for the current subscription id: the session ends

OFFSET_RE = re.compile(r"[0-9]{1,20}")  # fullmatch: ASCII digits only, no trailing newline

# Placeholders, replaced when the gateway knows the subscription id (JSON strings, quotes
# included, so they can never match inside another string).
SUB = '"@@SUB@@"'  # the current subscription id
SUB_UPPER = '"@@SUBU@@"'  # a near miss: the id in upper case
SUB_SPACE = '"@@SUBS@@"'  # a near miss: the id and a trailing space
PAD = b"@@PAD@@"  # expanded so that the frame has exactly Frame.target_len bytes

KNOWN_TYPES = frozenset(
    {"next", "error", "complete", "ping", "pong", "connection_ack", "connection_init", "subscribe"}
)
# Sample subscription id for checks made before the gateway knows the real one (uuid4-like,
# as the daemon's).
SAMPLE_SUB_ID = "0f2c5a9e-3b1d-4c7a-9e21-5d6f7a8b9c0d"


def _js(value: Any) -> bytes:
    return json.dumps(value).encode()


def near_upper(sub_id: str) -> str:
    up = sub_id.upper()
    return up if up != sub_id else sub_id + "-X"


@dataclass(frozen=True, eq=False)
class Frame:
    expect: str
    label: str  # which hostility, for failure messages ("wrong-type:offset=list")
    template: bytes
    binary: bool = False
    target_len: int | None = None  # PAD is expanded so the sent frame has exactly this length
    fill: bytes = b"x"  # what PAD expands to
    uid: str | None = None  # the uniqueEventId the frame carries, if any
    offset: str | None = None  # EVENT/UNDELIVERABLE: its offset (a resume point)
    primary_key: str | None = None  # EVENT: the resource (per-key order)
    pieces: int = 1  # sent as a message of this many fragments (frames), not one frame

    def fragments(self, data: bytes) -> list[bytes]:
        """``data`` cut into :attr:`pieces` fragments (mid-character too: a fragment of a text
        message need not be UTF-8 alone), the last possibly empty."""
        step = -(-len(data) // self.pieces)
        return [data[i * step : (i + 1) * step] for i in range(self.pieces)]

    def render(self, sub_id: str) -> bytes:
        data = self.template
        if b"@@SUB" in data:
            data = (
                data.replace(SUB.encode(), _js(sub_id))
                .replace(SUB_UPPER.encode(), _js(near_upper(sub_id)))
                .replace(SUB_SPACE.encode(), _js(sub_id + " "))
            )
        if self.target_len is not None:
            missing = self.target_len - (len(data) - len(PAD))
            if missing < 0:
                raise ValueError(f"{self.label}: template longer than its target length")
            data = data.replace(PAD, (self.fill * missing)[:missing], 1)
        return data

    @property
    def usable(self) -> bool:
        """Carries valid metadata: a resume point (the daemon may subscribe from its offset)."""
        return self.expect in (EVENT, UNDELIVERABLE)


# --- the oracle ----------------------------------------------------------------------------------


class Ambiguous(ValueError):
    """A frame the contract does not decide; generators must never produce one."""


def usable_event(msg: dict[str, Any]) -> dict[str, Any] | None:
    payload = msg.get("payload")
    data = payload.get("data") if isinstance(payload, dict) else None
    ev = data.get("newEvent") if isinstance(data, dict) else None
    meta = ev.get("metadata") if isinstance(ev, dict) else None
    if not isinstance(meta, dict):
        return None
    offset, uid = meta.get("offset"), meta.get("uniqueEventId")
    if type(offset) is not str or not OFFSET_RE.fullmatch(offset):
        return None
    if type(uid) is not str or not uid:
        return None
    assert isinstance(ev, dict)
    return ev


# Beyond orjson's rules, decode refuses a usable event (a dead letter, "malformed") whose frame
# holds a number no double holds as written, or a key that says what the event is twice in an
# object that does (the frame's, payload, data, newEvent, metadata). Checked here another way:
# Python's json hands over each number's text and each object's pairs.
LONG_NUMBER = re.compile(r"[0-9]{20}|[eE][-+]?[0-9]{3}")
HEADER_KEYS = frozenset(
    {"id", "type", "payload", "data", "newEvent", "metadata", "offset", "uniqueEventId"}
    | {"moduleName", "eventName", "primaryKey", "timestamp", "hotelId", "publisherId"}
    | {"actionInstanceId", "detail"}
)


class _Object(dict[str, Any]):
    twice: frozenset[str] = frozenset()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    keys = [k for k, _ in pairs]
    obj.twice = frozenset(k for k in keys if keys.count(k) > 1)
    return obj


def refused_event(data: bytes) -> bool:
    """A frame orjson reads (so at most 1,024 levels deep) that decode refuses all the same.
    (decode cannot tell a key twice in a frame deeper than its Python json reads, some 1,000
    levels: no generator writes one.)"""
    long: list[str] = []

    def number(text: str) -> int:
        if LONG_NUMBER.search(text):
            long.append(text)
        return 0

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 5000))
    try:
        msg = json.loads(data, object_pairs_hook=_object, parse_int=number, parse_float=number)
    finally:
        sys.setrecursionlimit(limit)
    if long:
        return True
    obj = msg
    for key in ("payload", "data", "newEvent", "metadata", ""):
        if not isinstance(obj, _Object):
            return False
        if obj.twice & HEADER_KEYS:
            return True
        obj = obj.get(key)
    return False


def _serializable(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def classify(data: bytes, sub_id: str, max_size: int, *, binary: bool = False) -> str:
    """What the contract says the daemon must do with this frame. A binary frame is judged by
    its bytes like a text frame (graphql-transport-ws sends text, but a usable event in a binary
    frame is still an event: refusing it would lose it)."""
    if len(data) > max_size:
        return MALFORMED
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError:
        return MALFORMED
    if type(msg) is not dict:
        return MALFORMED
    kind = msg.get("type")
    if kind in ("ping", "pong", "connection_ack"):
        raise Ambiguous(f"a well-formed {kind}: not a hostile frame")
    if kind not in ("next", "error", "complete"):
        return MALFORMED
    ident = msg.get("id")
    if type(ident) is not str or not ident:
        raise Ambiguous(f"{kind} with id {ident!r:.40}: the contract does not say")
    ev = usable_event(msg) if kind == "next" else None
    if ev is not None and refused_event(data):
        return MALFORMED
    if ident != sub_id:
        if kind == "next" and ev is None:
            raise Ambiguous("a malformed next for another id: the contract does not say")
        return IGNORED
    if kind != "next":
        return ENDER
    if ev is None:
        return MALFORMED
    if _serializable(ev):
        if ev.get("detail") is not None and _depth(ev["detail"]) > 200:
            raise Ambiguous("detail nested near orjson's write limit (254): sink-dependent")
        return EVENT
    if _serializable(ev.get("detail")):
        raise Ambiguous("only the whole event is too deep: sink-dependent")
    return UNDELIVERABLE


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def check(frame: Frame, max_size: int) -> Frame:
    """The frame's declared expectation agrees with the oracle (for a sample id)."""
    got = classify(frame.render(SAMPLE_SUB_ID), SAMPLE_SUB_ID, max_size, binary=frame.binary)
    if got != frame.expect:
        raise AssertionError(f"generator bug: {frame.label} declared {frame.expect}, is {got}")
    return frame


# --- where randomness comes from ----------------------------------------------------------------


class Draw(Protocol):
    def integer(self, lo: int, hi: int) -> int: ...
    def choice(self, options: Sequence[T]) -> T: ...
    def boolean(self) -> bool: ...
    def text(self, max_size: int, *, safe: bool = True) -> str: ...
    def json(self, *, safe: bool = True) -> Any: ...
    def raw(self, max_size: int) -> bytes: ...


# Characters a sink must store faithfully: quotes, escapes, control characters (not NUL, which
# PostgreSQL cannot store), accents, CJK, astral emoji, bidi marks, line/paragraph separators.
_SAFE_CHARS = (
    string.ascii_letters
    + string.digits
    + " .,;:-_/@#%&*()[]{}<>=+?!'\"\\\t\n\r"
    + "\x01\x07\x1b\x1f\x7f\u0085\u00a0éßøÆ漢字ホテル🏨😀🇫🇷"
    + "\u2028\u2029\u200f\u202e\u0634\u0644\u0645\ufeff"
)
_ANY_CHARS = _SAFE_CHARS + "\x00\ud800\udfff\uffff"


class RandomDraw:
    """A seeded ``random.Random`` behind the :class:`Draw` interface: a reproducible corpus."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def boolean(self) -> bool:
        return self.rng.random() < 0.5

    def text(self, max_size: int, *, safe: bool = True) -> str:
        pool = _SAFE_CHARS if safe else _ANY_CHARS
        return "".join(self.rng.choice(pool) for _ in range(self.rng.randint(0, max_size)))

    def json(self, *, safe: bool = True) -> Any:
        return self._json(safe, 3)

    def _json(self, safe: bool, budget: int) -> Any:
        r = self.rng.random()
        if budget > 0 and r < 0.2:
            return [self._json(safe, budget - 1) for _ in range(self.rng.randint(0, 4))]
        if budget > 0 and r < 0.4:
            return {
                self.text(8, safe=safe): self._json(safe, budget - 1)
                for _ in range(self.rng.randint(0, 4))
            }
        leaf = self.rng.randrange(6)
        if leaf == 0:
            return None
        if leaf == 1:
            return self.boolean()
        if leaf == 2:
            bound = 2**53 if safe else 10**30
            return self.rng.randint(-bound, bound)
        if leaf == 3:
            if not safe and self.rng.random() < 0.2:
                return self.rng.choice([float("nan"), float("inf"), float("-inf")])
            return self.rng.uniform(-1e9, 1e9)
        return self.text(20, safe=safe)

    def raw(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(1, max_size))


_safe_text = st.characters(exclude_categories=["Cs"], exclude_characters=["\x00"])


def _json_strategy(safe: bool) -> st.SearchStrategy[Any]:
    text = st.text(_safe_text if safe else st.characters(), max_size=20)
    bound = 2**53 if safe else 10**30
    leaves = (
        st.none()
        | st.booleans()
        | st.integers(-bound, bound)
        | st.floats(allow_nan=not safe, allow_infinity=not safe)
        | text
    )
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=12,
    )


_JSON_SAFE = _json_strategy(True)
_JSON_ANY = _json_strategy(False)


class HypothesisDraw:
    """Hypothesis's ``draw`` behind the :class:`Draw` interface: shrinkable examples."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
        self._draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return int(self._draw(st.integers(lo, hi)))

    def choice(self, options: Sequence[T]) -> T:
        return options[self.integer(0, len(options) - 1)]

    def boolean(self) -> bool:
        return bool(self._draw(st.booleans()))

    def text(self, max_size: int, *, safe: bool = True) -> str:
        chars = _safe_text if safe else st.characters()
        return str(self._draw(st.text(chars, max_size=max_size)))

    def json(self, *, safe: bool = True) -> Any:
        return self._draw(_JSON_SAFE if safe else _JSON_ANY)

    def raw(self, max_size: int) -> bytes:
        return bytes(self._draw(st.binary(min_size=1, max_size=max_size)))


# --- context: unique ids, offsets and markers -----------------------------------------------------


@dataclass
class Context:
    """Per-script state: every uniqueEventId, offset and marker handed out is unique."""

    max_frame_bytes: int
    tag: str = "h"  # in every id: scripts of different tests never share one
    counter: int = 0
    _offsets: set[str] = field(default_factory=set)
    _next_offset: int = 5_000_000_000

    def n(self) -> int:
        self.counter += 1
        return self.counter

    def uid(self, prefix: str) -> str:
        return f"{prefix}-{self.tag}-{self.n()}"

    def marker(self) -> str:
        return f"hostile-{self.tag}-{self.n()}"

    def offset(self, draw: Draw, style: str = "next") -> str:
        """A fresh offset: the next one up, or one below the last ("backwards"), or 20 digits,
        or with leading zeros. Never one handed out before."""
        while True:
            if style == "backwards":
                value = str(draw.integer(1_000, 4_999_999_999))
            elif style == "twenty":
                value = "9" + "".join(str(draw.integer(0, 9)) for _ in range(19))
            elif style == "zeros":
                self._next_offset += draw.integer(1, 5)
                value = "000" + str(self._next_offset)
            else:
                self._next_offset += draw.integer(1, 5)
                value = str(self._next_offset)
            if value not in self._offsets:
                self._offsets.add(value)
                return value


# --- building blocks ----------------------------------------------------------------------------

MODULES = ("Reservation", "Profile", "Financial", "Inventory")
EVENT_NAMES = (
    "NEW RESERVATION",
    "UPDATE RESERVATION",
    "CHECK IN",
    "CHECK OUT",
    "UPDATE PROFILE",
    "POST CHARGE",
)
HOTELS = ("HOTEL1", "HOTEL2", "HÔTEL-3", None)
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")


def timestamp(d: Draw) -> str:
    return (
        f"{d.integer(1, 28):02d}-{d.choice(MONTHS)}-{d.integer(20, 26)} "
        f"{d.integer(1, 12):02d}.{d.integer(0, 59):02d}.{d.integer(0, 59):02d}."
        f"{d.integer(0, 999999):06d} {d.choice(('AM', 'PM'))}"
    )


def new_event(
    d: Draw, *, offset: Any, uid: Any, primary_key: str | None, detail: Any = None
) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "metadata": {"offset": offset, "uniqueEventId": uid},
        "moduleName": d.choice(MODULES),
        "eventName": d.choice(EVENT_NAMES),
        "timestamp": timestamp(d),
        "hotelId": d.choice(HOTELS),
        "publisherId": d.text(12),
        "actionInstanceId": str(d.integer(1, 10**9)),
    }
    if primary_key is not None:
        ev["primaryKey"] = primary_key
    if detail is None:
        detail = [
            {
                "elementName": d.text(16),
                "elementType": d.choice((None, "STRING", "DATE")),
                "elementSequence": None,
                "elementRole": d.choice((None, "Primary")),
                "newValue": d.text(40),
                "oldValue": d.choice((None, d.text(40))),
                "scopeFrom": None,
                "scopeTo": None,
            }
            for _ in range(d.integer(0, 4))
        ]
    ev["detail"] = detail
    return ev


def next_frame(ev: Any, sub: str = SUB, *, ascii_only: bool = False, **extra: Any) -> bytes:
    """A ``next`` frame; ``sub`` is a placeholder (raw JSON) or a JSON-encoded foreign id."""
    body = json.dumps({"payload": {"data": {"newEvent": ev}}, **extra}, ensure_ascii=ascii_only)
    return ('{"id":' + sub + ',"type":"next",' + body[1:]).encode()


def _frame(kind: str, sub: str, payload_json: str | None = None) -> bytes:
    text = '{"id":' + sub + ',"type":"' + kind + '"'
    if payload_json is not None:
        text += ',"payload":' + payload_json
    return (text + "}").encode()


def nest(depth: int, inner: str, container: str) -> str:
    if container == "object":
        return '{"a":' * depth + inner + "}" * depth
    return "[" * depth + inner + "]" * depth


# Nesting depths, in bands that stay clear of the parsers' limits (orjson reads 1024 levels and
# writes 254): every band has one certain outcome.
SHALLOW, MID, DEEP = (100, 200), (300, 900), (1100, 100_000)


def depth(d: Draw, band: tuple[int, int] | None = None) -> int:
    if band is None:
        band = d.choice((SHALLOW, MID, MID, DEEP, DEEP))
    if band == DEEP and d.boolean():
        return d.integer(1100, 5000)
    return d.integer(*band)


def nested(d: Draw, ctx: Context, n: int) -> tuple[int, str]:
    """``n`` levels of arrays or objects around a unique marker, capped so that the frame stays
    within the limit (an oversized frame is another case). Returns the depth and the text."""
    container = d.choice(("array", "object"))
    per_level = 6 if container == "object" else 2
    n = min(n, (ctx.max_frame_bytes - 2000) // per_level)
    return n, nest(n, json.dumps(ctx.marker()), container)


def _event_frame(
    d: Draw, ctx: Context, prefix: str, label: str, *, style: str = "next", **kw: Any
) -> Frame:
    uid, offset = ctx.uid(prefix), ctx.offset(d, style)
    key = kw.pop("primary_key", f"key-{d.integer(0, 49)}")
    ev = new_event(d, offset=offset, uid=uid, primary_key=key, **kw)
    # One event in four goes fragmented, chosen by its id (the draws, so the scripts, stay as
    # they were): whole frames and fragmented messages interleave in one socket read.
    chosen = int(hashlib.sha256(uid.encode()).hexdigest()[:4], 16)
    return Frame(
        EVENT,
        label,
        next_frame(ev, ascii_only=d.boolean()),
        uid=uid,
        offset=offset,
        primary_key=key,
        pieces=2 + chosen % 3 if chosen % 4 == 0 else 1,
    )


def valid_event(d: Draw, ctx: Context, style: str = "next") -> Frame:
    """An ordinary event; a few without a primaryKey, some with odd but valid offsets."""
    key = None if d.integer(0, 30) == 0 else f"key-{d.integer(0, 49)}"
    return _event_frame(d, ctx, "ev", f"valid:{style}", style=style, primary_key=key)


# --- the hostile generators ---------------------------------------------------------------------
# Each returns one Frame; ``check`` verifies its declared outcome against the oracle.

Gen = Callable[[Draw, Context], Frame]


def g_random_json(d: Draw, ctx: Context) -> Frame:
    value = d.json(safe=False)
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        value["type"] = "x-" + str(value["type"])
    try:
        text = json.dumps(value, ensure_ascii=d.boolean())
        data = text.encode("utf-8", "surrogatepass")
    except (ValueError, UnicodeEncodeError):
        data = json.dumps(value).encode()
    return Frame(MALFORMED, "random-json", data)


def g_deep(d: Draw, ctx: Context) -> Frame:
    where = d.choice(("frame", "payload", "newEvent", "metadata", "offset", "uniqueEventId"))
    n, inner = nested(d, ctx, depth(d))
    if where == "frame":
        data = inner.encode()
    elif where == "payload":
        data = ('{"id":' + SUB + ',"type":"next","payload":' + inner + "}").encode()
    else:
        ev = new_event(d, offset=ctx.offset(d), uid=ctx.uid("dm"), primary_key="deep")
        placeholder = "@@NEST@@"
        if where == "newEvent":
            ev = placeholder  # type: ignore[assignment]
        elif where == "metadata":
            ev["metadata"] = placeholder
        else:
            ev["metadata"][where] = placeholder
        data = next_frame(ev).replace(json.dumps(placeholder).encode(), inner.encode())
    return Frame(MALFORMED, f"deep-{where}:{n}", data)


def g_deep_detail(d: Draw, ctx: Context, band: tuple[int, int] | None = None) -> Frame:
    """Valid metadata, a nested ``detail``: deliverable (100-200 levels), undeliverable by any
    sink that writes JSON (300-900: orjson reads 1024 levels, writes 254) or unparseable."""
    band = band or d.choice((SHALLOW, MID, MID, DEEP))
    n, inner = nested(d, ctx, depth(d, band))
    uid, offset, key = ctx.uid("deep"), ctx.offset(d), f"deep-key-{ctx.n()}"
    ev = new_event(d, offset=offset, uid=uid, primary_key=key, detail="@@NEST@@")
    data = next_frame(ev).replace(b'"@@NEST@@"', inner.encode())
    expect = {SHALLOW: EVENT, MID: UNDELIVERABLE}.get(band, MALFORMED)
    return Frame(expect, f"deep-detail:{n}", data, uid=uid, offset=offset, primary_key=key)


def g_deep_error_unknown(d: Draw, ctx: Context) -> Frame:
    """An error (or complete) for an unknown id with a nested payload: ignored while the parser
    can read it (up to 1,000 levels, the depth that killed the daemon through str()), malformed
    beyond."""
    n, inner = nested(
        d, ctx, d.choice((1000, d.integer(*SHALLOW), d.integer(*MID), depth(d, DEEP)))
    )
    kind = d.choice(("error", "error", "complete"))
    data = _frame(kind, json.dumps(f"other-{ctx.n()}"), inner)
    return Frame(IGNORED if n <= 1000 else MALFORMED, f"deep-{kind}-unknown-id:{n}", data)


def g_deep_error_current(d: Draw, ctx: Context) -> Frame:
    """An error for the current id too deep to parse: malformed (it cannot end anything)."""
    n, inner = nested(d, ctx, d.integer(1100, 100_000))
    return Frame(MALFORMED, f"deep-error-current-id:{n}", _frame("error", SUB, inner))


def g_huge_string(d: Draw, ctx: Context) -> Frame:
    """Strings up to the size limit: a valid event exactly at the limit or below it, or a
    malformed frame carrying one."""
    limit = ctx.max_frame_bytes
    what = d.choice(("event-at-limit", "event-below", "unknown-type", "bad-offset"))
    if what.startswith("event"):
        target = limit if what == "event-at-limit" else d.integer(limit // 2, limit)
        uid, offset, key = ctx.uid("huge"), ctx.offset(d), f"key-{d.integer(0, 49)}"
        ev = new_event(d, offset=offset, uid=uid, primary_key=key)
        ev["detail"] = [{"elementName": "Comments", "newValue": PAD.decode(), "oldValue": None}]
        return Frame(
            EVENT,
            f"huge-string:{what}",
            next_frame(ev),
            target_len=target,
            uid=uid,
            offset=offset,
            primary_key=key,
        )
    target = d.integer(limit // 2, limit)
    if what == "unknown-type":
        data = ('{"type":"surprise","marker":"' + ctx.marker() + '","blob":"@@PAD@@"}').encode()
    else:  # a huge offset: digits, far more than 20 of them
        ev = new_event(d, offset="@@PAD@@", uid=ctx.uid("hugeoff"), primary_key="k")
        data = next_frame(ev)
    fill = b"7" if what == "bad-offset" else b"x"
    return Frame(MALFORMED, f"huge-string:{what}", data, target_len=target, fill=fill)


def g_binary(d: Draw, ctx: Context) -> Frame:
    """Binary frames (graphql-transport-ws sends text; judged by their bytes all the same) and
    text frames that are not UTF-8."""
    what = d.choice(("random-bytes", "event-json", "text-not-utf8", "text-random-bytes"))
    if what == "random-bytes":
        return Frame(MALFORMED, "binary:random", ctx.marker().encode() + d.raw(2000), binary=True)
    uid, offset = ctx.uid("bin"), ctx.offset(d)
    ev = new_event(d, offset=offset, uid=uid, primary_key="bin")
    if what == "event-json":  # a perfectly good event, in a binary frame: delivered
        return Frame(
            EVENT,
            "binary:event-json",
            next_frame(ev),
            binary=True,
            uid=uid,
            offset=offset,
            primary_key="bin",
        )
    if what == "text-not-utf8":
        ev["eventName"] = "@@BAD@@"
        data = next_frame(ev).replace(b"@@BAD@@", b"CHECK \xff\xfe IN \xc3(")
        return Frame(MALFORMED, "text:not-utf8", data)
    return Frame(MALFORMED, "text:random-bytes", b"\xff" + ctx.marker().encode() + d.raw(2000))


_WRONG: dict[str, Callable[[Draw], Any]] = {
    "number": lambda d: d.integer(-(10**12), 10**12),
    "float": lambda d: d.integer(1, 10**6) / 7,
    "list": lambda d: [str(d.integer(0, 10**6))],
    "object": lambda d: {"value": str(d.integer(0, 10**6))},
    "null": lambda d: None,
    "bool": lambda d: d.boolean(),
    "string": lambda d: d.text(12) or "s",
    "empty-string": lambda d: "",
    "missing": lambda d: _MISSING,
}
_MISSING = object()
# Which wrong values apply to which field (a string is right for offset and uniqueEventId).
_WRONG_FOR = {
    "type": ("number", "list", "object", "null", "bool", "missing"),
    "payload": ("number", "list", "null", "bool", "string", "missing"),
    "data": ("number", "list", "null", "bool", "string", "missing"),
    "newEvent": ("number", "list", "null", "bool", "string", "missing"),
    "metadata": ("number", "list", "null", "bool", "string", "missing"),
    "offset": ("number", "float", "list", "object", "null", "bool", "missing"),
    "uniqueEventId": ("number", "list", "object", "null", "bool", "empty-string", "missing"),
}


def g_wrong_type(d: Draw, ctx: Context) -> Frame:
    where = d.choice(tuple(_WRONG_FOR))
    how = d.choice(_WRONG_FOR[where])
    value = _WRONG[how](d)
    ev = new_event(d, offset=ctx.offset(d), uid=ctx.uid("wt"), primary_key="wt")
    frame: dict[str, Any] = {
        "id": "@@ID@@",
        "type": "next",
        "payload": {"data": {"newEvent": ev}},
        "marker": ctx.marker(),
    }
    parent, key = {
        "type": (frame, "type"),
        "payload": (frame, "payload"),
        "data": (frame["payload"], "data"),
        "newEvent": (frame["payload"]["data"], "newEvent"),
        "metadata": (ev, "metadata"),
        "offset": (ev["metadata"], "offset"),
        "uniqueEventId": (ev["metadata"], "uniqueEventId"),
    }[where]
    if value is _MISSING:
        del parent[key]
    else:
        parent[key] = value
    data = json.dumps(frame).replace('"@@ID@@"', SUB).encode()
    return Frame(MALFORMED, f"wrong-type:{where}={how}", data)


BAD_OFFSETS = (
    "abc",
    "",
    "-5",
    "+7",
    "12.5",
    "1e5",
    " 12",
    "12 ",
    "123\n",
    "0x1F",
    "\u0661\u0662\u0663",  # Arabic-Indic digits: \d matches them, [0-9] does not
    "\uff11\uff12\uff13",  # fullwidth digits
    "12\u200b3",  # a zero-width space inside
    "1" * 21,
    "9" * 40,
)


def g_bad_offset(d: Draw, ctx: Context) -> Frame:
    which = d.integer(0, len(BAD_OFFSETS) + 1)
    if which < len(BAD_OFFSETS):
        offset = BAD_OFFSETS[which]
    elif which == len(BAD_OFFSETS):
        offset = "".join(str(d.integer(0, 9)) for _ in range(d.integer(21, 60)))
    else:
        offset = (d.text(6) or "x") + "!"
        if OFFSET_RE.fullmatch(offset):
            offset += "x"
    ev = new_event(d, offset=offset, uid=ctx.uid("bo"), primary_key="bo")
    return Frame(MALFORMED, f"bad-offset:{offset[:12]!r}", next_frame(ev, marker=ctx.marker()))


def g_unknown_id_next(d: Draw, ctx: Context) -> Frame:
    """A perfectly good event for a subscription that is not ours: never delivered."""
    sub = d.choice((SUB_UPPER, SUB_SPACE, json.dumps(f"other-{ctx.n()}"), json.dumps(str(ctx.n()))))
    uid = ctx.uid("ghost")
    ev = new_event(d, offset=ctx.offset(d), uid=uid, primary_key=f"key-{d.integer(0, 49)}")
    return Frame(IGNORED, f"unknown-id-next:{sub[:8]}", next_frame(ev, sub), uid=uid)


def g_unknown_id_end(d: Draw, ctx: Context) -> Frame:
    """complete / error for a subscription that is not ours: must not end the session."""
    sub = d.choice((SUB_UPPER, SUB_SPACE, json.dumps(f"other-{ctx.n()}")))
    kind = d.choice(("complete", "error"))
    if kind == "complete":
        return Frame(IGNORED, "unknown-id-complete", _frame("complete", sub, _marked(ctx)))
    payload = d.choice(
        (
            json.dumps([{"message": d.text(200), "marker": ctx.marker()}]),
            json.dumps({"message": "not a list", "marker": ctx.marker()}),
            json.dumps([{"message": "x" * d.integer(10_000, ctx.max_frame_bytes // 2)}])[:-1]
            + ',"'
            + ctx.marker()
            + '"]',
            json.dumps([ctx.marker(), None]),
        )
    )
    return Frame(IGNORED, "unknown-id-error", _frame("error", sub, payload))


def _marked(ctx: Context) -> str:
    return json.dumps({"marker": ctx.marker()})


UNKNOWN_TYPES = (
    "surprise",
    "Next",
    "NEXT",
    "next ",
    "nexт",  # a Cyrillic т
    "",
    "data",
    "start",
    "connection_init",
    "subscribe",
    "pingg",
)


def g_unknown_type(d: Draw, ctx: Context) -> Frame:
    kind = d.choice((*UNKNOWN_TYPES, "t-" + d.text(10)))
    if kind in KNOWN_TYPES - {"connection_init", "subscribe"}:
        kind = "t-" + kind
    ev = new_event(d, offset=ctx.offset(d), uid=ctx.uid("ut"), primary_key="ut")
    data = json.dumps(
        {"id": "@@ID@@", "type": kind, "payload": {"data": {"newEvent": ev}}}
    ).replace('"@@ID@@"', SUB)
    return Frame(MALFORMED, f"unknown-type:{kind[:12]!r}", data.encode())


def g_oversized(d: Draw, ctx: Context) -> Frame:
    """Larger than max_frame_bytes, at most 4 times it: dead-lettered unread."""
    limit = ctx.max_frame_bytes
    target = d.choice((limit + 1, 4 * limit, d.integer(limit + 2, 4 * limit - 1)))
    what = d.choice(("event", "garbage", "binary"))
    if what == "event":  # metadata that would be usable: it must not be delivered anyway
        ev = new_event(d, offset=ctx.offset(d), uid=ctx.uid("big"), primary_key="big")
        ev["detail"] = [{"elementName": "Notes", "newValue": PAD.decode()}]
        data, fill = next_frame(ev), b"x"
    else:
        data, fill = ctx.marker().encode() + b"@@PAD@@", d.choice((b"x", b"\xff", b"{["))
    return Frame(
        MALFORMED, f"oversized:{what}", data, binary=what == "binary", target_len=target, fill=fill
    )


def g_truncated(d: Draw, ctx: Context) -> Frame:
    ev = new_event(d, offset=ctx.offset(d), uid=ctx.uid("cut"), primary_key="cut")
    whole = next_frame(ev, marker=ctx.marker())
    return Frame(MALFORMED, "truncated", whole[: d.integer(1, len(whole) - 1)])


def g_trailing(d: Draw, ctx: Context) -> Frame:
    ev = new_event(d, offset=ctx.offset(d), uid=ctx.uid("trail"), primary_key="trail")
    tail = d.choice((b" x", b"{}", b"]", b"\x00", b" " + ctx.marker().encode()))
    return Frame(MALFORMED, "trailing-garbage", next_frame(ev, marker=ctx.marker()) + tail)


LONG_NUMBERS = (
    "1e400",  # no double: orjson refuses the frame
    "-1E+400",
    "1" + "0" * 400,
    "1e-400",  # orjson: 0.0
    "1e-16384",  # PostgreSQL's jsonb refuses it
    "18446744073709551616",  # 2**64: orjson, a float
    "1" * 25,
    "0." + "3" * 30,
    "5e0300",
)


def g_long_number(d: Draw, ctx: Context) -> Frame:
    """A usable event with a number no double holds as written, anywhere in its frame."""
    number = d.choice(LONG_NUMBERS)
    ev = new_event(d, offset=ctx.offset(d), uid=ctx.uid("num"), primary_key="num")
    where = d.choice(("publisherId", "detail", "envelope"))
    extra: dict[str, Any] = {"marker": ctx.marker()}
    if where == "publisherId":
        ev["publisherId"] = "@@NUM@@"
    elif where == "detail":
        ev["detail"] = [{"elementName": "Amount", "newValue": "@@NUM@@"}]
    else:
        extra["extensions"] = {"cost": "@@NUM@@"}
    data = next_frame(ev, ascii_only=d.boolean(), **extra).replace(b'"@@NUM@@"', number.encode())
    return Frame(MALFORMED, f"long-number:{where}:{number[:12]}", data)


def g_repeated_key(d: Draw, ctx: Context) -> Frame:
    """A usable event with a key that says what it is twice (a reader of the stored text
    would take the other one)."""
    ev = new_event(d, offset=ctx.offset(d), uid=ctx.uid("twice"), primary_key="twice")
    data = next_frame(ev, marker=ctx.marker())
    other, offset = _js(ctx.uid("other")), _js(ctx.offset(d))
    which = d.choice(
        (
            *("uniqueEventId", "offset", "metadata", "primaryKey", "detail", "newEvent"),
            *("type", "escaped", "eventName"),
        )
    )
    where, extra = {
        "uniqueEventId": (b'"metadata": {', b'"uniqueEventId": ' + other + b", "),
        "offset": (b'"metadata": {', b'"offset": ' + offset + b", "),
        "metadata": (
            b'"newEvent": {',
            b'"metadata": {"offset": ' + offset + b', "uniqueEventId": ' + other + b"}, ",
        ),
        "primaryKey": (b'"newEvent": {', b'"primaryKey": "other", '),
        "escaped": (b'"newEvent": {', b'"\\u0070rimaryKey": "other", '),
        "eventName": (b'"newEvent": {', b'"eventName": "DELETE", '),
        "detail": (b'"newEvent": {', b'"detail": [], '),
        "newEvent": (
            b'"data": {',
            b'"newEvent": {"metadata": {"offset": ' + offset + b', "uniqueEventId": ' + other,
        ),
        "type": (b"{", b'"type": "complete", '),  # the last one says next
    }[which]
    if which == "newEvent":
        extra += b"}}, "
    return Frame(MALFORMED, f"repeated-key:{which}", data.replace(where, where + extra, 1))


GENERATORS: tuple[tuple[str, Gen], ...] = (
    ("random-json", g_random_json),
    ("deep", g_deep),
    ("deep-detail", g_deep_detail),
    ("deep-error-unknown", g_deep_error_unknown),
    ("deep-error-current", g_deep_error_current),
    ("huge-string", g_huge_string),
    ("binary", g_binary),
    ("wrong-type", g_wrong_type),
    ("bad-offset", g_bad_offset),
    ("unknown-id-next", g_unknown_id_next),
    ("unknown-id-end", g_unknown_id_end),
    ("unknown-type", g_unknown_type),
    ("oversized", g_oversized),
    ("truncated", g_truncated),
    ("trailing", g_trailing),
    ("long-number", g_long_number),
    ("repeated-key", g_repeated_key),
)


def canonical(d: Draw, ctx: Context) -> list[Frame]:
    """The named cases of issue #9, once each in every script."""
    frames = [
        # 300 nested arrays in detail: orjson reads it, cannot write it (the sinks raised
        # TypeError and the daemon exited 70).
        g_deep_detail(d, ctx, MID),
        _deep_detail_exact(d, ctx, 300),
        _deep_detail_exact(d, ctx, 1000),  # even Python's json cannot write this one
        # An error for an unknown id whose payload is 1,000 nested arrays (str() overflowed).
        Frame(
            IGNORED,
            "deep-error-unknown-id:1000",
            _frame("error", json.dumps(f"other-{ctx.n()}"), nest(1000, '"x"', "array")),
        ),
        # Exactly at the limit (valid), one byte over, exactly 4 times.
        _at_size(d, ctx, ctx.max_frame_bytes, EVENT),
        _at_size(d, ctx, ctx.max_frame_bytes + 1, MALFORMED),
        _at_size(d, ctx, 4 * ctx.max_frame_bytes, MALFORMED),
        # 100,000 levels, whatever the limit.
        Frame(
            MALFORMED,
            "deep-frame:100000",
            nest(100_000, json.dumps(ctx.marker()), "array").encode(),
        ),
    ]
    return frames


def _deep_detail_exact(d: Draw, ctx: Context, n: int) -> Frame:
    uid, offset, key = ctx.uid("deep"), ctx.offset(d), f"deep-key-{ctx.n()}"
    ev = new_event(d, offset=offset, uid=uid, primary_key=key, detail="@@NEST@@")
    data = next_frame(ev).replace(
        b'"@@NEST@@"', nest(n, json.dumps(ctx.marker()), "array").encode()
    )
    return Frame(UNDELIVERABLE, f"deep-detail:{n}", data, uid=uid, offset=offset, primary_key=key)


def _at_size(d: Draw, ctx: Context, size: int, expect: str) -> Frame:
    uid, offset, key = ctx.uid("size"), ctx.offset(d), f"key-{d.integer(0, 49)}"
    ev = new_event(d, offset=offset, uid=uid, primary_key=key)
    ev["detail"] = [{"elementName": "Comments", "newValue": PAD.decode()}]
    return Frame(
        expect,
        f"size:{size}",
        next_frame(ev),
        target_len=size,
        uid=uid if expect == EVENT else None,
        offset=offset if expect == EVENT else None,
        primary_key=key if expect == EVENT else None,
    )


def enders(ctx: Context) -> list[Frame]:
    """Frames that end the session: an error or complete for the current subscription id."""
    long_message = json.dumps([{"message": "e" * 20_000, "extensions": {"code": "4500"}}])
    arrays, objects = nest(1000, "1", "array"), nest(600, "null", "object")
    return [
        Frame(ENDER, "ender:error-1000-nested-arrays", _frame("error", SUB, arrays)),
        Frame(ENDER, "ender:error-600-nested-objects", _frame("error", SUB, objects)),
        Frame(ENDER, "ender:error-long-message", _frame("error", SUB, long_message)),
        Frame(ENDER, "ender:complete", _frame("complete", SUB)),
    ]


# --- scripts --------------------------------------------------------------------------------------


def build_script(
    seed: int,
    *,
    events: int,
    bad: int,
    max_frame_bytes: int,
    tag: str = "h",
    with_enders: bool = True,
    extra_bad: Sequence[Frame] = (),
) -> list[Frame]:
    """A deterministic script: ``events`` valid events (about 3% with a backwards offset, a few
    with 20 digits or leading zeros) interleaved with the canonical cases, ``bad`` generated
    hostile frames (every generator at least once) and ``extra_bad``, and the session enders
    spread over it. Bad frames are distinct byte strings; uniqueEventIds and offsets unique."""
    rng = random.Random(seed)
    d = RandomDraw(rng)
    ctx = Context(max_frame_bytes, tag=tag)
    valid: list[Frame] = []
    for i in range(events):
        r = rng.random()
        style = "next"
        if r < 0.03 and i:
            style = "backwards"  # smaller than the one before: still a valid event
        elif r < 0.035:
            style = "twenty"
        elif r < 0.04:
            style = "zeros"
        valid.append(valid_event(d, ctx, style))
    hostile = canonical(d, ctx)
    for i in range(bad):
        gen = GENERATORS[i][1] if i < len(GENERATORS) else d.choice(GENERATORS)[1]
        hostile.append(gen(d, ctx))
    hostile.extend(extra_bad)
    hostile = [check(f, max_frame_bytes) for f in _distinct(hostile)]
    rng.shuffle(hostile)
    # Merge, keeping the valid events in their order (their offsets were handed out in order).
    script: list[Frame] = []
    vi = hi = 0
    while vi < len(valid) or hi < len(hostile):
        take_valid = hi >= len(hostile) or (
            vi < len(valid) and rng.random() < len(valid) / (len(valid) + len(hostile))
        )
        if take_valid:
            script.append(valid[vi])
            vi += 1
        else:
            script.append(hostile[hi])
            hi += 1
    if with_enders:
        for frac, ender in zip((0.15, 0.4, 0.65, 0.85), enders(ctx), strict=True):
            script.insert(int(len(script) * frac), check(ender, max_frame_bytes))
    # Last, a valid event: once it is in the sink, the daemon has read every frame before it.
    last = valid_event(d, ctx)
    script.append(dataclasses.replace(last, label="valid:sentinel"))
    for f in valid:
        check(f, max_frame_bytes)
    return script


def flood(seed: int, count: int, max_frame_bytes: int, tag: str = "flood") -> list[Frame]:
    """``count`` malformed frames of just under 4 x ``max_frame_bytes`` (the most the client
    reads at all): events that would be usable but for their size, text garbage and binary
    garbage. Each is a small template expanded when sent, so the corpus itself stays small."""
    rng = random.Random(seed)
    d = RandomDraw(rng)
    ctx = Context(max_frame_bytes, tag=tag)
    frames = []
    for i in range(count):
        target = 4 * max_frame_bytes - rng.randint(0, 4096)
        what = ("event", "garbage", "binary")[i % 3]
        if what == "event":
            ev = new_event(d, offset=ctx.offset(d), uid=ctx.uid("flood"), primary_key="flood")
            ev["detail"] = [{"elementName": "Notes", "newValue": PAD.decode()}]
            data = next_frame(ev)
        else:
            data = ctx.marker().encode() + b" " + PAD
        frames.append(
            Frame(MALFORMED, f"flood:{what}", data, binary=what == "binary", target_len=target)
        )
    return frames


def _distinct(frames: list[Frame]) -> list[Frame]:
    """No two bad frames with the same bytes (their DLQ rows would collapse): add whitespace."""
    seen: set[bytes] = set()
    out = []
    for frame in frames:
        data = frame.render(SAMPLE_SUB_ID)
        spaces = 0
        while (key := hashlib.sha256(data + b" " * spaces).digest()) in seen:
            spaces += 1
        seen.add(key)
        out.append(dataclasses.replace(frame, template=frame.template + b" " * spaces))
    return out


def summary(frames: Sequence[Frame]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in frames:
        out[f.expect] = out.get(f.expect, 0) + 1
    return out


# --- hypothesis strategies -----------------------------------------------------------------------


@st.composite
def bad_frames(draw: Callable[[st.SearchStrategy[Any]], Any], max_frame_bytes: int) -> Frame:
    """One hostile frame from any generator (or a canonical case), checked against the oracle."""
    d = HypothesisDraw(draw)
    ctx = Context(max_frame_bytes, tag="p")
    names = [name for name, _ in GENERATORS]
    which = d.choice((*names, "canonical", "ender", "valid"))
    if which == "canonical":
        frame = d.choice(canonical(d, ctx))
    elif which == "ender":
        frame = d.choice(enders(ctx))
    elif which == "valid":
        frame = valid_event(d, ctx, d.choice(("next", "backwards", "twenty", "zeros")))
    else:
        frame = dict(GENERATORS)[which](d, ctx)
    return check(frame, max_frame_bytes)
