"""Redirects of the WebSocket upgrade: never followed. Each hop would be another upgrade
request, which the key's upgrade budget (booked once per attempt) never sees (ten per attempt
in a loop), and the gateway's credentials travel in ``connection_init``, after the handshake,
where no client library strips them: they would go wherever the redirect leads. A 3xx is a
refused upgrade, said by the host it points to (never its path or query). The stream's
connection (:mod:`.connection`) and preflight's each refuse to follow one."""

from __future__ import annotations

import urllib.parse

from websockets.datastructures import Headers
from websockets.headers import build_host
from websockets.uri import parse_uri

from ..core.printable import printable


def one_header(headers: Headers, name: str) -> str | None:
    """A header's value if the response has it once (twice is a hostile answer: neither)."""
    values = headers.get_all(name)
    return values[0] if len(values) == 1 else None


def redirect_target(url: str, location: str | None) -> tuple[str, bool] | None:
    """Where a redirect's ``Location`` points, relative to ``url``: its host (``host[:port]``,
    printable and bounded; never the path or query) and whether it is ``url``'s origin. None
    when it names no usable place."""
    if location is None:
        return None
    try:
        to = urllib.parse.urlsplit(urllib.parse.urljoin(url, location))
        port = to.port
    except ValueError:
        return None
    secure = {"wss": True, "https": True, "ws": False, "http": False}.get(to.scheme)
    if secure is None or not to.hostname:
        return None
    port = port or (443 if secure else 80)
    given = parse_uri(url)
    same = (secure, to.hostname, port) == (given.secure, given.host.lower(), given.port)
    return printable(build_host(to.hostname, port, secure), 200), same
