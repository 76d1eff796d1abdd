"""The few lines of HTTP/1.1 the sandbox and the metrics listener answer with (h11 frames them)."""

from __future__ import annotations

import asyncio

import h11


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
