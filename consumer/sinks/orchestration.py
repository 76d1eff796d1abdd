"""Orchestration: fetch the resource an event is about from the OHIP REST API, before the sink.

OHIP's streaming events say *that* a reservation changed, with the changed elements; many
integrations then GET the reservation itself. For the configured event (or module) names,
:class:`OrchestratingSink` builds the URL from a template and the event (``primaryKey``,
``hotelId``...), GETs it with the stream's token, ``x-app-key`` and ``x-hotelid``, and hands the
event to the real sink with the JSON attached (``Event.resource``).

* One token bucket for the process (``rate_per_s``, ``burst``); a 429's ``Retry-After`` holds
  it for every caller.
* 408/425/429, every status from 500 up, a 2xx that is not JSON (a maintenance page) and
  transport errors are retried (``max_attempts``, ``Retry-After`` honoured), then the batch
  fails as a transient sink error (the pipeline retries it, intake pauses): an outage is
  never the event's fault, whatever it answers.
* Each GET has a deadline (:func:`~consumer.http_client.deadline_s` of the client's timeouts:
  its connect bound plus twice its read bound), so a server trickling its answer a byte at a
  time cannot hold the stream.
* 401: the token is dropped and fetched again once. 404: ``on_not_found`` decides. Other 4xx:
  the event is dead-lettered, with the start of the answer's body scrubbed of the token, the
  app key and every secret the log redactor knows (a server may echo the request).
* Coalescing: requests for one URL in flight are shared, and a resource fetched less than
  ``coalesce_ms`` ago is reused, so a burst of updates to one reservation costs one GET (its
  state may then predate the newest of those events by at most that window).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import quote

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
from ..core.records import Staged
from ..core.retry_after import WaitRetryAfter, retry_after_seconds, transient_status
from ..core.token_bucket import TokenBucket
from ..core.unreachable import reason
from ..errors import AuthError, PermanentSinkError, TransientSinkError
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
from .base import Sink

log = structlog.get_logger(__name__)

MAX_RESOURCE_BYTES = 16 * 1024 * 1024  # a REST resource larger than this is not one
UNSENT_MAX = 2_000  # events of failed writes kept as sent, for their retries (see below)
EXCERPT_CHARS = 300  # of an error answer's body, in the error (and so the dead letter)


class AccessTokens(Protocol):
    """A stream's OAuth tokens (the runtime's token provider): the current one, or a new one
    after :meth:`invalidate`."""

    async def access_token(self) -> str: ...

    def invalidate(self, rejected: str | None = None) -> None: ...


class _NotFound:
    """A 404, kept like a resource so the coalescing window applies to it too."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __str__(self) -> str:
        return self.what


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
        # URL -> (the fetch, monotonic time it finished or None while in flight)
        self._recent: dict[str, tuple[asyncio.Future[Any], float | None]] = {}
        self.requests = 0  # GETs sent (retries included)
        self.coalesced = 0  # fetches answered by another one's GET
        self.throttled = 0  # 429 answers

    def url_for(self, stream: str, ev: Event) -> str | None:
        s = self.settings
        template = s.resources.get(ev.event_name) or s.resources.get(ev.module_name)
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
        path = template.format_map({k: quote(v, safe="") for k, v in values.items()})
        if path.startswith(("http://", "https://")):
            return path
        return (s.base_url or st.gateway_url) + "/" + path.lstrip("/")

    async def enrich(self, stream: str, events: Sequence[Event]) -> list[Event]:
        urls = [self.url_for(stream, ev) for ev in events]
        wanted: dict[str, str | None] = {}
        for u, ev in zip(urls, events, strict=True):
            if u is None:
                continue
            hotel = ev.hotel_id
            if hotel and not (hotel.isascii() and hotel.isprintable()):
                raise PermanentSinkError(  # aiohttp would refuse the header (a ValueError)
                    "orchestration: hotelId cannot travel in the x-hotelid header (not "
                    "printable ASCII)",
                    unique_event_id=ev.unique_event_id,
                )
            wanted[u] = hotel
        if not wanted:
            return list(events)
        results = await asyncio.gather(
            *(self.fetch(stream, url, hotel) for url, hotel in wanted.items()),
            return_exceptions=True,
        )
        found: dict[str, Any] = {}
        for url, result in zip(wanted, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            found[url] = result
        out: list[Event] = []
        for maybe_url, ev in zip(urls, events, strict=True):
            if maybe_url is None:
                out.append(ev)
                continue
            resource = found[maybe_url]
            if isinstance(resource, _NotFound):
                if self.settings.on_not_found == "dead-letter":
                    raise PermanentSinkError(
                        f"orchestration: {resource}", unique_event_id=ev.unique_event_id
                    )
                resource = None
            out.append(ev._replace(resource=resource, fetched=True))
        return out

    async def fetch(self, stream: str, url: str, hotel_id: str | None) -> Any:
        now = self._clock()
        window = self.settings.coalesce_ms / 1000
        hit = self._recent.get(url)
        if hit is not None:
            fut, done_at = hit
            if done_at is None or now - done_at < window:
                self.coalesced += 1
                return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._recent[url] = (fut, None)
        try:
            value = await self._get(stream, url, hotel_id)
        except BaseException as exc:
            self._recent.pop(url, None)
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
                fut.exception()  # retrieved: waiters re-raise it, nobody else must log it
            raise
        fut.set_result(value)
        self._recent[url] = (fut, self._clock())
        self._forget_old()
        return value

    def _forget_old(self) -> None:
        if len(self._recent) < 1024:
            return
        cutoff = self._clock() - self.settings.coalesce_ms / 1000
        for url, (_, done_at) in list(self._recent.items()):
            if done_at is not None and done_at < cutoff:
                del self._recent[url]

    async def _get(self, stream: str, url: str, hotel_id: str | None) -> Any:
        s = self.settings
        shown = mask_url(url)  # what messages, logs and dead letters say: no secret of the URL
        wire = str(wire_url(url)[0])  # as aiohttp's errors write it

        def masked(text: str) -> str:
            return text.replace(wire, shown).replace(url, shown)

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
        except AuthError as exc:
            # Our credentials, not the event: retried by the pipeline, never dead-lettered. Not
            # here: the token provider has already retried for as long as it is configured to.
            raise TransientSinkError(f"orchestration: {exc}") from exc
        except TRANSPORT_ERRORS as exc:
            raise TransientSinkError(
                f"orchestration GET {shown}: {failure_name(exc)}: {reason(exc, masked)}"
            ) from exc
        raise AssertionError("unreachable: AsyncRetrying either returns or raises")

    async def _request(self, stream: str, url: str, shown: str, hotel_id: str | None) -> Any:
        settings, tokens = self._streams[stream]
        # The bucket is arithmetic on the clock: nothing would set an Event, so we sleep.
        while (wait := self._bucket.take(self._clock())) > 0:  # noqa: ASYNC110
            await asyncio.sleep(wait)
        token = await tokens.access_token()  # an AuthError: see _get
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
        try:
            # The bearer token authenticates; user information in the URL does not travel.
            async with (
                deadline,
                self._http.get(wire_url(url)[0], headers=headers, allow_redirects=False) as resp,
            ):
                status = resp.status
                ok = 200 <= status < 300
                # The far end's body: a resource up to MAX_RESOURCE_BYTES, else only its start.
                limit = MAX_RESOURCE_BYTES + 1 if ok else ERROR_BODY_BYTES
                content = await read_at_most(resp, limit)
                retry_after = resp.headers.get("Retry-After")
                says_json = "json" in resp.headers.get("Content-Type", "").lower()
        except TimeoutError:
            if not deadline.expired():
                raise  # aiohttp's own timeouts: a transport error (see _get)
            raise TransientSinkError(
                f"orchestration GET {shown}: no complete answer within {self._deadline:g} s"
            ) from None
        if ok:
            if len(content) > MAX_RESOURCE_BYTES:
                raise PermanentSinkError(
                    f"orchestration GET {shown}: resource larger than {MAX_RESOURCE_BYTES} bytes"
                )
            try:
                return json.loads(content)
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
        if status == 401:
            # Rejected early (revoked?): the next attempt gets a new one, unless another GET
            # got one already.
            tokens.invalidate(token)
            raise TransientSinkError(f"orchestration GET {shown}: HTTP 401")
        if transient_status(status):
            after = retry_after_seconds(retry_after)
            if status == 429:
                self.throttled += 1
                self._bucket.hold(self._clock(), after if after is not None else 1.0)
            raise TransientSinkError(f"orchestration GET {shown}: HTTP {status}", retry_after=after)
        if status == 404:
            return _NotFound(f"GET {shown}: HTTP 404")

        # The body is the far end's, and it may echo the request: only its start, decoded
        # lossily and scrubbed of this request's credentials and every registered secret.
        def scrub(text: str) -> str:
            for secret in sorted((token, app_key), key=len, reverse=True):
                if len(secret) >= 4:  # as the redactor: a shorter one would mask half the text
                    text = text.replace(secret, MASK)
            return str(REDACTOR.scrub(text))

        excerpt = error_excerpt(content, scrub, EXCERPT_CHARS)
        raise PermanentSinkError(f"orchestration GET {shown}: HTTP {status}: {excerpt}")


class OrchestratingSink:
    """The configured sink, with each event's resource fetched first."""

    waits = True  # the resource's GET, whatever the inner sink

    def __init__(self, inner: Sink, orchestrator: Orchestrator) -> None:
        self.inner = inner
        self.orchestrator = orchestrator
        self.name = inner.name
        self.transactional = inner.transactional
        # The events of writes that failed, as they were sent: tried again, they go out the
        # same (a webhook's Idempotency-Key with the same body). Fetched anew, a resource
        # changed meanwhile made the retry another request under the same key (a receiver
        # honouring the key refuses that: dead-lettered though delivered), or one the REST
        # API no longer answers. The newest UNSENT_MAX of them.
        self._unsent: dict[tuple[str, str], Event] = {}

    async def open(self, committed: str | None) -> None:
        await self.inner.open(committed)

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        unsent = self._unsent
        if not unsent:  # the usual case: no failed write to send again
            sent = await self.orchestrator.enrich(stream, events)
        else:
            missing = [ev for ev in events if (stream, ev.unique_event_id) not in unsent]
            fetched = iter(await self.orchestrator.enrich(stream, missing) if missing else ())
            sent = [
                kept if (kept := unsent.get((stream, ev.unique_event_id))) is not None
                else next(fetched)
                for ev in events
            ]  # fmt: skip
        try:
            await self.inner.write(stream, sent)
        except BaseException:
            for ev in sent:
                unsent[(stream, ev.unique_event_id)] = ev
            while len(unsent) > UNSENT_MAX:
                del unsent[next(iter(unsent))]
            raise
        if unsent:
            for ev in events:
                unsent.pop((stream, ev.unique_event_id), None)

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
        await self.inner.close()
