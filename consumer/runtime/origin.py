"""Where a WebSocket connection ended up. websockets follows HTTP redirects, to another host
too (it strips an Authorization header then), but the gateway's credentials travel in
``connection_init``, after the handshake, where it cannot see them: so before sending them we
check that the connection is still with the origin we were given."""

from __future__ import annotations

from websockets.asyncio.client import ClientConnection
from websockets.headers import build_host
from websockets.uri import parse_uri

from ..core.printable import printable


def redirected_to(ws: ClientConnection, url: str) -> str | None:
    """The host (``host[:port]``, bounded and printable) a redirect took ``ws`` to, when it is
    not ``url``'s; None when it is."""
    if ws.request is None:
        return None
    given = parse_uri(url)
    host = ws.request.headers.get("Host", "")
    if host.lower() == build_host(given.host, given.port, given.secure).lower():
        return None
    return printable(host, 200)
