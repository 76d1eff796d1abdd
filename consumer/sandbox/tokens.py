"""The OAuth token endpoint (``POST /oauth/v1/tokens``): both grants (``client_credentials``
with a scope, and with ``enterprise_id`` set the ``enterpriseId`` header as OCIM requires it;
``password`` with the user's credentials), HTTP Basic client authentication and
the ``x-app-key`` header (any accepted application key: a token is not bound to one); the
tokens it issues and their expiry, which the REST resources and the WebSocket's
``connection_init`` check through :meth:`TokenEndpoint.expiry`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
from collections.abc import Callable
from urllib.parse import parse_qs

import h11

from ..http11 import respond
from .faults import FailureQueue
from .options import SandboxOptions, SandboxStats
from .problem import problem


class TokenEndpoint:
    def __init__(
        self,
        options: SandboxOptions,
        stats: SandboxStats,
        failures: FailureQueue,
        clock: Callable[[], float],
    ) -> None:
        self._options = options
        self._stats = stats
        self._failures = failures
        self._clock = clock
        self._expiry: dict[str, float] = {}  # token -> monotonic expiry
        self.issued: list[str] = []
        self.requests: list[tuple[dict[str, str], dict[str, str]]] = []  # headers, form

    async def handle(
        self,
        conn: h11.Connection,
        request: h11.Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._stats.token_requests += 1
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if self._failures.answer(conn, writer):
            return
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        self.requests.append((headers, form))
        o = self._options
        grant = form.get("grant_type")
        if grant not in ("client_credentials", "password"):
            respond(
                conn,
                writer,
                400,
                problem(400, "grant_type must be password or client_credentials"),
            )
            return
        if (
            grant == "client_credentials"
            and o.enterprise_id is not None
            and headers.get("enterpriseid") != o.enterprise_id
        ):
            # OCIM: "Only while using Client Credentials workflow with OCIM environments"
            respond(
                conn,
                writer,
                400,
                problem(400, "enterpriseId header missing or unknown for client_credentials"),
            )
            return
        if (
            _basic(headers.get("authorization")) != (o.client_id, o.client_secret)
            or not o.accepts_app_key(headers.get("x-app-key"))
            or (grant == "client_credentials" and not form.get("scope"))
            or (
                grant == "password"
                and (form.get("username"), form.get("password")) != (o.username, o.password)
            )
        ):
            respond(conn, writer, 401, problem(401, "invalid client, app key, user or scope"))
            return
        token = secrets.token_urlsafe(32)
        self._expiry[token] = self._clock() + o.token_ttl_s
        self.issued.append(token)
        payload = {
            "access_token": token,
            "expires_in": int(o.token_ttl_s) if o.token_ttl_s >= 1 else o.token_ttl_s,
            "token_type": "Bearer",
            "oracle_tk_context": "user_assertion",
        }
        respond(conn, writer, 200, json.dumps(payload).encode())

    def expiry(self, token: str) -> float | None:
        """The monotonic expiry of an issued token still valid, else None."""
        expiry = self._expiry.get(token)
        return expiry if expiry is not None and expiry > self._clock() else None


def bearer(authorization: str) -> str:
    """The token of a ``Bearer`` authorization value, or "" for any other."""
    return authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else ""


def _basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.startswith("Basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password
