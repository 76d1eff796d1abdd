"""The TLS context of the process's WebSocket connections (``wss``): one, made on first use.

Given none, websockets makes ``ssl.create_default_context()`` for every ``wss`` connection:
the system's CA bundle parsed again, about 50 ms of CPU on the event loop's thread (every
other stream waits) and 1.1 MB held per connection (measured here), for every stream and
every reconnect. A context is meant to be shared by many connections.
"""

from __future__ import annotations

import functools
import ssl
from typing import Any


@functools.cache
def client_context() -> ssl.SSLContext:
    """The system's trusted CAs, hostname checked (``ssl.create_default_context``)."""
    return ssl.create_default_context()


def connect_options(url: str) -> dict[str, Any]:
    """websockets ``connect``'s TLS argument for ``url``: the shared context for ``wss``,
    nothing for ``ws`` (websockets refuses one there)."""
    return {"ssl": client_context()} if url.startswith("wss:") else {}
