"""OAuth tokens for OHIP: ``POST {gateway}/oauth/v1/tokens``, cached until shortly before expiry.

Both grants: ``client_credentials`` (scope, ``enterpriseId`` header) and ``password`` (the
integration user). Transient failures (transport errors, 5xx, 429) are retried with backoff
honouring ``Retry-After``; 400/401/403 fail at once with what to check.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_before_delay,
    wait_exponential_jitter,
)

from ..config import StreamSettings
from ..core.evidence import describe
from ..core.retry_after import RETRY_STATUSES, WaitRetryAfter, retry_after_seconds
from ..errors import AuthError
from ..logs import REDACTOR

log = structlog.get_logger(__name__)

_MAX_LIFETIME_S = 86400.0


@dataclass(frozen=True, slots=True)
class Token:
    value: str = field(repr=False)
    expires_at: float  # monotonic
    lifetime_s: float

    def __repr__(self) -> str:
        return f"Token(value='***', lifetime_s={self.lifetime_s})"

    def refresh_at(self, margin_s: float) -> float:
        """When to replace it: ``margin_s`` before expiry, or half-way for short-lived tokens."""
        return self.expires_at - min(margin_s, self.lifetime_s / 2)


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TokenProvider:
    """One per stream; shares the process's pooled ``httpx.AsyncClient``."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        settings: StreamSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._settings = settings
        self._clock = clock
        self._token: Token | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    def invalidate(self) -> None:
        self._token = None

    def expires_in(self) -> float | None:
        return None if self._token is None else self._token.expires_at - self._clock()

    async def access_token(self) -> str:
        """The current token's value (orchestration's view of this provider)."""
        return (await self.token()).value

    async def token(self) -> Token:
        """A token valid for at least ``refresh_margin_s`` more, fetched only when needed."""
        async with self._lock:
            margin = self._settings.auth.refresh_margin_s
            tok = self._token
            if tok is None or self._clock() >= tok.refresh_at(margin):
                self._token = tok = await self._fetch()
            return tok

    async def _fetch(self) -> Token:
        auth = self._settings.auth
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(
                    lambda e: isinstance(e, (_Retryable, httpx.TransportError))
                ),
                wait=WaitRetryAfter(wait_exponential_jitter(multiplier=0.5, max=30.0, jitter=0.5)),
                stop=stop_before_delay(auth.retry_max_s),
                before_sleep=lambda rs: log.warning(
                    "token request failed; retrying",
                    error=str(rs.outcome.exception() if rs.outcome else ""),
                    attempt=rs.attempt_number,
                ),
                reraise=True,
            ):
                with attempt:
                    return await self._request()
        except (_Retryable, httpx.TransportError) as exc:
            raise AuthError(f"token endpoint unavailable: {exc}", retriable=True) from exc
        raise AssertionError("unreachable: AsyncRetrying either returns or raises")

    async def _request(self) -> Token:
        s = self._settings
        auth = s.auth
        form: dict[str, str] = {"grant_type": auth.grant}
        if auth.grant == "client_credentials":
            form["scope"] = auth.scope
        else:
            assert auth.username is not None and auth.password is not None
            form["username"] = auth.username
            form["password"] = auth.password.get_secret_value()
        headers = {"x-app-key": s.app_key.get_secret_value(), "Accept": "application/json"}
        if auth.enterprise_id:
            headers["enterpriseId"] = auth.enterprise_id
        self.fetches += 1
        started = self._clock()
        resp = await self._client.post(
            s.token_url,
            data=form,
            headers=headers,
            auth=(auth.client_id, auth.client_secret.get_secret_value()),
            timeout=auth.timeout_s,
        )
        if resp.status_code in RETRY_STATUSES:
            raise _Retryable(
                f"token endpoint answered HTTP {resp.status_code}",
                retry_after_seconds(resp.headers.get("Retry-After")),
            )
        if resp.status_code in (400, 401, 403):
            grant_fields = (
                "scope/enterprise_id" if auth.grant == "client_credentials" else "username/password"
            )
            raise AuthError(
                f"token endpoint refused the credentials (HTTP {resp.status_code}): check "
                f"client_id/client_secret, app_key, the grant ({auth.grant}) and its {grant_fields}"
            )
        if resp.status_code != 200:
            raise AuthError(f"token endpoint answered HTTP {resp.status_code}", retriable=True)
        try:
            body = resp.json()
            value = body["access_token"]
            lifetime = float(body.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise AuthError(
                f"token endpoint sent an unusable response: {describe(exc)}", retriable=True
            ) from None
        if not isinstance(value, str) or not value:
            raise AuthError("token endpoint sent no access_token", retriable=True)
        if not math.isfinite(lifetime) or lifetime <= 0:
            raise AuthError("token endpoint sent an unusable expires_in", retriable=True)
        lifetime = min(lifetime, _MAX_LIFETIME_S)  # refreshed at least daily, whatever it says
        REDACTOR.add_token(value)
        log.info("token obtained", lifetime_s=lifetime)
        return Token(value, started + lifetime, lifetime)
