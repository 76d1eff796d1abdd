"""Orchestration: fetch the resource an event is about from the OHIP REST API, before the sink.

OHIP's streaming events say *that* a reservation changed, with the changed elements; many
integrations then GET the reservation itself. For the configured event (or module) names,
:class:`OrchestratingSink` builds the URL from a template and the event (``primaryKey``,
``hotelId``...), GETs it with the stream's token, ``x-app-key`` and ``x-hotelid``, and hands the
event to the real sink with the JSON attached (``Event.resource``).

* One token bucket for the process (``rate_per_s``, ``burst``); a 429's ``Retry-After`` holds
  it for every caller.
* 408/425/429, every status from 500 up, a redirect (3xx: maintenance, or ``base_url``
  pointing elsewhere; never followed), a 2xx that is not JSON (a maintenance page) and
  transport errors are retried (``max_attempts``, ``Retry-After`` honoured), then the batch
  fails as a transient sink error (the pipeline retries it, intake pauses): an outage is
  never the event's fault, whatever it answers.
* Each GET has a deadline (:func:`~consumer.http_client.deadline_s` of the client's timeouts:
  its connect bound plus twice its read bound), so a server trickling its answer a byte at a
  time cannot hold the stream.
* 401: the token is dropped and fetched again, at most once a :data:`REAUTH_EVERY_S`; a 401
  of the new one is not the token's age (a hotel outside its scope?): the write fails as
  transient at once. 403 (the application not entitled to this API or hotel, OHIP's
  configuration) dead-letters the event: waiting for a human would stall every hotel of the
  stream behind one, past OHIP's retention; ``dlq replay`` delivers them once fixed. 404, 410
  and 204: ``on_not_found`` decides. Other 4xx: the event is dead-lettered, with the start of the
  answer's body scrubbed of the token, the app key and every secret the log redactor knows
  (a server may echo the request). A permanent failure names its event: that one is
  dead-lettered, and the others of its batch get the answers already fetched for them (held
  :data:`HELD_S`), not another GET each.
* URL values from the wire are percent-encoded as one path segment each; an empty one, or a
  dot segment (``.``, ``..``) that would make the GET name another resource, dead-letters
  that event (refused, not encoded: ``%2E`` is ``.`` to URL normalisers, yarl and gateways).
* Coalescing: requests for one URL and hotel (``x-hotelid``) in flight are shared, and a
  resource fetched less than ``coalesce_ms`` ago is reused, so a burst of updates to one
  reservation costs one GET (its state may then predate the newest of those events by at
  most that window). A write stopped (a fleet handover) while others share its GET leaves
  the GET to them, not its cancellation. What is kept is the answer's bytes, at most
  :data:`CACHE_MAX_ENTRIES` and :data:`CACHE_MAX_BYTES`, let go once the window has passed;
  each event gets its own object parsed from them (a handler changing one event's resource
  changes no other's).
* So one GET can become a batch's worth of parsed copies (and of the sink's serialized ones):
  the sink is handed a batch in parts of at most :data:`WRITE_RESOURCE_BYTES` of resource
  text (one event at least), in order, each parsed only when its part is written, and fetched
  then (:data:`FETCH_WINDOW` GETs ahead at most, and no more than the part's room holds at
  the largest resource seen): one write holds a part's answers, not those of its whole batch
  (200 of up to 16 MiB each), and fetches each resource once.
* Parsed, a resource's text becomes objects that take some 2 to 30 times its bytes, the more
  the smaller its values (``[[],[],...]``: 23 times; an OHIP reservation: about 6). Each
  answer's objects are estimated from its text before it is parsed, by counting the bytes
  that make values (:func:`objects_estimate`, an over-estimate); a part's room counts a
  resource as its text or a :data:`OBJECTS_PER_BYTE`-th of that estimate, whichever is more
  (:func:`weight_of`), so the objects of one write stay within some
  :data:`OBJECTS_PER_BYTE` times :data:`WRITE_RESOURCE_BYTES`, whatever the resources are
  made of. A resource that alone would weigh more than :data:`MAX_RESOURCE_BYTES` (its
  objects over :data:`MAX_RESOURCE_OBJECTS`) is not parsed: that event is dead-lettered, as
  for a resource too large.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import aiohttp
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from ..config import OrchestrationSettings, StreamSettings
from ..config.fields import mask_url
from ..core.events import Event
from ..core.evidence import describe
from ..core.printable import printable
from ..core.records import Staged
from ..core.retry_after import WaitRetryAfter, retry_after_seconds, transient_status
from ..core.templates import Template
from ..core.token_bucket import TokenBucket
from ..core.unreachable import reason
from ..errors import AuthError, PermanentSinkError, SinkError, TransientSinkError
from ..http_client import (
    ERROR_BODY_BYTES,
    TRANSPORT_ERRORS,
    deadline_s,
    error_excerpt,
    failure_name,
    read_at_most,
    wire_url,
)
from ..logs import MASK, REDACTOR
from .base import Sink, took, within

log = structlog.get_logger(__name__)

MAX_RESOURCE_BYTES = 16 * 1024 * 1024  # a REST resource larger than this is not one
# What a resource's objects may take per byte of its text, in a part's room (weight_of): a
# write's parsed objects stay within about this many times WRITE_RESOURCE_BYTES. An OHIP
# resource (a reservation, a profile) is estimated at 7 to 15 times its text (indented to
# compact; it takes 3 to 6.5), so it weighs up to some 3.7 times its text: a part holds 4 MiB
# of them at least; only a resource of many tiny values weighs much more.
OBJECTS_PER_BYTE = 4
# A resource whose objects are estimated above this is refused unparsed (dead-lettered, as
# one larger than MAX_RESOURCE_BYTES): it would weigh more than a part's whole room.
MAX_RESOURCE_OBJECTS = OBJECTS_PER_BYTE * MAX_RESOURCE_BYTES
# The most one byte of JSON text adds to what parsing it takes (CPython 3.11, 64-bit: measured
# with tracemalloc, the parse's peak: a list's spare slots and its growth, the json module's
# key memo, a dict's growth), besides the text decoded: each value is an object of its own
# and a reference in its container, whatever its text. ``[`` a list (56 bytes, 4 slots from
# its first item); ``{`` a dict (184 bytes up to 5 keys); ``,`` one item more (a slot or a
# dict's entry, and a number: an int 28 bytes, a float 24); ``:`` a key (its entry, the
# memo's); ``"`` half a string (49 bytes and its characters: the text's own bytes count
# them). Counted wherever they are (a string's commas, keys parsed once, the shared ``0`` and
# ``""``): it over-counts, an OHIP resource some 2.5 times, a text of tiny values 1.2 to 3.3
# times (``[[],...]``: 49 bytes per byte of text, 23 taken). Not counted: strings that one
# character beyond Latin-1 widens to 2 or 4 bytes a character, at most 4 times the text,
# which a resource's weight (its length at least) covers; and the text decoded for the parse
# (as much at most, one resource's at a time).
_VALUE_COSTS = ((b"[", 88), (b"{", 192), (b",", 56), (b":", 64), (b'"', 28))
# Events of failed writes kept as sent, for their retries (OrchestratingSink): at most this
# many, of at most this many bytes together (resources and events); the oldest go first.
UNSENT_MAX = 2_000
UNSENT_MAX_BYTES = 64 * 1024 * 1024
# Resource text handed to the sink in one write, at most (a part has one event at least),
# each resource weighed by weight_of: the objects parsed from it, and the sink's own copies,
# are then those of one resource at most.
WRITE_RESOURCE_BYTES = MAX_RESOURCE_BYTES
# GETs of one write in flight at once, at most (more than the default burst): with the part's
# room, they bound what a write holds, whatever its batch's size and resources.
FETCH_WINDOW = 16
EXCERPT_CHARS = 300  # of an error answer's body, in the error (and so the dead letter)
# Answers kept for coalescing (past the window they are let go at once): at most this many,
# of at most this many bytes together; the oldest go first.
CACHE_MAX_ENTRIES = 1024
CACHE_MAX_BYTES = 64 * 1024 * 1024
# What the other events of a batch that failed permanently got, held for the writes of them
# the pipeline makes at once (see Orchestrator.bodies), and what a part's GETs fetched ahead
# of it: this long at most, this much (beyond it, the furthest ahead are not held).
HELD_S = 30.0
HELD_MAX_ENTRIES = 2_000
HELD_MAX_BYTES = 64 * 1024 * 1024
REAUTH_EVERY_S = 60.0  # a 401 drops the token at most this often
LOCATION_CHARS = 100  # of a redirect's target host, in the error
# What a URL template may name (the settings check them: OrchestrationSettings).
PLACEHOLDERS = ("primaryKey", "hotelId", "chainCode", "eventName", "moduleName")
_NULL = b"null"  # the body of a resource not found, attached as null
_DOT_SEGMENTS = frozenset({".", ".."})

Body = bytes  # a resource's JSON text, as answered (checked to be JSON)
_Key = tuple[str, str | None]  # (URL, x-hotelid): what one GET answers
# An event's: its resource, None (no template names it), or why it has none.
_Outcome = Body | None | BaseException
_Pair = tuple[Event, Body | None]  # an event and the resource attached to it


def objects_estimate(text: bytes) -> int:
    """About the most the objects parsed from ``text`` (JSON) take, in bytes, the text's own
    included: counted, not parsed (:data:`_VALUE_COSTS`; a few passes of ``bytes.count``,
    some 15 % of what parsing it costs)."""
    return len(text) + sum(text.count(byte) * cost for byte, cost in _VALUE_COSTS)


class _Answer(bytes):
    """A resource's JSON text as answered, with its :func:`weight_of` (estimated once, when
    it is fetched: it is kept, held and shared as it is)."""

    weight: int

    def __new__(cls, text: bytes, weight: int) -> _Answer:
        self = super().__new__(cls, text)
        self.weight = weight
        return self


def weight_of(text: bytes) -> int:
    """What a resource of JSON ``text`` takes of a part's room: its text, or its objects'
    estimate over :data:`OBJECTS_PER_BYTE`, whichever is more."""
    return max(len(text), -(-objects_estimate(text) // OBJECTS_PER_BYTE))


def _weight(body: Body) -> int:
    """:func:`weight_of` a resource, as weighed when it was fetched (``null``, not fetched:
    its text)."""
    return body.weight if isinstance(body, _Answer) else len(body)


class AccessTokens(Protocol):
    """A stream's OAuth tokens (the runtime's token provider): the current one, or a new one
    after :meth:`invalidate`."""

    async def access_token(self) -> str: ...

    def invalidate(self, rejected: str | None = None) -> None: ...


class _NotFound:
    """A 404 (410, 204), kept like a resource so the coalescing window applies to it too."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __str__(self) -> str:
        return self.what


class _Abandoned(Exception):
    """Set on a shared GET whose starter was cancelled (its write stopped: a handover, a
    stream's stop): the writes that joined it were not, and GET the resource themselves."""


class _NotRetried(Exception):
    """Failed for a reason another GET of this write cannot mend (a 401 of a new token): a
    transient failure of the write, at once (the pipeline retries it later)."""


def _attach(ev: Event, body: Body | None) -> Event:
    """``ev`` with its own resource parsed from ``body`` (None: not orchestrated)."""
    if body is None:
        return ev
    return ev._replace(resource=json.loads(body), fetched=True)


def _cut(pairs: Sequence[_Pair]) -> int:
    """How many of ``pairs`` make the part written next: as many as fit in
    :data:`WRITE_RESOURCE_BYTES` of resources (by :func:`_weight`), one at least."""
    size = 0
    for i, (_, body) in enumerate(pairs):
        size += _weight(body) if body is not None else 0
        if i and size > WRITE_RESOURCE_BYTES:
            return i
    return len(pairs)


def _copy(failed: BaseException) -> BaseException:
    """A fetch's failure, raised by one write: its own (``delivered`` is set on it, and the
    GET's may be another write's too)."""
    if isinstance(failed, TransientSinkError):
        return TransientSinkError(str(failed), retry_after=failed.retry_after)
    if isinstance(failed, PermanentSinkError):
        return PermanentSinkError(str(failed), unique_event_id=failed.unique_event_id)
    return failed


def _size(task: asyncio.Task[Body | _NotFound]) -> int:
    """What a done GET's resource takes of a part's room (:func:`_weight`; 0: none, a
    resource is never empty)."""
    if task.cancelled() or task.exception() is not None:
        return 0
    got = task.result()
    return _weight(got) if isinstance(got, bytes) else 0


def _drop_older(entries: OrderedDict[Any, tuple[Any, float, int]], cutoff: float) -> int:
    """Drop the entries (value, stamped at, bytes) stamped at or before ``cutoff``, the oldest
    first (they are in the order they were stamped); the bytes they counted."""
    freed = 0
    while entries:
        key, (_, at, size) = next(iter(entries.items()))
        if at > cutoff:
            break
        del entries[key]
        freed += size
    return freed


def _dot_segment(value: str) -> bool:
    """Whether ``value`` is, or holds between slashes (a gateway may decode ``%2F``), a dot
    segment: the server would resolve it and serve another resource."""
    if value in _DOT_SEGMENTS:
        return True
    return ("/" in value or "\\" in value) and any(
        part in _DOT_SEGMENTS for part in value.replace("\\", "/").split("/")
    )


def _location_host(location: str | None, scrub: Callable[[str], str]) -> str:
    """Where a redirect points, for a message: its host only (no user information, path or
    query), scrubbed and bounded."""
    if not location:
        return "nowhere (no Location)"
    try:
        host = urlsplit(location.strip()).hostname
    except ValueError:
        return "an unreadable Location"
    if not host:
        return "a path of the same host"
    return printable(scrub(host), LOCATION_CHARS)


class Orchestrator:
    def __init__(
        self,
        settings: OrchestrationSettings,
        http: aiohttp.ClientSession,
        streams: Mapping[str, tuple[StreamSettings, AccessTokens]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._http = http
        self._streams = streams
        self._clock = clock
        self._bucket = TokenBucket(settings.rate_per_s, settings.burst, clock())
        self._deadline = deadline_s(http.timeout)  # of one GET, its answer included
        self._templates = {
            name: Template(text, PLACEHOLDERS) for name, text in settings.resources.items()
        }
        # (URL, x-hotelid): the GETs in flight, and the answers of those done, in the order
        # they were done (answer, monotonic time, bytes counted) for the coalescing window.
        self._inflight: dict[_Key, asyncio.Future[Body | _NotFound]] = {}
        self._recent: OrderedDict[_Key, tuple[Body | _NotFound, float, int]] = OrderedDict()
        self._recent_bytes = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._reauth_at: float | None = None  # when a 401 last dropped a token
        self._dropped: str | None = None  # that token
        # (stream, uniqueEventId): what the events of a batch that failed permanently got
        # (answer or failure, monotonic time, bytes counted), for their own writes.
        self._held: OrderedDict[tuple[str, str], tuple[_Outcome, float, int]] = OrderedDict()
        self._held_bytes = 0
        self._biggest: dict[str, int] = {}  # stream: the largest resource of its last part
        self.requests = 0  # GETs sent (retries included)
        self.coalesced = 0  # fetches answered by another one's GET
        self.throttled = 0  # 429 answers

    def url_for(self, stream: str, ev: Event) -> str | None:
        """The URL of ``ev``'s resource; None when no template names it. A value that cannot
        name the resource (empty, a dot segment) is that event's :class:`PermanentSinkError`."""
        template = self._templates.get(ev.event_name) or self._templates.get(ev.module_name)
        if template is None:
            return None
        st = self._streams[stream][0]
        values = {
            "primaryKey": ev.primary_key,
            "hotelId": ev.hotel_id or "",
            "chainCode": st.chain_code,
            "eventName": ev.event_name,
            "moduleName": ev.module_name,
        }
        quoted: dict[str, str] = {}
        for name in dict.fromkeys(f for _, f in template.parts if f is not None):
            value = values[name]
            if not value:
                raise PermanentSinkError(
                    f"orchestration: the event has no {name}, which the URL template needs",
                    unique_event_id=ev.unique_event_id,
                )
            if _dot_segment(value):
                raise PermanentSinkError(
                    f"orchestration: the event's {name} {printable(value, 40)!r} is a dot "
                    "segment: the GET would name another resource",
                    unique_event_id=ev.unique_event_id,
                )
            quoted[name] = quote(value, safe="")
        path = template.render(quoted)
        if path.startswith(("http://", "https://")):
            return path
        return (self.settings.base_url or st.gateway_url) + "/" + path.lstrip("/")

    async def enrich(self, stream: str, events: Sequence[Event]) -> list[Event]:
        """``events``, each with its own resource attached where a template names it."""
        bodies = await self.bodies(stream, events)
        return [_attach(ev, body) for ev, body in zip(events, bodies, strict=True)]

    async def bodies(self, stream: str, events: Sequence[Event]) -> list[Body | None]:
        """Each event's resource as JSON text (``null`` when not found and attached as such),
        or None where no template names it: bytes, which nobody can change.

        A failure names its event (the first in the batch's order that has one) and is
        raised; what the others got is held, as :meth:`part` says."""
        got, failed = await self.part(stream, events)
        if failed is None:
            return got
        if isinstance(failed, PermanentSinkError):  # those before it: written at once
            self._hold(stream, zip(events, got, strict=False))
        raise failed

    async def part(
        self, stream: str, events: Sequence[Event], limit: int | None = None
    ) -> tuple[list[Body | None], BaseException | None]:
        """The resources (as :meth:`bodies`) of ``events``' first ones, in order: as many as
        fit in ``limit`` bytes (by :func:`_weight`; one at least), up to the first that has
        none; and why that one has none (None: all fit, or the next did not). So a batch is
        fetched, and written, a part at a time: its fetched bytes are those of a part, not of
        the whole batch.

        The GETs run ahead of the one awaited, :data:`FETCH_WINDOW` at most and no further
        than the part's room seems to allow (at the largest resource of this part and of the
        stream's last one; one at a time until a resource is seen). What they got beyond the
        part (a resource, its own permanent failure: less than two resources' worth when the
        guess holds) is held (:data:`HELD_S`) for the next part, so it costs no GET again. So
        is what the others got when a permanent failure names its event: the pipeline
        dead-letters that one and writes the others on, each part a call of its own (split
        one by one, a batch of n events fetched the n - 1 good ones up to n times more: rate
        limit, cost). An event whose URL cannot be made, or one whose own failure is held, is
        named at once, before any GET."""
        n = len(events)
        held = self._held
        known: dict[int, _Outcome] = {}
        if held:
            self._let_go_held(self._clock())
            for i, ev in enumerate(events):
                kept = held.get((stream, ev.unique_event_id))
                if kept is not None:
                    known[i] = kept[0]
        keys: list[_Key | None] = []
        for i, ev in enumerate(events):
            outcome = known.get(i)
            if isinstance(outcome, PermanentSinkError):  # that event's, already named
                self._unhold(stream, ev)
                return [], outcome
            try:
                keys.append(None if i in known else self._key(stream, ev))
            except PermanentSinkError as exc:
                return [], exc
        last = {key: i for i, key in enumerate(keys) if key is not None}  # its last event
        tasks: dict[_Key, asyncio.Task[Body | _NotFound]] = {}
        out: list[Body | None] = []
        size = started = 0
        # The largest resource of this stream's last part (None: none seen yet) and of this
        # one (None: none yet): the GETs in flight are guessed at the larger.
        before, biggest = self._biggest.get(stream), None

        def top_up(i: int) -> None:
            """Start the GETs of the events up to ``i``, and of those after it the window
            and the part's room allow (at a stream's first part, one at a time until one
            answers: 16 started at once would hold as many resources of up to 16 MiB)."""
            nonlocal started
            while started < n:
                if started > i:
                    running = sum(not t.done() for t in tasks.values())
                    got = [s for t in tasks.values() if t.done() and (s := _size(t))]
                    if running >= FETCH_WINDOW:
                        return
                    if limit is not None:
                        if before is None and biggest is None and not got:
                            if running:
                                return
                        else:
                            guess = max(before or 0, biggest or 0, *got) * running
                            if size + sum(got) + guess >= limit:
                                return
                key = keys[started]
                if key is not None and key not in tasks:
                    tasks[key] = asyncio.create_task(self.fetch(stream, *key))
                started += 1

        failed: BaseException | None = None
        stop = n  # the first event not returned
        try:
            for i, ev in enumerate(events):
                key = keys[i]
                if i in known:
                    outcome = known[i]
                elif key is None:
                    outcome = None
                else:
                    top_up(i)
                    await asyncio.wait([tasks[key]])  # its failure is an outcome, not raised
                    outcome = self._outcome(ev, tasks[key])
                if isinstance(outcome, BaseException):
                    failed, stop = outcome, i
                    break
                got = _weight(outcome) if outcome is not None else 0
                if outcome is not None:
                    biggest = max(biggest or 0, got)
                if limit is not None and out and size + got > limit:
                    stop = i
                    break
                out.append(outcome)
                size += got
                if i in known:
                    self._unhold(stream, ev)
                if key is not None and last[key] == i:
                    del tasks[key]  # let go of it: the part is the only copy the write has
            # What was fetched ahead: awaited (cancelled, another write sharing a GET would
            # GET it again), then held for the next part, unless an outage stopped this one
            # (asked again at the retry).
            if tasks:
                await asyncio.wait(tasks.values())
        except BaseException:
            for task in tasks.values():
                task.cancel()
            raise
        finally:
            if biggest is not None:
                # The next part is guessed at this one's largest, not the largest ever (one
                # resource of 16 MiB would slow the stream's GETs for good).
                self._biggest[stream] = biggest
        if failed is None or isinstance(failed, PermanentSinkError):
            ahead = [
                (events[i], self._outcome(events[i], tasks[key]))
                for i, key in enumerate(keys[stop:], start=stop)
                if key is not None and key in tasks and not (i == stop and failed is not None)
            ]
            self._hold(stream, ahead)
        return out, failed

    def _outcome(self, ev: Event, task: asyncio.Task[Body | _NotFound]) -> _Outcome:
        """``ev``'s resource from the GET of its URL (done), or why it has none: a permanent
        failure naming that event, or the GET's other failure."""
        if task.cancelled():
            # Not by this write (its own stop ends it where it awaits); nor by another write
            # sharing the GET (see fetch). Whoever did: retried, never a CancelledError nobody
            # asked this write for.
            return TransientSinkError("orchestration: the GET was cancelled")
        exc = task.exception()
        if exc is not None:
            if isinstance(exc, PermanentSinkError) and exc.unique_event_id is None:
                # The GET's (shared by the events of one resource): each its own, named.
                return PermanentSinkError(str(exc), unique_event_id=ev.unique_event_id)
            return exc
        got = task.result()
        if isinstance(got, _NotFound):
            if self.settings.on_not_found == "dead-letter":
                return PermanentSinkError(
                    f"orchestration: {got}", unique_event_id=ev.unique_event_id
                )
            return _NULL
        return got

    def _key(self, stream: str, ev: Event) -> _Key | None:
        """What ``ev``'s GET asks (None: no template names it); a value that cannot travel is
        that event's :class:`PermanentSinkError`."""
        u = self.url_for(stream, ev)
        if u is None:
            return None
        hotel = ev.hotel_id or None
        if hotel and not (hotel.isascii() and hotel.isprintable()):
            raise PermanentSinkError(  # aiohttp would refuse the header (a ValueError)
                "orchestration: hotelId cannot travel in the x-hotelid header (not "
                "printable ASCII)",
                unique_event_id=ev.unique_event_id,
            )
        return (u, hotel)

    def _hold(self, stream: str, outcomes: Iterable[tuple[Event, _Outcome]]) -> None:
        """Hold what these events got, for the writes of them that follow at once (the next
        part, a split's): their resources and their own permanent failures (an outage's are
        not: it is asked again when retried). ``outcomes`` come in the order they are
        written: past :data:`HELD_MAX_BYTES` (or entries) the rest, the furthest ahead, are not
        held (fetched again at their write), not those held before, needed sooner."""
        held, now = self._held, self._clock()
        self._let_go_held(now)
        for ev, outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, PermanentSinkError):
                continue
            key = (stream, ev.unique_event_id)
            if key in held:  # held already: as long as it was first
                continue
            size = (len(outcome) if isinstance(outcome, bytes) else 0) + 200
            if len(held) >= HELD_MAX_ENTRIES or self._held_bytes + size > HELD_MAX_BYTES:
                return
            held[key] = (outcome, now, size)
            self._held_bytes += size

    def _unhold(self, stream: str, ev: Event) -> None:
        kept = self._held.pop((stream, ev.unique_event_id), None)
        if kept is not None:
            self._held_bytes -= kept[2]

    def _let_go_held(self, now: float) -> None:
        """Past :data:`HELD_S` (a write that did not come at once: the sink's outage, a stop,
        a parked resource's event dead-lettered unwritten), fetched anew at its write."""
        self._held_bytes -= _drop_older(self._held, now - HELD_S)

    async def fetch(self, stream: str, url: str, hotel_id: str | None) -> Body | _NotFound:
        """The answer for ``url`` in the context of ``hotel_id``: shared with a GET of the
        same in flight, or one done within the coalescing window."""
        key = (url, hotel_id)
        flying = self._inflight.get(key)
        if flying is not None:
            self.coalesced += 1
            try:
                return await asyncio.shield(flying)  # cancelled, this fetch is; not the GET
            except _Abandoned:
                # Its starter was stopped, not this write. Another waiter's own GET may have
                # started meanwhile: joined once (abandoned again, our own GET: bounded).
                flying = self._inflight.get(key)
                if flying is not None:
                    with contextlib.suppress(_Abandoned):
                        return await asyncio.shield(flying)
        self._expire(self._clock())
        hit = self._recent.get(key)
        if hit is not None:
            self.coalesced += 1
            return hit[0]
        fut: asyncio.Future[Body | _NotFound] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            value = await self._get(stream, url, hotel_id)
        except BaseException as exc:
            if self._inflight.get(key) is fut:
                del self._inflight[key]
            if not fut.done():
                # Stopped (cancelled): not the GET's failure, nor that of the writes sharing it.
                fut.set_exception(exc if isinstance(exc, Exception) else _Abandoned())
                fut.exception()  # retrieved: waiters re-raise it, nobody else must log it
            raise
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        fut.set_result(value)
        self._keep(key, value)
        return value

    def _keep(self, key: _Key, value: Body | _NotFound) -> None:
        """Keep an answer for the coalescing window, within the cache's bounds."""
        window = self.settings.coalesce_ms / 1000
        size = (len(value) if isinstance(value, bytes) else 0) + len(key[0]) + 200
        if window <= 0 or size > CACHE_MAX_BYTES:
            return
        now = self._clock()
        old = self._recent.pop(key, None)
        if old is not None:
            self._recent_bytes -= old[2]
        self._recent[key] = (value, now, size)
        self._recent_bytes += size
        while len(self._recent) > CACHE_MAX_ENTRIES or self._recent_bytes > CACHE_MAX_BYTES:
            self._recent_bytes -= self._recent.popitem(last=False)[1][2]
        self._expire(now)
        if self._sweeper is None and self._recent:
            self._sweeper = asyncio.get_running_loop().call_later(window, self._sweep)

    def _expire(self, now: float) -> None:
        """Let go of the answers done a coalescing window ago or more (the oldest first)."""
        self._recent_bytes -= _drop_older(self._recent, now - self.settings.coalesce_ms / 1000)

    def _sweep(self) -> None:
        """A timer's: the answers kept expire though no fetch comes to let them go."""
        self._sweeper = None
        now = self._clock()
        self._expire(now)
        if self._recent:
            oldest = next(iter(self._recent.values()))[1]
            delay = max(oldest + self.settings.coalesce_ms / 1000 - now, 0.001)
            self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def close(self) -> None:
        """Let go of every answer kept (and of the timer that would)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._recent.clear()
        self._recent_bytes = 0
        self._held.clear()
        self._held_bytes = 0
        self._biggest.clear()

    async def _get(self, stream: str, url: str, hotel_id: str | None) -> Body | _NotFound:
        s = self.settings
        shown = mask_url(url)  # what messages, logs and dead letters say: no secret of the URL
        wire = str(wire_url(url)[0])  # as aiohttp's errors write it

        def masked(text: str) -> str:
            # And every registered secret (the token, the app key), before reason() cuts the
            # text: aiohttp's parse errors quote the reply, which may echo the request.
            return str(REDACTOR.scrub(text.replace(wire, shown).replace(url, shown)))

        def retrying_note(rs: RetryCallState) -> None:
            failed = rs.outcome.exception() if rs.outcome else None
            log.warning(
                "orchestration GET failed; retrying",
                url=shown,
                attempt=rs.attempt_number,
                # aiohttp's errors carry the URL and may quote the reply: as the final error.
                error=reason(failed, masked) if failed is not None else "",
            )

        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type((TransientSinkError, *TRANSPORT_ERRORS)),
                stop=stop_after_attempt(s.max_attempts),
                wait=WaitRetryAfter(
                    wait_exponential_jitter(multiplier=0.2, max=s.retry_max_s, jitter=0.2)
                ),
                before_sleep=retrying_note,
                reraise=True,
            ):
                with attempt:
                    return await self._request(stream, url, shown, hotel_id)
        except _NotRetried as exc:
            raise TransientSinkError(str(exc)) from None
        except AuthError as exc:
            # Our credentials, not the event: retried by the pipeline, never dead-lettered. Not
            # here: the token provider has already retried for as long as it is configured to.
            raise TransientSinkError(f"orchestration: {exc}") from exc
        except TRANSPORT_ERRORS as exc:
            raise TransientSinkError(
                f"orchestration GET {shown}: {failure_name(exc)}: {reason(exc, masked)}"
            ) from exc
        raise AssertionError("unreachable: AsyncRetrying either returns or raises")

    async def _request(
        self, stream: str, url: str, shown: str, hotel_id: str | None
    ) -> Body | _NotFound:
        settings, tokens = self._streams[stream]
        # The bucket is arithmetic on the clock: nothing would set an Event, so we sleep.
        while (wait := self._bucket.take(self._clock())) > 0:  # noqa: ASYNC110
            await asyncio.sleep(wait)
        token = await tokens.access_token()  # an AuthError: see _get
        reissued = token == self._dropped  # a 401 dropped it already, and it came back
        app_key = settings.app_key.get_secret_value()
        headers = {
            "Authorization": f"Bearer {token}",
            "x-app-key": app_key,
            "Accept": "application/json",
        }
        if hotel_id:
            headers["x-hotelid"] = hotel_id
        self.requests += 1
        deadline = asyncio.timeout(self._deadline)
        status = 0
        read: list[bytes] = []  # of the answer's body, kept if its read fails
        cut = ""
        try:
            # The bearer token authenticates; user information in the URL does not travel.
            async with (
                deadline,
                self._http.get(wire_url(url)[0], headers=headers, allow_redirects=False) as resp,
            ):
                status = resp.status
                ok = 200 <= status < 300
                retry_after = resp.headers.get("Retry-After")
                location = resp.headers.get("Location")
                says_json = "json" in resp.headers.get("Content-Type", "").lower()
                # The far end's body: a resource up to MAX_RESOURCE_BYTES, else only its start.
                limit = MAX_RESOURCE_BYTES + 1 if ok else ERROR_BODY_BYTES
                content = await read_at_most(resp, limit, read)
        except TRANSPORT_ERRORS as exc:
            if status and not ok:
                # Another status, then its body cut or too slow: the status is the server's
                # word all the same (a 403 retried for good held the stream for ever).
                content = b"".join(read)
                cut = f" (its body cut short: {failure_name(exc)})"
            elif isinstance(exc, TimeoutError) and deadline.expired():
                raise TransientSinkError(
                    f"orchestration GET {shown}: no complete answer within {self._deadline:g} s"
                ) from None
            else:
                raise  # no answer, or a resource cut short: a transport error (see _get)

        # The body is the far end's, and it may echo the request: only its start, decoded
        # lossily and scrubbed of this request's credentials and every registered secret.
        def scrub(text: str) -> str:
            for secret in sorted((token, app_key), key=len, reverse=True):
                if len(secret) >= 4:  # as the redactor: a shorter one would mask half the text
                    text = text.replace(secret, MASK)
            return str(REDACTOR.scrub(text))

        if status == 204:  # nothing to attach: as a resource gone
            return _NotFound(f"GET {shown}: HTTP 204 (no content)")
        if ok:
            if len(content) > MAX_RESOURCE_BYTES:
                raise PermanentSinkError(
                    f"orchestration GET {shown}: resource larger than {MAX_RESOURCE_BYTES} bytes"
                )
            weight = weight_of(content)
            if weight > MAX_RESOURCE_BYTES:
                # Its values too many and too small (what a REST resource is not): parsed, it
                # would take more than a write may hold. Not parsed, not retried (the same
                # answer would come): the event is dead-lettered, as for a larger text.
                raise PermanentSinkError(
                    f"orchestration GET {shown}: resource of {len(content)} bytes too dense to "
                    f"read: its values would take some {weight * OBJECTS_PER_BYTE >> 20} MiB "
                    f"once parsed, more than {MAX_RESOURCE_OBJECTS >> 20} MiB"
                )
            content = _Answer(content, weight)  # the copy that is kept (the read's let go)
            try:
                json.loads(content)  # checked here; each event parses its own copy
            except RecursionError:  # this resource's own: nested deeper than a parser goes
                raise PermanentSinkError(
                    f"orchestration GET {shown}: resource nested too deep to read"
                ) from None
            except ValueError:
                if says_json:  # this resource's own JSON is broken: retrying cannot mend it
                    raise PermanentSinkError(
                        f"orchestration GET {shown}: the resource is not valid JSON"
                    ) from None
                # An HTML maintenance page or a proxy's answer served as 2xx: the server's
                # state, not the event's (dead-lettering would take every event of the outage).
                raise TransientSinkError(f"orchestration GET {shown}: answer is not JSON") from None
            return content
        if status == 401:
            self._unauthorised(tokens, token, shown, reissued)
        if status == 403:
            # OHIP's gateway: the application is not entitled to this API, or to this hotel.
            # Not the event's fault, but waiting for a human would stall every hotel of the
            # chain behind one, for days (OHIP keeps 7): dead-lettered with why, each event is
            # kept, and `dlq replay` delivers them once the portal is fixed.
            raise PermanentSinkError(
                f"orchestration GET {shown}: HTTP 403: the application is not allowed this "
                "API or hotel (check its subscription and hotels in the developer portal, or "
                "the resources/[filter] configured; then `dlq replay`)"
            )
        if 300 <= status < 400:
            # Not followed (the token must not travel elsewhere): a gateway in maintenance
            # sending every GET to a status page, or base_url pointing at the wrong place.
            raise TransientSinkError(
                f"orchestration GET {shown}: HTTP {status}, a redirect to "
                f"{_location_host(location, scrub)} (not followed: maintenance, or check "
                "base_url and the resources' URLs)",
                retry_after=retry_after_seconds(retry_after),
            )
        if transient_status(status):
            after = retry_after_seconds(retry_after)
            if status == 429:
                self.throttled += 1
                self._bucket.hold(self._clock(), after if after is not None else 1.0)
            raise TransientSinkError(f"orchestration GET {shown}: HTTP {status}", retry_after=after)
        if status in (404, 410):
            return _NotFound(f"GET {shown}: HTTP {status}")
        excerpt = error_excerpt(content, scrub, EXCERPT_CHARS, cut=bool(cut))
        raise PermanentSinkError(f"orchestration GET {shown}: HTTP {status}: {excerpt}{cut}")

    def _unauthorised(self, tokens: AccessTokens, token: str, shown: str, reissued: bool) -> None:
        """A 401 with ``token``: drop it (the next attempt fetches a new one), unless a 401
        dropped one less than :data:`REAUTH_EVERY_S` ago: then the token is not stale (this
        resource or hotel is outside its scope?) and the write fails at once, as transient,
        without asking the token endpoint for one more at every attempt."""
        what = f"orchestration GET {shown}: HTTP 401"
        if token == self._dropped and not reissued:
            # Dropped while this GET was on its way, for another one: retried with the new one.
            raise TransientSinkError(what)
        now = self._clock()
        if self._reauth_at is not None and now - self._reauth_at < REAUTH_EVERY_S:
            raise _NotRetried(
                f"{what} with a token fetched after another 401 (the application may not be "
                "allowed this resource or hotel); retried, not dead-lettered"
            )
        self._reauth_at, self._dropped = now, token
        tokens.invalidate(token)
        raise TransientSinkError(f"{what} (the token is dropped: a new one is fetched)")


class OrchestratingSink:
    """The configured sink, with each event's resource fetched first."""

    waits = True  # the resource's GET, whatever the inner sink

    def __init__(self, inner: Sink, orchestrator: Orchestrator) -> None:
        self.inner = inner
        self.orchestrator = orchestrator
        self.name = inner.name
        # The events of writes that failed, with the resources they were sent, as fetched
        # (JSON text: the handler may have changed the objects it was given): tried again,
        # they go out the same (a webhook's Idempotency-Key with the same body). Fetched
        # anew, a resource changed meanwhile made the retry another request under the same
        # key (a receiver honouring the key refuses that: dead-lettered though delivered),
        # or one the REST API no longer answers. (event, resource, bytes counted), the oldest
        # first, within UNSENT_MAX and UNSENT_MAX_BYTES: one let go is fetched again at its
        # write. Not those the pipeline dead-letters (never written again). The last one of a
        # failed part is marked (True): the retry's part ends there too, so that the inner
        # sink's requests are cut as before (a webhook batch's key is of its events: one more
        # in its last request, the receiver had what it took under another key).
        self._unsent: OrderedDict[tuple[str, str], tuple[Event, Body | None, int, bool]] = (
            OrderedDict()
        )
        self._unsent_bytes = 0

    async def open(self, committed: str | None) -> None:
        await self.inner.open(committed)

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        """``events`` fetched and written a part at a time (:meth:`Orchestrator.part`): what
        the write holds is a part's resources, not the batch's."""
        unsent, n = self._unsent, len(events)
        # Fetched (or kept from a failed write), not written yet: the part being written
        # first, and a resource at most besides (the next part's first, when it is large).
        pairs: list[_Pair] = []
        size = i = 0  # their resources' bytes; the first event not among them
        done = 0  # events of the parts the inner sink took
        cut = 0  # of the part being written
        failed: BaseException | None = None  # why the write stops at events[i:] (named)
        try:
            while True:
                full = False
                while i < n and failed is None and not full:
                    kept = unsent.get((stream, events[i].unique_event_id)) if unsent else None
                    if kept is not None:  # sent by a failed write: sent the same again
                        got = [(kept[0], kept[1])]
                        full = kept[3]  # its part ended there
                    else:
                        end = i + 1
                        while end < n and (stream, events[end].unique_event_id) not in unsent:
                            end += 1
                        run = events[i:end]
                        room = WRITE_RESOURCE_BYTES - size
                        bodies, failed = await self.orchestrator.part(stream, run, room)
                        got = list(zip(run, bodies, strict=False))
                        full = failed is None and len(got) < len(run)
                    pairs += got
                    size += sum(_weight(body) for _, body in got if body is not None)
                    i += len(got)
                    full = full or size >= WRITE_RESOURCE_BYTES
                if not pairs:
                    break
                cut = _cut(pairs)
                # Each event its own resource object, parsed for its part only.
                with within(done):  # what the inner sink says it took of the part counts
                    await self.inner.write(stream, [_attach(ev, body) for ev, body in pairs[:cut]])
                done += cut
                took(done)  # said now: the next part's GETs await, and a commit then records it
                size -= sum(_weight(body) for _, body in pairs[:cut] if body is not None)
                del pairs[:cut]
                cut = 0
            if failed is not None:  # the parts before it written: from its own event on
                raise _copy(failed)
        except BaseException as exc:
            problem = exc
            if isinstance(exc, TransientSinkError | PermanentSinkError):
                # Those the inner sink took before it failed are not sent again: counted from
                # the write's start (the parts before, and the failed part's own figure).
                taken = min(max(0, exc.delivered), cut) if cut else 0
                exc.delivered = done = done + taken
                del pairs[:taken]
                cut -= taken
            elif done and isinstance(exc, Exception) and not isinstance(exc, SinkError):
                # An error of the sink's own after parts it took: permanent, as the pipeline
                # takes it, with those parts delivered (not written again one by one).
                problem = PermanentSinkError(describe(exc, REDACTOR.scrub), delivered=done)
            self._failed(stream, events, done, pairs, problem, part=cut)
            if problem is exc:
                raise
            raise problem from exc
        if unsent:
            for ev in events:
                self._forget((stream, ev.unique_event_id))

    def _failed(
        self,
        stream: str,
        events: Sequence[Event],
        taken: int,
        rest: Sequence[_Pair],
        exc: BaseException,
        *,
        part: int = 0,
    ) -> None:
        """Keep the events of a failed write that the inner sink did not take, with what
        they were sent (``rest``: those fetched), for their retry; but not the one the
        pipeline dead-letters for ``exc``: the one it names, or the write's only one left
        that failed for good. ``part``: how many of ``rest`` the failed inner write held."""
        dead: str | None = None
        if len(events) - taken == 1:
            if isinstance(exc, Exception) and not isinstance(exc, TransientSinkError):
                dead = events[taken].unique_event_id
        elif isinstance(exc, PermanentSinkError):
            dead = exc.unique_event_id
        for ev in events[:taken]:
            self._forget((stream, ev.unique_event_id))
        unsent = self._unsent
        ends: tuple[str, str] | None = None  # the failed part's last one kept
        for at, (ev, body) in enumerate(rest):
            key = (stream, ev.unique_event_id)
            self._forget(key)  # kept again as the newest
            if ev.unique_event_id == dead:
                continue
            size = len(body or b"") + ev.held_bytes() + 200
            unsent[key] = (ev, body, size, False)
            self._unsent_bytes += size
            if at < part:
                ends = key
        if ends is not None:
            unsent[ends] = (*unsent[ends][:3], True)
        while len(unsent) > UNSENT_MAX or self._unsent_bytes > UNSENT_MAX_BYTES:
            self._unsent_bytes -= unsent.popitem(last=False)[1][2]  # fetched again at its write

    def _forget(self, key: tuple[str, str]) -> None:
        kept = self._unsent.pop(key, None)
        if kept is not None:
            self._unsent_bytes -= kept[2]

    def position(self) -> str | None:
        return self.inner.position()

    async def sync(self, position: str | None) -> None:
        await self.inner.sync(position)

    def committed(self, position: str) -> None:
        self.inner.committed(position)

    def staged(self) -> Staged | None:
        return self.inner.staged()

    def counters(self) -> dict[str, float]:
        o = self.orchestrator
        mine = {
            "orchestration_requests": float(o.requests),
            "orchestration_coalesced": float(o.coalesced),
            "orchestration_throttled": float(o.throttled),
        }
        return {**self.inner.counters(), **mine}

    async def close(self) -> None:
        self._unsent.clear()
        self._unsent_bytes = 0
        self.orchestrator.close()
        await self.inner.close()
