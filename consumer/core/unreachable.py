"""Why a connection failed, in the words an operator looks for: ``connection refused``,
``TLS error: …``, ``DNS failure: …``, ``timeout``. aiohttp and websockets wrap the socket's
error (``ClientConnectorError``, ``ConnectionTimeoutError``, or one with no message at all), so
the whole chain of causes is read, not only the outer exception."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator

from .printable import printable

_CHAIN_LIMIT = 16  # causes looked at (a chain may loop)
# What a client sees when it speaks TLS to a server that does not.
_NOT_TLS = ("WRONG_VERSION_NUMBER", "UNEXPECTED_EOF", "RECORD_LAYER_FAILURE", "HTTP_REQUEST")
_PLAIN_HINT = "the server does not speak TLS (a plain-HTTP server? then use http://)"


def _as_is(text: str) -> str:
    return text


def reason(exc: BaseException, scrub: Callable[[str], str] = _as_is) -> str:
    """One short line (control characters escaped): the most telling cause in the chain.
    ``scrub`` masks the caller's secrets in a cause's own text before the line is cut, so
    that no piece of one survives at the cut (aiohttp's errors carry the request's URL)."""
    chain = list(_causes(exc))
    # aiohttp's wrappers are SSL errors too, without the ssl module's details: those come from
    # the one it wraps.
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError) and hasattr(e, "verify_message"):
            return f"TLS error: certificate not accepted ({printable(e.verify_message)})"
    tls = [
        e
        for e in chain
        if isinstance(e, ssl.SSLError)
        and not isinstance(e, ssl.SSLWantReadError | ssl.SSLWantWriteError)
    ]
    if tls:
        e = next((t for t in tls if getattr(t, "reason", None)), tls[-1])
        code = str(getattr(e, "reason", None) or type(e).__name__)
        if any(sign in code.upper() for sign in _NOT_TLS) or isinstance(e, ssl.SSLEOFError):
            return f"TLS error: {_PLAIN_HINT} [{printable(code)}]"
        return f"TLS error: {printable(code)}"
    for e in chain:
        if isinstance(e, socket.gaierror):
            return f"DNS failure: {printable(e.strerror or e)}"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused"
    if any(isinstance(e, TimeoutError) for e in chain):
        if any(isinstance(e, ssl.SSLWantReadError) or _in_tls_handshake(e) for e in chain):
            return f"TLS error: no answer to the TLS handshake (timeout): {_PLAIN_HINT}"
        return "timeout"
    if any(isinstance(e, ConnectionResetError) for e in chain):
        return "connection reset by the server"
    for e in chain:
        if isinstance(e, OSError) and e.strerror:
            return printable(scrub(e.strerror))
    # Nothing recognised: the first cause that says something, with its type.
    said = next((e for e in chain if _text(e)), exc)
    return printable(scrub(f"{type(said).__name__}: {_text(said)}".rstrip(": ")))


def _in_tls_handshake(exc: BaseException) -> bool:
    """Whether ``exc`` (aiohttp's connect timeout cancels the connection: a CancelledError in
    the chain) was raised where asyncio waits for the TLS handshake of a connected socket;
    the exception carries no other sign that the TCP connection was made."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    where, tls = tb.tb_frame.f_code.co_name, tb.tb_frame.f_locals.get("ssl")
    return where == "_create_connection_transport" and tls not in (None, False)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and len(seen) < _CHAIN_LIMIT:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _text(exc: BaseException) -> str:
    try:
        return str(exc).strip()
    except Exception:  # a __str__ that fails on what it holds
        return ""
