"""The few lines of HTTP/1.1 the sandbox and the metrics listener answer with (h11 frames them)."""

from __future__ import annotations

import asyncio

import h11

Request = tuple[bytes, h11.Connection, h11.Request]  # the raw head too (for an upgrade)


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """Read and parse a request head; None if it is not a request."""
    head = await reader.readuntil(b"\r\n\r\n")
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    request = conn.next_event()
    return (head, conn, request) if isinstance(request, h11.Request) else None


def respond(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    *,
    content_type: str = "application/json",
    extra: dict[str, str] | None = None,
) -> None:
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *(extra or {}).items(),
    ]
    writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    writer.write(conn.send(h11.Data(data=body)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
