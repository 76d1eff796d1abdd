"""What every user of the process's HTTP client (an ``aiohttp.ClientSession``: tokens, webhook,
orchestration) needs around it: the URL as written, Basic credentials, the transport failures
and their names, and a deadline for a whole request.

aiohttp follows redirects unless told otherwise: every request passes ``allow_redirects=False``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from yarl import URL

from .core.evidence import masked

# Transport failures: refused, reset, timed out, TLS, DNS, an answer that is not HTTP. A timeout
# is a TimeoutError (aiohttp's own are both: ConnectionTimeoutError, SocketTimeoutError).
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError)

# Left as written: reserved characters (they mean something where they are) and escapes.
_KEEP = "!#$&'()*+,/:;=?@[]~%"
_STRAY_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Of an error answer's body: what is read and scrubbed, before the excerpt is cut from it (a JWT
# is often longer than 1 KB: read less, and a cut could leave part of one unmasked).
ERROR_BODY_BYTES = 65536


class Connector(aiohttp.TCPConnector):
    """aiohttp's pool, never handing out a connection that holds bytes nobody asked for. A far
    end that answered one request twice (buggy or hostile) leaves the second answer queued in
    the idle connection, and aiohttp 3.14 reuses any that is still connected: the next request
    took that stray answer as its own, before it was even sent (a webhook event said delivered
    that never left). Such a connection is closed, and the next one tried."""

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        # Bounded: each call takes one connection out of the idle ones.
        while (conn := await super()._get(key, traces)) is not None:
            protocol = conn.protocol
            if protocol is not None and not protocol.should_close:
                return conn
            conn.close()
        return None


def deadline_s(timeout: aiohttp.ClientTimeout) -> float | None:
    """The most a whole request may take (connecting, sending, the answer to its last byte):
    its connect bound plus twice its read bound, or its ``total`` if shorter. aiohttp's
    ``sock_read`` bounds each silence only, so a far end that trickles its answer a byte at a
    time would otherwise hold the caller for ever. None: no read bound to scale."""
    read = timeout.sock_read
    if read is None:
        return timeout.total
    connect = timeout.connect or timeout.sock_connect or read
    whole = connect + 2 * read
    return whole if timeout.total is None else min(whole, timeout.total)


def with_deadline(timeout: aiohttp.ClientTimeout) -> aiohttp.ClientTimeout:
    """``timeout`` with its :func:`deadline_s` as the ``total`` of a request."""
    return aiohttp.ClientTimeout(
        total=deadline_s(timeout),
        connect=timeout.connect,
        sock_read=timeout.sock_read,
        sock_connect=timeout.sock_connect,
        ceil_threshold=timeout.ceil_threshold,
    )


def wire_url(url: str) -> tuple[URL, str | None]:
    """The URL to send, and the ``Authorization`` value of its user information (None: none).

    yarl would re-encode the path and query (``%2F`` in a query becomes ``/``, a signature
    changes): they go as written, with only what cannot travel percent-encoded (UTF-8, as a
    browser does). The host is IDNA-encoded. The user information is taken out of the URL: it
    travels as Basic auth, and aiohttp refuses a request with both it and an ``Authorization``
    header, so the caller decides which wins.
    """
    parts = urlsplit(url)
    origin = URL.build(scheme=parts.scheme, host=parts.hostname or "", port=parts.port)
    rest = parts.path + (f"?{parts.query}" if parts.query else "")
    rest = quote(_STRAY_PERCENT.sub("%25", rest), safe=_KEEP)
    auth = None
    if parts.username is not None:
        auth = basic_auth(unquote(parts.username), unquote(parts.password or ""))
    return URL(str(origin) + rest, encoded=True), auth


def basic_auth(user: str, password: str) -> str:
    """The ``Authorization`` value of HTTP Basic auth, UTF-8 as websockets sends it. (aiohttp's
    ``encode_basic_auth`` raises ValueError for a user name with a colon, which a configured
    client id or URL user name may hold: the request would fail with no word of why.)"""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def failure_name(exc: BaseException) -> str:
    """A transport failure's kind, in the words our messages have always used (httpx's)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "ConnectTimeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "ConnectError"
    if isinstance(exc, TimeoutError):
        return "ReadTimeout"
    # Cut off, or an answer aiohttp could not parse (ClientResponseError).
    if isinstance(
        exc,
        aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError,
    ):
        return "RemoteProtocolError"
    if isinstance(exc, aiohttp.ClientOSError):
        return "NetworkError"
    return type(exc).__name__


async def read_at_most(
    response: aiohttp.ClientResponse, limit: int, chunks: list[bytes] | None = None
) -> bytes:
    """The start of a body (the far end's: it may be endless). A body read to its end lets the
    connection go back to the pool; one cut short closes it. ``chunks``: where what is read
    goes as it comes, for a caller that keeps it when the read fails (cut, too slow)."""
    if chunks is None:
        chunks = []
    size = 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def error_excerpt(
    body: bytes, scrub: Callable[[str], str], chars: int, *, cut: bool = False
) -> str:
    """The start of an error answer's body, for a message or a dead letter. The far end may
    echo the request, credentials and all: the text is scrubbed before it is cut, so that no
    part of a secret survives at the cut, nor at the end of a body the read cut short (one
    of :data:`ERROR_BODY_BYTES`: a reflecting page repeating a token, scrubbed to little).
    ``body``: up to :data:`ERROR_BODY_BYTES` of it; ``cut``: less, its read having failed."""
    return masked(body, chars, scrub, cut=cut or len(body) >= ERROR_BODY_BYTES)
