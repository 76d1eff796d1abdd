"""The REST resources: ``GET`` a reservation, a profile or a transaction as of the latest event
of its key in the event logs, behind OHIP's checks (a valid token and the raw app key, else
401; ``x-hotelid`` matching the path on hotel routes, else 400) and a token-bucket rate limit
shared by all routes (429 with ``Retry-After``)."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Mapping
from urllib.parse import unquote

import h11

from ..http11 import respond
from .eventlog import ChainLog, Resource
from .faults import FailureQueue
from .options import SandboxOptions, SandboxStats
from .problem import problem
from .tokens import bearer

# REST resources: path (hotel-scoped routes capture the hotel), event module, id field name.
_ROUTES: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (
        re.compile(r"/rsv/v1/hotels/(?P<hotel>[^/]+)/reservations/(?P<id>[^/]+)"),
        "Reservation",
        "reservationId",
    ),
    (re.compile(r"/crm/v1/profiles/(?P<id>[^/]+)"), "Profile", "profileId"),
    (
        re.compile(r"/csh/v1/hotels/(?P<hotel>[^/]+)/transactions/(?P<id>[^/]+)"),
        "Financial",
        "transactionId",
    ),
)

Route = tuple[re.Match[str], str, str]  # the path's match, event module, id field name


def match_route(path: str) -> Route | None:
    for pattern, module, id_name in _ROUTES:
        if (m := pattern.fullmatch(path)) is not None:
            return m, module, id_name
    return None


class RateLimiter:
    """A token bucket of ``burst`` requests refilled at ``rate`` per second; starts full."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate = rate
        self._size = max(1, burst)  # a burst below 1 could never admit anything
        self._clock = clock
        self._bucket = float(self._size)
        self._bucket_at = clock()

    def admit(self) -> int | None:
        """Take a token from the bucket: None if admitted, else whole seconds to wait."""
        rate = self._rate
        if rate <= 0:
            return None
        now = self._clock()
        self._bucket = min(self._size, self._bucket + (now - self._bucket_at) * rate)
        self._bucket_at = now
        if self._bucket >= 1:
            self._bucket -= 1
            return None
        return max(1, math.ceil((1 - self._bucket) / rate))


class RestResources:
    def __init__(
        self,
        options: SandboxOptions,
        stats: SandboxStats,
        *,
        logs: Mapping[str, ChainLog],
        failures: FailureQueue,
        token_expiry: Callable[[str], float | None],
        clock: Callable[[], float],
    ) -> None:
        self._options = options
        self._stats = stats
        self._logs = logs
        self._failures = failures
        self._token_expiry = token_expiry
        self._limiter = RateLimiter(options.rest_rate, options.rest_burst, clock)

    def handle(
        self,
        conn: h11.Connection,
        request: h11.Request,
        writer: asyncio.StreamWriter,
        route: Route,
    ) -> None:
        """GET one resource as of the latest event of its primaryKey, in any chain.

        Body: ``{<id_name>: primaryKey, "hotelId", "chainCode", "version": events of the key so
        far, "lastEventName", "lastOffset", "fields": {elementName: latest newValue}}`` with
        ``id_name`` ``reservationId``, ``profileId`` or ``transactionId``. Checked in order:
        injected failures, the rate limit (429), token and app key (401), ``x-hotelid`` (400),
        existence at the path's hotel (404).
        """
        match, module, id_name = route
        self._stats.rest_requests += 1
        if self._failures.answer(conn, writer):
            return
        wait = self._limiter.admit()
        if wait is not None:
            self._stats.rest_throttled += 1
            body = problem(429, f"rate limit of {self._options.rest_rate:g} requests/s exceeded")
            respond(conn, writer, 429, body, extra={"Retry-After": str(wait)})
            return
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
        token = bearer(headers.get("authorization", ""))
        if self._token_expiry(token) is None or not self._options.accepts_app_key(
            headers.get("x-app-key")
        ):
            body = problem(401, "Unauthorised - Invalid credentials")
            respond(conn, writer, 401, body, extra={"WWW-Authenticate": "Bearer"})
            return
        scoped = match.groupdict().get("hotel")
        hotel = unquote(scoped) if scoped is not None else None
        if hotel is not None and headers.get("x-hotelid") != hotel:
            respond(conn, writer, 400, problem(400, "x-hotelid must match the hotel in the path"))
            return
        key = unquote(match["id"])
        found = self._find(module, key, hotel)
        if found is None:
            where = f" at hotel {hotel}" if hotel is not None else ""
            respond(conn, writer, 404, problem(404, f"{module} {key} not found{where}"))
            return
        chain, res = found
        payload = {
            id_name: res.key,
            "hotelId": res.hotel,
            "chainCode": chain,
            "version": res.version,
            "lastEventName": res.last_event,
            "lastOffset": res.last_offset,
            "fields": res.values,
        }
        respond(conn, writer, 200, json.dumps(payload).encode())
        path = match.string
        self._stats.rest_paths[path] = self._stats.rest_paths.get(path, 0) + 1

    def _find(self, module: str, key: str, hotel: str | None) -> tuple[str, Resource] | None:
        """The first chain's resource with this key and module (and hotel, when scoped):
        chains number their keys independently, so two chains may share one."""
        for chain, log in self._logs.items():
            res = log.resource(key)
            if res is not None and res.module == module and hotel in (None, res.hotel):
                return chain, res
        return None
