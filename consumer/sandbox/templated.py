"""Cheap events for the benchmarks (``fast_backlog``): a backlog a server can send faster than
any client reads it.

The generator of :mod:`.eventlog` spends about 0.1-0.2 ms on an event; 300,000 take a minute.
:class:`TemplatedEvents` generates :data:`TEMPLATES` events with it once and then makes event
``j`` from template ``j % TEMPLATES`` with only four fields varied, formatted into the
template's JSON text: ``metadata.offset`` (increasing, with gaps of 1-3), ``metadata.
uniqueEventId`` (UUID-shaped, unique per chain, seed and ``j``), ``primaryKey`` (the template's
key, shifted per cycle of templates, so a key gets several events as with the generator) and
``timestamp`` (Oracle's format, :data:`STEP_US` apart: from a day in 2024, or with
``live_timestamps`` ending at the start (:meth:`TemplatedEvents.end_at`), and the wall clock in
UTC for events made later). Every event has the generator's shape and passes the consumer's
decoding; a few microseconds each.

The backlog (the first ``n`` events of a chain) is never held as :class:`~.eventlog.Entry`
objects: :meth:`TemplatedEvents.wire` serves it as WebSocket wire bytes, complete ``next``
frames in chunks of :data:`CHUNK`, built once per length of the subscription id's JSON (every
consumer's id is a UUID, so in practice once) and cached. The id itself is a placeholder of
NUL bytes that a send replaces in the whole chunk with one ``bytes.replace``: a session only
writes large pre-encoded chunks, with no per-frame work.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import struct
from array import array
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import overload

from .eventlog import ChainLog, Entry

TEMPLATES = 997  # generator events cycled through (prime: keys and event names interleave)
CHUNK = 512  # frames per cached wire chunk (about 400 KB)
KEY_STRIDE = 10_000_000  # primaryKey shift per cycle of templates
STEP_US = 5_000  # backlog timestamps: 5 ms apart
_MARKS = ("@@OFFSET@@", "@@UID@@", "@@KEY@@", "@@TS@@")


_SECONDS: dict[int, tuple[str, str]] = {}  # epoch second -> its text before and after %f


def oracle_timestamp(epoch_us: int) -> str:
    """``28-APR-24 06.18.59.028027 AM`` (UTC) of epoch microseconds; the per-second part is
    cached, so a call costs about a microsecond."""
    sec, us = divmod(epoch_us, 1_000_000)
    parts = _SECONDS.get(sec)
    if parts is None:
        text = datetime.fromtimestamp(sec, UTC).strftime("%d-%b-%y %I.%M.%S.|%p").upper()
        head, ampm = text.split("|")
        parts = _SECONDS[sec] = (head, " " + ampm)
        if len(_SECONDS) > 64:
            del _SECONDS[next(iter(_SECONDS))]
    return f"{parts[0]}{us:06d}{parts[1]}"


class TemplatedEvents:
    """Event ``j`` of a chain (``j`` counts valid events from 0), made from templates."""

    def __init__(self, chain: str, seed: int) -> None:
        source = ChainLog(chain, seed)
        made = source.generate(TEMPLATES)
        self._parts: list[tuple[str, str, str, str, str]] = []
        self._hotels: list[str] = []
        self._keys: list[int] = []
        for ev in made:
            self._hotels.append(ev["hotelId"])
            self._keys.append(int(ev["primaryKey"]))
            ev["metadata"]["offset"], ev["metadata"]["uniqueEventId"] = _MARKS[:2]
            ev["primaryKey"], ev["timestamp"] = _MARKS[2:]
            text = json.dumps({"data": {"newEvent": ev}}, ensure_ascii=False, separators=(",", ":"))
            pieces: list[str] = []
            for mark in _MARKS:
                head, sep, text = text.partition(mark)
                assert sep, "the generator's field order changed"
                pieces.append(head)
            self._parts.append((pieces[0], pieces[1], pieces[2], pieces[3], text))
        digest = hashlib.sha256(f"{seed}:{chain}".encode()).hexdigest()
        self._uid_prefix = f"{digest[:8]}-{digest[8:12]}-4{digest[12:15]}-8{digest[15:18]}-"
        self._base = 1000 + int(digest[18:21], 16)
        self._clock_us = 1_714_284_000_000_000 + int(digest[21:26], 16) * 1_000_000
        self._wire: dict[tuple[int, int], tuple[bytes, array[int]]] = {}

    # --- one event -----------------------------------------------------------------------------

    def key(self, j: int) -> int:
        """The numeric offset: increasing in ``j``, steps of 1 to 3 (never assume +1)."""
        return self._base + 2 * j + ((j * 2654435761) >> 13 & 1)

    def unique_id(self, j: int) -> str:
        return f"{self._uid_prefix}{j:012x}"

    def primary_key(self, j: int) -> str:
        return str(self._keys[j % TEMPLATES] + (j // TEMPLATES) * KEY_STRIDE)

    def hotel(self, j: int) -> str:
        return self._hotels[j % TEMPLATES]

    def end_at(self, end_us: int, n: int) -> None:
        """Live timestamps: event ``n - 1`` (the backlog's last) at ``end_us`` (epoch µs), the
        earlier ones :data:`STEP_US` apart before it. Before the backlog's frames are built."""
        assert not self._wire, "the backlog's frames are built already"
        self._clock_us = end_us - max(0, n - 1) * STEP_US

    def timestamp_us(self, j: int) -> int:
        """The event's time in the backlog's clock (from a day in 2024, or :meth:`end_at`)."""
        return self._clock_us + j * STEP_US

    def payload(self, j: int, timestamp: str | None = None) -> str:
        """``{"data":{"newEvent":...}}`` of event ``j`` (``timestamp``: instead of the
        backlog clock's, e.g. the wall clock's)."""
        p = self._parts[j % TEMPLATES]
        ts = timestamp if timestamp is not None else oracle_timestamp(self.timestamp_us(j))
        return (
            f"{p[0]}{self.key(j)}{p[1]}{self._uid_prefix}{j:012x}{p[2]}"
            f"{self.primary_key(j)}{p[3]}{ts}{p[4]}"
        )

    def entry(self, j: int, timestamp: str | None = None) -> Entry:
        key = self.key(j)
        return Entry(
            key,
            str(key),
            self.hotel(j),
            self.payload(j, timestamp),
            unique_id=self.unique_id(j),
            primary_key=self.primary_key(j),
        )

    def keys_view(self, n: int) -> Sequence[int]:
        """The numeric offsets of events ``0..n-1``, as a sequence for :mod:`bisect`."""
        return _Keys(self, n)

    def start_index(self, n: int, offset: int) -> int:
        """The first of events ``0..n-1`` whose offset is at least ``offset`` (n: none)."""
        return bisect.bisect_left(self.keys_view(n), offset)

    # --- the backlog as wire bytes ---------------------------------------------------------------

    @staticmethod
    def placeholder(id_len: int) -> bytes:
        """What stands for a subscription id's JSON (``id_len`` bytes) in :meth:`wire`."""
        return b'{"id":' + b"\0" * id_len

    def wire(self, id_len: int, backlog: int, start: int, end: int) -> bytes:
        """Events ``start..end-1`` (within one chunk of :data:`CHUNK`; ``end <= backlog``) as
        WebSocket frames of ``next`` messages: unmasked text frames, ready to write once
        :meth:`placeholder` is replaced with the id's JSON (of ``id_len`` bytes)."""
        chunk = start // CHUNK
        assert end <= backlog and (end - 1) // CHUNK == chunk, "one chunk at a time"
        data, starts = self._chunk(id_len, backlog, chunk)
        base = chunk * CHUNK
        return data[starts[start - base] : starts[end - base]]

    def chunk_end(self, index: int) -> int:
        """The end of the chunk holding event ``index``."""
        return (index // CHUNK + 1) * CHUNK

    def prebuild(self, id_len: int, backlog: int) -> None:
        """Build and cache every chunk of the backlog for ids of this length."""
        for chunk in range((backlog + CHUNK - 1) // CHUNK):
            self._chunk(id_len, backlog, chunk)

    def _chunk(self, id_len: int, backlog: int, chunk: int) -> tuple[bytes, array[int]]:
        cached = self._wire.get((id_len, chunk))
        if cached is not None:
            return cached
        head = b'{"id":' + b"\0" * id_len + b',"type":"next","payload":'
        frames: list[bytes] = []
        starts = array("Q", [0])
        pos = 0
        for j in range(chunk * CHUNK, min(backlog, (chunk + 1) * CHUNK)):
            body = self.payload(j).encode()
            header = frame_header(len(head) + len(body) + 1)
            frames += (header, head, body, b"}")
            pos += len(header) + len(head) + len(body) + 1
            starts.append(pos)
        built = (b"".join(frames), starts)
        self._wire[(id_len, chunk)] = built
        return built


def frame_header(size: int) -> bytes:
    """The header of an unmasked, final WebSocket text frame of ``size`` bytes (a server's)."""
    if size < 126:
        return struct.pack("!BB", 0x81, size)
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size)
    return struct.pack("!BBQ", 0x81, 127, size)


def text_frames(texts: Sequence[str]) -> bytes:
    """``texts`` as consecutive text frames, ready to write (what ``send_text`` of websockets'
    protocol would produce without extensions, in one piece)."""
    parts: list[bytes] = []
    for text in texts:
        data = text.encode()
        parts += (frame_header(len(data)), data)
    return b"".join(parts)


class _Keys(Sequence[int]):
    def __init__(self, events: TemplatedEvents, n: int) -> None:
        self._events, self._n = events, n

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[int]: ...
    def __getitem__(self, i: int | slice) -> int | Sequence[int]:
        if isinstance(i, slice):
            return [self._events.key(j) for j in range(*i.indices(self._n))]
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._events.key(i)
