"""The few lines of HTTP/1.1 the sandbox and the metrics listener answer with (h11 frames them)."""

from __future__ import annotations

import asyncio
import re
from urllib.parse import unquote_to_bytes, urlsplit

import h11

Request = tuple[bytes, h11.Connection, h11.Request]  # the raw head too (for an upgrade)

_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """Read and parse a request head; None if it is not a request.

    The head is bounded by the reader's limit (``asyncio.LimitOverrunError`` beyond it); a head
    h11 refuses raises ``h11.RemoteProtocolError`` (its ``error_status_hint`` is the status to
    answer, with :func:`reject`).
    """
    head = await reader.readuntil(b"\r\n\r\n")
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    request = conn.next_event()
    return (head, conn, request) if isinstance(request, h11.Request) else None


def request_path(target: bytes) -> str | None:
    """The percent-decoded path of an origin-form or absolute-form request target, or None when
    it does not parse: a URL ``urlsplit`` refuses, a ``%`` without two hex digits, escapes that
    are not UTF-8, control characters."""
    try:
        path = urlsplit(target.decode("ascii")).path
        if _BAD_ESCAPE.search(path.encode("ascii")):
            return None
        decoded = unquote_to_bytes(path).decode("utf-8")
    except (UnicodeError, ValueError):
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        return None
    return decoded


def respond(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    *,
    content_type: str = "application/json",
    extra: dict[str, str] | None = None,
    head: bool = False,
) -> None:
    """A complete response with ``Connection: close``. ``head``: the answer to a HEAD request,
    the headers the GET would get (its ``Content-Length`` too) and no body."""
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *(extra or {}).items(),
    ]
    writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    if not head:
        writer.write(conn.send(h11.Data(data=body)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")


def reject(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
    """Answer ``status`` to a head that did not parse (no h11 state to answer it with)."""
    respond(h11.Connection(h11.SERVER), writer, status, body)
