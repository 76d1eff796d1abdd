"""Deterministic OPERA-like events for the sandbox, and the per-chain log it serves.

Each event is encoded once, when it enters the log; a send only concatenates strings. Offsets
are digit strings with gaps (the consumer must not assume ``+1``); inside the sandbox they are
compared as numbers to position an inclusive replay.

With ``templated`` (the ``fast_backlog`` option, :mod:`.templated`), every event of the log is
made from templates instead, and the backlog (:meth:`ChainLog.add_backlog`) is a prefix of
``backlog`` events that are never held as entries: :attr:`ChainLog.entries` are the ones after
it, and indexes count from the prefix's start. Live timestamps (the ``live_timestamps`` option,
the default): :meth:`ChainLog.end_backlog_at` stamps the backlog so that it ends at the start,
its events evenly spaced back from there (what happened before the start), and with
``stamp_now`` events made later carry the wall clock's time (UTC): a consumer's event-time lag
is then true. Without, every event carries a clock that starts on a day of 2024.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..core.events import ORACLE_TIMESTAMP

if TYPE_CHECKING:
    from .templated import TemplatedEvents

HOTELS = ("HOTEL1", "HOTEL2", "HOTEL3", "RESORT4")
BACKLOG_STEP_US = 1_500_000  # live timestamps: the generator's backlog events this far apart

# module -> (creation event, follow-up events, detail elements: name -> value maker)
_MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "Reservation": (
        "NEW RESERVATION",
        ("UPDATE RESERVATION", "UPDATE RESERVATION", "CHECK IN", "CHECK OUT", "CANCEL RESERVATION"),
    ),
    "Profile": ("NEW PROFILE", ("UPDATE PROFILE",)),
    "Financial": ("NEW POSTING", ("NEW POSTING",)),
}
_ELEMENTS: dict[str, tuple[str, ...]] = {
    "Reservation": (
        "Arrival Date",
        "Departure Date",
        "Room Type",
        "Room Number",
        "Rate Code",
        "Adults",
        "Reservation Status",
    ),
    "Profile": ("Guest Last Name", "Guest First Name", "Email", "VIP Status", "Language"),
    "Financial": ("Amount", "Transaction Code", "Currency", "Folio Window"),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "Room Type": ("DLX", "STD", "KING", "QUEEN", "SUITE"),
    "Rate Code": ("BAR", "RACK", "CORP", "AAA", "PKG"),
    "Reservation Status": ("RESERVED", "DUE IN", "IN HOUSE", "CHECKED OUT", "CANCELLED"),
    "VIP Status": ("GOLD", "SILVER", "PLATINUM", "NONE"),
    "Language": ("EN", "DE", "FR", "ES", "IT"),
    "Transaction Code": ("1000", "2004", "9000", "5010"),
    "Currency": ("USD", "EUR", "GBP"),
}
_NAMES = ("Smith", "Garcia", "Müller", "Rossi", "Dupont", "Tanaka", "O'Brien", "Nguyen")


@dataclass(slots=True)
class Entry:
    key: int  # numeric offset (malformed entries: the previous event's)
    offset: str | None  # None: a raw malformed frame; "": an injected event (not generated)
    hotel: str | None
    payload: str  # events: JSON of {"data":{"newEvent":...}}; malformed: the frame itself
    _delta: str | None = None
    unique_id: str = ""  # generated events: metadata.uniqueEventId
    primary_key: str | None = None  # generated events: primaryKey

    def delta_payload(self) -> str:
        """The payload with unchanged detail elements removed (encoded once, on first use)."""
        if self._delta is None:
            doc = json.loads(self.payload)
            ev = doc["data"]["newEvent"]
            ev["detail"] = [d for d in ev["detail"] if d["oldValue"] != d["newValue"]]
            self._delta = _dumps(doc)
        return self._delta


@dataclass(slots=True)
class Resource:
    """A reservation, profile or posting as of the latest event in the log: what the sandbox's
    REST routes serve (``values``: element name -> latest ``newValue``)."""

    key: str
    module: str
    hotel: str
    values: dict[str, str]
    version: int = 0  # events of this key in the log
    last_event: str = ""
    last_offset: str = ""


def _oracle(when: datetime) -> str:
    """``28-APR-24 06.18.59.028027 AM``: Oracle's timestamp format, as the consumer reads it."""
    return when.strftime(ORACLE_TIMESTAMP).upper()


def _now_timestamp() -> str:
    """The wall clock (UTC) in Oracle's timestamp format, to the microsecond."""
    return _oracle(datetime.now(UTC))


def _epoch_timestamp(epoch_us: int) -> str:
    """Epoch microseconds (UTC) in Oracle's timestamp format."""
    when = datetime.fromtimestamp(epoch_us // 1_000_000, UTC).replace(
        microsecond=epoch_us % 1_000_000
    )
    return _oracle(when)


def _dumps(doc: Any) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


@dataclass
class ChainLog:
    chain: str
    seed: int
    templated: TemplatedEvents | None = None  # events made from templates (fast_backlog)
    stamp_now: bool = False  # new events' timestamp: the wall clock's (live_timestamps)
    entries: list[Entry] = field(default_factory=list)  # after the templated backlog, if any
    backlog: int = 0  # events of the templated backlog: indexes 0..backlog-1
    _keys: list[int] = field(default_factory=list)
    _rng: random.Random = field(init=False)
    _offset: int = field(init=False)
    _clock: datetime = field(init=False)
    _resources: list[Resource] = field(default_factory=list)  # recent, for follow-ups
    _by_key: dict[str, Resource] = field(default_factory=dict)  # every resource ever made
    _next_key: int = field(init=False)
    _changed: asyncio.Event | None = None
    _count: int = 0
    # Live timestamps: generated event i (from 0) stamped at _first_us + i * BACKLOG_STEP_US.
    _first_us: int | None = None
    _made: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(f"{self.seed}:{self.chain}")
        self._offset = 1000 + self._rng.randrange(1000)
        self._clock = datetime(2024, 4, 28, 6, 0, 0) + timedelta(days=self._rng.randrange(300))
        self._next_key = 400_000 + self._rng.randrange(100_000)

    # --- reading ------------------------------------------------------------------------------

    def start_index(self, offset: str | None, *, highest: bool) -> int:
        tail = self.backlog
        if highest:
            for i in range(len(self.entries) - 1, -1, -1):
                if self.entries[i].offset is not None:
                    return tail + i
            return tail - 1 if tail else len(self.entries)
        if offset is None:
            return 0
        wanted = int(offset)
        if self.templated is not None and tail:
            found = self.templated.start_index(tail, wanted)
            if found < tail:
                return found
        return tail + bisect.bisect_left(self._keys, wanted)

    @property
    def size(self) -> int:
        """Entries in the log, the templated backlog's included: the end of its indexes."""
        return self.backlog + len(self.entries)

    def between(self, start: int, end: int) -> list[Entry]:
        """The entries at indexes ``start..end-1`` (those of the templated backlog made now)."""
        made: list[Entry] = []
        if start < self.backlog:
            assert self.templated is not None
            made = [self.templated.entry(j) for j in range(start, min(end, self.backlog))]
        return made + self.entries[max(0, start - self.backlog) : max(0, end - self.backlog)]

    @property
    def count(self) -> int:
        """Valid events in the log."""
        return self._count

    def events(self) -> list[dict[str, Any]]:
        made = self.templated
        backlog = [made.payload(j) for j in range(self.backlog)] if made is not None else []
        payloads = backlog + [e.payload for e in self.entries if e.offset]
        return [json.loads(p)["data"]["newEvent"] for p in payloads]

    def event_keys(self) -> list[tuple[str, str, str | None]]:
        """(uniqueEventId, offset, primaryKey) of :meth:`events`, in the same order, without
        decoding any payload."""
        made = self.templated
        backlog: list[tuple[str, str, str | None]] = (
            [
                (made.unique_id(j), str(made.key(j)), made.primary_key(j))
                for j in range(self.backlog)
            ]
            if made is not None
            else []
        )
        return backlog + [(e.unique_id, e.offset, e.primary_key) for e in self.entries if e.offset]

    def resource(self, key: str) -> Resource | None:
        """The resource with this primaryKey (keys are unique within a chain)."""
        return self._by_key.get(key)

    def changed(self) -> asyncio.Event:
        """An event set at the next append (capture it before checking the length)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # --- writing ------------------------------------------------------------------------------

    def append_malformed(self, raw: str) -> None:
        key = self._keys[-1] if self._keys else 0
        self.entries.append(Entry(key, None, None, raw))
        self._keys.append(key)
        self._notify()

    def append_raw_event(self, new_event_json: str) -> None:
        """An event given as text, wrapped in ``next`` when sent; replayed from the previous
        event's offset (its own may be anything)."""
        key = self._keys[-1] if self._keys else 0
        self.entries.append(Entry(key, "", None, '{"data":{"newEvent":' + new_event_json + "}}"))
        self._keys.append(key)
        self._notify()

    def end_backlog_at(self, end_us: int, n: int) -> None:
        """Live timestamps: the backlog's ``n`` events, made next, end at ``end_us`` (epoch
        microseconds: the start), evenly spaced back from there."""
        if self.templated is not None:
            self.templated.end_at(end_us, n)
        else:
            self._first_us = end_us - max(0, n - 1) * BACKLOG_STEP_US

    def add_backlog(self, n: int) -> None:
        """The templated backlog: ``n`` events, first in an empty templated log."""
        assert self.templated is not None and not self.entries and not self.backlog
        self.backlog = n
        self._count = n
        self._notify()

    def generate(self, n: int, *, decoded: bool = True) -> list[dict[str, Any]]:
        """Append ``n`` new events; returns them (decoded: a templated log returns [] unless
        ``decoded``)."""
        if self.templated is not None:
            return self._generate_templated(self.templated, n, decoded=decoded)
        made = [self._one() for _ in range(n)]
        for ev in made:
            offset = ev["metadata"]["offset"]
            key = int(offset)
            payload = _dumps({"data": {"newEvent": ev}})
            uid, primary = ev["metadata"]["uniqueEventId"], ev["primaryKey"]
            entry = Entry(key, offset, ev["hotelId"], payload, unique_id=uid, primary_key=primary)
            self.entries.append(entry)
            self._keys.append(key)
        self._count += len(made)
        self._notify()
        return made

    def _generate_templated(
        self, made: TemplatedEvents, n: int, *, decoded: bool
    ) -> list[dict[str, Any]]:
        stamp = _now_timestamp() if self.stamp_now else None
        new = [made.entry(j, stamp) for j in range(self._count, self._count + n)]
        self.entries += new
        self._keys += (e.key for e in new)
        self._count += n
        self._notify()
        return [json.loads(e.payload)["data"]["newEvent"] for e in new] if decoded else []

    def _one(self) -> dict[str, Any]:
        rng = self._rng
        self._offset += rng.randint(1, 3)
        self._clock += timedelta(microseconds=rng.randrange(1, 3_000_000))
        # Mostly follow-ups on recent resources, so each resource gets several events.
        if self._resources and rng.random() < 0.75:
            res = self._resources[-1 - rng.randrange(min(len(self._resources), 300))]
            event_name = rng.choice(_MODULES[res.module][1])
            detail = self._changes(res, new=False)
        else:
            module = rng.choices(("Reservation", "Profile", "Financial"), (6, 3, 2))[0]
            self._next_key += rng.randint(1, 9)
            res = Resource(str(self._next_key), module, rng.choice(HOTELS), {})
            self._resources.append(res)
            self._by_key[res.key] = res
            if len(self._resources) > 5000:
                del self._resources[:1000]
            event_name = _MODULES[module][0]
            detail = self._changes(res, new=True)
        # generate() appends at once, so the resource never runs ahead of the log.
        res.version += 1
        res.last_event, res.last_offset = event_name, str(self._offset)
        return {
            "metadata": {
                "offset": res.last_offset,
                "uniqueEventId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            },
            "moduleName": res.module,
            "eventName": event_name,
            "primaryKey": res.key,
            "timestamp": self._timestamp(),
            "hotelId": res.hotel,
            "publisherId": f"OPERA-{res.hotel}",
            "actionInstanceId": str(rng.randrange(10**9, 10**10)),
            "detail": detail,
        }

    def _timestamp(self) -> str:
        made, self._made = self._made, self._made + 1
        if self.stamp_now:
            return _now_timestamp()
        if self._first_us is not None:
            return _epoch_timestamp(self._first_us + made * BACKLOG_STEP_US)
        return _oracle(self._clock)

    def _changes(self, res: Resource, *, new: bool) -> list[dict[str, Any]]:
        rng = self._rng
        names = _ELEMENTS[res.module]
        picked = names[:4] if new else rng.sample(names, rng.randint(1, 3))
        detail = []
        for seq, name in enumerate(picked, start=1):
            old = "" if new else res.values.get(name, "")
            # Some elements keep their value: delta mode has something to filter out.
            value = old if (not new and rng.random() < 0.3) else self._value(name)
            res.values[name] = value
            scoped = name in ("Rate Code", "Room Type")
            day = self._clock.date()
            detail.append(
                {
                    "elementName": name,
                    "elementType": "FIELD",
                    "elementSequence": str(seq) if scoped else None,
                    "elementRole": None,
                    "newValue": value,
                    "oldValue": old,
                    "scopeFrom": day.isoformat() if scoped else None,
                    "scopeTo": (day + timedelta(days=3)).isoformat() if scoped else None,
                }
            )
        return detail

    def _value(self, name: str) -> str:
        rng = self._rng
        if "Date" in name:
            return (self._clock.date() + timedelta(days=rng.randrange(1, 90))).isoformat()
        if name == "Amount":
            return f"{rng.randrange(500, 90000) / 100:.2f}"
        if name in ("Adults", "Room Number", "Folio Window"):
            return str(rng.randrange(1, 500 if name == "Room Number" else 5))
        if "Name" in name:
            return rng.choice(_NAMES)
        if name == "Email":
            return f"guest{rng.randrange(10000)}@example.com"
        return rng.choice(_CHOICES[name])
