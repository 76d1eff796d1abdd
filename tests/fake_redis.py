"""Something that speaks RESP2 on 127.0.0.1 in place of Redis, for the Redis sink's tests of
answers no real Redis gives: :func:`commands` reads what the sink sends, :func:`usual` is
the answer of a server that runs the sink's script and refuses CONFIG and INFO (a user without
those rights)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

SHA = b"a" * 40  # the script's digest, as SCRIPT LOAD answers it


async def commands(r: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The name (upper-case) of each command the client sends, as it comes, until it hangs up."""
    while line := await r.readline():
        args = []
        for _ in range(int(line[1:])):
            n = int((await r.readline())[1:])
            args.append((await r.readexactly(n + 2))[:-2])
        yield args[0].upper()


def usual(command: bytes) -> bytes:
    if command == b"PING":
        return b"+PONG\r\n"
    if command == b"SCRIPT":
        return b"$40\r\n" + SHA + b"\r\n"
    if command in (b"CONFIG", b"INFO"):
        return b"-NOPERM this user has no permissions to run this command\r\n"
    return b"+OK\r\n"


def handler(
    answer: Callable[[bytes, asyncio.StreamWriter], Awaitable[None]],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A connection's handler for :func:`support.serving`: ``answer`` each command the client
    sends, until it hangs up."""

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            async for command in commands(r):
                await answer(command, w)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    return serve


async def reply(w: asyncio.StreamWriter, data: bytes) -> None:
    w.write(data)
    await w.drain()
