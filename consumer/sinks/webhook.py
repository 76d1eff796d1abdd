"""HTTP webhook sink: POST events as JSON to a URL, through the process's pooled client.

Not transactional: delivery is at-least-once and every request carries an ``Idempotency-Key``
for the receiver to drop repeats with.

* ``batch_size = 1``: one POST per event; the body is the event's document (the ``newEvent``
  object as received, plus ``resource`` when orchestration fetched one) and
  ``Idempotency-Key`` is its ``metadata.uniqueEventId`` (one that is not visible ASCII, which
  an HTTP header cannot carry as it is: ``sha256:`` and the hex digest of it, UTF-8).
* ``batch_size > 1``: the events of a write go in chunks of up to ``batch_size``, each a JSON
  array of documents, in order; ``Idempotency-Key`` is ``"batch-"`` followed by the hex SHA-256
  of the chunk's ``uniqueEventId`` values joined by ``"\\n"`` (UTF-8). The key names the
  chunk, not its events: after a restart or a one-at-a-time re-delivery the same event may
  come in a chunk with another key, so a receiver that must not see an event twice should
  also deduplicate on each document's ``metadata.uniqueEventId``.

Every request: ``Content-Type: application/json``, ``X-Opera-Stream: <stream name>``, the
configured ``headers`` (one of those, or an Authorization beside configured auth, is refused at
load), the configured auth and no redirects.
Timeouts: ``timeout_s`` to connect (a free pooled connection included) and for each silence of
the receiver, and at most 3 * ``timeout_s`` for the whole request, answer included (cut within
a tenth of that after it, at most 1 s: :mod:`consumer.deadlines`), so that a receiver trickling
its answer a byte at a time cannot hold a worker. A body over 256 KiB goes
in 64 KiB slices, each one taken by the receiver starting those 3 * ``timeout_s`` again: a big
batch on a slow link takes what its upload takes, one the receiver stops reading still fails.

Responses: 2xx is done. 408, 425, 429, every status from 500 up, transport failures (refused,
reset, timed out) and 409 (a key's first try still under way at the receiver: for at most
``conflict_retry_s`` from its first 409, then permanent) raise
:class:`~consumer.errors.TransientSinkError`, with ``retry_after`` from ``Retry-After``: the
pipeline retries the whole write, so chunks already accepted may be POSTed again (hence the
key). Any other status (4xx, and 3xx as redirects are not followed) raises
:class:`~consumer.errors.PermanentSinkError` with the status and the start of the body; the
pipeline then re-delivers a failed batch one event at a time so that only the culprit is
dead-lettered. Error texts never hold a secret: the token, the password, the
``Authorization`` header, secret-looking configured headers, nor the URL's password or query
values (in any form we know they travel in: raw, percent-encoded or decoded, base64 for Basic
auth, and each as JSON escapes it), even when the receiver echoes the request;
:meth:`WebhookSink.open` registers them all with the log redactor. Nor the URL's path and query
(a Zapier hook's credential is short path segments): the URL, written whole (aiohttp's error for
an answer it cannot parse) or its path alone (a receiver's "Cannot POST /path"), is shown as
``scheme://host:port/…``.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit

import aiohttp
import orjson
from multidict import CIMultiDict

from ..config import WebhookSinkSettings, query_secret_values, webhook_secret_values
from ..core.events import Event, header_id
from ..core.printable import printable
from ..core.retry_after import retry_after_seconds, transient_status
from ..core.unreachable import reason
from ..deadlines import Deadline, Deadlines
from ..errors import PermanentSinkError, TransientSinkError
from ..http_client import (
    ERROR_BODY_BYTES,
    TRANSPORT_ERRORS,
    basic_auth,
    deadline_s,
    error_excerpt,
    failure_name,
    read_at_most,
    wire_url,
)
from ..logs import MASK, REDACTOR, secret_forms
from .base import PlainSink, serialized, took

EXCERPT_CHARS = 300  # of an answer's body, in the error (scrubbed first: error_excerpt)
# What a receiver that honours Idempotency-Key answers a retry while it still processes the
# first try of the same key (draft-ietf-httpapi-idempotency-key-header: "MUST reply 409"):
# ours timed out and the first is still running. Not the event's fault: tried again, for
# sink.conflict_retry_s; then the receiver's refusal (it says "conflict" of the event itself).
CONFLICT = 409
# Keys answered 409 whose first 409 is remembered (the oldest forgotten first): the requests
# the workers are retrying, a few each.
MAX_CONFLICTED_KEYS = 1024
# A body over this goes in slices of UPLOAD_SLICE_BYTES, each one sent moving the request's
# deadline on (aiohttp bounds no upload: its sock_read starts once the body is sent). One up to
# this goes whole, as it always could within 3 * timeout_s: 256 KiB in 30 s is 70 kbit/s.
STREAMED_BODY_BYTES = 256 * 1024
UPLOAD_SLICE_BYTES = 64 * 1024
# Query values are all treated as secrets, but a short one ("?v=1") is most likely none and
# would mask half of every text: as the log redactor, those are left alone.
MIN_QUERY_SECRET_CHARS = 4


def batch_idempotency_key(unique_event_ids: Sequence[str]) -> str:
    """The ``Idempotency-Key`` of a batch request (``batch_size > 1``): ``batch-`` and the
    SHA-256 of its ids, one per line. An id with a line break in it would make two batches
    one key (``["a\\nb"]`` and ``["a", "b"]``: a receiver honouring it answers the second
    from the first, its events never processed): such a batch's key is ``batch-j-`` and the
    SHA-256 of its ids' JSON array instead."""
    joined = "\n".join(unique_event_ids)
    if joined.count("\n") >= len(unique_event_ids):  # one more than the separators
        digest = hashlib.sha256(orjson.dumps(list(unique_event_ids))).hexdigest()
        return f"batch-j-{digest}"
    return f"batch-{hashlib.sha256(joined.encode('utf-8')).hexdigest()}"


class WebhookSink(PlainSink):
    name = "webhook"

    def __init__(self, settings: WebhookSinkSettings, client: aiohttp.ClientSession) -> None:
        # ``client`` is shared by the whole process, which closes it; this sink never does.
        self.settings = settings
        self._client = client
        t = settings.timeout_s
        self._timeout = aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t, sock_read=t)
        whole = deadline_s(self._timeout)
        assert whole is not None  # sock_read is set
        # The whole request's (3 * timeout_s), on one timer for every request, not one each
        # (see consumer.deadlines).
        self._deadlines = Deadlines(whole)
        # The URL's user information travels as Basic auth, as configured auth would.
        url, url_auth = wire_url(str(settings.url))
        self._url = url
        # Case-insensitive (the settings refuse a configured header of the same name).
        self._headers: CIMultiDict[str] = CIMultiDict(settings.headers)
        self._headers["Content-Type"] = "application/json"
        if url_auth is not None:
            self._headers["Authorization"] = url_auth
        if settings.auth == "bearer" and settings.token is not None:
            self._headers["Authorization"] = f"Bearer {settings.token.get_secret_value()}"
        elif settings.auth == "basic" and settings.password is not None:
            user, password = settings.username or "", settings.password.get_secret_value()
            self._headers["Authorization"] = basic_auth(user, password)
        # Every secret in every form we know (config.webhook_secret_values), plus the query
        # values as they go on the request line (wire_url's percent-encoding).
        wire_query = url.raw_query_string
        written = urlsplit(str(settings.url))
        secrets = webhook_secret_values(settings) + query_secret_values(wire_query)
        query = set(query_secret_values(wire_query, written.fragment))
        query.update(query_secret_values(written.query))
        self._registered = [
            s for s in dict.fromkeys(secrets) if s not in query or len(s) >= MIN_QUERY_SECRET_CHARS
        ]
        # Also as a JSON string or a base64 holds them (a receiver echoing the request as
        # JSON, "\/" and all, or as base64); longest first, so that a secret containing
        # another is masked whole.
        self._secrets = sorted(
            {form for s in self._registered for form in secret_forms(s)},
            key=len,
            reverse=True,
        )
        # For error texts: no user information, no query string, no path (each may hold a
        # secret: Slack's, Discord's and Teams' webhooks carry theirs in the path).
        port = f":{url.explicit_port}" if url.explicit_port is not None else ""
        path = "" if url.raw_path in ("", "/") else "/…"
        self._where = f"{url.scheme}://{url.raw_host}{port}{path}"
        # Where an error text holds them (aiohttp's names the request's URL whole, a receiver's
        # error page the path it was posted to), the URL and its path and query are shown as
        # _where shows them; longest first. (Not the log redactor's: "/events" alone is no
        # secret in every line.)
        url_forms = {str(url): self._where, url.human_repr(): self._where}
        if path:
            for form in (url.raw_path_qs, url.path_qs, url.raw_path, url.path):
                url_forms.setdefault(form, path)
        self._url_forms = sorted(url_forms.items(), key=lambda kv: len(kv[0]), reverse=True)
        # Idempotency-Key -> when it was first answered 409 (time.monotonic()).
        self._conflicted: OrderedDict[str, float] = OrderedDict()

    async def open(self, committed: str | None) -> None:
        REDACTOR.add(*self._registered)  # which adds their other forms itself

    async def close(self) -> None:
        self._deadlines.close()

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        # Every body is made before the first POST: an event that cannot be serialized is
        # named at once, and the events before it are not POSTed twice when the pipeline
        # re-delivers around it.
        docs = [serialized(ev) for ev in events]
        size = self.settings.batch_size
        done = 0
        try:
            # Each request answered 2xx is the receiver's: said (took) by _post as soon as its
            # status is read, so that a stop before the write ends (its answer's body still
            # coming, say) does not send it again (in batch mode the replay's chunks, cut
            # otherwise, would carry other Idempotency-Keys).
            if size == 1:
                for ev, doc in zip(events, docs, strict=True):
                    await self._post(stream, doc, header_id(ev.unique_event_id), [ev], done + 1)
                    done += 1
                return
            for start in range(0, len(events), size):
                chunk = events[start : start + size]
                body = b"[" + b",".join(docs[start : start + size]) + b"]"
                key = batch_idempotency_key([ev.unique_event_id for ev in chunk])
                await self._post(stream, body, key, chunk, done + len(chunk))
                done += len(chunk)
        except (TransientSinkError, PermanentSinkError) as exc:
            # The requests answered 2xx before this one are the receiver's: the pipeline
            # sends only the rest again (the same chunks, so the same keys), never those
            # under another chunk's or an event's key.
            exc.delivered = done
            raise

    async def _post(
        self, stream: str, body: bytes, key: str, events: Sequence[Event], taken: int
    ) -> None:
        """POST ``body`` (``events``'); answered 2xx, ``taken`` (the write's events taken with
        these) is said at once, before the answer's body is read."""
        headers = self._headers.copy()
        headers["X-Opera-Stream"] = stream
        headers["Idempotency-Key"] = key
        deadline = self._deadlines.new()
        data: bytes | AsyncIterator[bytes] = body
        if len(body) > STREAMED_BODY_BYTES:
            headers["Content-Length"] = str(len(body))  # not chunked: as a whole body goes
            data = self._upload(body, deadline)
        status = 0
        reason_phrase: str | None = None
        retry_after: str | None = None
        read: list[bytes] = []  # of the answer's body, kept if its read fails
        cut = ""
        try:
            with deadline:
                async with self._client.post(
                    self._url,
                    data=data,
                    headers=headers,
                    timeout=self._timeout,
                    allow_redirects=False,
                ) as response:
                    status = response.status
                    if 200 <= status < 300:
                        took(taken)
                    reason_phrase = response.reason
                    retry_after = response.headers.get("Retry-After")
                    # The body is the receiver's: only its start is read (a 2xx one to its
                    # end usually, so that the connection is kept).
                    content = await read_at_most(response, ERROR_BODY_BYTES, read)
        except TRANSPORT_ERRORS as exc:  # refused, reset, timed out
            if 200 <= status < 300:
                # Answered 2xx, then its body cut or too slow: the receiver has taken it (sent
                # again, a receiver that ignores Idempotency-Key would hold it twice). Its
                # connection is dropped, not reused.
                return
            if status:
                # Any other status, then its body cut or too slow: the status is the receiver's
                # word all the same (a refusal stays one: retried, it held the stream for ever).
                content = b"".join(read)
                cut = f" (its body cut short: {failure_name(exc)})"
            elif deadline.expired():
                raise TransientSinkError(
                    f"{self._what(events)}: no complete answer within "
                    f"{self._deadlines.seconds:g} s (3 * timeout_s)"
                ) from exc
            else:
                raise TransientSinkError(
                    f"{self._what(events)}: {failure_name(exc)}: {reason(exc, self._scrub)}"
                ) from exc
        if 200 <= status < 300:
            if self._conflicted:
                self._conflicted.pop(key, None)
            return
        if status == CONFLICT:
            transient = not self._conflict_ran_out(key)
        else:
            transient = transient_status(status)
        reason_text = f"{self._what(events)}: HTTP {status}"
        if reason_phrase:  # the receiver's words too: it may echo a secret there
            reason_text += f" {printable(self._scrub(reason_phrase), 100)}"
        if status == CONFLICT and not transient:
            reason_text += f" for {self.settings.conflict_retry_s:g} s (sink.conflict_retry_s)"
        # The receiver may echo the request (an Authorization header, say).
        excerpt = error_excerpt(content, self._scrub, EXCERPT_CHARS, cut=bool(cut))
        if excerpt:
            reason_text += f": {excerpt}"
        reason_text += cut
        if transient:
            raise TransientSinkError(reason_text, retry_after=retry_after_seconds(retry_after))
        raise PermanentSinkError(
            reason_text, unique_event_id=events[0].unique_event_id if len(events) == 1 else None
        )

    async def _upload(self, body: bytes, deadline: Deadline) -> AsyncIterator[bytes]:
        """``body`` in slices; each asked for once the one before is written (and, over
        aiohttp's buffer, drained to the socket), which gives the request its whole deadline
        again. After the last, that is the answer's."""
        for start in range(0, len(body), UPLOAD_SLICE_BYTES):
            yield body[start : start + UPLOAD_SLICE_BYTES]
            deadline.renew()

    def _conflict_ran_out(self, key: str) -> bool:
        """Whether ``key``, answered 409 again, has been for conflict_retry_s: the receiver's
        refusal. Then the key is forgotten, and a replay of the event gets a window of its own."""
        now = time.monotonic()
        first = self._conflicted.setdefault(key, now)
        if len(self._conflicted) > MAX_CONFLICTED_KEYS:
            self._conflicted.popitem(last=False)
        if now - first < self.settings.conflict_retry_s:
            return False
        self._conflicted.pop(key, None)
        return True

    def _what(self, events: Sequence[Event]) -> str:
        what = f"webhook POST {self._where}"
        return what + (f" ({len(events)} events)" if len(events) > 1 else "")

    def _scrub(self, text: str) -> str:
        for form, shown in self._url_forms:
            text = text.replace(form, shown)
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text
